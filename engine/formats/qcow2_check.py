"""``qemu-img check`` for qcow2: consistency check and repair of the refcount structures.

Layer: engine, pure logic.  All I/O is injected as callables (``read``/``write``/``truncate``/``flush``), so
this module never opens files and never consults a clock.  It may import only the standard library,
:mod:`engine.formats.qcow2_layout` and :mod:`engine.formats.qcow2_bitmaps` (pure on-disk structure helpers)
and :mod:`engine.errors`.

What it mirrors: QEMU 7.2's ``qcow2_co_check_locked`` / ``qcow2_check_refcounts`` (block/qcow2-refcount.c)
plus ``qemu-img check``'s "repair, then check again" wrapper.  Messages are the lines QEMU prints on stderr,
in QEMU's wording.

Invariants:
* Never raises on a hostile image: every loop is bounded by the file size (tables are only read where they
  lie inside the file, repeated references to one L2 table are walked once and applied with a
  multiplicity, a global work budget stops pathological metadata).  Problems become ``corruptions`` or
  ``check_errors``.  The one exception: a header QEMU could not open raises :class:`ImageOpenError`
  from ``parse_header`` (the CLI reports "Could not open ...").
* Nothing is written unless ``fix`` is non-zero; writes go only to refcount structures, L1/L2 entries
  (COPIED flags, unaligned preallocated entries), the header's refcount-table pointer / snapshot count /
  incompatible-feature bits, and (for a refblock outside the image) a file extension.
* A rebuilt refcount structure is written past both the current EOF and every referenced cluster, so a
  rebuild never overwrites existing data; the new structures count themselves.
"""
from __future__ import annotations

import struct
import sys
from array import array
from dataclasses import dataclass, field, replace
from itertools import chain, compress, repeat
from typing import Callable

from engine.errors import CorruptImage, ImageOpenError
from engine.formats import qcow2_bitmaps as bitmaps
from engine.formats.qcow2_layout import (
    L1E_OFFSET_MASK,
    L1E_RESERVED,
    L2E_OFFSET_MASK,
    L2E_STD_RESERVED,
    MAX_CLUSTER_BITS,
    MIN_CLUSTER_BITS,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    REFT_OFFSET_MASK,
    Autoclear,
    Incompat,
    compressed_geometry,
    compressed_host_range,
    parse_header,
    parse_snapshots,
    refcounts_per_block,
)

FIX_LEAKS = 1
FIX_ERRORS = 2

# QEMU limits (block/qcow2.h)
_MAX_L1_ENTRIES = (32 << 20) // 8
_MAX_SNAPSHOTS = 65536
_MAX_SNAPSHOT_EXTRA = 1024
_MAX_SNAPSHOTS_SIZE = 1024 * _MAX_SNAPSHOTS
_INT_MAX = (1 << 31) - 1
_REFT_RESERVED = 0x1FF
_BITMAP_ALL_ALLOC = 0x00000000FFFFFFFF
_BITMAP_ALL_ZEROES = 0xFFFFFFFF00000000
_MAX_MESSAGES = 100_000
_LITTLE = sys.byteorder == "little"
_BDRV_MAX_LENGTH = (1 << 63) - (1 << 30)  # requests reaching past this fail with EIO in qemu's block layer


def _bad_request(offset: int, length: int) -> bool:
    return offset > _BDRV_MAX_LENGTH or length > _BDRV_MAX_LENGTH - offset


@dataclass
class CheckResult:
    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    messages: list[str] = field(default_factory=list)
    # Set when the check itself failed (qemu-img: "Check failed: <error>", exit 1, no JSON); the text is
    # qemu's strerror, e.g. "Input/output error".
    error: str | None = None


class _Fatal(Exception):
    """The check cannot continue (qemu returns -errno from bdrv_check)."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


# --- refcount block codecs --------------------------------------------------------------------------

def _sub_byte_tables(order: int) -> tuple[list[tuple[int, ...]], dict[tuple[int, ...], int]]:
    bits = 1 << order
    per = 8 // bits
    mask = (1 << bits) - 1
    dec = [tuple((b >> (i * bits)) & mask for i in range(per)) for b in range(256)]
    enc = {t: b for b, t in enumerate(dec)}
    return dec, enc


_SUB_TABLES = {o: _sub_byte_tables(o) for o in (0, 1, 2)}
_ARRAY_CODE = {4: "H", 5: "I" if array("I").itemsize == 4 else "L", 6: "Q"}


def decode_refblock(buf: bytes, order: int) -> list[int]:
    """All refcounts of one refblock (``len(buf)*8 >> order`` entries)."""
    if order == 3:
        return list(buf)
    if order < 3:
        dec = _SUB_TABLES[order][0]
        return list(chain.from_iterable(map(dec.__getitem__, buf)))
    a = array(_ARRAY_CODE[order])
    a.frombytes(buf)
    if _LITTLE:
        a.byteswap()
    return a.tolist()


def encode_refblock(values: list[int], order: int, cluster_size: int) -> bytes:
    """Serialise refcounts (missing tail entries are 0) into one refblock of ``cluster_size`` bytes."""
    n = (cluster_size * 8) >> order
    vals = list(values[:n])
    while vals and not vals[-1]:
        vals.pop()
    if not vals:
        return bytes(cluster_size)
    if order == 3:
        out = bytes(vals)
    elif order < 3:
        per = 8 >> order
        vals.extend(repeat(0, (-len(vals)) % per))
        enc = _SUB_TABLES[order][1]
        it = iter(vals)
        out = bytes(map(enc.__getitem__, zip(*([it] * per))))
    else:
        a = array(_ARRAY_CODE[order], vals)
        if _LITTLE:
            a.byteswap()
        out = a.tobytes()
    return out + bytes(cluster_size - len(out))


def _u64_array(buf: bytes) -> array:
    a = array("Q")
    a.frombytes(buf[: len(buf) // 8 * 8])
    if _LITTLE:
        a.byteswap()
    return a


def _last_nonzero(vals: list[int]) -> int:
    for j in range(len(vals) - 1, -1, -1):
        if vals[j]:
            return j
    return -1


# --- I/O wrapper ------------------------------------------------------------------------------------

class _Io:
    def __init__(self, read, file_size, write, truncate, flush) -> None:
        self._read = read
        self.size = file_size
        self._write = write
        self._truncate = truncate
        self._flush = flush

    def pread(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset``; zeros past EOF (only the in-file part is actually read)."""
        if length <= 0:
            return b""
        if offset >= self.size:
            return bytes(length)
        avail = min(length, self.size - offset)
        data = bytes(self._read(offset, avail))[:avail]
        if len(data) < length:
            data += bytes(length - len(data))
        return data

    def pwrite(self, offset: int, data: bytes) -> None:
        if self._write is None:
            raise _Fatal("Operation not permitted")
        self._write(offset, bytes(data))
        self.size = max(self.size, offset + len(data))

    def truncate(self, size: int) -> None:
        if self._truncate is None:
            raise _Fatal("Operation not supported")
        self._truncate(size)
        self.size = size

    def flush(self) -> None:
        if self._flush is not None:
            self._flush()


# --- the on-disk refcounts --------------------------------------------------------------------------

_ERR = object()  # a refblock that cannot be read (unaligned offset)


class _DiskRefcounts:
    """qcow2_get_refcount() over the image's refcount table, with a decoded-block cache."""

    def __init__(self, chk: "_Checker") -> None:
        self.chk = chk
        self.blocks: dict[int, object] = {}
        self.dirty: set[int] = set()
        self._flat: list | None = None

    def block(self, b: int):
        """Decoded refcounts of refblock ``b``: a list, None (no refblock: all 0) or _ERR."""
        if b in self.blocks:
            return self.blocks[b]
        c = self.chk
        if b >= len(c.reftable):
            blk = None
        else:
            off = c.reftable[b] & REFT_OFFSET_MASK
            if not off:
                blk = None
            elif off & (c.cs - 1) or _bad_request(off, c.cs):
                blk = _ERR
            else:
                blk = decode_refblock(c.io.pread(off, c.cs), c.order)
        self.blocks[b] = blk
        return blk

    def get(self, k: int) -> int | None:
        blk = self.block(k // self.chk.epb)
        if blk is _ERR:
            return None
        if blk is None:
            return 0
        return blk[k % self.chk.epb]  # type: ignore[index]

    def set(self, k: int, value: int) -> None:
        b = k // self.chk.epb
        blk = self.block(b)
        assert isinstance(blk, list)
        blk[k % self.chk.epb] = value
        self.dirty.add(b)
        self._flat = None

    def flat(self) -> list:
        """Refcounts of clusters [0, nb) as one list (None where the refblock cannot be read)."""
        c = self.chk
        if self._flat is None or len(self._flat) < c.nb:
            parts = []
            for b in range((c.nb + c.epb - 1) // c.epb):
                blk = self.block(b)
                parts.append(repeat(None, c.epb) if blk is _ERR else repeat(0, c.epb) if blk is None else blk)
            self._flat = list(chain.from_iterable(parts))
        return self._flat

    def write_back(self) -> None:
        c = self.chk
        for b in sorted(self.dirty):
            blk = self.blocks[b]
            c.io.pwrite(c.reftable[b] & REFT_OFFSET_MASK, encode_refblock(blk, c.order, c.cs))  # type: ignore
        self.dirty.clear()


class _Masks:
    """Per-entry bit masks repeated over a whole standard L2 table (as one big-endian integer)."""

    def __init__(self, cs: int, cb: int) -> None:
        n = cs // 8

        def rep(v: int) -> int:
            return int.from_bytes(struct.pack(">Q", v) * n, "big")

        self.bad = rep(~(L2E_OFFSET_MASK | OFLAG_COPIED) & 0xFFFFFFFFFFFFFFFF)
        self.align = rep(L2E_OFFSET_MASK & (cs - 1))
        self.offset = rep(L2E_OFFSET_MASK)
        self.compressed = rep(OFLAG_COMPRESSED)
        self.ones = rep(1)


# --- L2 walk effects ----------------------------------------------------------------------------------

class _L2Effect:
    """What walking one L2 table contributes (qemu's check_refcounts_l2), so repeats can be replayed."""

    __slots__ = ("incs", "corruptions", "corruptions_fixed", "check_errors", "messages", "allocated",
                 "fragmented", "compressed", "modified", "pending")

    def __init__(self) -> None:
        self.incs = array("q")
        self.corruptions = 0
        self.corruptions_fixed = 0
        self.check_errors = 0
        self.messages: list[str] = []
        self.allocated = 0
        self.fragmented = 0
        self.compressed = 0
        self.modified = False
        self.pending = 0


class _Checker:
    def __init__(self, io: _Io) -> None:
        self.io = io
        self.messages: list[str] = []
        self.suppressed = 0
        self.work = 0

    # -- messages / budget
    def msg(self, text: str) -> None:
        if len(self.messages) < _MAX_MESSAGES:
            self.messages.append(text)
        else:
            self.suppressed += 1

    def spend(self, n: int) -> None:
        self.work += n
        if self.work > self.budget:
            raise _Fatal("File too large")

    # -- "open": header, refcount table, snapshots
    def load(self) -> None:
        head = self.io.pread(0, 24)
        cbits = struct.unpack_from(">I", head, 20)[0]
        first = 1 << cbits if MIN_CLUSTER_BITS <= cbits <= MAX_CLUSTER_BITS else 4096
        buf = self.io.pread(0, first)
        h = parse_header(buf)
        self.h = h
        self.cb = h.cluster_bits
        self.cs = h.cluster_size
        self.order = h.refcount_order
        self.maxrc = (1 << (1 << self.order)) - 1
        self.epb = refcounts_per_block(self.cb, self.order)
        self.ext = h.extended_l2
        self.l2_entries = self.cs // (16 if self.ext else 8)
        self.coff_mask = (1 << compressed_geometry(self.cb)[0]) - 1
        self.budget = 8 * (self.io.size // 8) + (1 << 24)
        self.load_reftable()

    def load_reftable(self) -> None:
        h = self.h
        n = h.refcount_table_clusters * self.cs // 8
        self.reftable = _u64_array(self.io.pread(h.refcount_table_offset, n * 8))
        self.disk = _DiskRefcounts(self)

    def read_snapshot_table(self, res: CheckResult, fix: int) -> None:
        """qcow2_check_read_snapshot_table(): sets self.snapshots and self.snapshots_size."""
        h = self.h
        self.snapshots = []
        self.snapshots_size = 0
        nb = h.nb_snapshots
        if nb > _MAX_SNAPSHOTS and fix & FIX_ERRORS:
            self.msg(f"Discarding {nb - _MAX_SNAPSHOTS} overhanging snapshots")
            reduced = nb - _MAX_SNAPSHOTS
            nb = _MAX_SNAPSHOTS
            self.io.pwrite(60, struct.pack(">I", nb))
            h.nb_snapshots = nb
            res.corruptions_fixed += reduced
        if nb > _MAX_SNAPSHOTS:
            res.check_errors += 1
            self.msg("parablock: ERROR snapshot table too large")
            self.msg(f"You can force-remove all {nb - _MAX_SNAPSHOTS} overhanging snapshots with "
                     "qemu-img check -r all")
            raise _Fatal("File too large")
        if h.snapshots_offset % self.cs or (1 << 63) - 1 - nb * 40 < h.snapshots_offset:
            res.check_errors += 1
            self.msg("parablock: ERROR snapshot table offset invalid")
            raise _Fatal("Invalid argument")
        if not nb:
            return
        base = h.snapshots_offset
        off = base
        for i in range(nb):
            off = (off + 7) & ~7
            hdr = self.io.pread(off, 40)
            id_len, name_len = struct.unpack_from(">HH", hdr, 12)
            extra = struct.unpack_from(">I", hdr, 36)[0]
            if extra > _MAX_SNAPSHOT_EXTRA:
                res.check_errors += 1
                self.msg(f"parablock: ERROR failed to read the snapshot table: Too much extra metadata in "
                         f"snapshot table entry {i}")
                raise _Fatal("File too large")
            off += 40 + extra + id_len + name_len
            if off - base > _MAX_SNAPSHOTS_SIZE:
                res.check_errors += 1
                self.msg("parablock: ERROR failed to read the snapshot table: Snapshot table is too big")
                raise _Fatal("File too large")
        self.snapshots_size = off - base
        try:
            self.snapshots, _ = parse_snapshots(self.io.pread(base, self.snapshots_size + 8), nb, h.version)
        except CorruptImage as exc:  # cannot happen with the sizes computed above; be safe anyway
            res.check_errors += 1
            self.msg(f"parablock: ERROR failed to read the snapshot table: {exc}")
            raise _Fatal("Invalid argument") from None
        if h.version >= 3:
            off = base
            for i in range(nb):
                off = (off + 7) & ~7
                hdr = self.io.pread(off, 40)
                id_len, name_len = struct.unpack_from(">HH", hdr, 12)
                extra = struct.unpack_from(">I", hdr, 36)[0]
                if extra < 16:
                    res.corruptions += 1
                    self.msg(f"{'Repairing' if fix & FIX_ERRORS else 'ERROR'} snapshot table entry {i} "
                             "is incomplete")
                off += 40 + extra + id_len + name_len

    def read_table(self, offset: int, entries: int) -> array:
        """A u64 table; only its part inside the file is read (the rest would read as zeros)."""
        n = min(entries, (max(0, self.io.size - offset) + 7) // 8)
        self.spend(n + 1)
        return _u64_array(self.io.pread(offset, n * 8))

    # -- the in-memory refcount table (IMRT)
    def inc(self, res: CheckResult, offset: int, size: int) -> None:
        """qcow2_inc_refcounts_imrt()."""
        if size <= 0:
            return
        cs = self.cs
        if offset + size - self.io.size >= cs:
            self.msg("ERROR: counting reference for region exceeding the end of the file by one cluster or "
                     f"more: offset 0x{offset:x} size 0x{size:x}")
            res.corruptions += 1
            return
        first = offset >> self.cb
        last = (offset + size - 1) >> self.cb
        self.spend(last - first + 1)
        self.grow(last + 1)
        imrt = self.imrt
        maxrc = self.maxrc
        for k in range(first, last + 1):
            v = imrt[k]
            if v >= maxrc:
                self.overflow(res, k)
            else:
                imrt[k] = v + 1

    def overflow(self, res: CheckResult, k: int) -> None:
        self.msg(f"ERROR: overflow cluster offset=0x{k << self.cb:x}")
        self.msg("Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a "
                 "clean copy if the image cannot be opened for writing")
        res.corruptions += 1

    def grow(self, n: int) -> None:
        if n > len(self.imrt):
            self.imrt.extend(repeat(0, n - len(self.imrt)))
        if n > self.nb:
            self.nb = n

    def apply_effect(self, res: CheckResult, eff: _L2Effect, mult: int) -> None:
        if not eff.incs or not mult:
            return
        top = max(eff.incs)
        self.grow(top + 1)
        imrt = self.imrt
        for k in eff.incs:
            imrt[k] += mult
        maxrc = self.maxrc
        if max(imrt[min(eff.incs):top + 1]) > maxrc:
            # qemu refuses each increment at the maximum: clamp and report every refused one
            for k in sorted(set(eff.incs)):
                over = imrt[k] - maxrc
                if over > 0:
                    imrt[k] = maxrc
                    for _ in range(over):
                        self.overflow(res, k)

    # -- calculate_refcounts()
    def calculate(self, res: CheckResult, fix: int, nb: int) -> None:
        self.imrt = [0] * nb
        self.nb = nb
        h = self.h
        self.effects: dict[int, _L2Effect] = {}
        self.all_effects: list[_L2Effect] = []
        self.inc(res, 0, self.cs)
        self.check_l1(res, h.l1_table_offset, h.l1_size, True, fix)
        for sn in self.snapshots:
            if sn.l1_table_offset & (self.cs - 1):
                self.msg(f"ERROR snapshot {sn.id_str} ({sn.name}) l1_offset={sn.l1_table_offset:#x}: "
                         "L1 table "
                         "is not cluster aligned; snapshot table entry corrupted")
                res.corruptions += 1
                continue
            if sn.l1_size > _MAX_L1_ENTRIES:
                self.msg(f"ERROR snapshot {sn.id_str} ({sn.name}) l1_size={sn.l1_size:#x}: L1 table is too "
                         "large; snapshot table entry corrupted")
                res.corruptions += 1
                continue
            self.check_l1(res, sn.l1_table_offset, sn.l1_size, False, fix)
        for eff in self.all_effects:
            self.apply_effect(res, eff, eff.pending)
        self.effects = {}
        self.all_effects = []
        self.inc(res, h.snapshots_offset, self.snapshots_size)
        self.inc(res, h.refcount_table_offset, len(self.reftable) * 8)
        self.check_bitmaps(res)
        self.check_refblocks(res, fix)

    def check_l1(self, res: CheckResult, l1_offset: int, l1_size: int, active: bool, fix: int) -> None:
        if not l1_size:
            return
        self.inc(res, l1_offset, l1_size * 8)
        if _bad_request(l1_offset, l1_size * 8):
            self.msg("ERROR: I/O error in check_refcounts_l1")
            res.check_errors += 1
            raise _Fatal("Input/output error")
        l1 = self.read_table(l1_offset, l1_size)
        cs = self.cs
        for i in compress(range(l1_size), l1):
            e = l1[i]
            self.spend(1)
            if e & L1E_RESERVED:
                self.msg(f"ERROR found L1 entry with reserved bits set: {e:x}")
                res.corruptions += 1
            l2_offset = e & L1E_OFFSET_MASK
            self.inc(res, l2_offset, cs)
            if l2_offset & (cs - 1):
                self.msg(f"ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; L1 entry corrupted")
                res.corruptions += 1
            eff = self.effects.get(l2_offset)
            if eff is None:
                eff = self.walk_l2(res, l2_offset, fix, active)
                self.all_effects.append(eff)
                if not eff.modified:
                    self.effects[l2_offset] = eff
            else:
                # a repeated walk prints and counts the same problems again
                for m in eff.messages:
                    self.msg(m)
                res.corruptions += eff.corruptions
                res.check_errors += eff.check_errors
            eff.pending += 1
            if active:
                res.allocated_clusters += eff.allocated
                res.fragmented_clusters += eff.fragmented
                res.compressed_clusters += eff.compressed

    def walk_l2(self, res: CheckResult, l2_offset: int, fix: int, active: bool) -> _L2Effect:
        """check_refcounts_l2(): one walk; its effect on counters is applied to ``res`` right away."""
        eff = _L2Effect()
        cs = self.cs
        cb = self.cb
        n = self.l2_entries
        ext = self.ext
        self.spend(n)
        buf = self.io.pread(l2_offset, cs)
        if not ext and self._walk_l2_fast(eff, buf):
            self._flush_effect(res, eff, 0, eff.messages)
            return eff
        raw = _u64_array(buf)
        if ext:
            entries, bitmaps = raw[0::2], raw[1::2]
            idx = compress(range(n), map(int.__or__, entries, bitmaps))
        else:
            entries, bitmaps = raw, None
            idx = compress(range(n), entries)
        file_len = self.io.size
        incs = eff.incs
        msgs = eff.messages
        next_contig = 0
        corruptions = 0
        for i in idx:
            e = entries[i]
            bm = bitmaps[i] if ext else 0
            if e & OFLAG_COMPRESSED:
                if e & OFLAG_COPIED:
                    msgs.append(f"ERROR: coffset=0x{e & self.coff_mask:x}: copied flag must never be set for "
                                "compressed clusters")
                    e &= ~OFLAG_COPIED
                    corruptions += 1
                if bm:
                    msgs.append(f"ERROR compressed cluster {i} with non-zero subcluster allocation bitmap, "
                                f"entry=0x{e:x}")
                    corruptions += 1
                    continue
                start, end = compressed_host_range(e, cb)
                coffset = e & self.coff_mask
                if end - file_len >= cs:
                    msgs.append("ERROR: counting reference for region exceeding the end of the file by one "
                                f"cluster or more: offset 0x{coffset:x} size 0x{end - coffset:x}")
                    corruptions += 1
                else:
                    incs.extend(range(start >> cb, ((end - 1) >> cb) + 1))
                eff.allocated += 1
                eff.compressed += 1
                eff.fragmented += 1
                continue
            if e & L2E_STD_RESERVED:
                msgs.append(f"ERROR found l2 entry with reserved bits set: {e:x}")
                corruptions += 1
            off = e & L2E_OFFSET_MASK
            if not ext and e & OFLAG_ZERO:
                if not off:
                    continue  # ZERO_PLAIN
            elif not off:  # UNALLOCATED
                if bm & _BITMAP_ALL_ALLOC:
                    msgs.append("ERROR: Unallocated cluster has non-zero subcluster allocation map")
                    corruptions += 1
                continue
            # NORMAL or ZERO_ALLOC
            if (bm >> 32) & bm:
                corruptions += 1
                msgs.append(f"ERROR offset={off:x}: Allocated cluster has corrupted subcluster allocation "
                            "bitmap")
            if off & (cs - 1):
                corruptions += 1
                contains_data = bool(bm & _BITMAP_ALL_ALLOC) if ext else not (e & OFLAG_ZERO)
                if not contains_data:
                    repairing = bool(fix & FIX_ERRORS)
                    msgs.append(f"{'Repairing' if repairing else 'ERROR'} offset={off:x}: Preallocated "
                                "cluster is not properly aligned; L2 entry corrupted.")
                    if repairing:
                        if self.fix_l2_entry_by_zero(eff, l2_offset, i, bm):
                            corruptions -= 1
                            continue
                        if eff.check_errors:
                            # overlap with metadata: qemu aborts the check
                            self._flush_effect(res, eff, corruptions, msgs)
                            raise _Fatal("Input/output error")
                else:
                    msgs.append(f"ERROR offset={off:x}: Data cluster is not properly aligned; L2 entry "
                                "corrupted.")
            eff.allocated += 1
            if next_contig and off != next_contig:
                eff.fragmented += 1
            next_contig = off + cs
            if off >= file_len:
                msgs.append("ERROR: counting reference for region exceeding the end of the file by one "
                            f"cluster or more: offset 0x{off:x} size 0x{cs:x}")
                corruptions += 1
            else:
                incs.append(off >> cb)
                if off & (cs - 1):  # a misaligned cluster straddles two host clusters
                    incs.append((off >> cb) + 1)
        self._flush_effect(res, eff, corruptions, msgs)
        return eff

    def _masks(self) -> "_Masks":
        m = getattr(self, "_mask_cache", None)
        if m is None:
            m = self._mask_cache = _Masks(self.cs, self.cb)
        return m

    def _walk_l2_fast(self, eff: _L2Effect, buf: bytes) -> bool:
        """Whole-table fast path for standard L2 tables holding only plain, aligned, in-file entries.

        The table is handled as one big integer so the per-entry flag checks run in C; returns False
        (nothing recorded) when any entry needs the careful per-entry walk.
        """
        m = self._masks()
        t = int.from_bytes(buf, "big")
        if t & m.bad or t & m.align:
            return False
        ks = _u64_array(((t & m.offset) >> self.cb).to_bytes(self.cs, "big"))
        ks = list(compress(ks, ks))
        if not ks:
            return True
        if max(ks) << self.cb >= self.io.size:
            return False
        eff.incs.extend(ks)
        eff.allocated = len(ks)
        eff.fragmented = sum(map(int.__ne__, ks[1:], map((1).__add__, ks)))
        return True

    def _flush_effect(self, res: CheckResult, eff: _L2Effect, corruptions: int, msgs: list[str]) -> None:
        eff.corruptions = corruptions
        for m in msgs:
            self.msg(m)
        res.corruptions += corruptions
        res.corruptions_fixed += eff.corruptions_fixed
        res.check_errors += eff.check_errors

    def fix_l2_entry_by_zero(self, eff: _L2Effect, l2_offset: int, i: int, bm: int) -> bool:
        esize = 16 if self.ext else 8
        pos = l2_offset + i * esize
        if self.overlaps_metadata(pos, esize):
            eff.messages.append("ERROR: Overlap check failed")
            eff.check_errors += 1
            return False
        if self.ext:
            bm |= bm << 32
            bm &= _BITMAP_ALL_ZEROES
            data = struct.pack(">QQ", 0, bm)
        else:
            data = struct.pack(">Q", OFLAG_ZERO)
        self.io.pwrite(pos, data)
        eff.corruptions_fixed += 1
        eff.modified = True
        return True

    def overlaps_metadata(self, offset: int, size: int) -> bool:
        """A reduced qcow2_check_metadata_overlap(): header, L1s, refcount structures, snapshot table."""
        cs = self.cs
        if offset < cs:
            return True
        start = offset & ~(cs - 1)
        end = (offset + size + cs - 1) & ~(cs - 1)

        def hit(o: int, s: int) -> bool:
            return s > 0 and o < end and start < o + s

        h = self.h
        if hit(h.l1_table_offset, h.l1_size * 8) or hit(h.refcount_table_offset, len(self.reftable) * 8):
            return True
        if hit(h.snapshots_offset, self.snapshots_size):
            return True
        if any(hit(sn.l1_table_offset, sn.l1_size * 8) for sn in self.snapshots):
            return True
        bm_ext = h.bitmaps_ext
        if bm_ext is not None and h.autoclear_features & Autoclear.BITMAPS and len(bm_ext) == 24:
            _nb, _res, dsize, doff = struct.unpack_from(">IIQQ", bm_ext, 0)
            if hit(doff, dsize):
                return True
        return any(hit(e & REFT_OFFSET_MASK, cs) for e in self.reftable if e & REFT_OFFSET_MASK)

    def check_bitmaps(self, res: CheckResult) -> None:
        """qcow2_check_bitmaps_refcounts(): the directory, every bitmap table and every data cluster count
        once.  Bitmaps count only when autoclear bit 0 says they are valid (v3): otherwise QEMU ignores
        the extension and its clusters are leaks."""
        h = self.h
        if h.bitmaps_ext is None or not h.autoclear_features & Autoclear.BITMAPS or h.version < 3:
            return
        try:
            ext = bitmaps.parse_ext(h.bitmaps_ext, self.cs)
        except ImageOpenError as exc:
            res.check_errors += 1
            self.msg(f"ERROR {exc.message}")
            raise _Fatal("Invalid argument") from None
        self.inc(res, ext.directory_offset, ext.directory_size)
        if _bad_request(ext.directory_offset, ext.directory_size):
            res.corruptions += 1
            raise _Fatal("Input/output error")
        self.spend(ext.directory_size // 8 + 1)
        d = self.io.pread(ext.directory_offset, ext.directory_size)
        try:
            entries = bitmaps.parse_directory(d, ext.nb_bitmaps, self.cs, h.size)
        except CorruptImage:
            res.corruptions += 1
            raise _Fatal("Invalid argument") from None
        for e in entries:
            self.inc(res, e.table_offset, e.table_size * 8)
            if _bad_request(e.table_offset, e.table_size * 8):
                res.corruptions += 1
                raise _Fatal("Input/output error")
            table = self.read_table(e.table_offset, e.table_size)
            for t in compress(table, table):
                if not bitmaps.table_entry_ok(t, self.cs):
                    res.corruptions += 1
                    continue
                off = t & bitmaps.TABLE_OFFSET_MASK
                if off:
                    self.inc(res, off, self.cs)

    def check_refblocks(self, res: CheckResult, fix: int) -> None:
        cs = self.cs
        for i in compress(range(len(self.reftable)), self.reftable):
            e = self.reftable[i]
            offset = e & REFT_OFFSET_MASK
            cluster = offset >> self.cb
            if e & _REFT_RESERVED:
                self.msg(f"ERROR refcount table entry {i} has reserved bits set")
                res.corruptions += 1
                self.rebuild = True
                continue
            if offset & (cs - 1):
                self.msg(f"ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted")
                res.corruptions += 1
                self.rebuild = True
                continue
            if cluster >= self.nb:
                res.corruptions += 1
                word = "Repairing" if fix & FIX_ERRORS else "ERROR"
                self.msg(f"{word} refcount block {i} is outside image")
                if fix & FIX_ERRORS:
                    new_size = offset + cs
                    if (new_size + cs - 1) >> self.cb > max(self.nb, 1) * 4 + (1 << 20):
                        self.rebuild = True
                        self.msg("ERROR could not resize image: File too large")
                        continue
                    self.io.truncate(new_size)
                    self.budget += 8 * (new_size // 8)
                    self.grow((self.io.size + cs - 1) >> self.cb)
                    res.corruptions -= 1
                    res.corruptions_fixed += 1
                    self.inc(res, offset, cs)
                continue
            if offset:
                self.inc(res, offset, cs)
                if self.imrt[cluster] != 1:
                    self.msg(f"ERROR refcount block {i} refcount={self.imrt[cluster]}")
                    res.corruptions += 1
                    self.rebuild = True

    # -- compare_refcounts()
    def compare(self, res: CheckResult, fix: int) -> int:
        """Compare the IMRT with the on-disk refcounts; returns the highest used cluster index."""
        imrt = self.imrt
        nb = self.nb
        epb = self.epb
        highest = 0
        disk = self.disk
        for b in range((nb + epb - 1) // epb):
            base = b * epb
            end = min(base + epb, nb)
            comp = imrt[base:end]
            blk = disk.block(b)
            if blk is _ERR:
                for k in range(base, end):
                    self.msg(f"Can't get refcount for cluster {k}: Input/output error")
                    res.check_errors += 1
                continue
            if blk is None:
                last = _last_nonzero(comp)
                if last < 0:
                    continue
                dslice = [0] * (end - base)
            else:
                dslice = blk[: end - base]  # type: ignore[index]
                if dslice == comp:
                    last = _last_nonzero(comp)
                    if last >= 0:
                        highest = base + last
                    continue
                last = max(_last_nonzero(comp), _last_nonzero(dslice))
            if last >= 0:
                highest = base + last
            for j in compress(range(end - base), map(int.__ne__, dslice, comp)):
                r1 = dslice[j]
                r2 = comp[j]
                k = base + j
                num_fixed = None
                if r1 == 0:
                    self.rebuild = True
                elif r1 > r2 and fix & FIX_LEAKS:
                    num_fixed = "leaks_fixed"
                elif r1 < r2 and fix & FIX_ERRORS:
                    num_fixed = "corruptions_fixed"
                word = "Repairing" if num_fixed else ("ERROR" if r1 < r2 else "Leaked")
                self.msg(f"{word} cluster {k} refcount={r1} reference={r2}")
                if num_fixed:
                    disk.set(k, r2)
                    setattr(res, num_fixed, getattr(res, num_fixed) + 1)
                    continue
                if r1 < r2:
                    res.corruptions += 1
                else:
                    res.leaks += 1
        if disk.dirty:
            disk.write_back()
            self.io.flush()
        return highest

    # -- rebuild_refcount_structure()
    def rebuild_structure(self) -> None:
        cs = self.cs
        epb = self.epb
        imrt = self.imrt
        nb = self.nb
        used = [b for b in range((nb + epb - 1) // epb) if any(imrt[b * epb:(b + 1) * epb])]
        base = max((self.io.size + cs - 1) >> self.cb, nb)
        nblocks, tclusters = 0, 0
        for _ in range(64):
            new_end = base + tclusters + nblocks
            blocks = set(used)
            if new_end > base:
                blocks.update(range(base // epb, (new_end - 1) // epb + 1))
            need_t = max(1, ((max(blocks) + 1) * 8 + cs - 1) // cs)
            if (len(blocks), need_t) == (nblocks, tclusters):
                break
            nblocks, tclusters = len(blocks), need_t
        else:
            raise _Fatal("Input/output error")
        order_blocks = sorted(blocks)
        self.grow(base + tclusters + nblocks)
        imrt = self.imrt
        for k in range(base, base + tclusters + nblocks):
            imrt[k] = 1
        reftable = [0] * (tclusters * cs // 8)
        for idx, b in enumerate(order_blocks):
            off = (base + tclusters + idx) << self.cb
            reftable[b] = off
            self.io.pwrite(off, encode_refblock(imrt[b * epb:(b + 1) * epb], self.order, cs))
        rt_offset = base << self.cb
        self.io.pwrite(rt_offset, struct.pack(f">{len(reftable)}Q", *reftable))
        self.io.flush()
        self.io.pwrite(48, struct.pack(">QI", rt_offset, tclusters))
        self.io.flush()
        self.h.refcount_table_offset = rt_offset
        self.h.refcount_table_clusters = tclusters
        self.load_reftable()

    # -- check_oflag_copied()
    def check_oflag_copied(self, res: CheckResult, fix: int) -> None:
        if fix & FIX_ERRORS:
            repair = True
        elif fix & FIX_LEAKS:
            repair = not res.check_errors and not res.corruptions and not res.leaks
        else:
            repair = False
        h = self.h
        cs = self.cs
        l1_size = h.l1_size
        l1 = self.read_table(h.l1_table_offset, l1_size)
        seen: dict[int, tuple[int, list[str]]] = {}
        word = "Repairing" if repair else "ERROR"
        for i in compress(range(l1_size), l1):
            l1e = l1[i]
            l2_offset = l1e & L1E_OFFSET_MASK
            if not l2_offset:
                continue
            self.spend(1)
            rc = self.disk.get(l2_offset >> self.cb)
            if rc is None:
                continue
            if (rc == 1) != bool(l1e & OFLAG_COPIED):
                res.corruptions += 1
                self.msg(f"{word} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1e:x} refcount={rc}")
                if repair:
                    new = l1e | OFLAG_COPIED if rc == 1 else l1e & ~OFLAG_COPIED
                    l1[i] = new
                    self.io.pwrite(h.l1_table_offset + 8 * i, struct.pack(">Q", new))
                    res.corruptions -= 1
                    res.corruptions_fixed += 1
            if l2_offset in seen:
                count, msgs = seen[l2_offset]
                res.corruptions += count
                for m in msgs:
                    self.msg(m)
                continue
            self.spend(self.l2_entries)
            raw = self.io.pread(l2_offset, cs)
            if not self.ext and self._copied_ok_fast(raw):
                seen[l2_offset] = (0, [])
                continue
            table = _u64_array(raw)
            step = 2 if self.ext else 1
            entries = table[0::step]
            dirty = 0
            msgs = []
            for j in compress(range(len(entries)), entries):
                e = entries[j]
                if e & OFLAG_COMPRESSED:
                    continue
                off = e & L2E_OFFSET_MASK
                if not off:
                    continue
                rc = self.disk.get(off >> self.cb)
                if rc is None:
                    continue
                if (rc == 1) != bool(e & OFLAG_COPIED):
                    res.corruptions += 1
                    m = f"{word} OFLAG_COPIED data cluster: l2_entry={e:x} refcount={rc}"
                    msgs.append(m)
                    self.msg(m)
                    if repair:
                        table[j * step] = e | OFLAG_COPIED if rc == 1 else e & ~OFLAG_COPIED
                        dirty += 1
            if dirty:
                if self.overlaps_metadata(l2_offset, cs):
                    self.msg("ERROR: Could not write L2 table; metadata overlap check failed: "
                             "Input/output error")
                    res.check_errors += 1
                    raise _Fatal("Input/output error")
                if _LITTLE:
                    table.byteswap()
                self.io.pwrite(l2_offset, table.tobytes())
                res.corruptions -= dirty
                res.corruptions_fixed += dirty
                seen[l2_offset] = (0, [])
            else:
                seen[l2_offset] = (len(msgs), msgs)

    def _copied_ok_fast(self, raw: bytes) -> bool:
        """True when every allocated entry of a standard L2 table has COPIED == (refcount == 1)."""
        m = self._masks()
        t = int.from_bytes(raw, "big")
        if t & m.compressed or t & m.align:
            return False
        ks = _u64_array(((t & m.offset) >> self.cb).to_bytes(self.cs, "big"))
        copied = _u64_array(((t >> 63) & m.ones).to_bytes(self.cs, "big"))
        cps = list(compress(copied, ks))
        ks = list(compress(ks, ks))
        if not ks:
            return True
        flat = self.disk.flat()
        if max(ks) >= len(flat):
            return False
        rcs = list(map(flat.__getitem__, ks))
        if None in rcs:
            return False
        return list(map((1).__eq__, rcs)) == cps

    # -- qcow2_check_refcounts()
    def check_refcounts(self, res: CheckResult, fix: int) -> None:
        cs = self.cs
        nb = (self.io.size + cs - 1) >> self.cb
        if nb > _INT_MAX:
            res.check_errors += 1
            raise _Fatal("File too large")
        res.total_clusters = ((self.h.size // 512 * 512) + cs - 1) >> self.cb
        self.rebuild = False
        self.calculate(res, fix, nb)
        pre = replace(res)
        highest = self.compare(res, 0)
        if self.rebuild and fix & FIX_ERRORS:
            old = replace(res)
            self.msg("Rebuilding refcount structure")
            self.rebuild_structure()
            res.corruptions = 0
            res.leaks = 0
            self.rebuild = False
            nb = max(self.nb, (self.io.size + cs - 1) >> self.cb)
            self.calculate(res, 0, nb)
            fresh_leaks = 0
            if fix & FIX_LEAKS:
                tmp = CheckResult()
                highest = self.compare(tmp, FIX_LEAKS)
                if self.rebuild:
                    self.msg("ERROR rebuilt refcount structure is still broken")
                fresh_leaks = tmp.leaks
            if res.corruptions < old.corruptions:
                res.corruptions_fixed += old.corruptions - res.corruptions
            if res.leaks < old.leaks:
                res.leaks_fixed += old.leaks - res.leaks
            res.leaks += fresh_leaks
        elif fix:
            if self.rebuild:
                self.msg("ERROR need to rebuild refcount structures")
                res.check_errors += 1
                raise _Fatal("Input/output error")
            if res.leaks or res.corruptions:
                for f in ("corruptions", "leaks", "check_errors", "corruptions_fixed", "leaks_fixed"):
                    setattr(res, f, getattr(pre, f))
                highest = self.compare(res, fix)
        self.check_oflag_copied(res, fix)
        res.image_end_offset = (highest + 1) * cs

    def mark_clean(self) -> None:
        """qcow2_mark_clean() + qcow2_mark_consistent(): clear the dirty and corrupt bits."""
        h = self.h
        bits = int(Incompat.DIRTY | Incompat.CORRUPT)
        if h.version >= 3 and h.incompatible_features & bits:
            self.io.flush()
            h.incompatible_features &= ~bits
            self.io.pwrite(72, struct.pack(">Q", h.incompatible_features))
            self.io.flush()


def _one_check(io: _Io, fix: int) -> CheckResult:
    """One bdrv_check() (qcow2_co_check_locked)."""
    chk = _Checker(io)
    res = CheckResult()
    res.messages = chk.messages
    chk.load()  # may raise ImageOpenError: the image cannot be opened at all
    try:
        chk.read_snapshot_table(res, fix)
        chk.check_refcounts(res, fix)
        if fix and res.check_errors == 0 and res.corruptions == 0:
            chk.mark_clean()
    except _Fatal as exc:
        res.error = exc.text
    except MemoryError:
        res.check_errors += 1
        res.error = "Cannot allocate memory"
    except (ValueError, IndexError, OverflowError, struct.error, CorruptImage, OSError) as exc:
        res.check_errors += 1
        res.error = str(exc) or type(exc).__name__
        chk.msg(f"ERROR: {res.error}")
    if res.error and not res.check_errors:
        res.check_errors += 1
    if chk.suppressed:
        chk.messages.append(f"({chk.suppressed} further messages suppressed)")
    return res


def check_qcow2(read: Callable[[int, int], bytes], file_size: int, fix: int = 0,
                write: Callable[[int, bytes], None] | None = None,
                truncate: Callable[[int], None] | None = None,
                flush: Callable[[], None] | None = None) -> CheckResult:
    """Check (and with ``fix`` repair) a qcow2 image the way ``qemu-img check [-r leaks|all]`` does.

    ``read(offset, length)`` returns exactly ``length`` bytes (zeros past EOF).  ``write``/``truncate``/
    ``flush`` are needed only when ``fix`` is non-zero.  After a repair the image is checked again and the
    returned counts describe the repaired image, with ``corruptions_fixed``/``leaks_fixed`` telling what was
    repaired (as qemu-img reports it).  ``messages`` holds qemu's stderr lines of every pass, in order.
    """
    io = _Io(read, file_size, write, truncate, flush)
    res = _one_check(io, fix)
    if fix and not res.error and (res.corruptions_fixed or res.leaks_fixed):
        again = _one_check(io, 0)
        again.messages = res.messages + again.messages
        again.corruptions_fixed = res.corruptions_fixed
        again.leaks_fixed = res.leaks_fixed
        return again
    return res
