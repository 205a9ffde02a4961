"""Regression tests: minimal reproducers of the four reader bugs test_qcow2_reader_fuzz.py found (a NUL
in the backing name, a refcount-table entry and an L1 offset with bit 63, a backing-file offset past the
header cluster).  Each now ends with one clear error, as qemu-img does."""
from __future__ import annotations

import hashlib
import struct

from engine.cli.main import main
from tests.util import needs_qemu, qemu_img, qemu_io


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def clean(rc: int, err: str, ok: tuple[int, ...] = (0,)) -> bool:
    """A result, or one clear ``parablock:`` line with a non-zero exit; never our own bug."""
    if "internal error" in err or "Traceback" in err:
        return False
    return rc in ok or (rc != 0 and err.startswith("parablock: "))


def poke(path, fmt: str, off: int, *values: int) -> None:
    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, off, *values)
    path.write_bytes(bytes(data))


@needs_qemu
def test_backing_name_with_nul(capsys, tmp_path):
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), "1M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(top))
    poke(top, ">Q", 8, 1)  # backing_file_offset = 1: the name is b"FI\xfb\x00\x00\x00\x03..."
    digest = hashlib.sha256(top.read_bytes()).digest()
    for cmd in ("info", "map", "check"):
        rc, _, err = run_cli(capsys, cmd, str(top))
        assert clean(rc, err, (0, 2, 3)), (cmd, rc, err)
    assert hashlib.sha256(top.read_bytes()).digest() == digest


@needs_qemu
def test_refcount_table_entry_with_reserved_bit(capsys, tmp_path):
    img = tmp_path / "r.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", str(img), "1M")
    qemu_io("-c", "write -P 0x11 0 4k", str(img))
    rt = struct.unpack_from(">Q", img.read_bytes(), 48)[0]
    old = struct.unpack_from(">Q", img.read_bytes(), rt)[0]
    poke(img, ">Q", rt, old | 1 << 63)
    rc, _, err = run_cli(capsys, "map", "--output=json", str(img))
    assert clean(rc, err), err


@needs_qemu
def test_header_extension_walk_past_the_header_cluster(capsys, tmp_path):
    img = tmp_path / "h.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", str(img), "1M")
    poke(img, ">Q", 8, 1 << 40)                   # backing_file_offset far away
    poke(img, ">II", 112, 0x12345678, 0x2000)     # an unknown extension 8 KiB long, past the cluster
    rc, _, err = run_cli(capsys, "info", str(img))
    assert clean(rc, err), err


@needs_qemu
def test_l1_table_offset_with_bit_63(capsys, tmp_path):
    img = tmp_path / "l1.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", str(img), "1M")
    poke(img, ">Q", 40, 1 << 63)
    rc, _, err = run_cli(capsys, "info", str(img))
    assert clean(rc, err), err
