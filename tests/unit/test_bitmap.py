"""DirtyBitmap (engine/bitmap.py) against a simple model, and the qcow2 bitmap layout (qcow2_bitmaps.py).

The model is a Python set of dirty granule indices with QEMU's rules written out the obvious way:
set dirties every touched granule, reset needs aligned ranges, count is granules x granularity.
A stateful hypothesis machine drives random operations on both and compares every observable
(is_dirty, count, extents, next_dirty/next_clean, the serialised bytes) after each step.
"""
from __future__ import annotations

import struct
import time

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from engine.bitmap import DirtyBitmap
from engine.errors import BlockError, CorruptImage, ImageOpenError, InvalidArgument
from engine.formats import qcow2_bitmaps as QB


def _div_up(a: int, b: int) -> int:
    return -(-a // b)


class Model:
    def __init__(self, size: int, gran: int) -> None:
        self.size, self.gran = size, gran
        self.nbits = _div_up(size, gran)
        self.dirty: set[int] = set()

    def set(self, off: int, n: int) -> None:
        if n:
            self.dirty.update(range(off // self.gran, (off + n - 1) // self.gran + 1))

    def reset(self, off: int, n: int) -> None:
        self.dirty.difference_update(range(off // self.gran, _div_up(off + n, self.gran)))

    def extents(self, off: int = 0, length: int | None = None) -> list[tuple[int, int]]:
        end = self.size if length is None else min(off + length, self.size)
        out: list[tuple[int, int]] = []
        for pos in range(off, end):
            if pos // self.gran in self.dirty:
                if out and out[-1][0] + out[-1][1] == pos:
                    out[-1] = (out[-1][0], out[-1][1] + 1)
                else:
                    out.append((pos, 1))
        return out

    def next(self, off: int, end: int, dirty: bool) -> int:
        for pos in range(off, min(end, self.size)):
            if (pos // self.gran in self.dirty) == dirty:
                return pos
        return -1

    def serialized(self) -> bytes:
        out = bytearray(_div_up(self.nbits, 8))
        for k in self.dirty:
            out[k // 8] |= 1 << (k % 8)
        return bytes(out)


# small granularities on a byte-level model are not allowed (>= 512); scale the model instead: sizes here
# are a few dozen granules so the byte-by-byte model stays fast
GRAN = 512


class BitmapMachine(RuleBasedStateMachine):
    @initialize(nbits=st.integers(min_value=1, max_value=70),
                tail=st.integers(min_value=0, max_value=GRAN - 1))
    def init(self, nbits: int, tail: int) -> None:
        size = max(1, (nbits - 1) * GRAN + tail) if tail else nbits * GRAN
        self.bm = DirtyBitmap(size, GRAN, "m")
        self.model = Model(size, GRAN)

    def _range(self, data) -> tuple[int, int]:
        size = self.model.size
        off = data.draw(st.integers(min_value=0, max_value=size))
        n = data.draw(st.integers(min_value=0, max_value=size - off))
        return off, n

    @rule(data=st.data())
    def set_range(self, data) -> None:
        off, n = self._range(data)
        self.bm.set(off, n)
        self.model.set(off, n)

    @rule(data=st.data())
    def reset_aligned(self, data) -> None:
        g = self.model.nbits
        a = data.draw(st.integers(min_value=0, max_value=g))
        b = data.draw(st.integers(min_value=a, max_value=g))
        off, end = a * GRAN, min(b * GRAN, self.model.size)
        if end < off:
            return
        self.bm.reset(off, end - off)
        self.model.reset(off, end - off)

    @rule(data=st.data())
    def reset_misaligned_refused(self, data) -> None:
        off, n = self._range(data)
        aligned = off % GRAN == 0 and (n % GRAN == 0 or off + n == self.model.size)
        before = self.bm.to_disk_bytes()
        if aligned:
            return
        with pytest.raises(InvalidArgument):
            self.bm.reset(off, n)
        assert self.bm.to_disk_bytes() == before

    @rule()
    def clear(self) -> None:
        self.bm.clear()
        self.model.dirty.clear()

    @rule(data=st.data(), other_gran=st.sampled_from([512, 1024, 4096]))
    def merge(self, data, other_gran: int) -> None:
        other = DirtyBitmap(self.model.size, other_gran, "o")
        om = Model(self.model.size, other_gran)
        for _ in range(data.draw(st.integers(min_value=0, max_value=3))):
            off, n = self._range(data)
            other.set(off, n)
            om.set(off, n)
        self.bm.merge_from(other)
        for off, n in om.extents():
            self.model.set(off, n)

    @rule(data=st.data())
    def resize(self, data) -> None:
        new = data.draw(st.integers(min_value=0, max_value=80 * GRAN))
        self.bm.resize(new)
        nb = _div_up(new, GRAN)
        self.model.size = new
        self.model.nbits = nb
        self.model.dirty = {k for k in self.model.dirty if k < nb}

    @rule()
    def roundtrip(self) -> None:
        raw = self.bm.to_disk_bytes()
        again = DirtyBitmap.from_disk_bytes(raw, self.model.size, GRAN)
        assert again == self.bm
        cp = self.bm.copy()
        assert cp == self.bm and cp._bits is not self.bm._bits

    @invariant()
    def agrees(self) -> None:
        m, bm = self.model, self.bm
        assert bm.count() == len(m.dirty) * GRAN
        assert bm.to_disk_bytes() == m.serialized()
        assert list(bm.dirty_extents()) == m.extents()

    @rule(data=st.data())
    def probes(self, data) -> None:
        m, bm = self.model, self.bm
        if not m.size:
            return
        off, n = self._range(data)
        assert list(bm.dirty_extents(off, n)) == m.extents(off, n)
        end = off + n
        assert bm.next_dirty(off, end) == m.next(off, end, True)
        assert bm.next_clean(off, end) == m.next(off, end, False)
        pos = data.draw(st.integers(min_value=0, max_value=m.size))
        assert bm.is_dirty(pos) == (pos < m.size and pos // GRAN in m.dirty)


TestBitmapMachine = BitmapMachine.TestCase
TestBitmapMachine.settings = settings(max_examples=150, stateful_step_count=25, deadline=None,
                                      suppress_health_check=[HealthCheck.too_slow])


# --- QEMU facts -----------------------------------------------------------------------------------------

def test_count_is_granules_times_granularity_unclipped():
    # checked against qemu-storage-daemon: a dirty last granule of a 1000448-byte disk counts 65536
    bm = DirtyBitmap(1000448, 65536)
    bm.set(999936, 512)
    bm.set(0, 1)
    assert bm.count() == 131072
    assert list(bm.dirty_extents()) == [(0, 65536), (983040, 1000448 - 983040)]


def test_set_rounds_outwards_and_reset_needs_alignment():
    bm = DirtyBitmap(1 << 20, 65536)
    bm.set(65535, 2)
    assert list(bm.dirty_extents()) == [(0, 131072)]
    with pytest.raises(InvalidArgument):
        bm.reset(1, 65536)
    with pytest.raises(InvalidArgument):
        bm.reset(0, 100)
    bm.reset(0, 65536)
    assert list(bm.dirty_extents()) == [(65536, 65536)]
    with pytest.raises(InvalidArgument):
        bm.set((1 << 20) - 1, 2)


def test_reset_may_end_at_an_unaligned_disk_end():
    bm = DirtyBitmap(1000448, 65536)
    bm.fill()
    bm.reset(983040, 1000448 - 983040)
    assert bm.count() == 15 * 65536


def test_disk_layout_lsb_first():
    bm = DirtyBitmap(64 << 20, 65536)
    bm.set(0, 1)
    bm.set(9 * 65536, 1)
    raw = bm.to_disk_bytes()
    assert len(raw) == 128 and raw[0] == 0x01 and raw[1] == 0x02 and not any(raw[2:])
    # tail bits past the disk's end are dropped when loading
    small = DirtyBitmap.from_disk_bytes(b"\xff\xff", 10 * 512, 512)
    assert small.to_disk_bytes() == b"\xff\x03"


def test_bad_arguments():
    for g in (0, 256, 65535, 3 * 512):
        with pytest.raises(InvalidArgument):
            DirtyBitmap(1 << 20, g)
    with pytest.raises(InvalidArgument):
        DirtyBitmap(1 << 20, name="x" * 1024)
    a, b = DirtyBitmap(1 << 20, name="a"), DirtyBitmap(2 << 20, name="b")
    with pytest.raises(BlockError, match="incompatible"):
        a.merge_from(b)
    b = DirtyBitmap(1 << 20, name="b")
    b.inconsistent = True
    with pytest.raises(BlockError, match="Bitmap 'b' is inconsistent and cannot be used"):
        a.merge_from(b)
    a.busy = True
    with pytest.raises(BlockError, match="currently in use"):
        a.merge_from(DirtyBitmap(1 << 20))


def test_big_sparse_bitmap_is_fast():
    # 1 TiB at 64 KiB = 16 M bits: sparse walks, merge and count must not loop per bit in Python
    size = 1 << 40
    bm = DirtyBitmap(size, 65536, "big")
    spots = [(k * 7919 * 65536 * 97) % size for k in range(200)]
    t0 = time.perf_counter()
    for s in spots:
        bm.set(s, 3 * 65536)
    bm.set(size - 1, 1)
    ext = list(bm.dirty_extents())
    other = DirtyBitmap(size, 1 << 20)
    other.set(12345 << 20, 1)
    bm.merge_from(other)
    bm.merge_from(bm.copy())
    n = bm.count()
    nd = bm.next_dirty(0)
    nc = bm.next_clean(spots[1])
    elapsed = time.perf_counter() - t0
    assert ext[-1] == (size - 65536, 65536)
    assert nd == min(spots)
    assert nc > spots[1] and not bm.is_dirty(nc) and bm.is_dirty(nc - 1)
    assert n >= 200 * 65536
    assert elapsed < 2.0, elapsed


@given(st.lists(st.tuples(st.integers(0, (1 << 30) - 1), st.integers(0, 1 << 24)), max_size=20),
       st.sampled_from([512, 65536, 1 << 20]))
@settings(max_examples=60, deadline=None)
def test_extents_cover_exactly_the_dirty_granules(writes, gran):
    size = 1 << 30
    bm = DirtyBitmap(size, gran)
    granules: set[int] = set()
    for off, n in writes:
        n = min(n, size - off)
        bm.set(off, n)
        if n:
            granules.update(range(off // gran, (off + n - 1) // gran + 1))
    got: set[int] = set()
    prev_end = -1
    for off, n in bm.dirty_extents():
        assert off % gran == 0 and n > 0 and off > prev_end  # merged: runs never touch
        prev_end = off + n
        got.update(range(off // gran, _div_up(off + n, gran)))
    assert got == granules
    assert bm.count() == len(granules) * gran


# --- qcow2 layout ---------------------------------------------------------------------------------------

CS = 65536


def _entry(name="b0", t_off=3 * CS, t_size=1, flags=QB.FLAG_AUTO, gbits=16, btype=1, extra=b""):
    nb = name.encode()
    raw = struct.pack(">QIIBBHI", t_off, t_size, flags, btype, gbits, len(nb), len(extra)) + extra + nb
    return raw + bytes((-len(raw)) % 8)


def test_directory_roundtrip():
    entries = [QB.DirEntry(3 * CS, 1, QB.FLAG_AUTO, 16, "b0"),
               QB.DirEntry(5 * CS, 2, QB.FLAG_IN_USE, 9, "a-longer-name")]
    raw = QB.build_directory(entries)
    assert len(raw) == QB.entry_size(2) + QB.entry_size(13) == 32 + 40
    assert QB.parse_directory(raw, 2, CS, 64 << 20) == entries
    assert entries[1].info_flags() == ["in-use"] and entries[0].info_flags() == ["auto"]


@pytest.mark.parametrize("raw,nb,text", [
    (_entry(), 2, "Less bitmaps found"),
    (_entry() + _entry("b1"), 1, "More bitmaps found"),
    (_entry()[:20], 1, "Broken bitmap directory"),
    (_entry(extra=b"12345678"), 1, "Bitmap extra data is not supported"),
    (_entry(t_size=0), 1, "Bitmap 'b0' doesn't satisfy the constraints"),
    (_entry(t_off=3 * CS + 512), 1, "doesn't satisfy"),
    (_entry(gbits=8), 1, "doesn't satisfy"),
    (_entry(gbits=32), 1, "doesn't satisfy"),
    (_entry(flags=4), 1, "doesn't satisfy"),  # extra_data_compatible: reserved for QEMU 7.2
    (_entry(btype=2), 1, "doesn't satisfy"),
    (_entry(t_size=QB.MAX_TABLE_SIZE + 1), 1, "doesn't satisfy"),
    (b"", 1, "size is zero"),
])
def test_directory_rejects(raw, nb, text):
    with pytest.raises(CorruptImage, match=text):
        QB.parse_directory(raw, nb, CS, 64 << 20)


def test_table_too_small_only_matters_when_not_in_use():
    # 1 table entry covers CS*8 granules; a bigger disk needs more unless the bitmap is in use
    big = CS * 8 * 65536 + 1
    with pytest.raises(CorruptImage):
        QB.parse_directory(_entry(), 1, CS, big)
    assert QB.parse_directory(_entry(flags=QB.FLAG_IN_USE), 1, CS, big)[0].in_use


@pytest.mark.parametrize("data,text", [
    (b"\0" * 23, "Invalid extension length"),
    (struct.pack(">IIQQ", 1, 1, 32, CS), "Reserved field is not zero"),
    (struct.pack(">IIQQ", 0, 0, 32, CS), "zero bitmaps"),
    (struct.pack(">IIQQ", 65536, 0, 32, CS), "exceeding the QEMU supported maximum of 65535"),
    (struct.pack(">IIQQ", 1, 0, 32, CS + 8), "invalid bitmap directory offset"),
    (struct.pack(">IIQQ", 1, 0, QB.MAX_DIRECTORY_SIZE + 1, CS), "exceeds the maximum supported size"),
])
def test_ext_rejects(data, text):
    with pytest.raises(ImageOpenError, match=text):
        QB.parse_ext(data, CS)


def test_ext_roundtrip_and_tables():
    ext = QB.BitmapsExt(2, 72, 7 * CS)
    assert QB.parse_ext(QB.build_ext(ext), CS) == ext
    good = [0, 1, 4 * CS]
    assert QB.parse_table(QB.build_table(good), 3, CS) == good
    for bad in (4 * CS | 1, 4 * CS + 512, 1 << 60, 2):
        with pytest.raises(CorruptImage):
            QB.parse_table(QB.build_table([bad]), 1, CS)
    assert QB.table_size_for(64 << 20, 65536, CS) == 1
    assert QB.table_size_for(CS * 8 * 512 + 1, 512, CS) == 2


def test_constraints_texts():
    assert QB.constraints_error("b", 256, 1 << 30, CS) == "Granularity is under minimum (512 bytes)"
    assert QB.constraints_error("b", 1 << 32, 1 << 30, CS) == "Granularity exceeds maximum (2147483648 bytes)"
    assert QB.constraints_error("b", 512, 1 << 62, CS).startswith("Too much space")
    assert (QB.constraints_error("x" * 1024, 65536, 1 << 30, CS)
            == "Name length exceeds maximum (1023 characters)")
    assert QB.constraints_error("b", 65536, 1 << 30, CS) is None
