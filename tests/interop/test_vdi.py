"""VDI images made by qemu-img 7.2 (dynamic and static) read back by parablock exactly: data, and
`info`/`map` JSON byte for byte; hostile VDI headers give one clear error."""
from __future__ import annotations

import struct

import pytest

from engine.cli.main import main
from tests.util import needs_qemu, qemu_img, qemu_io, read_all, run

pytestmark = needs_qemu
MiB = 1 << 20


def _pb(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("kind,size,writes", [
    ("dynamic", "8M", [("0xab", "1M", "64k"), ("0xcd", "5M", "1M")]),
    ("dynamic", "5243392", [("0x11", "0", "4k"), ("0x22", "4M", "512")]),  # 5 MiB + 512: a partial block
    ("static", "3M", [("0x33", "2M", "128k")]),
    ("dynamic", "64M", []),
])
def test_vdi_reads_like_qemu(tmp_path, capsys, kind, size, writes):
    img = tmp_path / "d.vdi"
    qemu_img("create", "-q", "-f", "vdi", *(["-o", "static=on"] if kind == "static" else []), str(img), size)
    cmds = []
    for pat, off, ln in writes:
        cmds += ["-c", f"write -P {pat} {off} {ln}"]
    if cmds:
        qemu_io("-f", "vdi", *cmds, str(img))
    qemu_img("convert", "-f", "vdi", "-O", "raw", str(img), str(tmp_path / "q.raw"))
    assert read_all(img) == (tmp_path / "q.raw").read_bytes()
    for cmd in (["info", "--output=json"], ["map", "--output=json"]):
        want = run(["qemu-img", *cmd, str(img)]).stdout
        rc, got, err = _pb(capsys, *cmd, str(img))
        assert rc == 0, err
        if cmd[0] == "info":  # the disk usage may differ by a block of the host file system
            want = "\n".join(ln for ln in want.splitlines() if "actual-size" not in ln)
            got = "\n".join(ln for ln in got.splitlines() if "actual-size" not in ln)
        assert got.strip() == want.strip()
    rc, _, err = _pb(capsys, "compare", "-f", "vdi", "-F", "raw", str(img), str(tmp_path / "q.raw"))
    assert rc == 0, err
    rc, _, err = _pb(capsys, "convert", "-f", "vdi", "-O", "qcow2", str(img), str(tmp_path / "o.qcow2"))
    assert rc == 0, err
    assert qemu_img("compare", "-f", "vdi", "-F", "qcow2", str(img), str(tmp_path / "o.qcow2")).returncode == 0


@pytest.mark.parametrize("field,offset,value,text", [
    ("block size", 376, 65536, "block size 65536 is not 1048576"),
    ("sector size", 360, 4096, "sector size 4096 is not 512"),
    ("version", 68, 0x00020000, "unsupported VDI image (version 2.0)"),
    ("map entry", 512, 1000, "out of range"),
    ("disk size", 368, 1 << 40, "image bitmap has room for"),
])
def test_hostile_vdi_headers(tmp_path, capsys, field, offset, value, text):
    img = tmp_path / "h.vdi"
    qemu_img("create", "-q", "-f", "vdi", str(img), "4M")
    b = bytearray(img.read_bytes())
    struct.pack_into("<Q" if field == "disk size" else "<I", b, offset, value)
    img.write_bytes(bytes(b))
    before = img.read_bytes()
    rc, _, err = _pb(capsys, "info", str(img))
    assert rc == 1 and len(err.splitlines()) == 1 and err.startswith("parablock: ") and text in err, err
    assert img.read_bytes() == before
