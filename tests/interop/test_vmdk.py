"""VMDK with qemu-img 7.2 as the oracle: every subformat qemu-img makes (monolithicSparse/Flat,
twoGbMaxExtentSparse/Flat, streamOptimized) is read back exactly, with `info`/`map` JSON byte for byte;
what parablock writes (convert, create, qemu-io style writes, COW over a parent) is byte for byte the file
qemu-img/qemu-io write (the random CID aside); VMware's footer-style streams and VMFS sparse (COWD) files
read like qemu reads them; hostile headers and descriptors give one clear error line."""
from __future__ import annotations

import json
import re
import shutil
import struct
import tracemalloc
import zlib
from pathlib import Path

import pytest

from engine.cli.main import main
from engine.errors import BlockError
from tests.util import needs_qemu, open_node, qemu_img, qemu_io, read_all, run

pytestmark = needs_qemu
MiB = 1 << 20
SUBFORMATS = ["monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat",
              "streamOptimized"]
DESC_SIZE = 20 * 512


def _pb(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def _image_files(img: Path) -> list[Path]:
    """The image file and, for descriptor-based subformats, its extent files (named like qemu-img's)."""
    stem = img.stem
    return sorted(p for p in img.parent.iterdir() if p.name == img.name or p.name.startswith(stem + "-"))


def _normalized(path: Path, stem: str) -> bytes:
    """A vmdk file with its CID value masked and the image's own name (``stem``) replaced in the
    descriptor text (up to its NUL); for a sparse file every byte outside the descriptor area too."""
    data = path.read_bytes()

    def mask(text: bytes) -> bytes:
        text = re.sub(rb"(?m)^(parent)?CID=[0-9a-f]+$", rb"\1CID=?", text.split(b"\0", 1)[0])
        return text.replace(stem.encode(), b"X")

    if data[:4] == b"KDMV":
        return data[:512] + mask(data[512:512 + DESC_SIZE]) + b"|" + data[512 + DESC_SIZE:]
    if b"# Disk DescriptorFile" in data[:64]:
        return mask(data)
    return data


def _assert_same_files(ours: Path, theirs: Path) -> None:
    a, b = _image_files(ours), _image_files(theirs)
    assert [p.name.replace(ours.stem, "X") for p in a] == [p.name.replace(theirs.stem, "X") for p in b]
    for pa, pb in zip(a, b):
        assert _normalized(pa, ours.stem) == _normalized(pb, theirs.stem), \
            f"{pa.name} differs from qemu's {pb.name}"


def _assert_json_like_qemu(capsys, cmd: list[str], img: Path) -> None:
    want = run(["qemu-img", *cmd, str(img)]).stdout
    rc, got, err = _pb(capsys, *cmd, str(img))
    assert rc == 0, err
    if cmd[0] == "info":  # disk usage may differ by a host file system block
        want = "\n".join(ln for ln in want.splitlines() if "actual-size" not in ln)
        got = "\n".join(ln for ln in got.splitlines() if "actual-size" not in ln)
    assert got.strip() == want.strip()


def _pattern_raw(path: Path, size: int) -> bytes:
    rnd = bytes(range(256)) * 1024
    data = bytearray(size)
    data[64 * 1024:128 * 1024] = b"\xab" * 65536                 # one whole grain
    data[1000 * 1024:1003 * 1024] = b"\xcd" * 3072              # part of a grain
    data[3 * MiB:3 * MiB + 200000] = rnd[:200000]               # several grains, the last one partial
    data[size - 65536:size - 60000] = b"\x11" * 5536            # near the end
    path.write_bytes(bytes(data))
    return bytes(data)


# qemu-io writes: whole grains, a partial grain, zero writes (aligned and not), data near the end
_WRITES = ["write -P 0xab 64k 64k", "write -P 0xcd 1000k 3k", "write -z 2M 128k", "write -z 3M 100k",
           "write -P 0x11 8126464 64k", "write -P 0x22 1040k 2k", "write -z 4M 64k", "write -P 5 4M 1k",
           "write -P 6 0 64k", "write -P 7 64k 64k"]
# streamOptimized takes whole grains only, once each; rewrites and partial writes fail
_STREAM_WRITES = ["write -P 0xab 64k 64k", "write -z 2M 128k", "write -P 0x11 8126464 64k",
                  "write -P 0x22 1040k 2k", "write -P 7 64k 64k", "write -P 6 0 64k"]


def _cmds(sub: str) -> list[str]:
    out: list[str] = []
    for c in (_STREAM_WRITES if sub == "streamOptimized" else _WRITES):
        out += ["-c", c]
    return out


@pytest.mark.parametrize("sub,opts", [(s, []) for s in SUBFORMATS]
                         + [("monolithicSparse", ["-o", "zeroed_grain=on,adapter_type=lsilogic"])])
def test_reads_like_qemu(tmp_path, capsys, sub, opts):
    img = tmp_path / "d.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-o", f"subformat={sub}", *opts, str(img), "8M")
    qemu_io("-f", "vmdk", *_cmds(sub), str(img), check=False)
    qraw = tmp_path / "q.raw"
    qemu_img("convert", "-f", "vmdk", "-O", "raw", str(img), str(qraw))
    assert read_all(img) == qraw.read_bytes()
    for cmd in (["info", "--output=json"], ["map", "--output=json"]):
        _assert_json_like_qemu(capsys, cmd, img)
    rc, _, err = _pb(capsys, "convert", "-O", "raw", str(img), str(tmp_path / "p.raw"))
    assert rc == 0, err
    assert (tmp_path / "p.raw").read_bytes() == qraw.read_bytes()
    rc, _, err = _pb(capsys, "convert", "-O", "qcow2", str(img), str(tmp_path / "p.qcow2"))
    assert rc == 0, err
    q = qemu_img("compare", "-f", "raw", "-F", "qcow2", str(qraw), str(tmp_path / "p.qcow2"), check=False)
    assert q.returncode == 0, q.stdout


@pytest.mark.parametrize("sub", SUBFORMATS)
def test_convert_writes_what_qemu_img_writes(tmp_path, capsys, sub):
    raw = tmp_path / "src.raw"
    _pattern_raw(raw, 8 * MiB)
    (tmp_path / "q").mkdir()
    (tmp_path / "p").mkdir()
    theirs, ours = tmp_path / "q" / "qi.vmdk", tmp_path / "p" / "pi.vmdk"
    qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", f"subformat={sub}", str(raw), str(theirs))
    rc, _, err = _pb(capsys, "convert", "-f", "raw", "-O", "vmdk", "-o", f"subformat={sub}", str(raw),
                     str(ours))
    assert rc == 0, err
    assert qemu_img("compare", "-f", "raw", "-F", "vmdk", str(raw), str(ours)).returncode == 0
    assert run(["qemu-img", "check", "-f", "vmdk", str(ours)], check=False).returncode == 0
    _assert_same_files(ours, theirs)


@pytest.mark.parametrize("sub,opts", [(s, []) for s in SUBFORMATS] + [
    ("monolithicSparse", ["-o", "zeroed_grain=on,compat6=on"]),
    ("streamOptimized", ["-o", "adapter_type=buslogic,hwversion=10,toolsversion=99"]),
])
def test_create_and_io_write_like_qemu(tmp_path, capsys, sub, opts):
    """parablock create gives qemu-img's files; the same write commands through qemu-io and parablock io
    leave the same bytes (grain allocation, zero grains, streamOptimized appends and refusals)."""
    (tmp_path / "q").mkdir()
    (tmp_path / "p").mkdir()
    theirs, ours = tmp_path / "q" / "qi.vmdk", tmp_path / "p" / "pi.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-o", f"subformat={sub}", *opts, str(theirs), "8M")
    rc, _, err = _pb(capsys, "create", "-q", "-f", "vmdk", "-o", f"subformat={sub}", *opts, str(ours), "8M")
    assert rc == 0, err
    _assert_same_files(ours, theirs)
    qio = qemu_io("-f", "vmdk", *_cmds(sub), str(theirs), check=False)
    rc, out, err = _pb(capsys, "io", "-f", "vmdk", *_cmds(sub), str(ours))
    assert (rc != 0) == (qio.returncode != 0)
    strip = re.compile(r".*ops/sec.*\n")
    assert strip.sub("", out) == strip.sub("", qio.stdout)
    _assert_same_files(ours, theirs)
    # and qemu-io keeps writing into what parablock wrote
    if sub != "streamOptimized":
        qemu_io("-f", "vmdk", "-c", "write -P 0x99 6M 70k", str(ours))
        qemu_io("-f", "vmdk", "-c", "write -P 0x99 6M 70k", str(theirs))
    assert qemu_img("compare", "-f", "vmdk", "-F", "vmdk", str(ours), str(theirs)).returncode == 0
    assert run(["qemu-img", "check", "-f", "vmdk", str(ours)], check=False).returncode == 0


@pytest.mark.parametrize("sub", ["twoGbMaxExtentSparse", "twoGbMaxExtentFlat"])
def test_split_extents_across_2g_boundaries(tmp_path, capsys, sub):
    """5 GiB split into three extents named and sized like qemu-img's; a write straddling each boundary
    (made by qemu-io) reads back through parablock, and map/info agree with qemu-img."""
    (tmp_path / "q").mkdir()
    (tmp_path / "p").mkdir()
    theirs, ours = tmp_path / "q" / "qi.vmdk", tmp_path / "p" / "pi.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-o", f"subformat={sub}", str(theirs), "5G")
    rc, _, err = _pb(capsys, "create", "-q", "-f", "vmdk", "-o", f"subformat={sub}", str(ours), "5G")
    assert rc == 0, err
    def extents(img: Path) -> list[tuple[str, int]]:  # (the descriptor's size follows its random CID)
        return [(p.name[2:], p.stat().st_size) for p in _image_files(img) if p != img]

    assert extents(ours) == extents(theirs) and len(extents(ours)) == 3
    if sub.endswith("Sparse"):
        _assert_same_files(ours, theirs)
    else:
        assert _normalized(ours, "pi") == _normalized(theirs, "qi")
    qemu_io("-f", "vmdk", "-c", "write -P 0x61 2047M 2M", "-c", "write -P 0x62 4095M 2M", str(ours))
    reads = ["read -P 0x61 2047M 2M", "read -P 0x62 4095M 2M", "read -P 0 4097M 1M", "read -P 0 0 1M"]
    rc, out, err = _pb(capsys, "io", "-f", "vmdk", *[x for r in reads for x in ("-c", r)], str(ours))
    assert rc == 0 and "Pattern verification failed" not in out, out + err
    for cmd in (["info", "--output=json"], ["map", "--output=json"]):
        _assert_json_like_qemu(capsys, cmd, ours)
    node = open_node(ours)
    try:
        assert node.check() == ([], 0)
    finally:
        node.close()


def test_stream_optimized_refuses_rewrites(tmp_path, capsys):
    img = tmp_path / "s.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=streamOptimized", str(img), "4M")
    node = open_node(img, "vmdk", read_only=False)
    try:
        node.write(65536, b"\x42" * 65536)
        with pytest.raises(BlockError, match="Could not write to allocated cluster for streamOptimized") \
                as rew:
            node.write(65536, b"\x43" * 65536)
        assert rew.value.errno == 5 and getattr(rew.value, "error_report", False)  # qemu-io prints it
        with pytest.raises(BlockError) as exc:
            node.write(4096, b"\x44" * 4096)  # part of an unallocated grain
        assert exc.value.errno == 22
        node.write(4 * MiB - 65536, b"\x45" * 65536)
    finally:
        node.close()
    rc, out, _ = _pb(capsys, "io", "-f", "vmdk", "-c", "write -P 1 64k 64k", str(img))
    assert rc == 1 and "write failed: Input/output error" in out
    qraw = tmp_path / "q.raw"
    qemu_img("convert", "-f", "vmdk", "-O", "raw", str(img), str(qraw))
    want = bytearray(4 * MiB)
    want[65536:131072] = b"\x42" * 65536
    want[-65536:] = b"\x45" * 65536
    assert qraw.read_bytes() == bytes(want)


def _vmware_stream(path: Path, data: bytes, grain: int = 65536) -> None:
    """A streamOptimized file as VMware writes it: gdOffset = GD_AT_END in the header, grains as markers
    plus zlib streams, grain tables and the directory after their markers, then footer marker, header
    copy (with the real directory offset) and end-of-stream marker.  Grain tables without any grain are
    left out (directory entry 0)."""
    cap, gsec = len(data) // 512, grain // 512
    out = bytearray()

    def pad() -> None:
        out.extend(bytes(-len(out) % 512))

    def header(gd_offset: int) -> bytes:
        return struct.pack("<4sIIQQQQIQQQB4sH", b"KDMV", 3, 0x30001, cap, gsec, 1, 2, 512, 0, gd_offset, 3, 0,
                           b"\n \r\n", 1).ljust(512, b"\0")

    def marker(val: int, mtype: int) -> bytes:
        return struct.pack("<QII", val, 0, mtype).ljust(512, b"\0")

    desc = (b'# Disk DescriptorFile\nversion=1\nCID=7a3b9c01\nparentCID=ffffffff\n'
            b'createType="streamOptimized"\n'
            b'\n# Extent description\nRW %d SPARSE "vm.vmdk"\n\n# The Disk Data Base\n#DDB\n\n'
            b'ddb.adapterType = "lsilogic"\n' % cap)
    out += header(0xFFFFFFFFFFFFFFFF) + desc.ljust(1024, b"\0")
    ngrains = -(-cap // gsec)
    tables = [[0] * 512 for _ in range(-(-ngrains // 512))]
    for g in range(ngrains):
        chunk = data[g * grain:(g + 1) * grain]
        if not any(chunk):
            continue
        tables[g // 512][g % 512] = len(out) // 512
        comp = zlib.compress(chunk)
        out += struct.pack("<QI", g * gsec, len(comp)) + comp
        pad()
    gd = []
    for t in tables:
        if not any(t):
            gd.append(0)
            continue
        out += marker(4, 1)
        gd.append(len(out) // 512)
        out += struct.pack("<512I", *t)
    out += marker(-(-len(gd) * 4 // 512), 2)
    gd_at = len(out) // 512
    out += struct.pack(f"<{len(gd)}I", *gd)
    pad()
    out += marker(1, 3) + header(gd_at) + marker(0, 0)
    path.write_bytes(bytes(out))


def test_vmware_stream_with_footer(tmp_path, capsys):
    size = 72 * MiB + 12 * 1024  # three grain tables, the middle one empty; a short last grain
    data = bytearray(size)
    data[0:70000] = bytes(range(250)) * 280
    data[5 * MiB:5 * MiB + 4096] = b"\x5a" * 4096
    data[size - 10000:] = b"\x6b" * 10000
    img = tmp_path / "vm.vmdk"
    _vmware_stream(img, bytes(data))
    qraw = tmp_path / "q.raw"
    qemu_img("convert", "-f", "vmdk", "-O", "raw", str(img), str(qraw))
    assert qraw.read_bytes() == bytes(data)  # the crafted file is what qemu-img thinks it is
    assert read_all(img) == bytes(data)
    for cmd in (["info", "--output=json"], ["map", "--output=json"]):
        _assert_json_like_qemu(capsys, cmd, img)
    rc, _, err = _pb(capsys, "convert", "-O", "raw", str(img), str(tmp_path / "p.raw"))
    assert rc == 0, err
    assert (tmp_path / "p.raw").read_bytes() == bytes(data)
    # appending grains, one of them where the directory has no grain table yet: qemu reads them back
    node = open_node(img, "vmdk", read_only=False)
    try:
        node.write(40 * MiB, b"\x7c" * 65536)
        node.write(10 * MiB, b"\x7d" * 65536)
    finally:
        node.close()
    data[40 * MiB:40 * MiB + 65536] = b"\x7c" * 65536
    data[10 * MiB:10 * MiB + 65536] = b"\x7d" * 65536
    qemu_img("convert", "-f", "vmdk", "-O", "raw", str(img), str(qraw))
    assert qraw.read_bytes() == bytes(data)
    # without its footer the file is refused as qemu refuses it
    img.write_bytes(img.read_bytes()[:-1536])
    rc, _, err = _pb(capsys, "info", str(img))
    assert rc == 1 and err.strip() == f"parablock: Could not open '{img}': Invalid footer"


def test_write_where_the_directory_names_no_table(tmp_path):
    """Directory and redundant directory entry 1 cleared: a write there appends a grain table for each
    (QEMU would lose the write); qemu-img reads the data back and finds the image clean."""
    img = tmp_path / "d.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", str(img), "64M")
    b = bytearray(img.read_bytes())
    rgd, gd = struct.unpack_from("<QQ", b, 48)
    struct.pack_into("<I", b, rgd * 512 + 4, 0)
    struct.pack_into("<I", b, gd * 512 + 4, 0)
    img.write_bytes(bytes(b))
    node = open_node(img, "vmdk", read_only=False)
    try:
        node.write(40 * MiB + 4096, b"\x3c" * 8192)
        node.write_zeroes(50 * MiB, 65536)
    finally:
        node.close()
    want = bytearray(64 * MiB)
    want[40 * MiB + 4096:40 * MiB + 12288] = b"\x3c" * 8192
    qemu_img("convert", "-f", "vmdk", "-O", "raw", str(img), str(tmp_path / "q.raw"))
    assert (tmp_path / "q.raw").read_bytes() == bytes(want)
    assert run(["qemu-img", "check", str(img)], check=False).returncode == 0
    b = img.read_bytes()
    assert struct.unpack_from("<I", b, rgd * 512 + 4)[0] and struct.unpack_from("<I", b, gd * 512 + 4)[0]


def test_parent_chain_reads_and_cow_like_qemu(tmp_path, capsys):
    for d in ("q", "p"):
        (tmp_path / d).mkdir()
        base, top = tmp_path / d / "base.vmdk", tmp_path / d / "top.vmdk"
        qemu_img("create", "-q", "-f", "vmdk", str(base), "8M")
        qemu_io("-f", "vmdk", "-c", "write -P 0x33 0 1M", "-c", "write -P 0x44 5M 100k", str(base))
        qemu_img("create", "-q", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", str(top))
        qemu_io("-f", "vmdk", "-c", "write -P 0x55 512k 4k", str(top))
    top = tmp_path / "p" / "top.vmdk"
    qraw = tmp_path / "q.raw"
    qemu_img("convert", "-f", "vmdk", "-O", "raw", str(top), str(qraw))
    assert read_all(top) == qraw.read_bytes()
    for cmd in (["info", "--output=json"], ["map", "--output=json"],
                ["info", "--backing-chain", "--output=json"]):
        _assert_json_like_qemu(capsys, cmd, top)
    cmds = ["-c", "write -P 0x66 1000k 3k", "-c", "write -z 5M 64k", "-c", "write -P 1 5200k 1k"]
    qemu_io("-f", "vmdk", *cmds, str(tmp_path / "q" / "top.vmdk"))
    rc, _, err = _pb(capsys, "io", "-f", "vmdk", *cmds, str(top))
    assert rc == 0, err
    _assert_same_files(top, tmp_path / "q" / "top.vmdk")
    # creating an overlay through the driver: qemu-img reads it through the chain
    from engine.image import create_image
    from workers.inproc import InProcessExecutor

    create_image(str(tmp_path / "p" / "new.vmdk"), "vmdk", 8 * MiB, InProcessExecutor(),
                 {"backing_file": "top.vmdk", "backing_fmt": "vmdk"})
    info = json.loads(qemu_img("info", "--output=json", str(tmp_path / "p" / "new.vmdk")).stdout)
    assert info["backing-filename"] == "top.vmdk" and info["backing-filename-format"] == "vmdk"
    assert info["format-specific"]["data"]["parent-cid"] == \
        json.loads(qemu_img("info", "--output=json", str(top)).stdout)["format-specific"]["data"]["cid"]
    assert qemu_img("compare", str(top), str(tmp_path / "p" / "new.vmdk")).returncode == 0
    with pytest.raises(BlockError, match="Flat image can't have backing file"):
        create_image(str(tmp_path / "p" / "f.vmdk"), "vmdk", MiB, InProcessExecutor(),
                     {"backing_file": "top.vmdk", "subformat": "monolithicFlat"})


def test_cli_overlay_create_and_convert_with_backing(tmp_path, capsys):
    base = tmp_path / "base.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", str(base), "8M")
    qemu_io("-f", "vmdk", "-c", "write -P 0x33 0 1M", str(base))
    (tmp_path / "q").mkdir()
    (tmp_path / "p").mkdir()
    qemu_img("create", "-q", "-f", "vmdk", "-b", "../base.vmdk", "-F", "vmdk",
             str(tmp_path / "q" / "qi.vmdk"))
    rc, _, err = _pb(capsys, "create", "-q", "-f", "vmdk", "-b", "../base.vmdk", "-F", "vmdk",
                     str(tmp_path / "p" / "pi.vmdk"))
    assert rc == 0, err
    _assert_same_files(tmp_path / "p" / "pi.vmdk", tmp_path / "q" / "qi.vmdk")
    src = tmp_path / "src.vmdk"
    shutil.copy(base, src)
    qemu_io("-f", "vmdk", "-c", "write -P 0x44 512k 4k", "-c", "write -P 0x45 3M 64k", str(src))
    out = tmp_path / "p" / "conv.vmdk"
    rc, _, err = _pb(capsys, "convert", "-O", "vmdk", "-B", "../base.vmdk", "-F", "vmdk", str(src), str(out))
    assert rc == 0, err
    assert qemu_img("compare", str(src), str(out)).returncode == 0
    info = json.loads(qemu_img("info", "--output=json", str(out)).stdout)
    assert info["backing-filename"] == "../base.vmdk"
    assert run(["qemu-img", "check", str(out)], check=False).returncode == 0


def test_vmfs_sparse_cowd_and_ignored_extent_lines(tmp_path, capsys):
    # a VMFS sparse (COWD) file: 4 KiB grains, 4096 entries per table
    img = bytearray(40 * 512)
    struct.pack_into("<4s10I", img, 0, b"COWD", 1, 3, 4096, 8, 4, 1, 0, 0, 0, 0)
    text = b'# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType="vmfsSparse"\n'
    img[512:512 + len(text)] = text
    struct.pack_into("<I", img, 4 * 512, 8)  # directory entry 0: the table at sector 8
    struct.pack_into("<I", img, 8 * 512 + 3 * 4, 40)  # grain 3 at sector 40
    img += b"\x77" * 4096
    cowd = tmp_path / "c.vmdk"
    cowd.write_bytes(bytes(img))
    assert read_all(cowd) == bytes(12288) + b"\x77" * 4096 + bytes(2 * MiB - 16384)
    for cmd in (["info", "--output=json"], ["map", "--output=json"]):
        _assert_json_like_qemu(capsys, cmd, cowd)
    # qemu 7.2 skips extent lines it does not take (ZERO, other access modes): so do we
    (tmp_path / "f.img").write_bytes(b"\x11" * MiB)
    desc = tmp_path / "z.vmdk"
    desc.write_text('# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\n'
                    'createType="monolithicFlat"\n'
                    'RW 100 ZERO\nRDONLY 2048 FLAT "f.img" 0\nRW 1024 FLAT "f.img" 1024\n')
    for cmd in (["info", "--output=json"], ["map", "--output=json"]):
        _assert_json_like_qemu(capsys, cmd, desc)
    assert read_all(desc) == b"\x11" * (512 * 1024)


def _sparse_header(tmp_path: Path) -> Path:
    img = tmp_path / "h.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", str(img), "4M")
    return img


def _poke(offset: int, fmt: str, value: int):
    def f(img: Path) -> None:
        b = bytearray(img.read_bytes())
        struct.pack_into(fmt, b, offset, value)
        img.write_bytes(bytes(b))
    return f


def _desc(text: str):
    def f(img: Path) -> None:
        img.write_text(text)
    return f


_D = '# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\ncreateType="monolithicFlat"\n'


@pytest.mark.parametrize("name,corrupt,text", [
    ("grain size", _poke(20, "<Q", 0x400000), "Invalid granularity, image may be corrupt"),
    ("grain size 0", _poke(20, "<Q", 0), "L1 entry size is invalid"),
    ("table size", _poke(44, "<I", 1024), "L2 table size too big"),
    ("huge directory", _poke(12, "<Q", 3 << 40), "L1 size too big"),
    ("version", _poke(4, "<I", 4), "Unsupported VMDK version 4"),
    ("overhead", _poke(64, "<Q", 1 << 30), "File truncated, expecting at least 549755813888 bytes"),
    ("footer missing", _poke(56, "<Q", 0xFFFFFFFFFFFFFFFF), "Invalid footer"),
    ("descriptor garbage", _desc("# Disk DescriptorFile\nversion=1\nfoo bar\n"),
     "invalid VMDK image descriptor"),
    ("extent missing", _desc(_D + 'RW 100 FLAT "nothere.img" 0\n'),
     "nothere.img': No such file or directory"),
    ("extent line", _desc(_D + 'RW 100 FLAT "nothere.img"\n'),
     'Invalid extent line: RW 100 FLAT "nothere.img"'),
    ("no CID", _desc(_D.replace("CID=1\nparentCID=ffffffff\n", "") + 'RW 8 FLAT "h.vmdk" 0\n'),
     "Invalid argument"),
    ("create type", _desc(_D.replace("monolithicFlat", "streamOptimized") + 'RW 8 FLAT "h.vmdk" 0\n'),
     "Unsupported image type 'streamOptimized'"),
    ("sparse extent", _desc(_D.replace("monolithicFlat", "twoGbMaxExtentSparse") + 'RW 8 SPARSE "h.vmdk"\n'),
     "Image not in VMDK format"),
    ("no extent", _desc(_D), "no usable extent"),
])
def test_hostile_input_one_clear_error(tmp_path, capsys, name, corrupt, text):
    img = _sparse_header(tmp_path)
    corrupt(img)
    before = img.read_bytes()
    rc, _, err = _pb(capsys, "info", str(img))
    assert rc == 1 and len(err.splitlines()) == 1, err
    assert err.startswith(f"parablock: Could not open '{img}': "), err
    assert text in err, err
    assert img.read_bytes() == before
    if name != "no extent":  # (qemu-img 7.2 asserts on a descriptor without extents)
        q = run(["qemu-img", "info", str(img)], check=False)
        assert q.returncode == 1
        assert err.split(": ", 1)[1].replace(str(tmp_path) + "/", "") == q.stderr.split(": ", 1)[1].replace(
            str(tmp_path) + "/", ""), (err, q.stderr)


def test_claimed_tables_are_bounded_by_the_file(tmp_path, capsys):
    """A header claiming a 2^40-sector disk (a 64 MiB directory) and tables past the end of the file: the
    image opens as in qemu-img, reads zeros there, and nothing near the claimed size is allocated."""
    img = _sparse_header(tmp_path)
    _poke(12, "<Q", 1 << 40)(img)
    _poke(27 * 512, "<I", 0xFFFFFFF0)(img)  # grain 0 far past the end of the file
    tracemalloc.start()
    try:
        node = open_node(img)
        try:
            assert node.size() == 1 << 49
            assert node.read(0, 65536) == bytes(65536)
        finally:
            node.close()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * MiB
    want = json.loads(qemu_img("info", "--output=json", str(img)).stdout)
    rc, out, err = _pb(capsys, "info", "--output=json", str(img))
    assert rc == 0, err
    got = json.loads(out)
    assert got["virtual-size"] == want["virtual-size"] and got["format-specific"] == want["format-specific"]
    # qemu-img check's finding, from the driver's check
    node = open_node(img)
    try:
        messages, err_no = node.check()
    finally:
        node.close()
    q = run(["qemu-img", "check", str(img)], check=False)
    assert q.returncode == 1 and err_no == 22 and messages[0] in q.stderr


def test_mutated_images_fail_cleanly(tmp_path):
    """Random byte changes in headers, descriptors, directories, tables and grains: opening, reading,
    walking block status, checking and writing end normally or with a BlockError, never anything else,
    and quickly."""
    import random
    import time

    seeds = {}
    for sub in ("monolithicSparse", "streamOptimized"):
        img = tmp_path / f"{sub}.vmdk"
        qemu_img("create", "-q", "-f", "vmdk", "-o", f"subformat={sub}", str(img), "4M")
        qemu_io("-f", "vmdk", "-c", "write -P 1 0 128k", "-c", "write -P 2 3M 64k", str(img))
        seeds[sub] = img.read_bytes()
    rng = random.Random(20240607)
    victim = tmp_path / "m.vmdk"
    for _ in range(150):
        b = bytearray(seeds[rng.choice(sorted(seeds))])
        for _ in range(rng.randint(1, 6)):
            lo, hi = rng.choice([(0, 80), (512, 1200), (21 * 512, 23 * 512), (26 * 512, 28 * 512),
                                 (65536, 65536 + 600), (0, len(b))])
            b[rng.randrange(lo, min(hi, len(b)))] = rng.choice([rng.randrange(256), 0, 0xFF, 1, 0x80])
        victim.write_bytes(bytes(b))
        start = time.monotonic()
        try:
            node = open_node(victim, "vmdk")
            try:
                size = node.size()
                if size <= 64 * MiB:
                    node.read(0, size)
                off, calls = 0, 0
                while off < size and calls < 2000:
                    off += node.block_status(off, size - off).length
                    calls += 1
                node.check()
            finally:
                node.close()
            node = open_node(victim, "vmdk", read_only=False)
            try:
                for off in (0, 65536, node.size() - 65536):
                    if 0 <= off < node.size():
                        try:
                            node.write(off, b"\x5a" * min(65536, node.size() - off))
                        except BlockError:
                            pass
            finally:
                node.close()
        except BlockError:
            pass
        assert time.monotonic() - start < 5


@pytest.mark.parametrize("opts,text", [
    ("subformat=foo", "invalid parameter value: foo"),
    ("adapter_type=scsi", "invalid parameter value: scsi"),
    ("compat6=on,hwversion=7", "compat6 cannot be enabled with hwversion set"),
    ("subformat=monolithicFlat,zeroed_grain=on", "Flat image can't enable zeroed grain"),
])
def test_create_refuses_like_qemu_img(tmp_path, capsys, opts, text):
    img = tmp_path / "c.vmdk"
    rc, _, err = _pb(capsys, "create", "-q", "-f", "vmdk", "-o", opts, str(img), "1M")
    q = run(["qemu-img", "create", "-q", "-f", "vmdk", "-o", opts, str(tmp_path / "q.vmdk"), "1M"],
            check=False)
    assert rc == 1 and q.returncode == 1
    assert err.strip() == f"parablock: {img}: {text}"
    assert text in q.stderr
    assert not img.exists()


def test_probe_descriptor_and_sparse(tmp_path):
    from engine.driver import probe_format

    assert probe_format(b"KDMV" + bytes(508), "x") == "vmdk"
    assert probe_format(b"# Disk DescriptorFile\n# more\n   \nversion=1\nCID=1\n", "x") == "vmdk"
    assert probe_format(b"\nversion=1\n", "x") == "raw"  # an empty line before version= is not a descriptor
    assert probe_format(b"# Disk DescriptorFile\nCID=1\n", "x") == "raw"
    img = tmp_path / "m.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", str(img), "1M")
    node = open_node(img)
    try:
        assert node.format_name == "vmdk" and node.cluster_size() is None
    finally:
        node.close()
