"""VHD (vpc) images made by qemu-img 7.2 read back by parablock exactly: fixed and dynamic, CHS-rounded
and force_size sizes; data, `info` and `map` JSON byte for byte; hostile footers give one clear error."""
from __future__ import annotations

import json
import struct
import time

import pytest

from engine.cli.main import main
from tests.util import needs_qemu, open_node, qemu_check, qemu_img, qemu_io, read_all, run

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


# ------------------------------------------------------------------------------------------------------
# writing and creating VHD
# ------------------------------------------------------------------------------------------------------
MiB = 1 << 20
BLOCK = 2 * MiB
FIXED, FORCE = ["-o", "subformat=fixed"], ["-o", "force_size=on"]


def _masked(footer: bytes) -> bytes:
    """A footer without its timestamp, checksum and UUID (the fields that differ between two creates)."""
    b = bytearray(footer)
    b[24:28] = bytes(4)
    b[64:84] = bytes(20)
    return bytes(b)


def _footer_ok(footer: bytes) -> None:
    assert footer[:8] == b"conectix"
    zeroed = footer[:64] + bytes(4) + footer[68:]
    assert struct.unpack_from(">I", footer, 64)[0] == (~sum(zeroed)) & 0xFFFFFFFF
    u = footer[68:84]
    assert u[6] >> 4 == 4 and u[8] >> 6 == 2, u.hex()  # a random (version 4) UUID, as QEMU's
    stamp = struct.unpack_from(">I", footer, 24)[0] + 946684800
    assert abs(stamp - time.time()) < 120


def _tail(path, n: int = 512) -> bytes:
    with open(path, "rb") as f:
        f.seek(-n, 2)
        return f.read(n)


@pytest.mark.parametrize("opts,size,vsize", [
    ([], "8M", 8390656),
    ([], "1G", 1073995776),
    ([], "127M", 133171200),
    ([], "5243392", None),
    ([], "0", 0),
    ([], "200G", 200 << 30),           # past the largest CHS geometry: the exact size
    (FORCE, "8M", 8388608),
    (FORCE, "1000000", 1000448),
    (FIXED, "8M", 8390656),
    (FIXED, "127M", 133171200),
    (["-o", "subformat=fixed,force_size=on"], "8M", 8388608),
])
def test_vpc_create_like_qemu(tmp_path, capsys, opts, size, vsize):
    ours, ref = tmp_path / "p.vhd", tmp_path / "q.vhd"
    rc, _, err = _pb(capsys, "create", "-q", "-f", "vpc", *opts, str(ours), size)
    assert rc == 0, err
    qemu_img("create", "-q", "-f", "vpc", *opts, str(ref), size)
    want = json.loads(qemu_img("info", "-f", "vpc", "--output=json", str(ref)).stdout)["virtual-size"]
    got = json.loads(qemu_img("info", "-f", "vpc", "--output=json", str(ours)).stdout)["virtual-size"]
    assert got == want and (vsize is None or got == vsize)
    assert ours.stat().st_size == ref.stat().st_size
    footer = _tail(ours)
    _footer_ok(footer)
    assert _masked(footer) == _masked(_tail(ref))
    if "subformat=fixed" not in " ".join(opts):
        a, b = ours.read_bytes(), ref.read_bytes()
        assert a[:512] == footer                            # the copy at offset 0
        assert a[512:-512] == b[512:-512]                   # dynamic header and BAT
    assert read_all(ours, "vpc") == bytes(got) if got <= 16 * MiB else True
    assert qemu_check(ours, "vpc")[0] == 63                                          # qemu-img cannot check VHD


def test_vpc_geometry_like_qemu(tmp_path):
    """The CHS rounding of odd sizes, footer against footer."""
    from engine.formats.vpc import vhd_geometry

    for size in (512, 1 << 20, 3 * MiB + 512, 33 * MiB, 500 * MiB, 4 << 30, 31 << 30, 127 << 30,
                 (127 << 30) + (512 << 20), 128 << 30, 130 << 30):
        ref = tmp_path / "g.vhd"
        qemu_img("create", "-q", "-f", "vpc", str(ref), str(size))
        head = ref.read_bytes()[:512]
        cyls, heads, secs, sectors = vhd_geometry(size, False)
        assert struct.unpack_from(">HBB", head, 56) == (cyls, heads, secs), size
        assert struct.unpack_from(">Q", head, 48)[0] == sectors * 512, size


@pytest.mark.parametrize("opts", [[], FIXED, FORCE, ["-o", "subformat=fixed,force_size=on"]])
def test_convert_to_vpc(tmp_path, capsys, opts):
    from tests.interop.test_vdi import assert_info_map_like_qemu, patterned_raw

    src, out, ref = tmp_path / "src.raw", tmp_path / "out.vhd", tmp_path / "ref.vhd"
    data = patterned_raw(src, 9 * MiB + 4096)
    rc, _, err = _pb(capsys, "convert", "-f", "raw", "-O", "vpc", *opts, str(src), str(out))
    assert rc == 0, err
    assert qemu_img("compare", "-f", "raw", "-F", "vpc", str(src), str(out), check=False).returncode == 0
    assert qemu_check(out, "vpc")[0] == 63
    qemu_img("convert", "-f", "raw", "-O", "vpc", *opts, str(src), str(ref))
    info = json.loads(qemu_img("info", "-f", "vpc", "--output=json", str(out)).stdout)
    assert info["virtual-size"] == json.loads(
        qemu_img("info", "-f", "vpc", "--output=json", str(ref)).stdout)["virtual-size"]
    assert info["virtual-size"] == (len(data) if opts and "force_size" in opts[1] else 9469952)
    got = read_all(out, "vpc")
    assert got[:len(data)] == data and not any(got[len(data):])
    assert_info_map_like_qemu(capsys, out, "vpc")
    if not opts or "force_size=on" == opts[1]:  # dynamic: the same blocks in the same places as qemu-img's
        a, b = out.read_bytes(), ref.read_bytes()
        assert len(a) == len(b) and _masked(a[:512]) == _masked(b[:512]) and a[:512] == a[-512:]
        assert a[512:-512] == b[512:-512]
        assert out.stat().st_blocks * 512 < 3 * MiB  # zeros inside new blocks stay holes, as with qemu-img


def _bitmap(img, index: int) -> bytes:
    raw = img.read_bytes()
    entry = struct.unpack_from(">I", raw, 1536 + 4 * index)[0]
    assert entry != 0xFFFFFFFF
    return raw[entry * 512:entry * 512 + 512]


@pytest.mark.parametrize("opts", [[], FIXED, FORCE])
def test_vpc_write_roundtrip(tmp_path, capsys, opts):
    """qemu-io writes read back by parablock; parablock writes (driver API and ``parablock io``) read back
    by qemu-img; zeroing leaves unallocated blocks unallocated; the first write to an allocated block sets
    its whole sector bitmap, as QEMU does."""
    img = tmp_path / "w.vhd"
    rc, _, err = _pb(capsys, "create", "-q", "-f", "vpc", *opts, str(img), "8M")
    assert rc == 0, err
    size = json.loads(qemu_img("info", "-f", "vpc", "--output=json", str(img)).stdout)["virtual-size"]
    model = bytearray(size)

    def put(off: int, data: bytes) -> None:
        model[off:off + len(data)] = data

    qemu_io("-f", "vpc", "-c", "write -P 0x11 100k 3000", "-c", "write -P 0x22 2000k 200k", str(img))
    put(100 * 1024, b"\x11" * 3000)
    put(2000 * 1024, b"\x22" * 200 * 1024)
    assert read_all(img, "vpc") == bytes(model)
    dynamic = "subformat=fixed" not in " ".join(opts)
    if dynamic:  # another tool's bitmap saying "not present": our first write must set it again
        raw = bytearray(img.read_bytes())
        entry = struct.unpack_from(">I", raw, 1536)[0]
        raw[entry * 512:entry * 512 + 512] = bytes(512)
        img.write_bytes(bytes(raw))

    # 2 MiB blocks: qemu-io allocated blocks 0 and 1
    node = open_node(img, "vpc", read_only=False)
    try:
        node.write(50 * 1024, b"\x33" * 1024)                  # in place in an allocated block
        put(50 * 1024, b"\x33" * 1024)
        span = bytes(range(256)) * 64
        node.write(4 * MiB - 8192, span)                       # allocated block 1 and new block 2
        put(4 * MiB - 8192, span)
        node.write(5 * MiB + 512, b"\x44" * 4096)              # block 2 again, in place
        put(5 * MiB + 512, b"\x44" * 4096)
        node.write(size - 512, b"\x66" * 512)                  # the last sector: a new, partial block
        put(size - 512, b"\x66" * 512)
        node.write_zeroes(6 * MiB, 4096)                       # block 3: unallocated unless it is the last
        put(6 * MiB, bytes(4096))
        node.write_zeroes(2000 * 1024 + 5, 50)                 # part of an allocated block
        put(2000 * 1024 + 5, bytes(50))
        node.flush()
    finally:
        node.close()
    last = (size - 1) // BLOCK
    if dynamic:
        raw = img.read_bytes()
        bat = struct.unpack_from(f">{last + 1}I", raw, 1536)
        allocated = [i for i, e in enumerate(bat) if e != 0xFFFFFFFF]
        assert allocated == sorted({0, 1, 2, last})
        assert all(_bitmap(img, i) == b"\xff" * 512 for i in allocated)
        assert raw[-512:] == raw[:512]                         # the footer moved to the new end
        assert len(raw) == 2560 + len(allocated) * (512 + BLOCK)
    qemu_img("convert", "-f", "vpc", "-O", "raw", str(img), str(tmp_path / "back.raw"))
    assert (tmp_path / "back.raw").read_bytes() == bytes(model)
    from tests.interop.test_vdi import assert_info_map_like_qemu

    assert_info_map_like_qemu(capsys, img, "vpc")
    if dynamic and last != 3:
        m = json.loads(qemu_img("map", "-f", "vpc", "--output=json", str(img)).stdout)
        assert any(e["start"] <= 6 * MiB and 8 * MiB <= e["start"] + e["length"] and not e["data"] for e in m)

    rc, out, err = _pb(capsys, "io", "-f", "vpc", "-c", "write -P 0x77 4200k 4k", "-c", "write -z 0 4k",
                       "-c", f"write -P 0x78 {size - 512} 1024", str(img))
    assert rc == 1 and "wrote 4096/4096 bytes at offset 4300800" in out, (out, err)
    assert "write failed: Input/output error" in out  # past the end
    put(4200 * 1024, b"\x77" * 4096)
    put(0, bytes(4096))
    assert run(["qemu-io", "-f", "vpc", "-c", "read -P 0x77 4200k 4k", "-c", "read -P 0 0 4k",
                "-c", f"read -P 0x66 {size - 512} 512", str(img)], check=False).returncode == 0
    assert read_all(img, "vpc") == bytes(model)


def test_vpc_write_and_create_errors(tmp_path, capsys):
    from engine.errors import OutOfBounds, ReadOnlyError

    img = tmp_path / "e.vhd"
    qemu_img("create", "-q", "-f", "vpc", str(img), "4M")
    size = json.loads(qemu_img("info", "-f", "vpc", "--output=json", str(img)).stdout)["virtual-size"]
    before = img.read_bytes()
    node = open_node(img, "vpc", read_only=False)
    try:
        with pytest.raises(OutOfBounds, match="beyond the end"):
            node.write(size - 512, b"x" * 1024)
        with pytest.raises(OutOfBounds, match="beyond the end"):
            node.write_zeroes(size, 512)
    finally:
        node.close()
    ro = open_node(img, "vpc", read_only=True)
    try:
        with pytest.raises(ReadOnlyError):
            ro.write(0, b"x" * 512)
    finally:
        ro.close()
    assert img.read_bytes() == before
    for opts, size_arg in ((["-o", "subformat=bogus"], "1M"), (["-o", "static=on"], "1M"),
                           (["-o", "preallocation=metadata"], "1M"), ([], "2041G"), (FORCE, "2089000M")):
        target = tmp_path / "c.vhd"
        want = qemu_img("create", "-q", "-f", "vpc", *opts, str(target), size_arg, check=False)
        assert want.returncode == 1
        rc, _, err = _pb(capsys, "create", "-q", "-f", "vpc", *opts, str(target), size_arg)
        assert rc == 1 and err.splitlines() == [want.stderr.strip().replace("qemu-img:", "parablock:", 1)]


def test_vpc_allocation_crash_points(tmp_path):
    """Each new block: bitmap and data, footer, a flush, then the BAT entry.  A crash at any point leaves
    an image qemu-img and parablock open, every block reading its old or its new contents."""
    from tests.interop.test_vdi import assert_blocks_old_or_new, record_file_ops, replay

    img = tmp_path / "c.vhd"
    qemu_img("create", "-q", "-f", "vpc", str(img), "8M")
    qemu_io("-f", "vpc", "-c", "write -P 0x11 0 64k", str(img))
    before = img.read_bytes()
    old = read_all(img, "vpc")
    node = open_node(img, "vpc", read_only=False)
    try:
        log = record_file_ops(node)
        node.write(BLOCK + BLOCK // 2, bytes(range(256)) * (BLOCK // 256))  # two new blocks, one request
        node.write(4096, b"\x12" * 512)                                  # in place
    finally:
        node.close()
    new = read_all(img, "vpc")
    assert replay(before, log) == img.read_bytes()
    bat_writes = [i for i, op in enumerate(log) if op[0] == "write" and 1536 <= op[1] < 2048]
    assert len(bat_writes) == 2
    for n, i in enumerate(bat_writes):
        start = struct.unpack(">I", log[i][2])[0] * 512
        first = bat_writes[n - 1] + 1 if n else 0
        touching = [j for j in range(first, i) if log[j][0] != "flush" and log[j][1] < start + 512 + BLOCK + 512
                    and log[j][1] + (len(log[j][2]) if log[j][0] == "write" else log[j][2]) > start]
        assert touching and log[touching[0]][2][:512] == b"\xff" * 512       # the bitmap, all bits set
        assert any(log[j][1] == start + 512 + BLOCK for j in touching)      # the footer at the new end
        assert ("flush",) in log[max(touching) + 1:i]                        # barrier before the BAT
    crash = tmp_path / "crash.vhd"
    for k in range(len(log) + 1):
        crash.write_bytes(replay(before, log[:k]))
        assert_blocks_old_or_new(crash, "vpc", old, new, BLOCK)
        assert json.loads(qemu_img("info", "-f", "vpc", "--output=json", str(crash)).stdout)["virtual-size"] \
            == len(old)
        if k <= bat_writes[0]:
            assert read_all(crash, "vpc") == old
