"""The ``qed`` format (QEMU Enhanced Disk): read, write, create and backing files, as qemu-img 7.2 does.

Layer: engine.  Imports engine.driver, engine.errors, engine.units, (for ``create``) the ``file``
driver and (for ``check_image``) the ``CheckResult`` of engine.formats.qcow2_check.

On disk, little-endian: a 64-byte header at offset 0 (magic ``QED\\0``, cluster_size 4 KiB to 64 MiB
and a power of two, table_size 1..16 clusters and a power of two, header_size in clusters,
features: bit0 backing file, bit1 need check (dirty), bit2 backing file is raw (no probing), then
compat and autoclear features, l1_table_offset, image_size, and the backing file name's offset and
size), the backing file name inside the header clusters, one L1 table and on-demand L2 tables, each
``table_size`` clusters of u64 entries: 0 unallocated (read the backing file, or zeros), 1 zero
cluster, otherwise the host offset of a data cluster.  A table maps ``table_size * cluster_size / 8``
entries, so the largest image is ``cluster_size * entries**2`` bytes.

Allocation always appends at the end of the file (the file size rounded down to a cluster at open).
An allocating write writes the data cluster(s) whole (the untouched head and tail copied from the
backing file, or zeros), then the L2 entries; a new L2 table is allocated after the data, written whole
and flushed before the L1 entry that points at it.  Without a backing file the first allocating write
sets need-check in the header and a clean close clears it; with one, data is flushed before its L2
entries instead (QEMU's rule).  A writable open of an image with need-check set runs the check below
with repair (table entries that point outside the file become unallocated, the flag is cleared); a
read-only open just reads.

Check (``check_image``, QEMU's block/qed-check.c): walk the L1 table and every L2 table it points at,
marking the clusters they use in a bitmap of the file's clusters.  An L1 entry that is not a valid table
offset, or an L2 entry (other than 0 and 1) that is not a valid cluster offset, is a corruption; with any
repair it is set to 0 instead (``-r leaks`` repairs it too: QEMU only asks "fix or not").  A cluster
referenced twice is a corruption no repair touches (a table overlapping used clusters is not walked).
Clusters between the header and the end of the file (rounded down to a cluster) that no table uses are
leaks; QED has no way to free them, so they are never repaired.  The bitmap is indexed as QEMU 7.2
indexes it (offset / (cluster_size - 1), see ``_check_index``), so the counts include QEMU's phantom
leaks in files of more than cluster_size - 1 clusters, and its counts wrap as a C int does.  A repair
that leaves no corruption clears need-check.  The writable open of a dirty image runs the same repair,
unless the image is opened for a check (option ``check``, QEMU's BDRV_O_CHECK, as ``parablock check``
opens it); a ``check_image`` on a node opened without it reuses the open-time repair's result as its
first pass, while the metadata is unchanged.

Invariants: table lookups validate every L2 table and data cluster offset they follow (aligned, past
the header, inside the file), so a hostile image gives EINVAL rather than a read from anywhere; tables
are read and cached in slices of at most 64 KiB, so memory stays bounded whatever the header claims.

Deliberate differences from QEMU 7.2: QEMU's need-check timer (clearing the flag after 5 s idle) is not
kept, the flag is cleared on close only; a partial write into a *zero* cluster of an image with a
backing file fills the rest of the cluster with zeros (QEMU 7.2 copies the backing file's data there,
so the guest sees old backing data reappear).  As qemu-img 7.2 does, ``info`` reports "dirty-flag":
false even when need-check is set (``needs_check`` has the flag).  As in QEMU 7.2, images with
table_size 1 are created but cannot be opened ("QED table offset is invalid": its table check rejects a
table of one cluster).
"""

from __future__ import annotations

import errno
import os
import struct
import sys
from array import array
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import Any

from engine.driver import BlockDriver, Extent, Status, leftover_create_options, register
from engine.errors import BlockError, ImageOpenError, InvalidArgument, NotSupported, OutOfBounds
from engine.units import parse_size, round_up

MAGIC = 0x00444551  # "QED\0" read as a little-endian u32
HEADER = struct.Struct("<IIIIQQQQQII")  # 64 bytes
MIN_CLUSTER_SIZE = 4096
MAX_CLUSTER_SIZE = 64 << 20
DEFAULT_CLUSTER_SIZE = 65536
MIN_TABLE_SIZE = 1
MAX_TABLE_SIZE = 16
DEFAULT_TABLE_SIZE = 4
MAX_BACKING_NAME = 4095  # QEMU reads the name into a PATH_MAX buffer
ZERO_CLUSTER = 1
SECTOR = 512
_SLICE_BYTES = 64 << 10  # tables are read and cached in slices of this size (or the whole table)
_CACHE_BYTES = 32 << 20  # bound of the slice cache
_WRITE_CHUNK = 1 << 20  # a new table is written in pieces of this size
_BIG_ENDIAN_HOST = sys.byteorder == "big"
_FLAT_BITMAP_BYTES = 64 << 20  # the check's bitmap of used clusters is flat up to this size
_SIZE_HELP = (
    "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively."
)


class Feature(IntFlag):
    BACKING_FILE = 1
    NEED_CHECK = 2
    BACKING_FORMAT_NO_PROBE = 4


KNOWN_FEATURES = Feature.BACKING_FILE | Feature.NEED_CHECK | Feature.BACKING_FORMAT_NO_PROBE
KNOWN_AUTOCLEAR = 0


class Kind(IntEnum):
    """What a lookup found for a guest range (QEMU's QED_CLUSTER_*)."""

    FOUND = 0  # data clusters, contiguous in the file
    ZERO = 1  # zero-cluster entries
    UNALLOC_L2 = 2  # entries 0 in an existing L2 table
    UNALLOC_L1 = 3  # no L2 table at all


@dataclass(slots=True)
class QedHeader:
    magic: int = MAGIC
    cluster_size: int = DEFAULT_CLUSTER_SIZE
    table_size: int = DEFAULT_TABLE_SIZE
    header_size: int = 1
    features: int = 0
    compat_features: int = 0
    autoclear_features: int = 0
    l1_table_offset: int = 0
    image_size: int = 0
    backing_filename_offset: int = 0
    backing_filename_size: int = 0

    @classmethod
    def unpack(cls, raw: bytes) -> QedHeader:
        return cls(*HEADER.unpack_from(raw.ljust(HEADER.size, b"\0"), 0))

    def pack(self) -> bytes:
        return HEADER.pack(
            self.magic,
            self.cluster_size,
            self.table_size,
            self.header_size,
            self.features,
            self.compat_features,
            self.autoclear_features,
            self.l1_table_offset,
            self.image_size,
            self.backing_filename_offset,
            self.backing_filename_size,
        )


def cluster_size_valid(cs: int) -> bool:
    return MIN_CLUSTER_SIZE <= cs <= MAX_CLUSTER_SIZE and cs & (cs - 1) == 0


def table_size_valid(ts: int) -> bool:
    return MIN_TABLE_SIZE <= ts <= MAX_TABLE_SIZE and ts & (ts - 1) == 0


def max_image_size(cs: int, ts: int) -> int:
    entries = cs * ts // 8
    return entries * entries * cs


def image_size_valid(size: int, cs: int, ts: int) -> bool:
    return size % SECTOR == 0 and size <= max_image_size(cs, ts)


def _unpack_table(raw: bytes) -> array:
    table = array("Q")
    table.frombytes(raw)
    if _BIG_ENDIAN_HOST:
        table.byteswap()
    return table


def _pack_table(table: array) -> bytes:
    if _BIG_ENDIAN_HOST:
        table = array("Q", table)
        table.byteswap()
    return table.tobytes()


def _run_values(value: int, step: int, count: int) -> array:
    """``count`` table entries: ``value``, ``value + step``, ..."""
    if step == 0:
        return array("Q", [value]) * count
    return array("Q", range(value, value + step * count, step))


def _size_option(opts: dict[str, Any], key: str, default: int) -> int:
    value = opts.pop(key, None)
    if value is None:
        return default
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    try:
        return parse_size(str(value))
    except BlockError:
        raise InvalidArgument(
            f"Parameter '{key}' expects a non-negative number below 2^64\n{_SIZE_HELP}"
        ) from None


def _c_int(n: int) -> int:
    """``n`` as a 32-bit C int holds it after wrapping around."""
    return (n + (1 << 31)) % (1 << 32) - (1 << 31)


class _ClusterBitmap:
    """The bitmap indexes (see ``QedDriver._check_index``) the check found in use, below ``size``.

    A flat bit array while it takes at most ``_FLAT_BITMAP_BYTES``; past that (a huge, probably sparse,
    file) a set of the marked indexes, so memory follows the references the tables really hold instead
    of the size the file claims."""

    def __init__(self, size: int) -> None:
        self._flat: bytearray | None = bytearray((size + 7) >> 3) if size <= _FLAT_BITMAP_BYTES * 8 else None
        self._sparse: set[int] = set()
        self._count = 0

    def mark(self, first: int, n: int) -> int:
        """Mark indexes ``first .. first+n-1``; returns how many of them were already marked."""
        again = 0
        flat = self._flat
        for i in range(first, first + n):
            if flat is not None:
                bit = 1 << (i & 7)
                if flat[i >> 3] & bit:
                    again += 1
                else:
                    flat[i >> 3] |= bit
            elif i in self._sparse:
                again += 1
            else:
                self._sparse.add(i)
        self._count += n - again
        return again

    def count(self) -> int:
        """How many indexes are marked."""
        return self._count


@register
class QedDriver(BlockDriver):
    format_name = "qed"
    supports_backing = True

    @classmethod
    def probe(cls, head: bytes, filename: str) -> int:
        if len(head) >= HEADER.size and struct.unpack_from("<I", head, 0)[0] == MAGIC:
            return 100
        return 0

    # ------------------------------------------------------------------------------------------------
    # open / close
    # ------------------------------------------------------------------------------------------------
    def open(self, options: dict[str, Any]) -> None:
        """Parse and validate the header (QEMU's checks, in QEMU's order, with its messages).  A writable
        open of a dirty image repairs it, unless ``options["check"]`` says it is opened for a check.

        Raises ImageOpenError for a bad or unsupported image.
        """
        f = self.file
        assert f is not None
        h = QedHeader.unpack(f.read(0, HEADER.size))
        self.h = h
        if h.magic != MAGIC:
            raise ImageOpenError("Image not in QED format", errno=errno.EINVAL)
        if h.features & ~int(KNOWN_FEATURES):
            raise ImageOpenError(
                f"Unsupported QED features: {h.features & ~int(KNOWN_FEATURES):x}", errno=errno.ENOTSUP
            )
        if not cluster_size_valid(h.cluster_size):
            raise ImageOpenError("QED cluster size is invalid", errno=errno.EINVAL)
        self.cs = h.cluster_size
        self.cbits = self.cs.bit_length() - 1
        self.file_end = f.size() >> self.cbits << self.cbits
        if not table_size_valid(h.table_size):
            raise ImageOpenError("QED table size is invalid", errno=errno.EINVAL)
        if not image_size_valid(h.image_size, h.cluster_size, h.table_size):
            raise ImageOpenError("QED image size is invalid", errno=errno.EINVAL)
        self.table_bytes = self.cs * h.table_size
        self.nelems = self.table_bytes // 8
        self.header_bytes = h.header_size * self.cs
        if not self._table_ok(h.l1_table_offset):
            raise ImageOpenError("QED table offset is invalid", errno=errno.EINVAL)
        if h.header_size > 0xFFFFFFFF // self.cs:
            raise ImageOpenError("QED header size is too large", errno=errno.EINVAL)
        self.slice_bytes = min(self.table_bytes, _SLICE_BYTES)
        self.per_slice = self.slice_bytes // 8
        self._cache: OrderedDict[tuple[int, int], array] = OrderedDict()
        self._cache_max = max(16, _CACHE_BYTES // self.slice_bytes)
        self._backing_name: str | None = None
        self._open_check: Any = None  # the open-time repair's CheckResult, until metadata changes
        if h.features & Feature.BACKING_FILE:
            if h.backing_filename_offset + h.backing_filename_size > self.header_bytes:
                raise ImageOpenError("QED backing filename offset is invalid", errno=errno.EINVAL)
            if h.backing_filename_size > MAX_BACKING_NAME:
                raise ImageOpenError("Failed to read backing filename", errno=errno.EINVAL)
            raw = f.read(h.backing_filename_offset, h.backing_filename_size)
            name = raw.split(b"\0", 1)[0]  # a C string: it ends at the first NUL
            self._backing_name = name.decode("utf-8", "surrogateescape") or None
        if not self.read_only:
            if h.autoclear_features & ~KNOWN_AUTOCLEAR:
                # an older program "knocks out" autoclear features it does not know (QEMU's rule)
                h.autoclear_features &= KNOWN_AUTOCLEAR
                self._write_header()
                f.flush()
            if h.features & Feature.NEED_CHECK and not options.get("check"):
                self._repair()  # not when opened for a check (QEMU's BDRV_O_CHECK): the check repairs
        self._open_done = True

    def close(self) -> None:
        if getattr(self, "_open_done", False) and not self.read_only and self.file is not None:
            try:
                self.file.flush()
                if self.h.features & Feature.NEED_CHECK:  # a clean shutdown: no check needed next time
                    self.h.features &= ~Feature.NEED_CHECK
                    self._write_header()
                    self.file.flush()
            finally:
                self._open_done = False
        super().close()

    def _write_header(self) -> None:
        assert self.file is not None
        self._open_check = None
        self.file.write(0, self.h.pack())

    def _repair(self) -> None:
        """A writable open of an image left with need-check set runs QEMU's check with repair (table entries
        that point outside the file or at unaligned offsets become unallocated; need-check is cleared if
        no corruption is left).  Its result is kept for ``check_image``.  Raises ImageOpenError when the
        check cannot read or write the tables (QEMU then fails the open)."""
        result, err = self._check(True)
        if err:
            raise ImageOpenError(os.strerror(err), errno=err)
        self._open_check = result

    def check_image(self, fix: int):
        """``parablock check`` (qemu-img check): returns a qcow2_check.CheckResult.

        ``fix`` is a mask of qcow2_check.FIX_LEAKS / FIX_ERRORS; for QED any non-zero mask repairs invalid
        table entries (leaks cannot be repaired).  When something was repaired the image is checked again
        without repair and that result is returned with the repaired counts, as qemu-img does.  A check
        that cannot read or write a table returns a result whose ``error`` is the strerror text."""
        first = self._open_check if fix and self._open_check is not None else self._check(bool(fix))[0]
        self._open_check = None
        if first.error is not None or not (first.corruptions_fixed or first.leaks_fixed):
            return first
        second = self._check(False)[0]
        second.corruptions_fixed = first.corruptions_fixed
        second.leaks_fixed = first.leaks_fixed
        return second

    def _check(self, fix: bool) -> tuple[Any, int]:
        """One pass of QEMU's qed_check; returns (CheckResult, errno of a failed table read or write, or 0).

        The L1 table's clusters, then each valid L2 table's clusters and their data clusters are marked
        in a bitmap, in table order; then the unmarked clusters past the header are counted as leaks
        (only when every table could be read).  Allocated and fragmented clusters are counted over all
        data entries, valid or not, as QEMU counts them.  With ``fix`` invalid entries are zeroed on disk
        and, if no corruption is left, need-check is cleared.  Never raises for a hostile image: every
        table offset is validated before it is read, and I/O errors become the returned errno."""
        from engine.formats.qcow2_check import CheckResult

        assert self.file is not None
        res = CheckResult()
        h, cs, cbits = self.h, self.cs, self.cbits
        res.total_clusters = (h.image_size + cs - 1) >> cbits
        used = _ClusterBitmap(self._check_index(self.file_end))
        l1 = h.l1_table_offset
        res.corruptions += used.mark(self._check_index(l1), h.table_size)
        last_error = 0
        bad_l1: list[int] = []
        try:
            for l1i, l2 in self._nonzero_entries(l1):
                if not self._table_ok(l2):
                    if fix:
                        bad_l1.append(l1i)
                        res.corruptions_fixed += 1
                    else:
                        res.corruptions += 1
                    continue
                dup = used.mark(self._check_index(l2), h.table_size)
                if dup:
                    res.corruptions += dup
                    continue  # an L2 table overlapping used clusters is not walked
                try:
                    bad_l2 = self._check_l2(l2, used, res, fix)
                    for l2i in bad_l2:
                        self._store_entries(l2, l2i, 1, 0, 0)
                except (BlockError, OSError) as exc:
                    res.check_errors += 1
                    last_error = exc.errno or errno.EIO
            for l1i in bad_l1:
                self._store_entries(l1, l1i, 1, 0, 0)
        except (BlockError, OSError) as exc:  # the L1 table itself could not be read or written
            res.check_errors += 1
            last_error = exc.errno or errno.EIO
        if last_error:
            res.error = os.strerror(last_error)
            return res, last_error
        # BdrvCheckResult counts in a C int: a huge sparse file's leak count wraps as QEMU's does
        res.leaks = _c_int(max(0, self._check_index(self.file_end) - h.header_size - used.count()))
        res.corruptions = _c_int(res.corruptions)
        res.corruptions_fixed = _c_int(res.corruptions_fixed)
        if fix and not res.corruptions and not res.check_errors and h.features & Feature.NEED_CHECK:
            self.file.flush()  # the repairs reach the disk before the flag is cleared
            h.features &= ~Feature.NEED_CHECK
            self._write_header()
            self.file.flush()
        return res, 0

    def _check_index(self, offset: int) -> int:
        """The bitmap index QEMU 7.2's check gives a file offset (qed_bytes_to_clusters): the offset rounded
        up to a cluster, divided by ``cluster_size - 1``.  Not the cluster number: every ``cluster_size -
        1`` clusters an index is skipped, and since the number of clusters in the file is computed the same
        way, each skipped index below it counts as a leaked cluster (qemu-img reports one phantom leak
        per 4095 clusters of a 4 KiB-cluster image); a table is marked at consecutive indexes from its
        first one.  Kept so that the counts equal qemu-img's."""
        cs = self.cs
        return ((offset + cs - 1) & ~(cs - 1)) // (cs - 1)

    def _check_l2(self, l2: int, used: _ClusterBitmap, res: Any, fix: bool) -> list[int]:
        """Walk one L2 table for ``_check``: count allocated and fragmented data clusters, mark the valid
        ones used (a second reference is a corruption) and return the indexes of invalid entries when
        fixing (counted as fixed) or count them as corruptions."""
        cs = self.cs
        bad: list[int] = []
        last = 0
        allocated = fragmented = 0
        for l2i, e in self._nonzero_entries(l2):
            if e == ZERO_CLUSTER:
                continue
            allocated += 1
            if last and last + cs != e:
                fragmented += 1
            last = e
            if not self._cluster_ok(e):
                if fix:
                    bad.append(l2i)
                    res.corruptions_fixed += 1
                else:
                    res.corruptions += 1
                continue
            res.corruptions += used.mark(self._check_index(e), 1)
        res.allocated_clusters += allocated
        res.fragmented_clusters += fragmented
        return bad

    def _nonzero_entries(self, table: int) -> Iterator[tuple[int, int]]:
        """(index, value) of the non-zero entries of a table, slice by slice (empty slices skipped
        quickly).  Raises BlockError (OSError below a blkdebug filter) when a slice cannot be read."""
        empty = bytes(self.slice_bytes)
        for si in range(self.table_bytes // self.slice_bytes):
            sl = self._slice(table, si)
            if sl.tobytes() == empty:
                continue
            base = si * self.per_slice
            for j, e in enumerate(sl):
                if e:
                    yield base + j, e

    # ------------------------------------------------------------------------------------------------
    # basic properties
    # ------------------------------------------------------------------------------------------------
    def size(self) -> int:
        return self.h.image_size

    def cluster_size(self) -> int | None:
        return self.cs

    @property
    def backing_filename(self) -> str | None:
        return self._backing_name

    @property
    def backing_format(self) -> str | None:
        if self._backing_name and self.h.features & Feature.BACKING_FORMAT_NO_PROBE:
            return "raw"
        return None

    @property
    def needs_check(self) -> bool:
        """The header's need-check flag: the image was not closed cleanly after an allocating write."""
        return bool(self.h.features & Feature.NEED_CHECK)

    def is_dirty(self) -> bool:
        # what ``info`` reports as dirty-flag: qemu-img 7.2 prints false for QED images whatever their
        # need-check flag says (observed), so parablock does too; ``needs_check`` has the flag
        return False

    # ------------------------------------------------------------------------------------------------
    # tables
    # ------------------------------------------------------------------------------------------------
    def _cluster_ok(self, offset: int) -> bool:
        """A data cluster or table cluster offset QEMU accepts: aligned, past the header, in the file."""
        return offset & (self.cs - 1) == 0 and self.header_bytes <= offset < self.file_end

    def _table_ok(self, offset: int) -> bool:
        # QEMU 7.2's test: the first and last cluster of the table must be valid, and the table must not
        # wrap around; its "end <= start" overflow test also rejects every table of a single cluster
        end = offset + (self.h.table_size - 1) * self.cs
        if end <= offset or end >= 1 << 64:
            return False
        return self._cluster_ok(offset) and self._cluster_ok(end)

    def _slice(self, table: int, si: int) -> array:
        key = (table, si)
        sl = self._cache.get(key)
        if sl is not None:
            self._cache.move_to_end(key)
            return sl
        assert self.file is not None
        if table != self.h.l1_table_offset:
            self.file.debug_event("l2_load")  # QEMU's BLKDBG_L2_LOAD, on an L2 table cache miss
        raw = self.file.read(table + si * self.slice_bytes, self.slice_bytes)
        sl = _unpack_table(bytes(raw).ljust(self.slice_bytes, b"\0"))
        self._cache[key] = sl
        if len(self._cache) > self._cache_max:
            self._cache.popitem(last=False)
        return sl

    def _entry(self, table: int, index: int) -> int:
        si, j = divmod(index, self.per_slice)
        return self._slice(table, si)[j]

    def _run_end(self, table: int, index: int, end: int, first: int) -> int:
        """The index after the run starting at ``index`` (entry ``first``), at most ``end``: equal entries
        for 0 and 1, consecutive cluster offsets otherwise."""
        ps, cs = self.per_slice, self.cs
        i = index + 1
        while i < end:
            si, j = divmod(i, ps)
            sl = self._slice(table, si)
            stop = min(end - si * ps, ps)
            if first <= ZERO_CLUSTER:
                while j < stop and sl[j] == first:
                    j += 1
            else:
                expect = first + (i - index) * cs
                while j < stop and sl[j] == expect:
                    j += 1
                    expect += cs
            i = si * ps + j
            if j < stop:
                break
        return i

    def _find(self, pos: int, length: int) -> tuple[Kind, int, int]:
        """(kind, host offset for FOUND, bytes) of the run at guest offset ``pos``; runs stop at the end of
        an L2 table's reach.  Raises BlockError(EINVAL) for an invalid table or cluster offset."""
        cs = self.cs
        l1i, l2i = divmod(pos >> self.cbits, self.nelems)
        length = min(length, (l1i + 1) * self.nelems * cs - pos)
        l2 = self._entry(self.h.l1_table_offset, l1i)
        if l2 == 0:
            return Kind.UNALLOC_L1, 0, length
        if not self._table_ok(l2):
            raise BlockError(f"QED L2 table offset {l2:#x} is invalid", errno=errno.EINVAL)
        in_cluster = pos & (cs - 1)
        want = (in_cluster + length + cs - 1) >> self.cbits
        first = self._entry(l2, l2i)
        count = self._run_end(l2, l2i, l2i + want, first) - l2i
        n = min(length, count * cs - in_cluster)
        if first == 0:
            return Kind.UNALLOC_L2, 0, n
        if first == ZERO_CLUSTER:
            return Kind.ZERO, 0, n
        if not self._cluster_ok(first):
            raise BlockError(f"QED cluster offset {first:#x} is invalid", errno=errno.EINVAL)
        return Kind.FOUND, first + in_cluster, n

    def _store_entries(self, table: int, index: int, count: int, value: int, step: int) -> None:
        """Set ``count`` entries from ``index`` to value, value+step, ...; write the sectors holding them."""
        assert self.file is not None
        self._open_check = None
        ps = self.per_slice
        i, end = index, index + count
        while i < end:
            si, j = divmod(i, ps)
            stop = min(end - si * ps, ps)
            sl = self._slice(table, si)
            sl[j:stop] = _run_values(value + (i - index) * step, step, stop - j)
            lo = j * 8 // SECTOR * SECTOR // 8
            hi = min(ps, round_up(stop * 8, SECTOR) // 8)
            self.file.write(table + si * self.slice_bytes + lo * 8, _pack_table(sl[lo:hi]))
            i = si * ps + stop

    def _write_new_table(self, table: int, index: int, count: int, value: int, step: int) -> None:
        """Write a whole new table holding only the given run of entries (zeros elsewhere)."""
        assert self.file is not None
        for si in range(self.table_bytes // self.slice_bytes):
            self._cache.pop((table, si), None)
        chunk = min(self.table_bytes, _WRITE_CHUNK)
        per_chunk = chunk // 8
        end = index + count
        for cpos in range(0, self.table_bytes, chunk):
            e0 = cpos // 8
            lo, hi = max(index, e0), min(end, e0 + per_chunk)
            if lo >= hi:
                self.file.write(table + cpos, bytes(chunk))
                continue
            buf = array("Q", bytes(chunk))
            buf[lo - e0 : hi - e0] = _run_values(value + (lo - index) * step, step, hi - lo)
            self.file.write(table + cpos, _pack_table(buf))

    def _alloc_clusters(self, n: int) -> int:
        self._open_check = None
        offset = self.file_end
        self.file_end += n * self.cs
        return offset

    # ------------------------------------------------------------------------------------------------
    # I/O
    # ------------------------------------------------------------------------------------------------
    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.h.image_size:
            raise OutOfBounds(f"Request {offset}+{length} is beyond the end of the image")

    def _backing_bytes(self, pos: int, n: int) -> bytes:
        """``n`` bytes of the backing file at ``pos``, zeros past its end or without one."""
        b = self.backing
        if b is None:
            return bytes(n)
        m = max(0, min(n, b.size() - pos))
        data = bytes(b.read(pos, m)) if m else b""
        return data + bytes(n - m)

    def read(self, offset: int, length: int) -> bytes:
        assert self.file is not None
        self._check_range(offset, length)
        out = bytearray(length)
        pos, end = offset, offset + length
        while pos < end:
            kind, host, n = self._find(pos, end - pos)
            rel = pos - offset
            if kind is Kind.FOUND:
                self.file.debug_event("read_aio")
                out[rel : rel + n] = self.file.read(host, n)
            elif kind is not Kind.ZERO and self.backing is not None:
                bsize = self.backing.size()
                if pos < bsize:
                    m = min(n, bsize - pos)
                    out[rel : rel + m] = self.backing.read(pos, m)
            pos += n
        return bytes(out)

    def block_status(self, offset: int, length: int) -> Extent:
        kind, host, n = self._find(offset, length)
        if kind is Kind.FOUND:
            return Extent(Status.DATA | Status.OFFSET_VALID, n, host, self.file)
        if kind is Kind.ZERO:
            return Extent(Status.ZERO, n, 0, None)
        return Extent(Status(0), n, 0, None)

    def write(self, offset: int, data: bytes) -> None:
        """Raises ReadOnlyError, OutOfBounds, BlockError(EINVAL) for corrupt tables."""
        self.check_writable()
        self._check_range(offset, len(data))
        if data:
            self._write(offset, len(data), data)

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        """Whole clusters become zero-cluster entries (or zeros written in place where data is allocated);
        the unaligned head and tail are written as zeros, as QEMU's block layer falls back to."""
        self.check_writable()
        self._check_range(offset, length)
        cs = self.cs
        pos, end = offset, offset + length
        while pos < end:
            if pos & (cs - 1):
                n = min(end, round_up(pos, cs)) - pos
                self._write(pos, n, bytes(n))
            elif end - pos >= cs:
                n = (end - pos) >> self.cbits << self.cbits
                self._write(pos, n, None)
            else:
                n = end - pos
                self._write(pos, n, bytes(n))
            pos += n

    def _write(self, offset: int, length: int, data: bytes | None) -> None:
        """Write ``data`` (None: zero clusters) at ``offset``, run by run."""
        assert self.file is not None
        view = memoryview(data) if data is not None else None
        pos, end = offset, offset + length
        while pos < end:
            kind, host, n = self._find(pos, end - pos)
            piece: bytes | None = None
            if view is not None:
                piece = data if n == length else bytes(view[pos - offset : pos - offset + n])
            if kind is Kind.FOUND:
                if piece is None:
                    self.file.write_zeroes(host, n)
                else:
                    self.file.write(host, piece)
            elif piece is not None or kind is not Kind.ZERO:
                self._allocate(kind, pos, n, piece)
            pos += n

    def _allocate(self, kind: Kind, pos: int, n: int, piece: bytes | None) -> None:
        """An allocating write of one run (all within one L2 table): data clusters (piece) or zero-cluster
        entries (piece None).  Data first, then the L2 entries; a new L2 table before its L1 entry."""
        assert self.file is not None
        f = self.file
        cs = self.cs
        in_cluster = pos & (cs - 1)
        nclusters = (in_cluster + n + cs - 1) >> self.cbits
        if piece is None:
            value, step = ZERO_CLUSTER, 0
        else:
            value, step = self._alloc_clusters(nclusters), cs
        if self.backing is None and not self.h.features & Feature.NEED_CHECK:
            self.h.features |= Feature.NEED_CHECK
            self._write_header()
        if piece is not None:
            start = pos - in_cluster
            tail = nclusters * cs - in_cluster - n

            def fill(at: int, count: int) -> bytes:
                # the untouched part of a new cluster keeps what the guest saw there
                return bytes(count) if kind is Kind.ZERO else self._backing_bytes(at, count)

            if in_cluster:
                f.write(value, fill(start, in_cluster))
            f.debug_event("write_aio")
            f.write(value + in_cluster, piece)
            if tail:
                f.write(value + in_cluster + n, fill(pos + n, tail))
            if self.backing is not None:
                f.flush()  # no need-check with a backing file: the data must be stable before it is linked
        l1i, l2i = divmod(pos >> self.cbits, self.nelems)
        if kind is Kind.UNALLOC_L1:
            table = self._alloc_clusters(self.h.table_size)
            self._write_new_table(table, l2i, nclusters, value, step)
            f.flush()
            self._store_entries(self.h.l1_table_offset, l1i, 1, table, 0)
        else:
            l2 = self._entry(self.h.l1_table_offset, l1i)
            self._store_entries(l2, l2i, nclusters, value, step)

    def truncate(self, size: int, prealloc: str = "off", shrink: bool = False) -> None:
        """Grow the image (QED cannot shrink).  Raises NotSupported / InvalidArgument with QEMU's texts."""
        self.check_writable()
        if prealloc != "off":
            raise NotSupported(f"Unsupported preallocation mode '{prealloc}'")
        if not image_size_valid(size, self.cs, self.h.table_size):
            raise InvalidArgument("Invalid image size specified")
        if size < self.h.image_size:
            raise NotSupported("Shrinking images is currently not supported")
        self.h.image_size = size
        self._write_header()

    # ------------------------------------------------------------------------------------------------
    # header edits and creation
    # ------------------------------------------------------------------------------------------------
    def set_backing(self, name: str | None, fmt: str | None) -> None:
        """Rewrite the backing file name (``rebase``, ``commit``): the name follows the 64-byte header and
        must fit in the header clusters.  Raises NotSupported (unknown compat features), BlockError."""
        self.check_writable()
        assert self.file is not None
        h = self.h
        if name and h.compat_features:
            raise NotSupported("Cannot change the backing file of a QED image with unknown compat features")
        raw = name.encode("utf-8", "surrogateescape") if name else b""
        if HEADER.size + len(raw) > self.header_bytes:
            raise BlockError("No space left on device", errno=errno.ENOSPC)
        new = QedHeader(*HEADER.unpack(h.pack()))
        new.features &= ~int(Feature.BACKING_FILE | Feature.BACKING_FORMAT_NO_PROBE)
        if name:
            new.features |= Feature.BACKING_FILE
            if fmt == "raw":
                new.features |= Feature.BACKING_FORMAT_NO_PROBE
        new.backing_filename_offset = HEADER.size
        new.backing_filename_size = len(raw)
        self.file.write(0, new.pack() + raw)
        self.file.flush()
        self.h = new
        self._backing_name = name or None

    @classmethod
    def create(cls, filename: str, size: int | None, executor, options: dict[str, Any]) -> None:
        """``qemu-img create -f qed``: the header (and backing file name) in cluster 0, a zeroed L1 table
        at cluster 1.  Raises InvalidArgument with qemu-img's messages."""
        from engine.formats.file import FileDriver

        opts = dict(options)
        cs = _size_option(opts, "cluster_size", DEFAULT_CLUSTER_SIZE)
        ts = _size_option(opts, "table_size", DEFAULT_TABLE_SIZE)
        backing = opts.pop("backing_file", None)
        backing_fmt = opts.pop("backing_fmt", None)
        leftover_create_options(opts, size)
        if not cluster_size_valid(cs):
            raise InvalidArgument(
                f"QED cluster size must be within range [{MIN_CLUSTER_SIZE}, "
                f"{MAX_CLUSTER_SIZE}] and power of 2"
            )
        if not table_size_valid(ts):
            raise InvalidArgument(
                f"QED table size must be within range [{MIN_TABLE_SIZE}, {MAX_TABLE_SIZE}] and power of 2"
            )
        size = round_up(size, SECTOR)
        if not image_size_valid(size, cs, ts):
            raise InvalidArgument(
                "QED image size must be a non-zero multiple of cluster size and less than "
                f"{max_image_size(cs, ts)} bytes"
            )
        h = QedHeader(cluster_size=cs, table_size=ts, header_size=1, l1_table_offset=cs, image_size=size)
        name = str(backing).encode("utf-8", "surrogateescape") if backing else b""
        if HEADER.size + len(name) > cs:
            raise InvalidArgument("Backing file name too long for the QED header")
        if backing:
            h.features |= Feature.BACKING_FILE
            h.backing_filename_offset = HEADER.size
            h.backing_filename_size = len(name)
            if backing_fmt == "raw":
                h.features |= Feature.BACKING_FORMAT_NO_PROBE
        f = FileDriver(filename, executor, read_only=False, create=True)
        try:
            f.write(0, h.pack() + name)
            table = cs * ts
            chunk = min(table, _WRITE_CHUNK)
            for pos in range(0, table, chunk):
                f.write(cs + pos, bytes(chunk))
            f.flush()
        finally:
            f.close()
