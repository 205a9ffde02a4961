"""Persistent dirty bitmaps in qcow2, against QEMU 7.2.

Oracles:
- bitmaps QEMU writes (``qemu-img bitmap``, guest writes through ``qemu-io``) are read back by parablock
  and compared with the granules those writes must have dirtied;
- bitmaps parablock stores are read by QEMU: ``qemu-img info`` lists them, ``qemu-img check`` finds no
  leak or corruption, and ``qemu-nbd -B NAME`` exports them as ``qemu:dirty-bitmap:NAME``, whose map
  (``qemu-img map`` over NBD with ``x-dirty-bitmap``: dirty ranges read as ``"data": false``) must
  equal parablock's dirty extents;
- ``qemu-img bitmap --merge`` and ``--remove`` operate on parablock's bitmaps.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import pytest

from engine.bitmap import DirtyBitmap
from engine.errors import BlockError, CorruptImage, InvalidArgument, NotSupported
from tests.util import assert_qemu_clean, open_node, parablock, qemu_check, qemu_img, qemu_io, run, needs_qemu

pytestmark = needs_qemu

M = 1 << 20
K = 1 << 10


def _div_up(a: int, b: int) -> int:
    return -(-a // b)


def granule_extents(writes: list[tuple[int, int]], gran: int, size: int) -> list[tuple[int, int]]:
    """The dirty extents a set of guest writes must leave in a bitmap of granularity ``gran``."""
    dirty = set()
    for off, n in writes:
        if n:
            dirty.update(range(off // gran, (off + n - 1) // gran + 1))
    out: list[tuple[int, int]] = []
    for k in sorted(dirty):
        start, end = k * gran, min((k + 1) * gran, size)
        if out and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + end - start)
        else:
            out.append((start, end - start))
    return out


def qemu_dirty_extents(img: Path, name: str) -> list[tuple[int, int]]:
    """Bitmap ``name`` as QEMU sees it: exported by qemu-nbd, mapped by qemu-img over NBD."""
    sock = img.parent / f"nbd-{name}.sock"
    pidfile = img.parent / f"nbd-{name}.pid"
    run(["qemu-nbd", "--fork", "--pid-file", str(pidfile), "-r", "-f", "qcow2", "-B", name, "-k", str(sock),
         str(img)], timeout=30)
    try:
        p = run(["qemu-img", "map", "--output=json", "--image-opts",
                 f"driver=nbd,server.type=unix,server.path={sock},x-dirty-bitmap=qemu:dirty-bitmap:{name}"],
                timeout=30)
    finally:
        try:
            os.kill(int(pidfile.read_text()), 15)
        except (OSError, ValueError):
            pass
    out: list[tuple[int, int]] = []
    for e in json.loads(p.stdout):
        if e["data"]:
            continue
        if out and out[-1][0] + out[-1][1] == e["start"]:
            out[-1] = (out[-1][0], out[-1][1] + e["length"])
        else:
            out.append((e["start"], e["length"]))
    return out


def qemu_bitmaps(img: Path) -> list[dict]:
    info = json.loads(qemu_img("info", "-U", "--output=json", str(img)).stdout)
    return info["format-specific"]["data"].get("bitmaps", [])


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def qio(img: Path, *cmds: str, check: bool = True):
    args = []
    for c in cmds:
        args += ["-c", c]
    return qemu_io("-f", "qcow2", *args, str(img), check=check)


def assert_both_clean(img: Path) -> None:
    assert_qemu_clean(img)
    p = parablock("check", "--output=json", str(img), check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    data = json.loads(p.stdout)
    assert "leaks" not in data and "corruptions" not in data, data


SIZE = 64 * M
WRITES_1 = [(0, 1), (10 * M, 3 * M), (10 * M + 100, 4096), (SIZE - 512, 512)]
WRITES_2 = [(32 * M + 7, 70 * K)]


@pytest.fixture
def qemu_made(tmp_path: Path) -> Path:
    """b0 (64k, auto) sees both write rounds; b1 (512, disabled) none; b2 (1M) only the first round."""
    img = tmp_path / "q.qcow2"
    qemu_img("create", "-f", "qcow2", str(img), str(SIZE))
    qemu_img("bitmap", "--add", str(img), "b0")
    qemu_img("bitmap", "--add", "-g", "512", "--disable", str(img), "b1")
    qemu_img("bitmap", "--add", "-g", "1M", str(img), "b2")
    qio(img, *[f"write -P 0x5a {o} {n}" for o, n in WRITES_1])
    qemu_img("bitmap", "--disable", str(img), "b2")
    qio(img, *[f"write -P 0x6b {o} {n}" for o, n in WRITES_2])
    return img


def test_reads_bitmaps_qemu_wrote(qemu_made: Path):
    before = digest(qemu_made)
    node = open_node(qemu_made)
    try:
        got = {bm.name: bm for bm in node.bitmaps()}
    finally:
        node.close()
    assert digest(qemu_made) == before, "a read-only open changed the image"
    assert list(got) == ["b0", "b1", "b2"]
    assert [(b.granularity, b.enabled, b.persistent, b.inconsistent) for b in got.values()] == [
        (65536, True, True, False), (512, False, True, False), (M, False, True, False)]
    assert list(got["b0"].dirty_extents()) == granule_extents(WRITES_1 + WRITES_2, 65536, SIZE)
    assert list(got["b1"].dirty_extents()) == []
    assert list(got["b2"].dirty_extents()) == granule_extents(WRITES_1, M, SIZE)
    assert got["b0"].count() == len({k for o, n in WRITES_1 + WRITES_2
                                     for k in range(o // 65536, (o + n - 1) // 65536 + 1)}) * 65536
    # our oracle agrees with what QEMU itself exports
    assert qemu_dirty_extents(qemu_made, "b0") == list(got["b0"].dirty_extents())


def test_info_lists_bitmaps_like_qemu(qemu_made: Path, tmp_path: Path):
    qemu_img("bitmap", "--add", "-g", "2M", str(qemu_made), "a-much-longer-bitmap-name")
    for fmt in ("json", "human"):
        q = qemu_img("info", f"--output={fmt}", qemu_made.name, cwd=tmp_path).stdout
        p = parablock("info", f"--output={fmt}", qemu_made.name, cwd=tmp_path).stdout
        # the disk usage line depends on the moment of measurement in both tools
        strip = [ln for ln in q.splitlines() if "disk size" not in ln and "actual-size" not in ln]
        pstrip = [ln for ln in p.splitlines() if "disk size" not in ln and "actual-size" not in ln]
        assert pstrip == strip, fmt


def test_merge_by_qemu_of_our_bitmap(qemu_made: Path):
    node = open_node(qemu_made, read_only=False)
    try:
        bm = DirtyBitmap(SIZE, 4 * K, "ours")
        bm.set(5 * M, 1)
        bm.set(40 * M, 2 * M + 1)
        node.add_persistent_bitmap(bm)
    finally:
        node.close()
    assert_both_clean(qemu_made)
    qemu_img("bitmap", "--add", "-g", "4k", "--disable", str(qemu_made), "m")
    qemu_img("bitmap", "--merge", "ours", "--merge", "b2", str(qemu_made), "m")
    node = open_node(qemu_made)
    try:
        m = node.find_bitmap("m")
        assert m is not None and not m.enabled
        want = DirtyBitmap(SIZE, 4 * K)
        want.set(5 * M, 1)
        want.set(40 * M, 2 * M + 1)
        for o, n in granule_extents(WRITES_1, M, SIZE):
            want.set(o, n)
        assert list(m.dirty_extents()) == list(want.dirty_extents())
    finally:
        node.close()
    assert_both_clean(qemu_made)


def test_rw_open_marks_in_use_until_close(qemu_made: Path):
    node = open_node(qemu_made, read_only=False)
    try:
        flags = {b["name"]: b["flags"] for b in qemu_bitmaps(qemu_made)}
        assert flags == {"b0": ["in-use", "auto"], "b1": ["in-use"], "b2": ["in-use"]}
        node.write(48 * M, b"\x11" * 100)           # recorded by b0 (auto) only
        node.write_zeroes(50 * M, 128 * K)
        node.discard(56 * M, 64 * K)
    finally:
        node.close()
    assert {b["name"]: b["flags"] for b in qemu_bitmaps(qemu_made)} == {"b0": ["auto"], "b1": [], "b2": []}
    assert_both_clean(qemu_made)
    new = [(48 * M, 100), (50 * M, 128 * K), (56 * M, 64 * K)]
    assert qemu_dirty_extents(qemu_made, "b0") == granule_extents(WRITES_1 + WRITES_2 + new, 65536, SIZE)
    assert qemu_dirty_extents(qemu_made, "b1") == []
    assert qemu_dirty_extents(qemu_made, "b2") == granule_extents(WRITES_1, M, SIZE)
    # QEMU keeps recording into it after our close
    qio(qemu_made, "write 60m 4k")
    assert qemu_dirty_extents(qemu_made, "b0")[-2] == (60 * M, 64 * K)


def test_writes_through_parablock_io_keep_bitmaps(qemu_made: Path):
    parablock("io", "-f", "qcow2", "-c", "write -P 0x33 20m 1m", "-c", "write -c 0 64k", str(qemu_made),
              check=False)
    assert [b["name"] for b in qemu_bitmaps(qemu_made)] == ["b0", "b1", "b2"]
    assert_both_clean(qemu_made)
    want = granule_extents(WRITES_1 + WRITES_2 + [(20 * M, M)], 65536, SIZE)
    assert qemu_dirty_extents(qemu_made, "b0") == want


@pytest.mark.parametrize("opts,gran", [("", 65536), ("cluster_size=512", 512), ("cluster_size=4096", 1 << 20),
                                       ("refcount_bits=1,cluster_size=2M", 65536),
                                       ("lazy_refcounts=on", 4096), ("extended_l2=on", 32768)])
def test_bitmaps_we_store_are_qemus(tmp_path: Path, opts: str, gran: int):
    img = tmp_path / "p.qcow2"
    size = 300 * M + 4096  # not a multiple of the granularity
    args = ["create", "-f", "qcow2"] + (["-o", opts] if opts else []) + [str(img), str(size)]
    qemu_img(*args)
    node = open_node(img, read_only=False)
    writes = [(0, 1), (7 * M + 3, 5 * M), (size - 1, 1), (100 * M, 64 * M)]
    try:
        a = DirtyBitmap(size, gran, "alpha")
        for o, n in writes:
            a.set(o, n)
        node.add_persistent_bitmap(a)
        node.add_persistent_bitmap(DirtyBitmap(size, 65536, "empty", enabled=False))
        node.add_persistent_bitmap(DirtyBitmap(size, 512, "rec"))
        node.write(2 * M, b"\x01" * 4096)  # recorded by the enabled bitmaps from the moment they exist
        with pytest.raises(BlockError, match="Bitmap already exists: alpha"):
            node.add_persistent_bitmap(DirtyBitmap(size, 65536, "alpha"))
    finally:
        node.close()
    assert qemu_bitmaps(img) == [{"flags": ["auto"], "name": "alpha", "granularity": gran},
                                 {"flags": [], "name": "empty", "granularity": 65536},
                                 {"flags": ["auto"], "name": "rec", "granularity": 512}]
    assert_both_clean(img)
    assert qemu_dirty_extents(img, "alpha") == granule_extents(writes + [(2 * M, 4096)], gran, size)
    assert qemu_dirty_extents(img, "empty") == []
    assert qemu_dirty_extents(img, "rec") == [(2 * M, 4096)]
    # and read back by ourselves, then changed again by QEMU
    qio(img, "write 9m 1")
    node = open_node(img)
    try:
        rec = node.find_bitmap("rec")
        assert rec is not None and list(rec.dirty_extents()) == [(2 * M, 4096), (9 * M, 512)]
    finally:
        node.close()


def test_remove_frees_everything(qemu_made: Path):
    node = open_node(qemu_made, read_only=False)
    try:
        node.remove_persistent_bitmap("b1")
        with pytest.raises(BlockError, match="Dirty bitmap 'nope' not found"):
            node.remove_persistent_bitmap("nope")
    finally:
        node.close()
    assert [b["name"] for b in qemu_bitmaps(qemu_made)] == ["b0", "b2"]
    assert_both_clean(qemu_made)
    node = open_node(qemu_made, read_only=False)
    try:
        node.remove_persistent_bitmap("b0")
        node.remove_persistent_bitmap("b2")
    finally:
        node.close()
    assert qemu_bitmaps(qemu_made) == []
    assert_both_clean(qemu_made)
    # no extension, no autoclear bit: QEMU can add bitmaps again
    raw = qemu_made.read_bytes()
    assert struct.unpack_from(">Q", raw, 88)[0] & 1 == 0
    qemu_img("bitmap", "--add", str(qemu_made), "again")
    assert_both_clean(qemu_made)


def test_crash_leaves_bitmaps_in_use(qemu_made: Path):
    p = parablock("io", "-f", "qcow2", "-c", "write 0 64k", "-c", "abort", str(qemu_made), check=False)
    assert p.returncode != 0
    assert {b["name"]: b["flags"] for b in qemu_bitmaps(qemu_made)} == {
        "b0": ["in-use", "auto"], "b1": ["in-use"], "b2": ["in-use"]}
    rc, data = qemu_check(qemu_made)
    assert rc == 0, data
    node = open_node(qemu_made)
    try:
        assert all(bm.inconsistent for bm in node.bitmaps())
    finally:
        node.close()
    # a read-write open keeps inconsistent bitmaps as they are (QEMU's rule), refuses to resize, and
    # lets them be removed
    node = open_node(qemu_made, read_only=False)
    try:
        with pytest.raises(NotSupported, match="Bitmap 'b0' is inconsistent and cannot be used"):
            node.truncate(2 * SIZE)
        node.write(0, b"x")
    finally:
        node.close()
    assert {b["name"]: b["flags"] for b in qemu_bitmaps(qemu_made)} == {
        "b0": ["in-use", "auto"], "b1": ["in-use"], "b2": ["in-use"]}
    assert_both_clean(qemu_made)
    node = open_node(qemu_made, read_only=False)
    try:
        node.remove_persistent_bitmap("b1")
    finally:
        node.close()
    assert [b["name"] for b in qemu_bitmaps(qemu_made)] == ["b0", "b2"]
    assert_both_clean(qemu_made)


def test_qemu_crash_is_seen_as_inconsistent(qemu_made: Path):
    qio(qemu_made, "write 0 64k", "abort", check=False)
    node = open_node(qemu_made)
    try:
        got = [(b.name, b.inconsistent) for b in node.bitmaps()]
        assert got == [("b0", True), ("b1", True), ("b2", True)]
    finally:
        node.close()
    p = parablock("info", "--output=json", str(qemu_made))
    flags = [b["flags"] for b in json.loads(p.stdout)["format-specific"]["data"]["bitmaps"]]
    assert flags == [["in-use", "auto"], ["in-use"], ["in-use"]]


def test_resize_with_bitmaps(qemu_made: Path):
    parablock("resize", "-f", "qcow2", str(qemu_made), "+10M")
    assert_both_clean(qemu_made)
    assert qemu_dirty_extents(qemu_made, "b0") == granule_extents(WRITES_1 + WRITES_2, 65536, SIZE)
    qio(qemu_made, f"write {SIZE + M} 1")
    assert qemu_dirty_extents(qemu_made, "b0")[-1] == (SIZE + M, 65536)


def test_repair_keeps_bitmaps(qemu_made: Path):
    # make a leak: one more cluster at the end of the file, counted in refblock 0 (16-bit entries)
    raw = bytearray(qemu_made.read_bytes())
    raw += bytes(_div_up(len(raw), 65536) * 65536 + 65536 - len(raw))
    rt_off = struct.unpack_from(">Q", raw, 48)[0]
    rb0 = struct.unpack_from(">Q", raw, rt_off)[0]
    struct.pack_into(">H", raw, rb0 + 2 * (len(raw) // 65536 - 1), 1)
    qemu_made.write_bytes(bytes(raw))
    rc, data = qemu_check(qemu_made)
    assert rc == 3 and data["leaks"] == 1, data
    p = parablock("check", "--output=json", str(qemu_made), check=False)
    assert p.returncode == 3 and json.loads(p.stdout)["leaks"] == 1, p.stdout
    p = parablock("check", "-r", "all", "--output=json", str(qemu_made), check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    assert_both_clean(qemu_made)
    assert [b["name"] for b in qemu_bitmaps(qemu_made)] == ["b0", "b1", "b2"]
    assert qemu_dirty_extents(qemu_made, "b0") == granule_extents(WRITES_1 + WRITES_2, 65536, SIZE)


def test_autoclear_cleared_bitmaps_are_dropped_like_qemu(qemu_made: Path, tmp_path: Path):
    raw = bytearray(qemu_made.read_bytes())
    struct.pack_into(">Q", raw, 88, struct.unpack_from(">Q", raw, 88)[0] & ~1)
    qemu_made.write_bytes(bytes(raw))
    twin = tmp_path / "twin.qcow2"
    twin.write_bytes(bytes(raw))
    node = open_node(qemu_made)
    try:
        assert node.bitmaps() == []
    finally:
        node.close()
    assert qemu_made.read_bytes() == bytes(raw)
    # read-write opens drop the extension; the bitmap clusters are then leaks, for QEMU and for us
    parablock("io", "-f", "qcow2", "-c", "write 0 512", str(qemu_made))
    qio(twin, "write 0 512")
    assert qemu_bitmaps(qemu_made) == qemu_bitmaps(twin) == []
    rq, dq = qemu_check(twin)
    rp, dp = qemu_check(qemu_made)
    assert (rq, dq.get("leaks")) == (rp, dp.get("leaks")) and rq == 3
    p = parablock("check", "--output=json", str(qemu_made), check=False)
    assert p.returncode == 3 and json.loads(p.stdout)["leaks"] == dp["leaks"]


def test_v2_refuses_persistent_bitmaps(tmp_path: Path):
    img = tmp_path / "v2.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "compat=0.10", str(img), "1M")
    node = open_node(img, read_only=False)
    try:
        with pytest.raises(BlockError, match="Cannot store dirty bitmaps in qcow2 v2 files"):
            node.add_persistent_bitmap(DirtyBitmap(M, 65536, "b"))
        with pytest.raises(BlockError, match="Granularity is under minimum|must be power of 2"):
            node.add_persistent_bitmap(DirtyBitmap(M, 256, "b"))
    finally:
        node.close()
    img3 = tmp_path / "v3.qcow2"
    qemu_img("create", "-f", "qcow2", str(img3), "1M")
    node = open_node(img3, read_only=False)
    try:
        with pytest.raises(InvalidArgument):
            node.add_persistent_bitmap(DirtyBitmap(2 * M, 65536, "wrong-size"))
        with pytest.raises(BlockError, match="Name length exceeds maximum"):
            bm = DirtyBitmap(M, 65536)
            bm.name = "n" * 1024
            node.add_persistent_bitmap(bm)
    finally:
        node.close()
    assert_both_clean(img3)
    assert qemu_bitmaps(img3) == []


# --- hostile bitmap metadata ------------------------------------------------------------------------------

def _ext_offset(raw: bytes) -> int:
    off = struct.unpack_from(">I", raw, 100)[0]
    while True:
        etype, elen = struct.unpack_from(">II", raw, off)
        if etype == 0x23852875:
            return off + 8
        if etype == 0:
            raise AssertionError("no bitmaps extension")
        off += 8 + ((elen + 7) & ~7)


def _patch(img: Path, fn) -> None:
    raw = bytearray(img.read_bytes())
    fn(raw)
    img.write_bytes(bytes(raw))


def _dir_offset(raw) -> int:
    return struct.unpack_from(">Q", raw, _ext_offset(raw) + 16)[0]


PATCHES = {
    "nb_huge": lambda r: struct.pack_into(">I", r, _ext_offset(r), 0xFFFFFFFF),
    "nb_zero": lambda r: struct.pack_into(">I", r, _ext_offset(r), 0),
    "nb_more": lambda r: struct.pack_into(">I", r, _ext_offset(r), 4),
    "dir_size_huge": lambda r: struct.pack_into(">Q", r, _ext_offset(r) + 8, 1 << 40),
    "dir_past_eof": lambda r: struct.pack_into(">Q", r, _ext_offset(r) + 16, 1 << 40),
    "dir_unaligned": lambda r: struct.pack_into(">Q", r, _ext_offset(r) + 16, _dir_offset(r) + 8),
    "table_size_huge": lambda r: struct.pack_into(">I", r, _dir_offset(r) + 8, 0xFFFFFFFF),
    "granularity_bits_63": lambda r: struct.pack_into(">B", r, _dir_offset(r) + 17, 63),
    "name_size_huge": lambda r: struct.pack_into(">H", r, _dir_offset(r) + 18, 0xFFFF),
    "extra_data": lambda r: struct.pack_into(">I", r, _dir_offset(r) + 20, 8),
}


@pytest.mark.parametrize("name", sorted(PATCHES))
def test_bad_directory_is_a_clear_open_error(qemu_made: Path, name: str):
    _patch(qemu_made, PATCHES[name])
    before = digest(qemu_made)
    q = run(["qemu-img", "info", str(qemu_made)], check=False)
    p = parablock("info", str(qemu_made), check=False, timeout=60)
    assert q.returncode == 1
    assert p.returncode == 1, p.stdout
    assert "Traceback" not in p.stderr and p.stderr.startswith("parablock: Could not open"), p.stderr
    # the reason is QEMU's
    assert p.stderr.split(": ", 2)[-1].strip() == q.stderr.split(": ", 2)[-1].strip()
    p = parablock("io", "-f", "qcow2", "-c", "write 0 1", str(qemu_made), check=False, timeout=60)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert digest(qemu_made) == before
    p = parablock("check", str(qemu_made), check=False, timeout=60)
    assert "Traceback" not in p.stderr and p.returncode in (1, 2)


def _first_table(raw) -> int:
    return struct.unpack_from(">Q", raw, _dir_offset(raw))[0]


@pytest.mark.parametrize("value,text", [
    (1 << 62, "Could not read bitmap_table table from image for bitmap 'b0'"),
    ((1 << 50) | 1, "Could not read bitmap_table table"),
    (65536 * 3 + 512, "Could not read bitmap_table table"),
])
def test_bad_table_entry(qemu_made: Path, value: int, text: str):
    _patch(qemu_made, lambda r: struct.pack_into(">Q", r, _first_table(r), value))
    before = digest(qemu_made)
    node = open_node(qemu_made)
    try:
        with pytest.raises(CorruptImage, match=text):
            node.bitmaps()
    finally:
        node.close()
    assert digest(qemu_made) == before
    p = parablock("io", "-f", "qcow2", "-c", "write 0 1", str(qemu_made), check=False, timeout=60)
    assert p.returncode == 1 and text in p.stderr and "Traceback" not in p.stderr
    q = run(["qemu-io", "-f", "qcow2", "-c", "write 0 1", str(qemu_made)], check=False)
    assert text in q.stderr
    assert digest(qemu_made) == before


def test_data_past_eof_reads_as_zeros(qemu_made: Path):
    # a data cluster pointer past the end of the file is legal-looking: like QEMU, it reads as zeros
    _patch(qemu_made, lambda r: struct.pack_into(">Q", r, _first_table(r), 1 << 40))
    node = open_node(qemu_made)
    try:
        assert list(node.find_bitmap("b0").dirty_extents()) == []
    finally:
        node.close()


def test_store_mid_session_then_write_marks_in_use_again(qemu_made: Path):
    node = open_node(qemu_made, read_only=False)
    try:
        node.store_bitmaps()
        assert [b["flags"] for b in qemu_bitmaps(qemu_made)] == [["auto"], [], []]
        assert_qemu_clean(qemu_made)
        node.write(30 * M, b"z")  # the on-disk copy would now be stale: it must be flagged before the write
        assert [b["flags"] for b in qemu_bitmaps(qemu_made)] == [["in-use", "auto"], ["in-use"], ["in-use"]]
        node.store_bitmaps()
        node.store_bitmaps()  # twice in a row is fine and leaks nothing
    finally:
        node.close()
    assert_both_clean(qemu_made)
    assert qemu_dirty_extents(qemu_made, "b0") == granule_extents(WRITES_1 + WRITES_2 + [(30 * M, 1)], 65536,
                                                                  SIZE)


@pytest.mark.parametrize("tool", ["commit", "convert-n"])
def test_bulk_paths_record_like_qemu(tmp_path: Path, tool: str):
    """commit into a base with a bitmap (and convert -n into a target with one) dirty what QEMU dirties."""
    results = []
    for prog in ("qemu", "parablock"):
        d = tmp_path / prog
        d.mkdir()
        base, top = d / "base.qcow2", d / "top.qcow2"
        qemu_img("create", "-f", "qcow2", str(base), str(SIZE))
        qio(base, "write -P 1 0 1m")
        qemu_img("bitmap", "--add", "-g", "128k", str(base), "b0")
        if tool == "commit":
            qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(top), cwd=d)
        else:
            qemu_img("create", "-f", "qcow2", str(top), str(SIZE))
        qio(top, "write -P 2 3m 200k", "write -P 3 40m 1m", "write -c -P 4 50m 64k")
        if tool == "commit":
            args = ["commit", "-f", "qcow2", "-d", str(top)]
        else:
            args = ["convert", "-n", "-f", "qcow2", "-O", "qcow2", str(top), str(base)]
        if prog == "qemu":
            qemu_img(*args)
        else:
            parablock(*args)
        assert_qemu_clean(base)
        results.append(qemu_dirty_extents(base, "b0"))
    # at least the source's data is dirty (convert -n also writes zeroes over the rest: all of it is)
    must = granule_extents([(3 * M, 200 * K), (40 * M, M), (50 * M, 64 * K)], 128 * K, SIZE)
    for res in results:
        covered = DirtyBitmap(SIZE, 128 * K)
        for o, n in res:
            covered.set(o, n)
        for o, n in must:
            assert covered.next_clean(o, o + n) == -1, (res, must)
    assert results[0] == results[1]
