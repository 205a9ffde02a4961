"""VHDX against qemu-img/qemu-io 7.2: images QEMU makes and writes read back by parablock byte for byte
(info JSON too); images parablock creates, converts to and writes are laid out as QEMU lays them out and
read back by QEMU; logs crafted here (struct + CRC-32C) and left by QEMU are replayed by both to the same
bytes; hostile images give one clear error line and are left untouched."""
from __future__ import annotations

import json
import os
import shutil
import struct
import uuid

import pytest

from engine.cli.main import main
from engine.formats import vhdx
from tests.util import needs_qemu, open_node, qemu_check, qemu_img, qemu_io, read_all, run

pytestmark = needs_qemu
KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
H1, H2, RT1 = 64 * KiB, 128 * KiB, 192 * KiB


def _pb(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def _qemu_raw(img, out) -> bytes:
    qemu_img("convert", "-f", "vhdx", "-O", "raw", str(img), str(out))
    return out.read_bytes()


# --- reading the structures independently of the driver -----------------------------------------------------
def _regions(b: bytes) -> dict[str, tuple[int, int]]:
    out = {}
    count = struct.unpack_from("<I", b, RT1 + 8)[0]
    for i in range(count):
        guid, off, length, _flags = struct.unpack_from("<16sQII", b, RT1 + 16 + 32 * i)
        out[{vhdx.BAT_GUID: "bat", vhdx.METADATA_GUID: "meta"}[guid]] = (off, length)
    return out


def _header(b: bytes, off: int) -> dict:
    sig, crc, seq, fwg, dwg, lg, lv, ver, ll, lo = struct.unpack_from("<4sIQ16s16s16sHHIQ", b, off)
    return {"sig": sig, "crc": crc, "seq": seq, "fwg": fwg, "dwg": dwg, "log_guid": lg, "log_version": lv,
            "version": ver, "log_length": ll, "log_offset": lo}


def _set_header(b: bytearray, off: int, **fields) -> None:
    """Change header fields and re-checksum the 4 KiB block (as a writer would)."""
    h = _header(b, off)
    h.update(fields)
    struct.pack_into("<4sIQ16s16s16sHHIQ", b, off, h["sig"], 0, h["seq"], h["fwg"], h["dwg"], h["log_guid"],
                     h["log_version"], h["version"], h["log_length"], h["log_offset"])
    struct.pack_into("<I", b, off + 4, vhdx.crc32c(bytes(b[off:off + 4096])))


def _bat(b: bytes, n: int) -> list[int]:
    off, _length = _regions(b)["bat"]
    return list(struct.unpack_from(f"<{n}Q", b, off))


def _meta_item(b: bytes, guid: bytes) -> tuple[int, int]:
    base = _regions(b)["meta"][0]
    count = struct.unpack_from("<H", b, base + 10)[0]
    for i in range(count):
        g, off, length, _flags = struct.unpack_from("<16sIII", b, base + 32 + 32 * i)
        if g == guid:
            return base + off, length
    raise KeyError(guid)


@pytest.mark.parametrize("name,opts,size,writes", [
    ("dynamic", [], "24M", ["write -P 0xa1 0 64k", "write -P 0xa2 9M 1536k", "write -P 0xa3 24575k 1k",
                            "write -z 9M 64k"]),
    ("dynamic-1M-blocks", ["-o", "block_size=1M"], "5243392",  # 5 MiB + 512: a partial last block
     ["write -P 0xb1 1M 4k", "write -P 0xb2 5M 512"]),
    ("dynamic-no-zero-state", ["-o", "block_state_zero=off,log_size=2M"], "16M",
     ["write -P 0xc1 8M 1M", "write -z 0 1M"]),
    ("fixed", ["-o", "subformat=fixed,block_size=2M"], "8M", ["write -P 0xd1 3M 100k"]),
    ("empty", [], "64M", []),
], ids=lambda v: v if isinstance(v, str) and not v[0].isdigit() else None)
def test_vhdx_reads_like_qemu(tmp_path, capsys, name, opts, size, writes):
    img = tmp_path / "d.vhdx"
    qemu_img("create", "-q", "-f", "vhdx", *opts, str(img), size)
    cmds = [a for w in writes for a in ("-c", w)]
    if cmds:
        qemu_io("-f", "vhdx", *cmds, str(img))
    want = _qemu_raw(img, tmp_path / "q.raw")
    assert read_all(img) == want
    # info JSON byte for byte (the disk usage may differ by a block of the host file system)
    q = run(["qemu-img", "info", "--output=json", str(img)]).stdout
    rc, got, err = _pb(capsys, "info", "--output=json", str(img))
    assert rc == 0, err
    assert _strip_actual(got) == _strip_actual(q)
    rc, got, err = _pb(capsys, "info", str(img))
    assert rc == 0 and "file format: vhdx" in got and "cluster_size:" in got, err
    _check_map(capsys, img)
    rc, _, err = _pb(capsys, "compare", "-f", "vhdx", "-F", "raw", str(img), str(tmp_path / "q.raw"))
    assert rc == 0, err
    rc, _, err = _pb(capsys, "convert", "-f", "vhdx", "-O", "qcow2", str(img), str(tmp_path / "o.qcow2"))
    assert rc == 0, err
    assert qemu_img("compare", "-f", "vhdx", "-F", "qcow2", str(img), str(tmp_path / "o.qcow2")).returncode == 0


def _strip_actual(text: str) -> str:
    return "\n".join(ln for ln in text.splitlines() if "actual-size" not in ln)


def _check_map(capsys, img) -> None:
    """`map --output=json` equals qemu-img's (QEMU 7.2's vhdx has no block status: one data extent, no
    offset, even though convert uses the real extents)."""
    rc, got, err = _pb(capsys, "map", "--output=json", str(img))
    assert rc == 0, err
    assert got.strip() == run(["qemu-img", "map", "--output=json", str(img)]).stdout.strip()


def test_vhdx_sector_bitmap_interleave(tmp_path, capsys):
    """5 GiB with 1 MiB blocks spans two 4 GiB chunks: payload block 4096 is BAT entry 4097, after the
    sector bitmap entry that qemu leaves at 4096."""
    img = tmp_path / "big.vhdx"
    qemu_img("create", "-q", "-f", "vhdx", "-o", "block_size=1M", str(img), "5G")
    qemu_io("-f", "vhdx", "-c", "write -P 0x42 4607M 1M", "-c", "write -P 0x43 4G 512",
            "-c", "write -P 0x44 4095M 4k", str(img))
    b = img.read_bytes()
    bat = _bat(b, 5121)
    assert bat[4096] == 0 and bat[4097] & 7 == 6 and bat[4608] & 7 == 6 and bat[4095] & 7 == 6
    node = open_node(img)
    try:
        assert node.read(4607 * MiB, MiB) == b"\x42" * MiB
        assert node.read(4 * GiB - 512, 1536) == bytes(512) + b"\x43" * 512 + bytes(512)
        assert node.read(4095 * MiB, 8 * KiB) == b"\x44" * 4096 + bytes(4096)
        assert node.read(4606 * MiB, MiB) == bytes(MiB)
    finally:
        node.close()
    rc, _, err = _pb(capsys, "convert", "-f", "vhdx", "-O", "qcow2", str(img), str(tmp_path / "o.qcow2"))
    assert rc == 0, err
    assert qemu_img("compare", "-f", "vhdx", "-F", "qcow2", str(img), str(tmp_path / "o.qcow2")).returncode == 0
    # parablock writes into the second chunk too; qemu reads them
    rc, _, err = _pb(capsys, "io", "-f", "vhdx", "-c", "write -P 0x99 4100M 8k", str(img))
    assert rc == 0, err
    qemu_io("-f", "vhdx", "-r", "-c", "read -P 0x99 4100M 8k", "-c", "read -P 0x43 4G 512", str(img))
    assert _bat(img.read_bytes(), 5121)[4100 + 1] & 7 == 6


def test_vhdx_4k_logical_sectors(tmp_path):
    """4096-byte logical sectors (QEMU 7.2 refuses them): the chunk spans 32 GiB, so with 256 MiB blocks
    payload block 128 is BAT entry 129; parablock writes and reads such an image consistently."""
    img = tmp_path / "4k.vhdx"
    qemu_img("create", "-q", "-f", "vhdx", "-o", "block_size=256M,block_state_zero=off", str(img), "40G")
    b = bytearray(img.read_bytes())
    for guid in (vhdx.LOGICAL_SECTOR_GUID, vhdx.PHYSICAL_SECTOR_GUID):
        off, _ = _meta_item(b, guid)
        struct.pack_into("<I", b, off, 4096)
    img.write_bytes(bytes(b))
    assert run(["qemu-img", "info", str(img)], check=False).returncode == 1
    node = open_node(img, read_only=False)
    try:
        assert node.chunk_ratio == 128
        node.write(33 * GiB, b"\x5a" * 8192)
        node.write(100 * MiB, b"\x5b" * 4096)
    finally:
        node.close()
    bat = _bat(img.read_bytes(), 161)
    assert bat[128] == 0 and bat[132 + 1] & 7 == 6 and bat[0] & 7 == 6
    node = open_node(img)
    try:
        assert node.size() == 40 * GiB
        assert node.read(33 * GiB - 4096, 16384) == bytes(4096) + b"\x5a" * 8192 + bytes(4096)
        assert node.read(100 * MiB, 8192) == b"\x5b" * 4096 + bytes(4096)
    finally:
        node.close()


# --- (b) parablock creates and writes, QEMU reads ----------------------------------------------------------
def _patterned_raw(path, size: int) -> bytes:
    b = bytearray(size)
    for i, off in enumerate(range(0, size, 3 * MiB)):
        b[off:off + 70000] = bytes([i % 250 + 1]) * 70000
    b[size - 100:] = b"\xee" * 100
    path.write_bytes(bytes(b))
    return bytes(b)


CONVERT_CASES = [
    pytest.param("", id="dynamic-default"),
    pytest.param("subformat=fixed", id="fixed-default"),
    pytest.param("subformat=fixed,block_state_zero=off", id="fixed-full"),
    pytest.param("block_size=1M", id="dynamic-1M"),
    pytest.param("block_size=2M,block_state_zero=off", id="dynamic-2M-nozero"),
    pytest.param("subformat=fixed,block_size=4M,log_size=2M", id="fixed-4M-log2M"),
]


@pytest.mark.parametrize("opts", CONVERT_CASES)
def test_convert_to_vhdx_like_qemu(tmp_path, capsys, opts):
    src = tmp_path / "src.raw"
    _patterned_raw(src, 20 * MiB + 512)
    ours, theirs = tmp_path / "o.vhdx", tmp_path / "q.vhdx"
    o = ["-o", opts] if opts else []
    rc, _, err = _pb(capsys, "convert", "-f", "raw", "-O", "vhdx", *o, str(src), str(ours))
    assert rc == 0, err
    assert qemu_img("compare", "-f", "raw", "-F", "vhdx", str(src), str(ours)).returncode == 0
    rc, data = qemu_check(ours, "vhdx")
    assert rc == 0 and not data.get("corruptions"), data
    # the layout is qemu-img's: same file size, region tables, metadata table, BAT (allocation order)
    qemu_img("convert", "-f", "raw", "-O", "vhdx", *o, str(src), str(theirs))
    a, b = ours.read_bytes(), theirs.read_bytes()
    assert len(a) == len(b)
    assert a[RT1:RT1 + 128 * KiB] == b[RT1:RT1 + 128 * KiB]
    (bo, bl), (mo, _ml) = _regions(a)["bat"], _regions(a)["meta"]
    assert a[bo:bo + bl] == b[bo:bo + bl]
    assert a[mo:mo + 64 * KiB] == b[mo:mo + 64 * KiB]
    page83, _ = _meta_item(a, vhdx.PAGE83_GUID)
    assert a[mo + 64 * KiB:page83] == b[mo + 64 * KiB:page83]
    assert a[page83 + 16:page83 + 24] == b[page83 + 16:page83 + 24]
    for off in (H1, H2):
        ha, hb = _header(a, off), _header(b, off)
        assert (ha["log_offset"], ha["log_length"], ha["version"], ha["log_guid"]) == \
            (hb["log_offset"], hb["log_length"], hb["version"], hb["log_guid"])
    # sparse like qemu's: only the data (and metadata) are allocated, not whole blocks
    assert os.stat(ours).st_blocks * 512 <= os.stat(theirs).st_blocks * 512 + 256 * KiB


@pytest.mark.parametrize("opts,size", [
    ([], "8M"), (["-o", "subformat=fixed"], "12M"), (["-o", "block_size=1M,log_size=2M"], "5243392"),
    (["-o", "block_state_zero=off"], "3G"), (["-o", "subformat=fixed,block_state_zero=off"], "9M"),
    ([], "0"),
])
def test_create_like_qemu_then_qemu_writes(tmp_path, capsys, opts, size):
    ours, theirs = tmp_path / "o.vhdx", tmp_path / "q.vhdx"
    rc, _, err = _pb(capsys, "create", "-q", "-f", "vhdx", *opts, str(ours), size)
    assert rc == 0, err
    qemu_img("create", "-q", "-f", "vhdx", *opts, str(theirs), size)
    a, b = ours.read_bytes(), theirs.read_bytes()
    assert len(a) == len(b) and a[:8] == b"vhdxfile"
    assert a[RT1:RT1 + 128 * KiB] == b[RT1:RT1 + 128 * KiB]
    (bo, bl), (mo, _ml) = _regions(a)["bat"], _regions(a)["meta"]
    assert a[bo:bo + bl] == b[bo:bo + bl] and a[mo:mo + 64 * KiB] == b[mo:mo + 64 * KiB]
    for off in (H1, H2):
        ha, hb = _header(a, off), _header(b, off)
        for k in ("sig", "log_guid", "log_version", "version", "log_length", "log_offset"):
            assert ha[k] == hb[k], k
    assert _header(a, H2)["seq"] == _header(a, H1)["seq"] + 1
    assert qemu_img("info", str(ours)).returncode == 0
    if size == "0":
        return
    q = run(["qemu-img", "info", "--output=json", str(ours)]).stdout
    assert json.loads(q)["virtual-size"] == json.loads(run(["qemu-img", "info", "--output=json",
                                                               str(theirs)]).stdout)["virtual-size"]
    qemu_io("-f", "vhdx", "-c", "write -P 0x3c 4k 8k", "-c", "write -z 2M 4k", str(ours))
    qemu_io("-f", "vhdx", "-r", "-c", "read -P 0x3c 4k 8k", "-c", "read -P 0 0 4k", str(ours))
    node = open_node(ours)
    try:
        assert node.read(0, 16 * KiB) == bytes(4096) + b"\x3c" * 8192 + bytes(4096)
    finally:
        node.close()


def test_parablock_writes_read_by_qemu(tmp_path, capsys):
    img = tmp_path / "w.vhdx"
    qemu_img("create", "-q", "-f", "vhdx", "-o", "block_size=1M", str(img), "6M")
    qemu_io("-f", "vhdx", "-c", "write -P 0x21 2M 1M", str(img))
    before = img.read_bytes()
    h0 = max((_header(before, o) for o in (H1, H2)), key=lambda h: h["seq"])
    # a read-write open alone changes nothing (as QEMU 7.2)
    rc, _, err = _pb(capsys, "io", "-f", "vhdx", "-c", "read -P 0x21 2M 4k", str(img))
    assert rc == 0, err
    assert img.read_bytes() == before
    rc, out, err = _pb(capsys, "io", "-f", "vhdx",
                       "-c", "write -P 0x31 100k 3k",            # partial block, fresh allocation
                       "-c", "write -P 0x32 2050k 4k",           # in place
                       "-c", "write -P 0x33 6143k 1k",           # end of disk
                       "-c", "write -z 2M 512",                  # zero inside a present block
                       "-c", "write -z 4M 1M",                   # zero over a zero block: nothing to do
                       "-c", "write -P 0x34 1M 1M",              # a whole fresh block
                       "-c", "write -z -u 1M 1M",                # whole present block -> ZERO state
                       str(img))
    assert rc == 0, err + out
    qemu_io("-f", "vhdx", "-r", "-c", "read -P 0x31 100k 3k", "-c", "read -P 0 0 100k",
            "-c", "read -P 0x32 2050k 4k", "-c", "read -P 0 2M 512", "-c", "read -P 0x21 2097664 1536",
            "-c", "read -P 0x33 6143k 1k", "-c", "read -P 0 1M 1M", "-c", "read -P 0 4M 1M", str(img))
    want = _qemu_raw(img, tmp_path / "q.raw")
    assert read_all(img) == want
    rc, data = qemu_check(img, "vhdx")
    assert rc == 0 and not data.get("corruptions"), data
    b = img.read_bytes()
    bat = _bat(b, 6)
    assert [e & 7 for e in bat] == [6, 2, 6, 2, 2, 6]
    assert bat[0] >> 20 == len(before) >> 20  # allocated at the old end of the file, data then BAT
    hs = sorted((_header(b, o) for o in (H1, H2)), key=lambda h: h["seq"])
    assert hs[0]["seq"] == h0["seq"] + 1 and hs[1]["seq"] == h0["seq"] + 2
    assert hs[0]["fwg"] == hs[1]["fwg"] != h0["fwg"]
    assert h0["dwg"] not in (hs[0]["dwg"], hs[1]["dwg"]) and hs[1]["log_guid"] == bytes(16)


# --- (c) log replay ---------------------------------------------------------------------------------------
def _log_entry(seq: int, guid: bytes, descs: list, flushed: int, last: int) -> bytes:
    """A log entry as MS-VHDX describes it: header and descriptors in the first sector(s), one data sector
    per data descriptor (its first 8 and last 4 bytes in the descriptor), CRC-32C over the whole entry.
    ``descs``: ("data", file offset, 4096 bytes) or ("zero", file offset, length)."""
    nd = (len(descs) + 2 + 127) // 128
    ndata = sum(1 for d in descs if d[0] == "data")
    total = (nd + ndata) * 4096
    buf = bytearray(total)
    struct.pack_into("<4sIIIQII16sQQ", buf, 0, b"loge", 0, total, 0, seq, len(descs), 0, guid, flushed, last)
    k = 0
    for i, (kind, off, arg) in enumerate(descs):
        at = 64 + 32 * i
        if kind == "zero":
            struct.pack_into("<4sIQQQ", buf, at, b"zero", 0, arg, off, seq)
            continue
        lead, trail = struct.unpack_from("<Q", arg, 0)[0], struct.unpack_from("<I", arg, 4092)[0]
        struct.pack_into("<4sIQQQ", buf, at, b"desc", trail, lead, off, seq)
        struct.pack_into("<4sI4084sI", buf, (nd + k) * 4096, b"data", seq >> 32, arg[8:4092], seq & 0xFFFFFFFF)
        k += 1
    struct.pack_into("<I", buf, 4, vhdx.crc32c(bytes(buf)))
    return bytes(buf)


def _put_ring(b: bytearray, log_off: int, log_len: int, at: int, entry: bytes) -> None:
    for i in range(0, len(entry), 4096):
        pos = (at + i) % log_len
        b[log_off + pos:log_off + pos + 4096] = entry[i:i + 4096]


def _pending_log_image(tmp_path, layout: str) -> tuple:
    """A qemu-made image with a log of our making waiting in it; returns (image, expected guest bytes)."""
    img = tmp_path / "l.vhdx"
    qemu_img("create", "-q", "-f", "vhdx", "-o", "block_size=1M", str(img), "8M")
    qemu_io("-f", "vhdx", "-c", "write -P 0x05 0 64k", str(img))
    b = bytearray(img.read_bytes())
    assert len(b) == 9 * MiB
    bat_off = _regions(b)["bat"][0]
    block0 = struct.unpack_from("<Q", b, bat_off)[0] & ~0xFFFFF
    assert block0 == 8 * MiB
    bat_sector = bytearray(b[bat_off:bat_off + 4096])
    struct.pack_into("<Q", bat_sector, 3 * 8, 9 * MiB | 6)  # block 3 -> fully present at 9 MiB
    guid = uuid.uuid4().bytes_le
    a_descs = [("data", block0 + 4096, b"\xcc" * 4096),
               ("zero", block0 + 32 * KiB, 8 * KiB),
               ("zero", 9 * MiB, MiB),  # grows the file over the new block
               ("data", 9 * MiB, b"\xdd" * 4096),
               ("data", bat_off, bytes(bat_sector))]
    entry_a = _log_entry(10, guid, a_descs, 9 * MiB, 10 * MiB)
    log_off, log_len = _header(b, H1)["log_offset"], _header(b, H1)["log_length"]
    want = bytearray(8 * MiB)
    want[:64 * KiB] = b"\x05" * (64 * KiB)
    want[32 * KiB:40 * KiB] = bytes(8 * KiB)
    want[3 * MiB:3 * MiB + 4096] = b"\xdd" * 4096
    if layout == "chain":  # entries 10 and 11 one after the other: 11 rewrites a sector of 10
        entry_b = _log_entry(11, guid, [("data", block0 + 4096, b"\xee" * 4096)], 10 * MiB, 10 * MiB)
        _put_ring(b, log_off, log_len, 0, entry_a)
        _put_ring(b, log_off, log_len, len(entry_a), entry_b)
        want[4096:8192] = b"\xee" * 4096
    else:  # one entry wrapping around the end of the ring (qemu's stale entry at 0 is overwritten)
        _put_ring(b, log_off, log_len, log_len - 8192, entry_a)
        want[4096:8192] = b"\xcc" * 4096
    for off in (H1, H2):
        _set_header(b, off, log_guid=guid)
    img.write_bytes(bytes(b))
    return img, bytes(want)


@pytest.mark.parametrize("layout", ["chain", "wrap"])
def test_log_replay_like_qemu(tmp_path, capsys, layout):
    img, want = _pending_log_image(tmp_path, layout)
    pending = img.read_bytes()
    # read-only opens refuse, as qemu-img does (info, convert's source)
    p = run(["qemu-img", "info", str(img)], check=False)
    assert p.returncode == 1 and "needs to be replayed" in p.stderr
    rc, _, err = _pb(capsys, "info", str(img))
    assert rc == 1 and len(err.splitlines()) == 1 and "opened read-only, but contains a log that needs to be " \
        "replayed" in err, err
    rc, _, err = _pb(capsys, "convert", "-f", "vhdx", "-O", "raw", str(img), str(tmp_path / "x.raw"))
    assert rc == 1 and "needs to be replayed" in err and "Traceback" not in err
    assert img.read_bytes() == pending
    # qemu replays (check -r all), parablock replays on a read-write open: the same bytes
    theirs, ours = tmp_path / "q.vhdx", tmp_path / "o.vhdx"
    shutil.copy(img, theirs)
    shutil.copy(img, ours)
    p = run(["qemu-img", "check", "-r", "all", str(theirs)], check=False)
    assert p.returncode == 0, p.stderr
    assert _qemu_raw(theirs, tmp_path / "q.raw") == want
    rc, _, err = _pb(capsys, "io", "-f", "vhdx", "-c", "read -P 0xdd 3M 4k", str(ours))
    assert rc == 0, err
    assert read_all(ours) == want
    assert ours.stat().st_size == theirs.stat().st_size == 10 * MiB
    b = ours.read_bytes()
    assert all(_header(b, o)["log_guid"] == bytes(16) for o in (H1, H2))
    rc, data = qemu_check(ours, "vhdx")  # a read-only open: the log is gone, nothing left to repair
    assert rc == 0 and "corruptions-fixed" not in data, data
    assert _qemu_raw(ours, tmp_path / "o.raw") == want
    assert _bat(b, 4) == _bat(theirs.read_bytes(), 4)


def test_replay_of_qemu_written_log_entry(tmp_path, capsys):
    """QEMU leaves its last log entry (a BAT update, CRC'd by QEMU) in the ring; with the header's log GUID
    pointing at it again and the BAT entry undone, both replay QEMU's entry and find the block back."""
    img = tmp_path / "q.vhdx"
    qemu_img("create", "-q", "-f", "vhdx", str(img), "8M")
    qemu_io("-f", "vhdx", "-c", "write -P 0x05 0 64k", str(img))
    b = bytearray(img.read_bytes())
    log_off = _header(b, H1)["log_offset"]
    assert b[log_off:log_off + 4] == b"loge"
    guid = bytes(b[log_off + 32:log_off + 48])
    bat_off = _regions(b)["bat"][0]
    struct.pack_into("<Q", b, bat_off, 0)  # block 0 "not present" on disk; the log says otherwise
    for off in (H1, H2):
        _set_header(b, off, log_guid=guid)
    img.write_bytes(bytes(b))
    want = b"\x05" * (64 * KiB) + bytes(8 * MiB - 64 * KiB)
    theirs = tmp_path / "t.vhdx"
    shutil.copy(img, theirs)
    assert run(["qemu-img", "check", "-r", "all", str(theirs)], check=False).returncode == 0
    assert _qemu_raw(theirs, tmp_path / "t.raw") == want
    rc, _, err = _pb(capsys, "info", str(img))
    assert rc == 1 and "needs to be replayed" in err
    node = open_node(img, read_only=False)
    try:
        assert node.log_replayed
        assert node.read(0, 8 * MiB) == want
    finally:
        node.close()
    assert read_all(img) == want and _bat(img.read_bytes(), 1) == _bat(theirs.read_bytes(), 1)


def test_log_of_a_truncated_image_is_refused(tmp_path, capsys):
    """An entry written when the file was longer than it is now: the image was truncated since, and the
    replay (a read-write open) refuses, as QEMU's does, leaving the log pending (both have bumped the
    headers for the write they were about to make)."""
    img = tmp_path / "t.vhdx"
    qemu_img("create", "-q", "-f", "vhdx", str(img), "8M")
    b = bytearray(img.read_bytes())
    guid = uuid.uuid4().bytes_le
    _put_ring(b, MiB, MiB, 0, _log_entry(3, guid, [("zero", 8 * MiB, 4096)], len(b) + MiB, len(b) + MiB))
    for off in (H1, H2):
        _set_header(b, off, log_guid=guid)
    img.write_bytes(bytes(b))
    theirs = tmp_path / "q.vhdx"
    shutil.copy(img, theirs)
    assert run(["qemu-io", "-f", "vhdx", "-c", "read 0 4k", str(theirs)], check=False).returncode == 1
    rc, _, err = _pb(capsys, "io", "-f", "vhdx", "-c", "read 0 4k", str(img))
    assert rc == 1 and "probably been truncated" in err and len(err.splitlines()) == 1, err
    for path in (img, theirs):
        after = path.read_bytes()
        assert len(after) == len(b) and after[MiB:2 * MiB] == b[MiB:2 * MiB]
        current = max((_header(after, o) for o in (H1, H2)), key=lambda h: h["seq"])
        assert current["log_guid"] == guid


def test_log_writing_far_past_the_file_is_refused(tmp_path, capsys):
    """A zero descriptor of 2**60 bytes (QEMU would write zeros for ages): refused before any write."""
    img = tmp_path / "z.vhdx"
    qemu_img("create", "-q", "-f", "vhdx", str(img), "8M")
    b = bytearray(img.read_bytes())
    guid = uuid.uuid4().bytes_le
    _put_ring(b, MiB, MiB, 0, _log_entry(3, guid, [("zero", 8 * MiB, 1 << 60)], len(b), len(b)))
    for off in (H1, H2):
        _set_header(b, off, log_guid=guid)
    img.write_bytes(bytes(b))
    rc, _, err = _pb(capsys, "io", "-f", "vhdx", "-c", "read 0 4k", str(img))
    assert rc == 1 and "writes past its last file offset" in err and len(err.splitlines()) == 1, err
    assert img.read_bytes() == bytes(b)


def test_stale_log_is_not_replayed(tmp_path, capsys):
    """A log GUID that no entry carries: nothing to replay, read-only opens work (qemu agrees)."""
    img = tmp_path / "s.vhdx"
    qemu_img("create", "-q", "-f", "vhdx", str(img), "8M")
    qemu_io("-f", "vhdx", "-c", "write -P 0x07 0 4k", str(img))
    b = bytearray(img.read_bytes())
    for off in (H1, H2):
        _set_header(b, off, log_guid=uuid.uuid4().bytes_le)
    img.write_bytes(bytes(b))
    assert qemu_img("info", str(img)).returncode == 0
    rc, _, err = _pb(capsys, "info", str(img))
    assert rc == 0, err
    node = open_node(img, read_only=False)
    try:
        assert not node.log_replayed
    finally:
        node.close()
    assert img.read_bytes() == bytes(b)
    assert read_all(img)[:4096] == b"\x07" * 4096


# --- (d) hostile images -----------------------------------------------------------------------------------
def _corrupt(kind: str, b: bytearray) -> None:
    bat_off = _regions(b)["bat"][0]
    if kind == "both headers":
        b[H1 + 200] ^= 1
        b[H2 + 200] ^= 1
    elif kind == "region table":
        b[RT1 + 100] ^= 1
    elif kind == "bat past eof":
        struct.pack_into("<Q", b, bat_off, (100 << 20) | 6)
    elif kind == "bat end past eof":
        struct.pack_into("<Q", b, bat_off, (len(b) - MiB) | 6)
    elif kind == "bat over metadata":
        struct.pack_into("<Q", b, bat_off, _regions(b)["meta"][0] | 6)
    elif kind == "huge size":
        off, _ = _meta_item(b, vhdx.VIRTUAL_DISK_SIZE_GUID)
        struct.pack_into("<Q", b, off, 1 << 50)
    elif kind == "bat too small":
        off, _ = _meta_item(b, vhdx.VIRTUAL_DISK_SIZE_GUID)
        struct.pack_into("<Q", b, off, 60 << 40)  # 7.5M entries of 8 MiB blocks: the 1 MiB BAT cannot hold them
    elif kind == "block size":
        off, _ = _meta_item(b, vhdx.FILE_PARAMETERS_GUID)
        struct.pack_into("<I", b, off, 3 * MiB)
    elif kind == "sector size":
        off, _ = _meta_item(b, vhdx.LOGICAL_SECTOR_GUID)
        struct.pack_into("<I", b, off, 1024)
    elif kind == "has parent":
        off, _ = _meta_item(b, vhdx.FILE_PARAMETERS_GUID)
        struct.pack_into("<I", b, off + 4, 2)
    elif kind == "log offset":
        for off in (H1, H2):
            _set_header(b, off, log_offset=3 * MiB + 4096)
    elif kind == "log descriptor":
        guid = uuid.uuid4().bytes_le
        entry = bytearray(_log_entry(5, guid, [("data", 8 * MiB, bytes(4096))], 0, 0))
        entry[64:68] = b"dexc"  # a valid header whose descriptor is not
        struct.pack_into("<I", entry, 4, 0)
        struct.pack_into("<I", entry, 4, vhdx.crc32c(bytes(entry)))
        b[MiB:MiB + len(entry)] = entry
        for off in (H1, H2):
            _set_header(b, off, log_guid=guid)
    elif kind == "truncated":
        del b[bat_off + 4096:]
    else:
        raise AssertionError(kind)


HOSTILE = [
    ("both headers", "No valid VHDX header found"),
    ("region table", "region table has a bad checksum"),
    ("bat past eof", "points after end of file"),
    ("bat end past eof", "end offset"),
    ("bat over metadata", "overlaps with region"),
    ("huge size", "exceeds 64 TiB"),
    ("bat too small", "is too small for"),
    ("block size", "block size 3145728"),
    ("sector size", "logical sector size 1024"),
    ("has parent", "parent"),
    ("log offset", "log offset"),
    ("log descriptor", "invalid descriptor"),
    ("truncated", "past the end of the file"),
]


@pytest.mark.parametrize("kind,text", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_vhdx(tmp_path, capsys, kind, text):
    img = tmp_path / "h.vhdx"
    qemu_img("create", "-q", "-f", "vhdx", str(img), "8M")
    qemu_io("-f", "vhdx", "-c", "write -P 0x01 0 4k", str(img))
    b = bytearray(img.read_bytes())
    _corrupt(kind, b)
    img.write_bytes(bytes(b))
    assert run(["qemu-img", "info", "-f", "vhdx", str(img)], check=False).returncode == 1
    for cmd in (["info", "-f", "vhdx", str(img)], ["io", "-f", "vhdx", "-c", "read 0 4k", str(img)]):
        rc, _, err = _pb(capsys, *cmd)
        assert rc == 1 and len(err.splitlines()) == 1 and err.startswith("parablock: ") and text in err, err
    assert img.read_bytes() == bytes(b)


def test_partially_present_block_is_refused(tmp_path, capsys):
    """State 7 belongs to differencing images: QEMU opens the image and fails the read with EIO; parablock
    names the BAT entry instead."""
    img = tmp_path / "p.vhdx"
    qemu_img("create", "-q", "-f", "vhdx", str(img), "8M")
    qemu_io("-f", "vhdx", "-c", "write -P 0x01 0 4k", str(img))
    b = bytearray(img.read_bytes())
    bat_off = _regions(b)["bat"][0]
    struct.pack_into("<Q", b, bat_off, struct.unpack_from("<Q", b, bat_off)[0] | 7)
    img.write_bytes(bytes(b))
    p = run(["qemu-io", "-r", "-f", "vhdx", "-c", "read 0 4k", str(img)], check=False)
    assert "Input/output error" in p.stdout + p.stderr
    rc, _, err = _pb(capsys, "convert", "-f", "vhdx", "-O", "raw", str(img), str(tmp_path / "x.raw"))
    assert rc == 1 and "partially present" in err and "Traceback" not in err, err


def test_crc32c_fallback_matches():
    """The table-driven CRC-32C agrees with the check value and with a header QEMU wrote."""
    assert vhdx.crc32c_fallback(b"123456789") == 0xE3069283
    data = os.urandom(5000)
    assert vhdx.crc32c_fallback(data) == vhdx.crc32c(data)
    assert vhdx.crc32c_fallback(data[3000:], vhdx.crc32c_fallback(data[:3000])) == vhdx.crc32c(data)


def test_crc32c_fallback_reads_qemu_header(tmp_path):
    img = tmp_path / "c.vhdx"
    qemu_img("create", "-q", "-f", "vhdx", str(img), "8M")
    b = bytearray(img.read_bytes()[H1:H1 + 4096])
    want = struct.unpack_from("<I", b, 4)[0]
    b[4:8] = bytes(4)
    assert vhdx.crc32c_fallback(bytes(b)) == want


def test_create_options_like_qemu(tmp_path, capsys):
    for opt, text in [("subformat=foo", "Parameter 'subformat' does not accept value 'foo'"),
                      ("block_size=3M", "Block size must be a power of two"),
                      ("log_size=0", "Log size must be a multiple of 1 MB"),
                      ("log_size=5G", "Log size must be smaller than 4 GB"),
                      ("cluster_size=64k", "Invalid parameter 'cluster_size'")]:
        img = tmp_path / "c.vhdx"
        q = run(["qemu-img", "create", "-q", "-f", "vhdx", "-o", opt, str(img), "8M"], check=False)
        assert q.returncode == 1 and text in q.stderr, q.stderr
        rc, _, err = _pb(capsys, "create", "-q", "-f", "vhdx", "-o", opt, str(img), "8M")
        assert rc == 1 and text in err and len(err.splitlines()) == 1, err
    rc, _, err = _pb(capsys, "create", "-q", "-f", "vhdx", str(tmp_path / "t.vhdx"), "70T")
    assert rc == 1 and "Image size too large; max of 64TB" in err


def test_garbage_gives_block_errors_only(tmp_path):
    """Fuzz: random bytes in the headers, region table, log, BAT and metadata (checksums recomputed half
    of the time, so the damage gets past them) give BlockErrors, never another exception, on read-only and
    read-write opens, reads, block status and writes."""
    import random

    from engine.block import block_status
    from engine.errors import BlockError

    img, _want = _pending_log_image(tmp_path, "chain")
    pristine = img.read_bytes()
    regions = _regions(pristine)
    spans = [(H1, 4096), (H2, 4096), (RT1, 4096), (MiB, 20 * KiB), (regions["bat"][0], 64),
             (regions["meta"][0], 256), (regions["meta"][0] + 64 * KiB, 48)]
    rng = random.Random(1234)
    target = tmp_path / "f.vhdx"
    for _ in range(60):
        b = bytearray(pristine)
        for _k in range(rng.randint(1, 6)):
            start, n = rng.choice(spans)
            pos = start + rng.randrange(n)
            b[pos] = rng.choice([0, 0xFF, rng.randrange(256)])
        if rng.random() < 0.5:
            for off, size in ((H1, 4096), (H2, 4096), (RT1, 64 * KiB)):
                b[off + 4:off + 8] = bytes(4)
                struct.pack_into("<I", b, off + 4, vhdx.crc32c(bytes(b[off:off + size])))
        for read_only in (True, False):
            target.write_bytes(bytes(b))
            try:
                node = open_node(target, read_only=read_only)
            except BlockError:
                continue
            try:
                size = node.size()
                for off in range(0, size, max(MiB, size // 8 or 1)):
                    node.read(off, min(64 * KiB, size - off))
                    block_status(node, off, size - off)
                if not read_only and size:
                    node.write(rng.randrange(size) // 512 * 512 % max(size - 4096, 1), b"\x5a" * 4096)
            except BlockError:
                pass
            finally:
                node.close()
