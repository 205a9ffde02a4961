"""The ``vmdk`` format (VMware), read and write, laid out byte for byte as qemu-img 7.2 lays it out.

Layer: engine; imports the driver API, the errors, the ``file`` driver and (to resolve a parent image at
create time) ``engine.image``.  An image is a list of extents that follow one another in guest order:

* a *sparse* extent (magic ``KDMV``): a 512-byte little-endian header (version, flags, capacity, grain size,
  descriptor offset/size, GTEs per grain table, redundant and primary grain directory offsets, overhead,
  the newline check bytes ``\\n \\r\\n`` and the compression algorithm), a grain directory (u32 sector offsets
  of grain tables) and grain tables (u32 sector offsets of grains; 0 unallocated, 1 a zero grain when
  flag bit 2 is set).  Flags: bit0 newline test, bit1 redundant GD, bit2 zeroed-grain GTEs, bit16
  compressed grains, bit17 markers.  streamOptimized extents (version 3, compression 1) hold each grain as
  a marker ``{u64 lba, u32 size}`` and zlib data *with* its zlib header; QEMU keeps a GD/GT up front and
  writes no footer, VMware writes ``gdOffset = 0xFFFFFFFFFFFFFFFF`` and keeps the real header in a footer
  (footer marker, header copy, end-of-stream marker: the last 1536 bytes).  ``COWD`` (VMFS sparse, the
  VMDK3 header) extents are read too;
* a *flat* extent (``FLAT``/``VMFS``): raw data at a sector offset of its file.

A monolithicSparse/streamOptimized image is one sparse file whose embedded descriptor sits at sector 1; the
other subformats are a text descriptor (``# Disk DescriptorFile``, ``createType=...``, extent lines
``RW <sectors> SPARSE|FLAT|VMFS|VMFSSPARSE "<file>" [offset]``, ``ddb.*``) naming extent files relative to
the descriptor's directory.  Lines QEMU 7.2 ignores (other access modes, ``ZERO`` extents, unknown types)
are ignored here too.

Block status is QEMU's: a plain grain is DATA with its host offset in the extent's file node, a flat
extent DATA with RECURSE (the file says where its holes are), a zero grain ZERO, an unallocated grain
nothing (zeros, or the parent's data: a ``parentFileNameHint`` names a vmdk parent whose CID must equal our
parentCID); a compressed grain is DATA without an offset, and ``compressed_source`` hands convert's
workers its deflate stream (the zlib stream less its 2-byte header) so they inflate it themselves.

Invariants.  Allocation follows QEMU's: a new grain goes at the extent's next free sector (the file size
rounded up to a grain at open), its data is written before its grain-table entry (primary and redundant
table); a streamOptimized grain is a marker plus compressed data appended after the previous one, and a
grain that is already allocated there cannot be rewritten ("Could not write to allocated cluster for
streamOptimized").  The first write after an open stores a new random CID in the descriptor, as QEMU does.
Tables read at open are bounded by the file's size, never by a header's claim, and no table entry is
written past the end of its file.  QEMU's quirks that shape the file are kept: a partial-grain write to
streamOptimized fails with EINVAL after reserving (and filling) a grain, and the CID rewrite grows a
descriptor file to a multiple of 512 bytes.  Deliberate differences from QEMU: a write where the grain
directory entry is 0 appends a grain table (QEMU loses such a write); a write to a VMware stream writes
its footer again at the new end of the file (QEMU leaves it mid-file, and the image no longer opens); a
descriptor without any extent is refused at open (QEMU asserts later); a capacity beyond 2^63 bytes is
refused; seSparse extents are not supported.

Errors: ImageOpenError (open, create), InvalidArgument/NotSupported (create options, unfit streamOptimized
writes), CorruptImage (bad compressed grains, tables past the end of the file), BlockError with EIO/EINVAL
(rewriting a streamOptimized grain, a directory index out of range, a parent whose CID does not match).
"""
from __future__ import annotations

import bisect
import errno as _errno
import os
import random
import re
import struct
import sys
import zlib
from array import array
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from engine.driver import BlockDriver, Extent, Status, register
from engine.errors import BlockError, CorruptImage, ImageOpenError, InvalidArgument, NotSupported
from engine.formats.file import FileDriver
from ipc.ranges import consecutive_runs

if TYPE_CHECKING:
    from ipc.executor import Executor

SECTOR = 512
MAGIC_VMDK4 = b"KDMV"
MAGIC_VMDK3 = b"COWD"
FLAG_NL_DETECT = 1 << 0
FLAG_RGD = 1 << 1
FLAG_ZERO_GRAIN = 1 << 2
FLAG_COMPRESS = 1 << 16
FLAG_MARKER = 1 << 17
GD_AT_END = 0xFFFF_FFFF_FFFF_FFFF
COMPRESSION_DEFLATE = 1
GTE_ZEROED = 1
MARKER_EOS, MARKER_GT, MARKER_GD, MARKER_FOOTER = 0, 1, 2, 3
DESC_SIZE = 20 * SECTOR  # the descriptor area QEMU reads and rewrites (CID updates)
MAX_DESC_READ = (1 << 20) - 1  # a text descriptor is read up to this size
MAX_GRAIN_SECTORS = 0x200000  # 1 GiB grains
MAX_L1_SIZE = 32 * 1024 * 1024
MAX_EXTENT_SECTORS = 1 << 32
MAX_NESTING = 4  # a sparse extent whose header points at another descriptor
SPLIT_SIZE = 0x80000000  # twoGbMaxExtent*: every extent but the last holds 2 GiB
GT_CACHE_TABLES = 512
MAX_BOUNCE = 16 << 20  # zero writes that fall back to data are written this much at a time

# magic(4) version flags capacity granularity desc_offset desc_size num_gtes rgd gd grain_offset filler(1)
# check_bytes(4) compress_algorithm: 79 bytes
HEADER4 = struct.Struct("<4sIIQQQQIQQQB4sH")
HEADER3 = struct.Struct("<4s10I")
MARKER = struct.Struct("<QI")
CHECK_BYTES = b"\n \r\n"

SUBFORMATS = ("monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat",
              "streamOptimized")
ADAPTER_TYPES = ("ide", "buslogic", "lsilogic", "legacyESX")
DESCRIPTOR_TYPES = ("monolithicFlat", "vmfs", "vmfsSparse", "seSparse", "twoGbMaxExtentSparse",
                    "twoGbMaxExtentFlat")
EXTENT_TYPES = ("FLAT", "SPARSE", "VMFS", "VMFSSPARSE", "SESPARSE")

# lookup results (QEMU's VMDK_OK / VMDK_UNALLOC / VMDK_ZEROED / VMDK_ERROR)
_OK, _UNALLOC, _ZEROED, _ERROR = 0, 1, 2, 3

# one extent line as sscanf("%10s %lld %10s \"%511[^\n\r\"]\" %lld") reads it; whitespace may cross lines
_EXTENT_LINE = re.compile(rb"\s*(\S{1,10}+)(?:\s*([+-]?\d+)(?:\s*(\S{1,10}+)(?:\s*\"([^\n\r\"]{1,511})\""
                          rb"(?:\s*([+-]?\d+))?)?)?)?")
_HEX = re.compile(rb"\s*([+-]?)(?:0[xX])?([0-9a-fA-F]+)")


def _u32_table(raw: bytes) -> array:
    table = array("I")
    table.frombytes(raw[:len(raw) // 4 * 4])
    if sys.byteorder == "big":  # pragma: no cover - the tables are little-endian on disk
        table.byteswap()
    return table


def _le_bytes(table: array) -> bytes:
    if sys.byteorder == "big":  # pragma: no cover
        table = array("I", table)
        table.byteswap()
    return table.tobytes()


def _c_string(buf: bytes) -> bytes:
    """The text of ``buf`` up to its first NUL, as C's string functions see it."""
    end = buf.find(b"\0")
    return buf if end < 0 else buf[:end]


def _scan_hex(text: bytes) -> int | None:
    """sscanf("%x"): optional blanks, sign and 0x, then hex digits; None when there are none."""
    m = _HEX.match(text)
    if not m:
        return None
    value = int(m.group(2), 16)
    if m.group(1) == b"-":
        value = -value
    return value & 0xFFFFFFFF


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@dataclass(eq=False)
class _VmdkExtent:
    """One extent: where it sits in the guest (``start`` .. ``start + sectors``, in sectors) and how its
    file maps it.  Sparse extents carry their grain directory (``gd``) and a cache of grain tables."""

    file: FileDriver
    own: bool  # opened by this driver (closed with it)
    kind: str  # "" (a sparse file opened directly), FLAT, VMFS, SPARSE, VMFSSPARSE
    flat: bool
    sectors: int
    start: int = 0
    flat_offset: int = 0  # bytes
    cluster_sectors: int = 0
    gtes: int = 0  # entries per grain table
    l1_entry_sectors: int = 0
    l1_size: int = 0
    gd_offset: int = 0  # bytes
    rgd_offset: int = 0  # bytes; 0 = no redundant directory
    gd: array = field(default_factory=lambda: array("I"))
    rgd: array | None = None
    compressed: bool = False
    has_marker: bool = False
    zero_grain: bool = False
    version: int = 1
    next_sector: int = 0
    gt_cache: dict[int, array] = field(default_factory=dict)
    footer: bytes | None = None  # a VMware stream's last 1536 bytes (footer marker, header, EOS marker)
    gd_used: list[int] | None = None  # sorted directory indices that name a grain table (built lazily)
    tail_dirty: bool = False  # data was appended after the footer: it must be written again at the end

    @property
    def grain(self) -> int:
        return self.cluster_sectors * SECTOR

    @property
    def end(self) -> int:
        """First guest sector after this extent."""
        return self.start + self.sectors

    def next_table(self, l1: int) -> int:
        """The first directory index after ``l1`` that names a grain table (``l1_size`` if none): runs
        of empty directory entries are skipped in one step."""
        if self.gd_used is None:
            self.gd_used = [i for i, v in enumerate(self.gd) if v]
        j = bisect.bisect_right(self.gd_used, l1)
        return min(self.gd_used[j], self.l1_size) if j < len(self.gd_used) else self.l1_size


class _ZeroNotSupported(Exception):
    """A zero write that the grain tables cannot express: it becomes a write of zeroes (QEMU's ENOTSUP)."""


@register
class VmdkDriver(BlockDriver):
    format_name = "vmdk"
    supports_backing = True

    def __init__(self, filename: str, executor: Executor, read_only: bool) -> None:
        super().__init__(filename, executor, read_only)
        self.extents: list[_VmdkExtent] = []
        self.create_type: str | None = None
        self.desc_offset = 0
        self.cid = 0
        self.parent_cid = 0
        self.parent_hint: str | None = None
        self.total_sectors = 0
        self._cid_updated = False
        self._cid_checked = False
        self._grain_cache: tuple[int, int, bytes] | None = None  # (id(extent), sector, decompressed grain)

    # --- probing ------------------------------------------------------------------------------------
    @classmethod
    def probe(cls, head: bytes, filename: str) -> int:
        head = head[:512]  # QEMU probes with the first 512 bytes
        if len(head) < 4:
            return 0
        if head[:4] in (MAGIC_VMDK4, MAGIC_VMDK3):
            return 100
        # a text descriptor: comment lines and blank (space-only) lines, then "version=1|2|3"
        p, end = 0, len(head)
        while p < end:
            c = head[p:p + 1]
            if c == b"#":
                nl = head.find(b"\n", p)
                p = end if nl < 0 else nl + 1
                continue
            if c == b" ":
                while p < end and head[p:p + 1] == b" ":
                    p += 1
                if p < end and head[p:p + 1] == b"\r":
                    p += 1
                if p == end or head[p:p + 1] != b"\n":
                    return 0
                p += 1
                continue
            for v in (b"1", b"2", b"3"):
                line = b"version=" + v
                if head.startswith(line + b"\n", p) or head.startswith(line + b"\r\n", p):
                    return 100
            return 0
        return 0

    # --- open ---------------------------------------------------------------------------------------
    def open(self, options: dict[str, Any]) -> None:
        f = self.file
        assert isinstance(f, FileDriver)
        fsize = f.size()
        if fsize < 4:
            raise ImageOpenError("File is too small, not a valid image")
        magic = f.read(0, 4)
        if magic in (MAGIC_VMDK4, MAGIC_VMDK3):
            self._open_sparse(f, own=False, kind="", depth=0)
            self.desc_offset = SECTOR
        else:
            text = _c_string(f.read(0, min(fsize, MAX_DESC_READ)))
            self._open_descriptor(text, depth=0)
            self.desc_offset = 0
        if not self.extents:
            raise ImageOpenError("invalid VMDK image descriptor: no usable extent")
        if self.create_type is None:  # a VMFS sparse (COWD) file opened directly names no type
            self.create_type = ""
        pos = 0
        for ext in self.extents:
            ext.start = pos
            pos += ext.sectors
        self.total_sectors = pos
        if pos * SECTOR >= 1 << 63:
            raise ImageOpenError("Image size too large: the extents' capacities overflow")
        desc = self._read_desc_area()
        self._parse_parent_hint(desc)
        cid = self._scan_cid(desc, parent=False)
        pcid = self._scan_cid(desc, parent=True)
        if cid is None or pcid is None:
            raise ImageOpenError(f"Could not open '{self.filename}': Invalid argument", errno=_errno.EINVAL)
        self.cid, self.parent_cid = cid, pcid
        cs = self.cluster_size()
        packed = [e for e in self.extents if e.compressed]
        if packed and all(e.has_marker and e.grain == cs and e.start * SECTOR % cs == 0 for e in packed):
            # grains convert's pool workers can inflate themselves (see _compressed_source); otherwise
            # convert reads them through read()
            self.compressed_source = self._compressed_source  # type: ignore[attr-defined]

    def _read_desc_area(self) -> bytes:
        assert self.file is not None
        buf = self.file.read(self.desc_offset, DESC_SIZE)
        return _c_string(buf[:DESC_SIZE - 1])

    @staticmethod
    def _scan_cid(desc: bytes, parent: bool) -> int | None:
        name = b"parentCID" if parent else b"CID"
        i = desc.find(name)
        if i < 0:
            return None
        return _scan_hex(desc[i + len(name) + 1:])

    def _parse_parent_hint(self, desc: bytes) -> None:
        key = b"parentFileNameHint"
        i = desc.find(key)
        if i < 0:
            return
        start = i + len(key) + 2
        end = desc.find(b'"', start)
        if end < 0 or end - start > 4095:
            raise ImageOpenError(f"Could not open '{self.filename}': Invalid argument", errno=_errno.EINVAL)
        self.parent_hint = desc[start:end].decode("utf-8", "surrogateescape")

    def _open_descriptor(self, text: bytes, depth: int) -> None:
        """A text descriptor: its createType and its extent lines (QEMU's vmdk_open_desc_file)."""
        key = b"createType"
        i = text.find(key)
        ct = None
        if i >= 0:
            start = i + len(key) + 2
            end = text.find(b'"', start)
            if start < len(text) and end >= 0 and end - start + 1 <= 128:
                ct = text[start:end].decode("latin-1")
        if ct is None:
            raise ImageOpenError("invalid VMDK image descriptor")
        if ct not in DESCRIPTOR_TYPES:
            raise ImageOpenError(f"Unsupported image type '{ct}'", errno=_errno.ENOTSUP)
        self.create_type = ct
        self._parse_extents(text, depth)

    def _parse_extents(self, text: bytes, depth: int) -> None:
        assert self.file is not None
        p = 0
        while p < len(text):
            nl = text.find(b"\n", p)
            line_end = len(text) if nl < 0 else nl
            nxt = len(text) if nl < 0 else nl + 1
            m = _EXTENT_LINE.match(text, p)
            p_line = p
            p = nxt
            if not m:
                continue
            access, sectors_s, etype_b, fname_b, off_s = m.groups()
            matches = sum(g is not None for g in m.groups())
            if matches < 4 or access != b"RW":
                continue
            etype = etype_b.decode("latin-1")
            flat_offset = int(off_s) if off_s is not None else -1
            invalid = False
            if etype == "FLAT":
                invalid = matches != 5 or flat_offset < 0
            elif etype == "VMFS":
                invalid = matches != 4
                flat_offset = 0
            elif matches != 4:
                invalid = True
            if invalid:
                line = text[p_line:line_end].decode("utf-8", "replace")
                raise ImageOpenError(f"Invalid extent line: {line}")
            sectors = int(sectors_s)
            if sectors <= 0 or etype not in EXTENT_TYPES:
                continue
            fname = fname_b.decode("utf-8", "surrogateescape")
            from engine.image import path_combine

            path = path_combine(self.file.filename, fname)
            if etype == "SESPARSE":
                raise ImageOpenError(f"Unsupported extent type '{etype}' in '{path}'", errno=_errno.ENOTSUP)
            efile = FileDriver(path, self.executor, self.read_only)
            efile.cache_unsafe = getattr(self.file, "cache_unsafe", False)
            try:
                if etype in ("FLAT", "VMFS"):
                    if sectors * SECTOR >= 1 << 63:
                        raise ImageOpenError(f"Invalid extent line: extent of {sectors} sectors")
                    ext = _VmdkExtent(efile, True, etype, True, sectors, flat_offset=flat_offset * SECTOR,
                                      cluster_sectors=sectors)
                    self.extents.append(ext)
                else:
                    if efile.size() < 4:
                        raise ImageOpenError("File is too small, not a valid image")
                    if efile.read(0, 4) not in (MAGIC_VMDK4, MAGIC_VMDK3):
                        raise ImageOpenError("Image not in VMDK format")
                    self._open_sparse(efile, own=True, kind=etype, depth=depth + 1)
            except BaseException:
                if not any(e.file is efile for e in self.extents):
                    efile.close()
                raise

    def _open_sparse(self, f: FileDriver, own: bool, kind: str, depth: int) -> None:
        head = f.read(0, SECTOR)
        if head[:4] == MAGIC_VMDK3:
            self._open_vmdk3(f, own, kind, head)
        else:
            self._open_vmdk4(f, own, kind, head, depth)

    def _open_vmdk3(self, f: FileDriver, own: bool, kind: str, head: bytes) -> None:
        (_m, _version, _flags, disk_sectors, granularity, l1dir_offset, l1dir_size, _file_sectors,
         _cyl, _heads, _spt) = HEADER3.unpack_from(head)
        if granularity > MAX_GRAIN_SECTORS:
            raise ImageOpenError("Invalid granularity, image may be corrupt", errno=_errno.EFBIG)
        if l1dir_size > MAX_L1_SIZE:
            raise ImageOpenError("L1 size too big", errno=_errno.EFBIG)
        if granularity == 0:
            raise ImageOpenError("L1 entry size is invalid")
        ext = _VmdkExtent(f, own, kind, False, disk_sectors, cluster_sectors=granularity, gtes=4096,
                          l1_entry_sectors=4096 * granularity, l1_size=l1dir_size,
                          gd_offset=l1dir_offset * SECTOR, version=0)
        self._init_tables(ext)
        self.extents.append(ext)

    def _open_vmdk4(self, f: FileDriver, own: bool, kind: str, head: bytes, depth: int) -> None:
        h = HEADER4.unpack_from(head.ljust(SECTOR, b"\0"))
        (_m, version, flags, capacity, granularity, desc_offset, _desc_size, num_gtes, rgd_offset, gd_offset,
         grain_offset, _filler, _check, compress) = h
        fsize = f.size()
        if capacity == 0 and desc_offset:
            if depth >= MAX_NESTING:
                raise ImageOpenError("VMDK descriptors nest too deeply")
            text = _c_string(f.read(desc_offset * SECTOR, min(fsize, MAX_DESC_READ))) \
                if desc_offset * SECTOR < fsize else b""
            self._open_descriptor(text, depth)
            return
        if self.create_type is None:
            self.create_type = "monolithicSparse"
        if gd_offset == GD_AT_END:
            # VMware's stream: the footer (its marker, a header copy, the end-of-stream marker) rules
            foot_at = _round_up(fsize, SECTOR) - 3 * SECTOR
            if foot_at < 0:
                raise ImageOpenError("Invalid footer")
            foot = f.read(foot_at, 3 * SECTOR)
            fm_size, fm_type = struct.unpack_from("<II", foot, 8)
            eos_val, = struct.unpack_from("<Q", foot, 1024)
            eos_size, eos_type = struct.unpack_from("<II", foot, 1032)
            if foot[512:516] != MAGIC_VMDK4 or fm_size != 0 or fm_type != MARKER_FOOTER or eos_val != 0 \
                    or eos_size != 0 or eos_type != MARKER_EOS:
                raise ImageOpenError("Invalid footer")
            (_m, version, flags, capacity, granularity, desc_offset, _desc_size, num_gtes, rgd_offset,
             gd_offset, grain_offset, _filler, _check, compress) = HEADER4.unpack_from(foot, 512)
            footer: bytes | None = foot
        else:
            footer = None
        compressed = compress == COMPRESSION_DEFLATE
        if version > 3:
            raise ImageOpenError(f"Unsupported VMDK version {version}", errno=_errno.ENOTSUP)
        if version == 3 and not self.read_only and not compressed:
            raise ImageOpenError("VMDK version 3 must be read only")
        if num_gtes > 512:
            raise ImageOpenError("L2 table size too big")
        l1_entry_sectors = (num_gtes * granularity) & 0xFFFFFFFF
        if l1_entry_sectors == 0:
            raise ImageOpenError("L1 entry size is invalid")
        l1_size = (-(-capacity // l1_entry_sectors)) & 0xFFFFFFFF
        rgd = rgd_offset * SECTOR if flags & FLAG_RGD else 0
        if -(-fsize // SECTOR) < grain_offset:
            raise ImageOpenError(f"File truncated, expecting at least {grain_offset * SECTOR} bytes")
        if granularity > MAX_GRAIN_SECTORS:
            raise ImageOpenError("Invalid granularity, image may be corrupt", errno=_errno.EFBIG)
        if l1_size > MAX_L1_SIZE:
            raise ImageOpenError("L1 size too big", errno=_errno.EFBIG)
        if capacity * SECTOR >= 1 << 63:
            raise ImageOpenError(f"Image size too large: capacity of {capacity} sectors")
        ext = _VmdkExtent(f, own, kind, False, capacity, cluster_sectors=granularity, gtes=num_gtes,
                          l1_entry_sectors=l1_entry_sectors, l1_size=l1_size, gd_offset=gd_offset * SECTOR,
                          rgd_offset=rgd, compressed=compressed, has_marker=bool(flags & FLAG_MARKER),
                          zero_grain=bool(flags & FLAG_ZERO_GRAIN), version=version, footer=footer)
        if compressed:
            self.create_type = "streamOptimized"
        self._init_tables(ext)
        self.extents.append(ext)

    def _init_tables(self, ext: _VmdkExtent) -> None:
        """Read the grain directory (and its redundant copy): what lies past the end of the file reads as
        zeros and is not stored, so a header cannot make us allocate more than the file holds."""
        fsize = ext.file.size()
        ext.gd = self._read_table(ext.file, fsize, ext.gd_offset, ext.l1_size)
        if ext.rgd_offset:
            ext.rgd = self._read_table(ext.file, fsize, ext.rgd_offset, ext.l1_size)
        ext.next_sector = _round_up(-(-fsize // SECTOR), ext.cluster_sectors)

    @staticmethod
    def _read_table(f: FileDriver, fsize: int, offset: int, entries: int) -> array:
        if offset >= fsize:
            return array("I")
        n = min(entries * 4, fsize - offset)
        try:
            return _u32_table(f.read(offset, n))
        except BlockError as exc:
            raise ImageOpenError(f"Could not read l1 table from extent '{f.filename}': {exc.message}",
                                 errno=exc.errno) from None

    # --- the mapping ----------------------------------------------------------------------------------
    def size(self) -> int:
        return self.total_sectors * SECTOR

    def cluster_size(self) -> int | None:
        first = self.extents[0]
        for e in self.extents[1:]:
            if e.flat != first.flat or e.compressed != first.compressed or \
                    (not e.flat and e.cluster_sectors != first.cluster_sectors):
                return None
        return None if first.flat else first.grain

    def _find(self, offset: int) -> _VmdkExtent:
        sector = offset // SECTOR
        for ext in self.extents:
            if sector < ext.end:
                return ext
        raise BlockError(f"offset {offset} is past the last VMDK extent", errno=_errno.EIO)

    def _gt(self, ext: _VmdkExtent, gt_sector: int) -> array:
        table = ext.gt_cache.get(gt_sector)
        if table is None:
            raw = ext.file.read(gt_sector * SECTOR, ext.gtes * 4)
            table = _u32_table(raw)
            if len(ext.gt_cache) >= GT_CACHE_TABLES:
                ext.gt_cache.clear()
            ext.gt_cache[gt_sector] = table
        return table

    def _lookup(self, ext: _VmdkExtent, rel: int) -> tuple[int, int, int, int]:
        """(result, grain sector, l1 index, l2 index) of extent-relative byte offset ``rel`` in a sparse
        extent; result is _OK, _UNALLOC, _ZEROED or _ERROR (a directory index past the directory)."""
        sector = rel // SECTOR
        l1 = sector // ext.l1_entry_sectors
        if l1 >= ext.l1_size:
            return _ERROR, 0, l1, 0
        l2 = (sector // ext.cluster_sectors) % ext.gtes
        gt_sector = ext.gd[l1] if l1 < len(ext.gd) else 0
        if not gt_sector:
            return _UNALLOC, 0, l1, l2
        entry = self._gt(ext, gt_sector)[l2]
        if ext.zero_grain and entry == GTE_ZEROED:
            return _ZEROED, 0, l1, l2
        if not entry:
            return _UNALLOC, 0, l1, l2
        return _OK, entry, l1, l2

    def _grain_data(self, ext: _VmdkExtent, sector: int) -> bytes:
        """A compressed grain, inflated (it may be shorter than a grain: the last one of a disk)."""
        key = (id(ext), sector)
        if self._grain_cache is not None and self._grain_cache[:2] == key:
            return self._grain_cache[2]
        grain = ext.grain
        if ext.has_marker:
            _lba, size = MARKER.unpack(ext.file.read(sector * SECTOR, MARKER.size))
            start = sector * SECTOR + MARKER.size
        else:
            size, start = grain, sector * SECTOR
        if not size or size > 2 * grain:
            raise CorruptImage(f"Invalid compressed grain at sector {sector} (size {size})",
                               errno=_errno.EINVAL)
        d = zlib.decompressobj()
        try:
            out = d.decompress(ext.file.read(start, size), grain)
        except zlib.error as exc:
            raise CorruptImage(f"Corrupt compressed grain at sector {sector}: {exc}",
                               errno=_errno.EINVAL) from None
        if not d.eof:
            raise CorruptImage(f"Corrupt compressed grain at sector {sector}", errno=_errno.EINVAL)
        self._grain_cache = (key[0], key[1], out)
        return out

    def _compressed_source(self, offset: int) -> tuple[int, int, int, str, int]:
        """For convert's workers: (file handle, host offset, length, codec, bytes to inflate) of the
        compressed grain holding guest ``offset``: the zlib stream without its 2-byte header is raw deflate
        (what the workers' "zlib" codec inflates), its Adler-32 trailer is never reached."""
        ext = self._find(offset)
        rel = offset - ext.start * SECTOR
        res, sector, _l1, _l2 = self._lookup(ext, rel)
        if res != _OK or not ext.compressed or not ext.has_marker:
            raise CorruptImage(f"guest offset {offset} is not in a compressed grain")
        raw = ext.file.read(sector * SECTOR, MARKER.size + 2)
        _lba, size = MARKER.unpack_from(raw)
        cmf, flg = raw[MARKER.size], raw[MARKER.size + 1]
        if size < 3 or size > 2 * ext.grain or cmf & 0x0F != 8 or (cmf * 256 + flg) % 31 or flg & 0x20:
            raise CorruptImage(f"Invalid compressed grain at sector {sector}", errno=_errno.EINVAL)
        grain_start = rel // ext.grain * ext.grain
        out_len = min(ext.grain, ext.sectors * SECTOR - grain_start)
        assert isinstance(ext.file, FileDriver)
        return ext.file.handle, sector * SECTOR + MARKER.size + 2, size - 2, "zlib", out_len

    # --- reads ----------------------------------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        out = bytearray(length)
        pos = 0
        run: tuple[FileDriver, int, int, int] | None = None  # (file, host, out position, length)

        def flush_run() -> None:
            if run is not None:
                f, host, at, n = run
                out[at:at + n] = f.read(host, n)

        while pos < length:
            cur = offset + pos
            ext = self._find(cur)
            rel = cur - ext.start * SECTOR
            if ext.flat:
                n = min(length - pos, ext.end * SECTOR - cur)
                host = ext.flat_offset + rel
                res = _OK
            else:
                in_grain = rel % ext.grain
                n = min(length - pos, ext.grain - in_grain, ext.end * SECTOR - cur)
                res, sector, _l1, _l2 = self._lookup(ext, rel)
                host = sector * SECTOR + in_grain
            if res == _OK and not ext.compressed:
                if run is not None and run[0] is ext.file and run[1] + run[3] == host \
                        and run[2] + run[3] == pos:
                    run = (run[0], run[1], run[2], run[3] + n)
                else:
                    flush_run()
                    run = (ext.file, host, pos, n)
            elif res == _OK:
                grain = self._grain_data(ext, sector)
                in_grain = rel % ext.grain
                if in_grain + n > len(grain):
                    raise CorruptImage(f"compressed grain at sector {sector} is too short",
                                       errno=_errno.EINVAL)
                out[pos:pos + n] = grain[in_grain:in_grain + n]
            elif res == _UNALLOC and self.backing is not None:
                self._check_parent_cid()
                out[pos:pos + n] = self._backing_read(cur, n)
            # _ZEROED, _ERROR (QEMU reads zeros there too) and unallocated without backing: zeros
            pos += n
        flush_run()
        return bytes(out)

    def _backing_read(self, offset: int, n: int) -> bytes:
        assert self.backing is not None
        bsize = self.backing.size()
        if offset >= bsize:
            return bytes(n)
        m = min(n, bsize - offset)
        data = self.backing.read(offset, m)
        return data if m == n else data + bytes(n - m)

    def _check_parent_cid(self) -> None:
        """QEMU's vmdk_is_cid_valid: the parent must be a vmdk whose CID is our parentCID."""
        if self._cid_checked or self.backing is None:
            return
        parent = self.backing
        ok = isinstance(parent, VmdkDriver)
        if ok:
            assert isinstance(parent, VmdkDriver)
            try:
                cur = parent._scan_cid(parent._read_desc_area(), parent=False)
            except BlockError:
                cur = None
            ok = cur == self.parent_cid
        if not ok:
            raise BlockError("Invalid argument: the parent image's CID does not match parentCID",
                             errno=_errno.EINVAL)
        self._cid_checked = True

    def block_status(self, offset: int, length: int) -> Extent:
        ext = self._find(offset)
        rel = offset - ext.start * SECTOR
        ext_left = ext.end * SECTOR - offset
        if ext.flat:
            return Extent(Status.DATA | Status.OFFSET_VALID | Status.RECURSE, min(length, ext_left),
                          ext.flat_offset + rel, ext.file)
        res, sector, _l1, _l2 = self._lookup(ext, rel)
        if res == _ERROR:
            raise BlockError(f"grain directory index out of range at offset {offset}", errno=_errno.EIO)
        grain = ext.grain
        in_grain = rel % grain
        n = min(length, grain - in_grain, ext_left)
        host = sector * SECTOR + in_grain
        # runs of grains with the same answer (and contiguous host offsets) in one extent
        limit = min(length, ext_left)
        while n < limit:
            nres, nsector, nl1, _b = self._lookup(ext, rel + n)
            if nres != res or (res == _OK and not ext.compressed and nsector * SECTOR != host + n):
                break
            if nres == _UNALLOC and not (ext.gd[nl1] if nl1 < len(ext.gd) else 0):
                n = min(limit, ext.next_table(nl1) * ext.l1_entry_sectors * SECTOR - rel)  # no grain tables
            else:
                n = min(limit, n + grain)
        if res == _UNALLOC:
            return Extent(Status(0), n, 0, None)
        if res == _ZEROED:
            return Extent(Status.ZERO, n, 0, None)
        if ext.compressed:
            return Extent(Status.DATA, n, 0, ext.file)
        return Extent(Status.DATA | Status.OFFSET_VALID, n, host, ext.file)

    # --- writes ---------------------------------------------------------------------------------------
    def write(self, offset: int, data: bytes) -> None:
        self.check_writable()
        self._write(offset, memoryview(bytes(data)), len(data), zeroed=False, dry=False)

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        """QEMU's split: an unaligned head, the whole grains, an unaligned tail; each part becomes zero
        grains (GTE 1) when every grain it covers can, else it is written as zeroes."""
        self.check_writable()
        align = max((e.grain for e in self.extents if not e.flat), default=0)
        head = offset % align if align else 0
        tail = (offset + length) % align if align else 0
        while length > 0:
            num = length
            if head:
                num = min(length, align - head)
                head = (head + num) % align
            elif tail and num > align:
                num -= tail
            try:
                self._write(offset, None, num, zeroed=True, dry=True)
                self._write(offset, None, num, zeroed=True, dry=False)
            except _ZeroNotSupported:
                done = 0
                while done < num:
                    m = min(MAX_BOUNCE, num - done)
                    self._write(offset + done, memoryview(bytes(m)), m, zeroed=False, dry=False)
                    done += m
            offset += num
            length -= num

    def _write(self, offset: int, data: memoryview | None, length: int, zeroed: bool, dry: bool) -> None:
        """QEMU's vmdk_pwritev: grain by grain.  Data goes to its grain first; new grains' table entries
        are written after all the data of the request (a grain's data always precedes its entry)."""
        if -(-offset // SECTOR) > self.total_sectors:
            raise BlockError(f"Wrong offset: offset={offset:#x} total_sectors={self.total_sectors:#x}",
                             errno=_errno.EIO)
        pending_data: list[tuple[FileDriver, int, bytes]] = []
        pending_gte: list[tuple[_VmdkExtent, int, int, int]] = []
        pos = 0
        try:
            while pos < length:
                cur = offset + pos
                ext = self._find(cur)
                rel = cur - ext.start * SECTOR
                if ext.flat:
                    n = min(length - pos, ext.end * SECTOR - cur)
                    if zeroed:
                        raise _ZeroNotSupported
                    assert data is not None
                    pending_data.append((ext.file, ext.flat_offset + rel, bytes(data[pos:pos + n])))
                    pos += n
                    continue
                grain = ext.grain
                in_grain = rel % grain
                n = min(length - pos, grain - in_grain)
                res, sector, l1, l2 = self._lookup(ext, rel)
                if ext.compressed and res == _OK:
                    exc = BlockError("Could not write to allocated cluster for streamOptimized",
                                     errno=_errno.EIO)
                    exc.error_report = True  # type: ignore[attr-defined]  # QEMU prints it (error_report)
                    raise exc
                if res == _ERROR:
                    raise BlockError(f"grain directory index out of range at offset {cur}",
                                     errno=_errno.EINVAL)
                if zeroed:
                    if not (ext.zero_grain and in_grain == 0 and n >= grain):
                        raise _ZeroNotSupported
                    n = grain
                    if not dry and res != _ZEROED:
                        pending_gte.append((ext, l1, l2, GTE_ZEROED))
                elif ext.compressed:
                    assert data is not None
                    self._flush_pending(pending_data, pending_gte)
                    self._write_compressed_grain(ext, cur, rel, data[pos:pos + n], l1, l2)
                elif res == _OK:
                    assert data is not None
                    pending_data.append((ext.file, sector * SECTOR + in_grain, bytes(data[pos:pos + n])))
                else:
                    assert data is not None
                    if ext.next_sector >= MAX_EXTENT_SECTORS:
                        raise BlockError("VMDK extent is full", errno=_errno.EINVAL)
                    new = ext.next_sector
                    ext.next_sector += ext.cluster_sectors
                    ext.tail_dirty = ext.footer is not None
                    buf = self._whole_grain(ext, cur - in_grain, in_grain, data[pos:pos + n], res == _ZEROED)
                    pending_data.append((ext.file, new * SECTOR, buf))
                    pending_gte.append((ext, l1, l2, new))
                pos += n
        except BaseException:
            if not dry:  # what the grains before the failing one got is on disk, as with QEMU
                self._flush_pending(pending_data, pending_gte)
            raise
        else:
            self._flush_pending(pending_data, pending_gte)
        finally:
            for ext in self.extents:
                if ext.tail_dirty:
                    self._append_footer(ext)
            if pos and not self._cid_updated and not (zeroed and dry):
                self._cid_updated = True
                self._write_cid(random.getrandbits(32))

    def _whole_grain(self, ext: _VmdkExtent, grain_start: int, in_grain: int, data: memoryview,
                     zeroed: bool) -> bytes:
        """A new grain's bytes: the parent's data around the request (QEMU's COW), or zeros."""
        grain = ext.grain
        end = in_grain + len(data)
        if self.backing is not None:
            self._check_parent_cid()  # QEMU checks it even for a zero grain, whose parent it does not read
        if self.backing is not None and not zeroed:
            headb = self._backing_read(grain_start, in_grain) if in_grain else b""
            tailb = self._backing_read(grain_start + end, grain - end) if end < grain else b""
        else:
            headb, tailb = bytes(in_grain), bytes(grain - end)
        return headb + bytes(data) + tailb

    def _flush_pending(self, pending_data: list, pending_gte: list) -> None:
        """Write the queued data (contiguous pieces of a file merged), then the grain-table entries
        (contiguous entries of a table merged, primary and redundant tables), then flush."""
        if pending_data:
            pending_data.sort(key=lambda t: (id(t[0]), t[1]))
            i = 0
            while i < len(pending_data):
                f, host, buf = pending_data[i]
                parts = [buf]
                end = host + len(buf)
                j = i + 1
                while j < len(pending_data) and pending_data[j][0] is f and pending_data[j][1] == end \
                        and sum(len(p) for p in parts) < (32 << 20):
                    parts.append(pending_data[j][2])
                    end += len(pending_data[j][2])
                    j += 1
                _pwrite(f, host, b"".join(parts) if len(parts) > 1 else parts[0])
                i = j
            pending_data.clear()
        if pending_gte:
            self._update_gtes(pending_gte)
            pending_gte.clear()

    def _update_gtes(self, updates: list[tuple[_VmdkExtent, int, int, int]]) -> None:
        """Store grain-table entries: contiguous entries of a table in one write, to the primary table
        and its redundant copy.  A directory entry that names no table gets new (zeroed) tables at the
        end of the extent, and the directory entries are written last, after the tables' entries."""
        touched: dict[tuple[int, int], tuple[_VmdkExtent, list[int], int, int]] = {}
        new_dirs: list[tuple[_VmdkExtent, int, int, int]] = []
        for ext, l1, l2, value in updates:
            key = (id(ext), l1)
            entry = touched.get(key)
            if entry is None:
                primary = ext.gd[l1] if l1 < len(ext.gd) else 0
                backup = ext.rgd[l1] if ext.rgd is not None and l1 < len(ext.rgd) else 0
                if not primary:
                    primary, backup = self._new_grain_tables(ext)
                    new_dirs.append((ext, l1, primary, backup))
                entry = touched[key] = (ext, [], primary, backup)
            self._gt(ext, entry[2])[l2] = value
            entry[1].append(l2)
        files: dict[int, FileDriver] = {}
        for ext, idxs, primary, backup in touched.values():
            idxs.sort()
            table = self._gt(ext, primary)
            for lo, hi in consecutive_runs(idxs):
                raw = _le_bytes(table[lo:hi])
                _pwrite(ext.file, primary * SECTOR + lo * 4, raw, metadata=True)
                if backup:
                    _pwrite(ext.file, backup * SECTOR + lo * 4, raw, metadata=True)
                    cached = ext.gt_cache.get(backup)
                    if cached is not None and backup != primary:
                        cached[lo:hi] = table[lo:hi]
            files[id(ext.file)] = ext.file
        for ext, l1, primary, backup in new_dirs:
            for directory, where, t in ((ext.gd, ext.gd_offset, primary), (ext.rgd, ext.rgd_offset, backup)):
                if directory is None or not t:
                    continue
                _pwrite(ext.file, where + l1 * 4, struct.pack("<I", t), metadata=True)
                if len(directory) <= l1:
                    directory.extend([0] * (l1 + 1 - len(directory)))
                directory[l1] = t
            ext.gd_used = None
        for f in files.values():
            f.flush()

    def _new_grain_tables(self, ext: _VmdkExtent) -> tuple[int, int]:
        """A zeroed grain table (and one for the redundant directory, if there is one) appended at the
        end of the extent: (primary table sector, redundant table sector or 0)."""
        gt_sectors = -(-ext.gtes * 4 // SECTOR)
        tables = [ext.next_sector]
        ext.next_sector += gt_sectors
        ext.tail_dirty = ext.footer is not None
        if ext.rgd is not None:
            tables.append(ext.next_sector)
            ext.next_sector += gt_sectors
        for t in tables:
            _pwrite(ext.file, t * SECTOR, bytes(gt_sectors * SECTOR))
            ext.gt_cache[t] = array("I", bytes(ext.gtes * 4))
        return tables[0], (tables[1] if len(tables) > 1 else 0)

    def _write_compressed_grain(self, ext: _VmdkExtent, cur: int, rel: int, data: memoryview, l1: int,
                                l2: int) -> None:
        """streamOptimized: a whole grain (or the disk's last, shorter one) as marker + zlib data at the
        end of the stream; the grain's span past the compressed bytes holds zeros, as QEMU leaves it."""
        grain = ext.grain
        in_grain = rel % grain
        n = len(data)
        if ext.next_sector >= MAX_EXTENT_SECTORS:
            raise BlockError("VMDK extent is full", errno=_errno.EINVAL)
        new = ext.next_sector
        grain_start = cur - in_grain
        ext.tail_dirty = ext.footer is not None
        if in_grain or n > grain or (n < grain and cur + n != ext.end * SECTOR) or not ext.has_marker:
            # QEMU reserves (and fills) the grain before it finds the request unfit: so do we, the file
            # stays the same as qemu-io leaves it
            if ext.gd[l1] if l1 < len(ext.gd) else 0:
                ext.next_sector += ext.cluster_sectors
                _pwrite(ext.file, new * SECTOR, self._grain_fill(grain_start, 0, grain))
            if not ext.has_marker:
                raise InvalidArgument("compressed VMDK extent without grain markers", errno=_errno.EINVAL)
            raise InvalidArgument("streamOptimized images take only whole grains", errno=_errno.EINVAL)
        comp = zlib.compress(bytes(data))
        buf = MARKER.pack(cur // SECTOR, len(comp)) + comp
        if len(buf) < grain:
            buf += self._grain_fill(grain_start, len(buf), grain - len(buf))
        _pwrite(ext.file, new * SECTOR, buf)
        ext.next_sector = -(-(new * SECTOR + MARKER.size + len(comp)) // SECTOR)
        self._update_gtes([(ext, l1, l2, new)])

    def _append_footer(self, ext: _VmdkExtent) -> None:
        """A VMware stream keeps its footer in its last 1536 bytes: after grains or tables were appended,
        write it again at the (sector-aligned) end, where a reader looks for it."""
        assert ext.footer is not None
        ext.tail_dirty = False
        end = _round_up(ext.file.size(), SECTOR)
        _pwrite(ext.file, end, ext.footer)

    def _grain_fill(self, grain_start: int, skip: int, n: int) -> bytes:
        """What QEMU puts in a freshly reserved compressed grain past ``skip``: the parent's data, or
        zeros."""
        if self.backing is not None:
            self._check_parent_cid()
            return self._backing_read(grain_start + skip, n)
        return bytes(n)

    def _write_cid(self, cid: int) -> None:
        """QEMU's vmdk_write_cid: the text from "CID=" to "parentCID" becomes the new CID in hex; the
        descriptor area is written back whole (a descriptor file grows to a multiple of 512 bytes)."""
        f = self.file
        assert f is not None
        fsize = f.size()
        area = min(DESC_SIZE, max(0, _round_up(fsize, SECTOR) - self.desc_offset))
        buf = bytearray(f.read(self.desc_offset, DESC_SIZE))
        buf[DESC_SIZE - 1] = 0
        text = _c_string(bytes(buf))
        i = text.find(b"parentCID")
        if i < 0:
            raise BlockError("Invalid argument: the VMDK descriptor has no parentCID", errno=_errno.EINVAL)
        j = text.find(b"CID")
        p = j + 4
        new = (text[:p] + b"%x\n" % cid + text[i:])[:DESC_SIZE - 1]
        buf[:len(new)] = new
        if len(new) < len(buf):
            buf[len(new)] = 0
        _pwrite(f, self.desc_offset, bytes(buf[:area]))
        if f.size() < _round_up(fsize, SECTOR):
            f.truncate(_round_up(fsize, SECTOR))
        f.flush()

    def flush(self) -> None:
        for ext in self.extents:
            if ext.own:
                ext.file.flush()
        super().flush()

    def close(self) -> None:
        for ext in self.extents:
            if ext.own:
                ext.file.close()
        self.extents = []
        super().close()

    # --- control --------------------------------------------------------------------------------------
    def allocated_size(self) -> int:
        total = self.file.allocated_size() if self.file is not None else 0
        seen = {id(self.file)}
        for ext in self.extents:
            if id(ext.file) not in seen:
                seen.add(id(ext.file))
                total += ext.file.allocated_size()
        return total

    @property
    def backing_filename(self) -> str | None:
        return self.parent_hint

    @property
    def backing_format(self) -> str | None:
        return "vmdk" if self.parent_hint else None

    def info_specific(self) -> dict[str, Any] | None:
        extents = []
        for ext in self.extents:
            info: dict[str, Any] = {}
            if ext.compressed:
                info["compressed"] = True
            info["virtual-size"] = ext.sectors * SECTOR
            info["filename"] = ext.file.filename
            if not ext.flat:
                info["cluster-size"] = ext.grain
            info["format"] = ext.kind
            extents.append(info)
        return {"type": "vmdk", "data": {"cid": self.cid, "parent-cid": self.parent_cid,
                                         "create-type": self.create_type, "extents": extents}}

    def check_image(self, fix: int):
        """``parablock check``: QEMU's vmdk check has no repair (NotSupported with -r, as qemu-img)."""
        import os as _os

        from engine.errors import NotSupported
        from engine.formats.qcow2_check import CheckResult

        if fix:
            raise NotSupported("This image format does not support checks")
        messages, err = self.check()
        return CheckResult(messages=messages, error=_os.strerror(err) if err else None)

    def check(self) -> tuple[list[str], int]:
        """QEMU's vmdk check: every allocated grain must start inside its extent file.  Returns (messages,
        errno): errno 0 when the image is clean, else the error qemu-img reports as "Check failed"."""
        sector = 0
        while sector < self.total_sectors:
            ext = self._find(sector * SECTOR)
            step = ext.sectors if ext.flat else ext.cluster_sectors
            if ext.flat and ext.flat_offset >= ext.file.size():
                return [f"ERROR: cluster offset for sector {sector} points after EOF"], _errno.EINVAL
            if not ext.flat:
                res, gsec, l1, _l2 = self._lookup(ext, (sector - ext.start) * SECTOR)
                if res == _ERROR:
                    return [f"ERROR: could not get cluster_offset for sector {sector}"], _errno.EPERM
                if res == _OK and gsec * SECTOR >= ext.file.size():
                    return [f"ERROR: cluster offset for sector {sector} points after EOF"], _errno.EINVAL
                if res == _UNALLOC and not (ext.gd[l1] if l1 < len(ext.gd) else 0):
                    # no grain table: the next sector QEMU's walk looks at past this directory entry
                    boundary = ext.start + ext.next_table(l1) * ext.l1_entry_sectors
                    step = max(step, -(-(boundary - sector) // ext.cluster_sectors) * ext.cluster_sectors)
            sector += step
        return [], 0

    # --- creation ---------------------------------------------------------------------------------------
    @classmethod
    def create(cls, filename: str, size: int, executor: Executor, options: dict[str, Any]) -> None:
        """qemu-img create -f vmdk: options subformat, adapter_type, hwversion, compat6, toolsversion,
        zeroed_grain, backing_file/backing_fmt (the parent must be a vmdk).  Raises InvalidArgument,
        NotSupported, ImageOpenError (the parent cannot be opened)."""
        backing_fmt = options.get("backing_fmt")
        if backing_fmt and backing_fmt != "vmdk":
            raise InvalidArgument("backing_file must be a vmdk image")
        if not filename:
            raise InvalidArgument("No filename provided")
        size = _round_up(int(size or 0), SECTOR)
        adapter = options.get("adapter_type")
        adapter = "ide" if adapter is None else str(adapter)
        if adapter not in ADAPTER_TYPES:
            raise InvalidArgument(f"invalid parameter value: {adapter}")
        sub = options.get("subformat")
        sub = "monolithicSparse" if sub is None else str(sub)
        if sub not in SUBFORMATS:
            raise InvalidArgument(f"invalid parameter value: {sub}")
        hw = options.get("hwversion")
        hw = None if hw is None or str(hw) == "undefined" else str(hw)
        tools = options.get("toolsversion")
        tools = "2147483647" if tools is None else str(tools)
        compat6 = _bool_opt(options.get("compat6"), "compat6")
        zeroed_grain = _bool_opt(options.get("zeroed_grain"), "zeroed_grain")
        backing = options.get("backing_file") or None
        if compat6:
            if hw:
                raise InvalidArgument("compat6 cannot be enabled with hwversion set")
            hw = "6"
        hw = hw or "4"
        heads = 16 if adapter == "ide" else 255
        split = sub in ("twoGbMaxExtentFlat", "twoGbMaxExtentSparse")
        flat = sub in ("monolithicFlat", "twoGbMaxExtentFlat")
        compress = sub == "streamOptimized"
        if flat and backing:
            raise NotSupported("Flat image can't have backing file")
        if flat and zeroed_grain:
            raise NotSupported("Flat image can't enable zeroed grain")

        path, prefix, postfix = _decompose(filename)
        lines: list[str] = []
        line_fmt = 'RW {} FLAT "{}" 0\n' if flat else 'RW {} SPARSE "{}"\n'
        monolithic = not split and not flat
        # the descriptor file (for monolithic sparse images also the extent)
        desc = FileDriver(filename, executor, read_only=False, create=True)
        try:
            if monolithic:
                _init_sparse_extent(desc, size, compress, zeroed_grain)
                lines.append(line_fmt.format(-(-size // SECTOR), os.path.basename(filename)))
            parent_cid, parent_line = 0xFFFFFFFF, ""
            if backing:
                parent_cid = _parent_cid(filename, backing, executor)
                parent_line = f'parentFileNameHint="{backing}"'
            created = size if monolithic else 0
            idx = 1
            while created < size:
                cur = min(size - created, SPLIT_SIZE if split else size)
                if split:
                    rel = f"{prefix}-{'f' if flat else 's'}{idx:03d}{postfix}"
                else:
                    rel = f"{prefix}-flat{postfix}"
                ext_path = path + rel
                ef = FileDriver(ext_path, executor, read_only=False, create=True)
                try:
                    if flat:
                        ef.truncate(cur)
                        if cur:  # QEMU's file driver writes the first block of a file it grows from 0
                            ef.write(0, bytes(min(cur, os.sysconf("SC_PAGE_SIZE") or 4096)))
                    else:
                        _init_sparse_extent(ef, cur, compress, zeroed_grain)
                    ef.flush()
                finally:
                    ef.close()
                lines.append(line_fmt.format(-(-cur // SECTOR), os.path.basename(ext_path)))
                created += cur
                idx += 1
            text = (f"# Disk DescriptorFile\nversion=1\nCID={random.getrandbits(32):x}\n"
                    f"parentCID={parent_cid:x}\ncreateType=\"{sub}\"\n{parent_line}\n"
                    f"# Extent description\n{''.join(lines)}\n"
                    f"# The Disk Data Base\n#DDB\n\n"
                    f"ddb.virtualHWVersion = \"{hw}\"\n"
                    f"ddb.geometry.cylinders = \"{size // (63 * heads * SECTOR)}\"\n"
                    f"ddb.geometry.heads = \"{heads}\"\n"
                    f"ddb.geometry.sectors = \"63\"\n"
                    f"ddb.adapterType = \"{adapter}\"\n"
                    f"ddb.toolsVersion = \"{tools}\"\n").encode("utf-8", "surrogateescape")
            if monolithic:
                desc.write(SECTOR, text)
            else:
                desc.write(0, text)
                desc.truncate(len(text))
            desc.flush()
        finally:
            desc.close()


def _pwrite(f: BlockDriver, offset: int, data: bytes, metadata: bool = False) -> None:
    """Write through a file node; a table entry must lie inside the file (a corrupt directory or table
    pointing past its end is not followed), and a host error becomes a BlockError."""
    if offset < 0 or offset + len(data) >= 1 << 63:
        raise CorruptImage(f"VMDK write offset {offset:#x} is out of range", errno=_errno.EINVAL)
    if metadata and offset + len(data) > f.size():
        raise CorruptImage(f"VMDK grain table or directory at {offset:#x} lies past the end of "
                           f"'{f.filename}'", errno=_errno.EIO)
    try:
        f.write(offset, data)
    except (OSError, OverflowError) as exc:
        raise BlockError(f"Could not write to '{f.filename}': {exc}",
                         errno=getattr(exc, "errno", None) or _errno.EIO) from None


def _bool_opt(value: Any, name: str) -> bool:
    if value is None or isinstance(value, bool):
        return bool(value)
    text = str(value).lower()
    if text in ("on", "yes", "true"):
        return True
    if text in ("off", "no", "false"):
        return False
    raise InvalidArgument(f"Parameter '{name}' expects 'on' or 'off'")


def _decompose(filename: str) -> tuple[str, str, str]:
    """QEMU's filename_decompose: (directory with its separator, name without extension, extension)."""
    cut = -1
    for sep in ("/", "\\", ":"):
        cut = filename.rfind(sep)
        if cut >= 0:
            break
    path, base = (filename[:cut + 1], filename[cut + 1:]) if cut >= 0 else ("", filename)
    dot = base.rfind(".")
    if dot < 0:
        return path, base, ""
    return path, base[:dot], base[dot:]


def _parent_cid(filename: str, backing: str, executor: Executor) -> int:
    """The CID of the parent image named by ``backing`` (relative to ``filename``'s directory)."""
    from engine.image import open_image, path_combine

    node = open_image(path_combine(filename, backing), executor, fmt=None, read_only=True, backing=False)
    try:
        if not isinstance(node, VmdkDriver):
            raise InvalidArgument(f"Invalid backing file format: {node.format_name}. Must be vmdk")
        return node.cid
    finally:
        node.close()


def _init_sparse_extent(f: FileDriver, size: int, compress: bool, zeroed_grain: bool) -> None:
    """A sparse extent as QEMU lays it out: header, 20 descriptor sectors, the redundant directory and
    its tables, the directory and its tables, data from the next 64 KiB boundary."""
    capacity = size // SECTOR
    granularity = 128
    gtes = 512
    grains = -(-capacity // granularity)
    gt_size = -(-gtes * 4 // SECTOR)
    gt_count = -(-grains // gtes)
    gd_sectors = -(-gt_count * 4 // SECTOR)
    desc_offset, desc_size = 1, 20
    rgd = desc_offset + desc_size
    gd = rgd + gd_sectors + gt_size * gt_count
    grain_offset = _round_up(gd + gd_sectors + gt_size * gt_count, granularity)
    version = 3 if compress else 2 if zeroed_grain else 1
    flags = FLAG_RGD | FLAG_NL_DETECT | (FLAG_COMPRESS | FLAG_MARKER if compress else 0) | \
        (FLAG_ZERO_GRAIN if zeroed_grain else 0)
    header = HEADER4.pack(MAGIC_VMDK4, version, flags, capacity, granularity, desc_offset, desc_size, gtes,
                          rgd, gd, grain_offset, 0, CHECK_BYTES, COMPRESSION_DEFLATE if compress else 0)
    f.write(0, header)
    f.truncate(grain_offset * SECTOR)
    for directory in (rgd, gd):
        table = array("I", [directory + gd_sectors + i * gt_size for i in range(gt_count)])
        raw = _le_bytes(table).ljust(gd_sectors * SECTOR, b"\0")
        if raw:
            f.write(directory * SECTOR, raw)
