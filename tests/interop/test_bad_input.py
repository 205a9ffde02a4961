"""Bad input: truncated, corrupt and hostile images, wrong formats, missing backing files, bad options.

Each case must give a clear ``parablock: ...`` message on stderr, qemu-img's exit code, no traceback
(nor an "internal error", which is how our own bugs surface), no hang, and no changed byte in an image the
command was not asked to modify.
"""
from __future__ import annotations

import hashlib
import os
import random
import struct

import pytest

from engine.cli.main import main
from tests.util import needs_qemu, qemu_img, qemu_io


def _digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "internal error" not in err, err
    return rc, out, err


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "img.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4k", str(p), "4M")
    qemu_io("-c", "write -P 0x11 0 64k", "-c", "write -P 0x22 1M 12k", "-c", "write -c -P 0x33 2M 8k",
            "-c", "write -z 3M 8k", str(p))
    qemu_img("snapshot", "-c", "s1", str(p))
    qemu_io("-c", "write -P 0x44 0 4k", str(p))
    return p


READ_ONLY_COMMANDS = [
    ["info", "--output=json"],
    ["info", "--backing-chain"],
    ["map", "--output=json"],
    ["check", "--output=json"],
    ["io", "-r", "-c", "read 0 4M"],
    ["snapshot", "-l"],
]


@needs_qemu
@pytest.mark.parametrize("cut", [0, 7, 71, 104, 4096, 8192, 12288, 20000])
def test_truncated_image(capsys, image, cut):
    data = image.read_bytes()
    image.write_bytes(data[:cut])
    before = _digest(image)
    for cmd in READ_ONLY_COMMANDS:
        rc, _out, err = run_cli(capsys, *cmd, str(image))
        assert rc in (0, 1, 2, 3, 63), (cmd, rc, err)
        if rc == 1:
            # qemu-io reports failed commands on stdout ("read failed: ..."), everything else on stderr
            assert err.startswith("parablock: ") or (cmd[0] == "io" and "failed" in _out), (cmd, err, _out)
    assert _digest(image) == before


@needs_qemu
@pytest.mark.parametrize("seed", range(24))
def test_random_metadata_corruption(capsys, image, seed):
    rng = random.Random(seed)
    data = bytearray(image.read_bytes())
    cs = 4096
    # metadata lives in the first few clusters (header, refcount table, refblock, L1, L2s, snapshot table)
    for _ in range(rng.randint(1, 6)):
        region = rng.choice([0, cs, 2 * cs, 3 * cs, 4 * cs, 5 * cs, 6 * cs])
        off = region + rng.randrange(0, 512 if region == 0 else cs)
        if rng.random() < 0.5:
            data[off] = rng.randrange(256)
        else:
            struct.pack_into(">Q", data, off - off % 8, rng.getrandbits(64))
    image.write_bytes(bytes(data))
    before = _digest(image)
    for cmd in READ_ONLY_COMMANDS:
        rc, _out, err = run_cli(capsys, *cmd, str(image))
        assert rc in (0, 1, 2, 3, 63), (cmd, rc, err)  # 63: the header no longer probes as qcow2
    assert _digest(image) == before


@needs_qemu
def test_hostile_l1_size_and_table_offsets(capsys, image):
    data = bytearray(image.read_bytes())
    struct.pack_into(">I", data, 36, 0xFFFFFFFF)  # l1_size
    image.write_bytes(bytes(data))
    rc, _, err = run_cli(capsys, "info", str(image))
    assert rc == 1 and "L1" in err
    data = bytearray(image.read_bytes())
    struct.pack_into(">I", data, 36, 1)
    struct.pack_into(">Q", data, 40, 1 << 50)  # L1 far past EOF
    struct.pack_into(">Q", data, 48, 3 << 40)  # refcount table far past EOF
    image.write_bytes(bytes(data))
    before = _digest(image)
    for cmd in READ_ONLY_COMMANDS:
        rc, _, err = run_cli(capsys, *cmd, str(image))
        assert rc in (1, 2, 3), (cmd, err)
    assert _digest(image) == before


@needs_qemu
def test_backing_loop_is_refused(capsys, tmp_path):
    a = tmp_path / "a.qcow2"
    b = tmp_path / "b.qcow2"
    qemu_img("create", "-f", "qcow2", str(a), "1M")
    qemu_img("create", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", str(b))
    qemu_img("rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", str(a))
    for cmd in (["map"], ["io", "-r", "-c", "read 0 1"], ["info", "--backing-chain"]):
        rc, _, err = run_cli(capsys, *cmd, str(b))
        assert rc == 1 and ("loop" in err), err


@needs_qemu
def test_wrong_format_and_missing_files(capsys, tmp_path):
    raw = tmp_path / "r.raw"
    raw.write_bytes(b"\x01" * 65536)
    rc, _, err = run_cli(capsys, "info", "-f", "qcow2", str(raw))
    assert rc == 1 and "Image is not in qcow2 format" in err
    rc, _, err = run_cli(capsys, "info", str(tmp_path / "nope.qcow2"))
    assert rc == 1 and "No such file or directory" in err
    rc, _, err = run_cli(capsys, "info", "-f", "vmdk9", str(raw))
    assert rc == 1 and err.startswith("parablock: ")
    assert raw.read_bytes() == b"\x01" * 65536


@needs_qemu
def test_missing_backing_file(capsys, tmp_path):
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-u", "-b", "gone.qcow2", "-F", "qcow2", str(top), "1M")
    before = _digest(top)
    rc, out, _ = run_cli(capsys, "info", str(top))
    assert rc == 0 and "backing file: gone.qcow2" in out
    rc, _, err = run_cli(capsys, "map", str(top))
    assert rc == 1 and "Could not open backing file" in err and "gone.qcow2" in err
    rc, _, err = run_cli(capsys, "io", "-c", "write 0 4k", str(top))
    assert rc == 1
    assert _digest(top) == before


@pytest.mark.parametrize("args,needle", [
    (["create", "-f", "qcow2", "-o", "cluster_size=3000", "{d}/x.qcow2", "1M"], "Cluster size must be a power of two"),
    (["create", "-f", "qcow2", "-o", "refcount_bits=3", "{d}/x.qcow2", "1M"], "Refcount width must be a power of two"),
    (["create", "-f", "qcow2", "-o", "compat=0.10,lazy_refcounts=on", "{d}/x.qcow2", "1M"],
     "Lazy refcounts only supported with compatibility level 1.1"),
    (["create", "-f", "qcow2", "-o", "bogus=1", "{d}/x.qcow2", "1M"], "Invalid parameter 'bogus'"),
    (["create", "-f", "qcow2", "{d}/x.qcow2", "5X"], "Invalid image size specified"),
    (["create", "-f", "qcow2", "{d}/x.qcow2"], "Image creation needs a size parameter"),
    (["create", "-f", "qcow2", "-b", "base", "{d}/x.qcow2", "1M"], "Backing file specified without backing format"),
    (["info", "--output=xml", "{d}/x.qcow2"], "--output must be used with human or json"),
    (["info", "--bogus", "{d}/x.qcow2"], "No such option"),
    (["check", "-r", "some", "{d}/x.qcow2"], "Unknown option for -r"),
])
def test_bad_options(capsys, tmp_path, args, needle):
    rc, _, err = run_cli(capsys, *[a.format(d=tmp_path) for a in args])
    assert rc == 1
    assert needle in err
    assert err.startswith("parablock: ")
    assert not os.path.exists(tmp_path / "x.qcow2") or args[0] != "create"


@needs_qemu
def test_corrupt_bit_refuses_writes_and_keeps_bytes(capsys, image):
    data = bytearray(image.read_bytes())
    inc = struct.unpack_from(">Q", data, 72)[0]
    struct.pack_into(">Q", data, 72, inc | 2)
    image.write_bytes(bytes(data))
    before = _digest(image)
    rc, out, _ = run_cli(capsys, "info", "--output=json", str(image))
    assert rc == 0 and '"corrupt": true' in out
    for cmd in (["io", "-c", "write 0 4k"], ["resize", str(image), "8M"], ["snapshot", "-c", "x"],
                ["amend", "-o", "lazy_refcounts=on"]):
        args = cmd if cmd[0] == "resize" else [*cmd, str(image)]
        rc, _, err = run_cli(capsys, *args)
        assert rc == 1 and "corrupt" in err.lower(), (cmd, err)
    assert _digest(image) == before
