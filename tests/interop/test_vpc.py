"""VHD (vpc) images made by qemu-img 7.2 read back by parablock exactly: fixed and dynamic, CHS-rounded
and force_size sizes; data, `info` and `map` JSON byte for byte; hostile footers give one clear error."""
from __future__ import annotations

import struct

import pytest

from engine.cli.main import main
from tests.util import needs_qemu, qemu_img, qemu_io, read_all, run

pytestmark = needs_qemu


def _pb(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("opts,size,writes", [
    ([], "8M", [("0xab", "1M", "64k"), ("0xcd", "5M", "1M")]),          # CHS rounds 8 MiB to 8390656
    (["-o", "force_size=on"], "8M", [("0x34", "2M", "4k")]),          # creator qem2: the exact size
    (["-o", "subformat=fixed"], "3M", [("0x12", "100k", "4k")]),
    ([], "40M", [("0x56", "39M", "512")]),
])
def test_vpc_reads_like_qemu(tmp_path, capsys, opts, size, writes):
    img = tmp_path / "d.vhd"
    qemu_img("create", "-q", "-f", "vpc", *opts, str(img), size)
    cmds = []
    for pat, off, ln in writes:
        cmds += ["-c", f"write -P {pat} {off} {ln}"]
    qemu_io("-f", "vpc", *cmds, str(img))
    qemu_img("convert", "-f", "vpc", "-O", "raw", str(img), str(tmp_path / "q.raw"))
    assert read_all(img, "vpc") == (tmp_path / "q.raw").read_bytes()
    for cmd in (["info", "-f", "vpc", "--output=json"], ["map", "-f", "vpc", "--output=json"]):
        want = run(["qemu-img", *cmd, str(img)]).stdout
        rc, got, err = _pb(capsys, *cmd, str(img))
        assert rc == 0, err
        if cmd[0] == "info":
            want = "\n".join(ln for ln in want.splitlines() if "actual-size" not in ln)
            got = "\n".join(ln for ln in got.splitlines() if "actual-size" not in ln)
        assert got.strip() == want.strip()
    rc, _, err = _pb(capsys, "compare", "-f", "vpc", "-F", "raw", str(img), str(tmp_path / "q.raw"))
    assert rc == 0, err
    # a dynamic VHD is probed (its footer copy at offset 0); a fixed one reads as raw without -f, as in qemu-img
    rc, out, _ = _pb(capsys, "info", "--output=json", str(img))
    assert ('"format": "vpc"' in out) == ("subformat=fixed" not in opts)


@pytest.mark.parametrize("offset,fmt,value,text", [
    (64, ">I", 0x12345678, "Incorrect header checksum"),       # footer checksum
    (60, ">I", 4, "differencing"),                             # disk type: differencing
    (512 + 32, ">I", 1000, "block size 1000"),                 # dynamic header: block size
])
def test_hostile_vhd_footers(tmp_path, capsys, offset, fmt, value, text):
    img = tmp_path / "h.vhd"
    qemu_img("create", "-q", "-f", "vpc", str(img), "4M")
    b = bytearray(img.read_bytes())
    struct.pack_into(fmt, b, offset, value)
    if offset == 60:  # keep the footer checksum right so the type check is what fails
        b[64:68] = b"\0\0\0\0"
        struct.pack_into(">I", b, 64, (~sum(b[:512])) & 0xFFFFFFFF)
    img.write_bytes(bytes(b))
    before = img.read_bytes()
    rc, _, err = _pb(capsys, "info", "-f", "vpc", str(img))
    assert rc == 1 and len(err.splitlines()) == 1 and err.startswith("parablock: ") and text in err, err
    assert img.read_bytes() == before
