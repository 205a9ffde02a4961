"""The ``vhdx`` format (Hyper-V VHDX): read and write, fixed and dynamic images, log replay.

Layer: engine (imports ``engine.driver``, ``engine.errors`` and, to create files, ``engine.formats.file``;
CRC-32C comes from the ``crc32c`` or ``google_crc32c`` package when one is installed, else from a small
table-driven fallback here, about 5 MB/s, plenty for 4 KiB headers, a 64 KiB region table and a log).

On disk (MS-VHDX 1.0, little-endian throughout, GUIDs in Microsoft byte order):

* 0: file identifier, ``vhdxfile`` then a UTF-16LE creator string.
* 64 KiB and 128 KiB: two 4 KiB headers (``head``, CRC-32C over the 4 KiB with the checksum field zeroed,
  u64 sequence number, file-write / data-write / log GUIDs, log version 0, version 1, log length and
  offset).  Of the valid ones the higher sequence number is current; equal numbers are accepted only
  when the headers are identical (Disk2VHD writes such pairs).
* 192 KiB (and a copy at 256 KiB): the region table, ``regi`` + CRC over 64 KiB + entries {GUID, u64
  offset, u32 length, u32 flags (bit 0 required)} locating the BAT and the metadata region.  As QEMU,
  only the first copy is read.
* Metadata region: a 64 KiB table (``metadata`` + entries {item GUID, u32 offset into the region, u32
  length, u32 flags}) naming File Parameters (u32 block size, u32 flags: bit 0 LeaveBlocksAllocated,
  bit 1 HasParent), Virtual Disk Size (u64), Page 83 data (a GUID), Logical and Physical Sector Size
  (u32) and, for differencing images, the Parent Locator.
* BAT: u64 entries, bits 0-2 the state, bits 20-63 the file offset in MiB.  After every ``chunk_ratio =
  2**23 * logical_sector_size / block_size`` payload entries comes one sector-bitmap entry, so payload
  block ``b`` is entry ``b + b // chunk_ratio``.  Payload states: 0 not present, 1 undefined, 2 zero,
  3 unmapped (5 in pre-1.0 files) all read as zeros; 6 fully present is data at the offset; 7 partially
  present exists only in differencing images, which are refused (as QEMU does).
* Log (normally 1 MiB at 1 MiB): a ring of 4 KiB sectors holding entries (``loge`` header with a CRC over
  the whole entry, ``desc``/``zero`` descriptors, ``data`` sectors carrying 4084 of each 4096 bytes, the
  first 8 and last 4 living in the descriptor).  A non-zero log GUID in the current header means the log
  may hold metadata updates not yet written in place: they are replayed before anything else is read.
  The active sequence is searched exactly as QEMU 7.2's vhdx-log.c does (including its acceptance of
  the second entry of a sequence without a sequence-number check), so both pick the same entries.

Behaviour, as QEMU 7.2 where it has one:

* A read-only open of an image whose log must be replayed fails ("... opened read-only, but contains a
  log that needs to be replayed"); a read-write open replays it (descriptors in order, then the file is
  grown to the entry's last file offset, flushed, and the log GUID cleared with a header update).  One
  deliberate difference: the file is grown even when that offset is 1 MiB-aligned (QEMU 7.2 only grows
  it for unaligned offsets and then refuses its own BAT).
* Opening read-write changes nothing on disk (7.2 no longer touches the headers on open); the first
  guest-visible write updates both headers (sequence number + 1 each, a new file-write GUID for the
  session, new data-write GUIDs), as QEMU's vhdx_user_visible_write.
* Writes allocate payload blocks at the end of the file, 1 MiB aligned, one whole block each (the file
  is extended, so the rest of the block reads as zeros).  BAT updates are written in place, not through
  the log as QEMU does: the data of the new blocks is written and flushed first, then their BAT entries
  (data -> flush -> BAT), so a crash leaves either the old state or the new one, never a BAT entry
  pointing at unwritten data.  The final on-disk state equals QEMU's but for the header sequence numbers
  and the stale entry QEMU leaves in its log.  A fresh block gets only the non-zero 4 KiB pieces of what
  is written into it (so does a block the host file reports as a hole, e.g. a fixed image's), which keeps
  converted images as sparse as qemu-img's.
* write_zeroes leaves blocks that already read as zeros alone, zeroes allocated blocks in place, and with
  ``unmap`` turns a wholly covered allocated block into a ZERO-state entry (not in fixed images, whose
  LeaveBlocksAllocated flag asks to keep blocks).
* 4096-byte logical sectors are read and written per the specification (they only change the chunk
  ratio); QEMU 7.2 refuses such images with "Operation not supported" and cannot create them.
* Hostile input: the BAT must lie in the file (a huge virtual size cannot make it allocate), a log entry
  must not write past its last file offset (QEMU would write zeros for as long as a zero descriptor says),
  and every refusal is an ImageOpenError naming what is wrong (QEMU mostly says "Invalid argument").
* ``check_image`` is qemu-img check's vhdx_co_check: a log replayed by the (``-r``, read-write) open is one
  corruption fixed, and fully present BAT entries that overflow, lie (partly) past the end of the file
  or overlap the log, BAT or metadata region are corruptions, reported in QEMU's words.  An open with
  the ``check`` option (QEMU's BDRV_O_CHECK) lets such entries through for the check to report (any
  other open refuses them, as QEMU's does), and words its refusal of a pending log on a read-only open
  as qemu-img check does, hint included.
* Block status: fully present blocks are DATA|OFFSET_VALID on the file (RECURSE, so holes in the host
  file read as zeros), ZERO-state blocks ZERO, other states unallocated (0).  QEMU 7.2's vhdx driver has
  no block-status callback, so ``qemu-img map`` shows the whole disk as one data extent without offsets;
  ``qemu_block_status = False`` below says so to a map that wants to print what qemu-img prints.

create() lays images out as qemu-img 7.2 does: log at 1 MiB, BAT at 1 MiB + log size (1 MiB-rounded
length), metadata region (1 MiB) after it, data from BAT end + 5 MiB; block size 8 MiB up to 1 GiB,
16 MiB up to 100 GiB, 32 MiB up to 32 TiB, else 64 MiB; 512-byte sectors; with ``block_state_zero=on``
(the default) every BAT entry, even of a fixed image, starts in the ZERO state.
"""
from __future__ import annotations

import array
import random
import struct
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar

from engine.driver import BlockDriver, Extent, Status, read_mapped, register
from engine.errors import CorruptImage, ImageOpenError, InvalidArgument, NotSupported, os_error_text
from ipc.ranges import consecutive_runs

if TYPE_CHECKING:
    from engine.formats.qcow2_check import CheckResult
    from ipc.executor import Executor

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40

SIGNATURE = b"vhdxfile"
HEADER_OFFSETS = (64 * KiB, 128 * KiB)
HEADER_SIZE = 4 * KiB
REGION_TABLE_OFFSET = 192 * KiB
REGION_TABLE2_OFFSET = 256 * KiB
REGION_TABLE_SIZE = 64 * KiB
HEADER_SECTION_END = 1 * MiB
METADATA_TABLE_SIZE = 64 * KiB
LOG_SECTOR = 4 * KiB
LOG_MIN_SIZE = 1 * MiB
BLOCK_SIZE_MIN = 1 * MiB
BLOCK_SIZE_MAX = 256 * MiB
MAX_IMAGE_SIZE = 64 * TiB
MAX_FILE_SIZE = 1 << 48  # far beyond any 64 TiB image with its metadata: a bound for hostile logs
MAX_SECTORS_PER_BLOCK = 1 << 23
_U64 = (1 << 64) - 1
_INT64_MAX = (1 << 63) - 1
DEFAULT_LOG_SIZE = 1 * MiB
CREATOR = "parablock"  # diagnostic only (qemu-img 7.2 writes "QEMU v7.2.22")

# payload block states
PAYLOAD_NOT_PRESENT = 0
PAYLOAD_UNDEFINED = 1
PAYLOAD_ZERO = 2
PAYLOAD_UNMAPPED = 3
PAYLOAD_UNMAPPED_V095 = 5
PAYLOAD_FULLY_PRESENT = 6
PAYLOAD_PARTIALLY_PRESENT = 7
ZERO_STATES = frozenset({PAYLOAD_NOT_PRESENT, PAYLOAD_UNDEFINED, PAYLOAD_ZERO, PAYLOAD_UNMAPPED,
                         PAYLOAD_UNMAPPED_V095})
STATE_MASK = 0x7
OFFSET_MASK = 0xFFFFFFFFFFF00000

# file parameter flags and metadata entry flags
PARAMS_LEAVE_BLOCKS_ALLOCATED = 0x1
PARAMS_HAS_PARENT = 0x2
META_IS_USER = 0x1
META_IS_VIRTUAL_DISK = 0x2
META_IS_REQUIRED = 0x4
REGION_REQUIRED = 0x1


def _guid(text: str) -> bytes:
    return uuid.UUID(text).bytes_le


BAT_GUID = _guid("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA_GUID = _guid("8B7CA206-4790-4B9A-B8FE-575F050F886E")
FILE_PARAMETERS_GUID = _guid("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VIRTUAL_DISK_SIZE_GUID = _guid("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
PAGE83_GUID = _guid("BECA12AB-B2E6-4523-93EF-C309E000C746")
LOGICAL_SECTOR_GUID = _guid("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
PHYSICAL_SECTOR_GUID = _guid("CDA348C7-445D-4471-9CC9-E9885251C556")
PARENT_LOCATOR_GUID = _guid("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
ZERO_GUID = bytes(16)

_METADATA_ITEMS = {
    FILE_PARAMETERS_GUID: "file parameters",
    VIRTUAL_DISK_SIZE_GUID: "virtual disk size",
    PAGE83_GUID: "page 83 data",
    LOGICAL_SECTOR_GUID: "logical sector size",
    PHYSICAL_SECTOR_GUID: "physical sector size",
    PARENT_LOCATOR_GUID: "parent locator",
}
_REQUIRED_ITEMS = (FILE_PARAMETERS_GUID, VIRTUAL_DISK_SIZE_GUID, PAGE83_GUID, LOGICAL_SECTOR_GUID,
                   PHYSICAL_SECTOR_GUID)

HEADER_FMT = struct.Struct("<4sIQ16s16s16sHHIQ")  # 80 bytes
REGION_HDR_FMT = struct.Struct("<4sIII")
REGION_ENTRY_FMT = struct.Struct("<16sQII")
METADATA_HDR_FMT = struct.Struct("<8sHH20x")
METADATA_ENTRY_FMT = struct.Struct("<16sIII4x")
LOG_HDR_FMT = struct.Struct("<4sIIIQII16sQQ")  # 64 bytes
LOG_DESC_FMT = struct.Struct("<4sIQQQ")  # data: trailing u32, leading u64; zero: reserved, length
LOG_DATA_FMT = struct.Struct("<4sI4084sI")


# --- CRC-32C (Castagnoli), as VHDX checksums it ------------------------------------------------------------
def _make_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = None  # the fallback's table, built on first use


def crc32c_fallback(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """Table-driven CRC-32C of ``data`` continuing ``crc`` (0 to start): the library-free path."""
    global _TABLE
    if _TABLE is None:
        _TABLE = _make_table()
    c = crc ^ 0xFFFFFFFF
    table = _TABLE
    for b in bytes(data):
        c = table[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def _pick_crc32c() -> Callable[..., int]:
    """The fastest CRC-32C at hand: ``f(data, crc=0) -> int`` continuing ``crc``."""
    try:
        import crc32c as _lib  # type: ignore[import-not-found]

        def lib_crc(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
            return int(_lib.crc32c(bytes(data), crc))

        return lib_crc
    except ImportError:
        pass
    try:
        import google_crc32c as _g  # type: ignore[import-not-found]

        def google_crc(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
            return int(_g.extend(crc, bytes(data)))

        return google_crc
    except ImportError:
        return crc32c_fallback


_crc_impl: Callable[..., int] | None = None


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC-32C of ``data`` continuing ``crc``.  The library is imported on first use, not with the module:
    the crc32c package pulls in importlib.metadata and argparse (~35 ms of every command's start-up)."""
    global _crc_impl
    if _crc_impl is None:
        _crc_impl = _pick_crc32c()
    return _crc_impl(data, crc)


def checksum(buf: bytes | bytearray, crc_offset: int = 4) -> int:
    """The VHDX checksum of ``buf``: CRC-32C with the u32 at ``crc_offset`` taken as zero."""
    c = crc32c(memoryview(buf)[:crc_offset])
    c = crc32c(b"\0\0\0\0", c)
    return crc32c(memoryview(buf)[crc_offset + 4:], c)


def _round_up(n: int, align: int) -> int:
    return -(-n // align) * align


def _new_guid() -> bytes:
    return uuid.uuid4().bytes_le


def _guid_text(raw: bytes) -> str:
    return str(uuid.UUID(bytes_le=bytes(raw)))


# --- headers ------------------------------------------------------------------------------------------------
@dataclass(slots=True)
class Header:
    """One VHDX header (the fields; the 4 KiB block's reserved bytes are kept on disk)."""

    sequence: int
    file_write_guid: bytes
    data_write_guid: bytes
    log_guid: bytes
    log_version: int
    version: int
    log_length: int
    log_offset: int

    def pack(self, block: bytes | bytearray = b"") -> bytes:
        """The 4 KiB header block: these fields over ``block`` (else zeros), checksum filled in."""
        buf = bytearray(block[:HEADER_SIZE]) if block else bytearray(HEADER_SIZE)
        buf.extend(bytes(HEADER_SIZE - len(buf)))
        HEADER_FMT.pack_into(buf, 0, b"head", 0, self.sequence, self.file_write_guid, self.data_write_guid,
                             self.log_guid, self.log_version, self.version, self.log_length, self.log_offset)
        struct.pack_into("<I", buf, 4, checksum(buf))
        return bytes(buf)

    @classmethod
    def parse(cls, block: bytes) -> Header | None:
        """The header in a 4 KiB block, or None when its checksum, signature or version is wrong."""
        if len(block) < HEADER_SIZE:
            return None
        (sig, crc, seq, fwg, dwg, lg, log_version, version, log_length,
         log_offset) = HEADER_FMT.unpack_from(block, 0)
        if crc != checksum(block[:HEADER_SIZE]) or sig != b"head" or version != 1:
            return None
        return cls(seq, fwg, dwg, lg, log_version, version, log_length, log_offset)


# --- the log --------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class LogDescriptor:
    """One descriptor of a log entry: ``data`` is the full 4096-byte sector for a data descriptor, None
    for a zero descriptor (which zeroes ``length`` bytes)."""

    file_offset: int
    length: int
    data: bytes | None


@dataclass(frozen=True, slots=True)
class LogEntry:
    start: int  # byte offset of the entry inside the log
    sequence: int
    entry_length: int
    flushed_file_offset: int
    last_file_offset: int
    descriptors: tuple[LogDescriptor, ...]


def _desc_sectors(count: int) -> int:
    """Sectors holding the 64-byte entry header and ``count`` 32-byte descriptors (never 0)."""
    return (count + 2 + 127) // 128


class _LogRing:
    """The log region read sector by sector as QEMU reads it: a ring of 4 KiB sectors; bytes past the end
    of the host file read as zeros and are never fetched."""

    def __init__(self, file: BlockDriver, offset: int, length: int, file_size: int) -> None:
        self.file = file
        self.offset = offset
        self.length = length
        self.nsectors = length // LOG_SECTOR
        self.file_size = file_size
        self._chunks: dict[int, bytes] = {}

    def sector(self, idx: int) -> bytes:
        """Sector ``idx`` (0-based, < nsectors) of the ring."""
        pos = self.offset + idx * LOG_SECTOR
        if pos >= self.file_size:
            return bytes(LOG_SECTOR)
        chunk = idx // 256  # 1 MiB reads
        data = self._chunks.get(chunk)
        if data is None:
            if len(self._chunks) > 64:
                self._chunks.clear()
            start = self.offset + chunk * MiB
            n = min(MiB, self.length - chunk * MiB, max(0, self.file_size - start))
            data = self.file.read(start, n) if n > 0 else b""
            self._chunks[chunk] = data
        rel = (idx % 256) * LOG_SECTOR
        out = data[rel:rel + LOG_SECTOR]
        return out + bytes(LOG_SECTOR - len(out))

    def inc(self, idx: int, n: int = 1) -> int:
        return (idx + n) % self.nsectors


class _LogParser:
    """vhdx-log.c's search for the active sequence, over a _LogRing (pure apart from the ring's reads)."""

    def __init__(self, ring: _LogRing, log_guid: bytes) -> None:
        self.ring = ring
        self.log_guid = log_guid

    def _header(self, sector: bytes) -> tuple | None:
        fields = LOG_HDR_FMT.unpack_from(sector, 0)
        sig, _crc, entry_length, _tail, seq, count, _res, guid, _flushed, _last = fields
        if sig != b"loge" or entry_length > self.ring.length or entry_length % LOG_SECTOR or seq == 0 \
                or guid != self.log_guid or count * 32 > entry_length:
            return None
        return fields

    def validate(self, idx: int, prev_seq: int) -> tuple[LogEntry | None, int]:
        """(the entry starting at sector ``idx`` if it is valid, the sector where reading goes on).

        Raises ImageOpenError for an entry whose header is valid but whose descriptors are not (QEMU fails
        the open then too)."""
        ring = self.ring
        first = ring.sector(idx)
        hdr = self._header(first)
        if hdr is None or (prev_seq > 0 and hdr[4] != prev_seq + 1):
            return None, ring.inc(idx)
        _sig, crc, entry_length, _tail, seq, count, _res, _guid, flushed, last = hdr
        nd = _desc_sectors(count)
        desc_buf = b"".join(ring.sector(ring.inc(idx, i)) for i in range(nd))
        raw_descs = []
        for i in range(count):
            sig, a, b, file_offset, dseq = LOG_DESC_FMT.unpack_from(desc_buf, 64 + 32 * i)
            if dseq != seq or file_offset % LOG_SECTOR or sig not in (b"desc", b"zero") \
                    or (sig == b"zero" and b % LOG_SECTOR):
                raise ImageOpenError(f"VHDX log entry {seq} at log offset {idx * LOG_SECTOR} has an invalid "
                                     f"descriptor ({i})")
            raw_descs.append((sig, a, b, file_offset))
        c = checksum(desc_buf)
        total = entry_length // LOG_SECTOR
        data_sectors = []
        for i in range(nd, total):
            s = ring.sector(ring.inc(idx, i))
            data_sectors.append(s)
            c = crc32c(s, c)
        nxt = ring.inc(idx, max(total, nd))
        if c != crc:
            return None, nxt
        descs = []
        it = iter(data_sectors)
        for sig, a, b, file_offset in raw_descs:
            if sig == b"zero":
                descs.append(LogDescriptor(file_offset, b, None))
                continue
            sector = next(it, None)
            if sector is None:
                raise ImageOpenError(f"VHDX log entry {seq} has more data descriptors than data sectors")
            _dsig, high, payload, low = LOG_DATA_FMT.unpack(sector)
            if (high << 32 | low) != seq:
                raise ImageOpenError(f"VHDX log entry {seq}: a data sector has sequence number "
                                     f"{high << 32 | low}")
            descs.append(LogDescriptor(file_offset, LOG_SECTOR, struct.pack("<Q", b) + payload
                                       + struct.pack("<I", a)))
        return LogEntry(idx * LOG_SECTOR, seq, entry_length, flushed, last, tuple(descs)), nxt

    def search(self) -> list[LogEntry]:
        """The active sequence (empty when the log holds none), chosen as QEMU 7.2 chooses it."""
        ring = self.ring
        if ring.nsectors == 0:
            return []
        candidate: list[LogEntry] = []
        read = 0
        budget = 4 * ring.nsectors + 16  # every step advances; a ring holds finitely many sequences
        while True:
            tail = read
            entry, read = self.validate(read, 0)
            if entry is not None:
                current = [entry]
                seq = 0  # as QEMU: the second entry is taken without a sequence check
                while True:
                    budget -= 1
                    if budget < 0:
                        raise ImageOpenError("VHDX log could not be parsed: its entries form a loop")
                    nxt, read = self.validate(read, seq)
                    if nxt is None:
                        break
                    current.append(nxt)
                    seq = nxt.sequence
                if not candidate or current[0].sequence > candidate[0].sequence:
                    candidate = current
            budget -= 1
            if read < tail:
                break
            if budget < 0:
                raise ImageOpenError("VHDX log could not be parsed: its entries form a loop")
        return candidate


# --- the driver ----------------------------------------------------------------------------------------------
@register
class VhdxDriver(BlockDriver):
    format_name = "vhdx"
    #: QEMU 7.2 has no block-status callback for vhdx: qemu-img map reports one data extent, no offsets
    qemu_block_status: ClassVar[bool] = False

    @classmethod
    def probe(cls, head: bytes, filename: str) -> int:
        return 100 if head[:8] == SIGNATURE else 0

    # --- open --------------------------------------------------------------------------------------------
    def open(self, options: dict[str, Any]) -> None:
        """Parse headers, replay the log (read-write opens), region table, metadata and BAT.

        Raises ImageOpenError for anything that is not a VHDX image QEMU 7.2 could open (with its texts
        where it has one) and for a pending log on a read-only open; NotSupported-flavoured errors carry
        errno ENOTSUP (differencing images, unknown required regions or metadata)."""
        f = self.file
        assert f is not None
        #: opened for ``parablock check`` (QEMU's BDRV_O_CHECK): BAT entries past the end of the file or
        #: over a region are left to check_image to report instead of refusing the open, and a pending
        #: log on a read-only open is refused in qemu-img check's words
        self._checking = bool(options.get("check"))
        self._dirty_visible = False
        self._session_guid = _new_guid()
        #: blocks allocated by this open that were written only below the given in-block offset: what
        #: lies past it is still zeros (convert fills blocks in increasing order, in slot-sized pieces)
        self._fresh: dict[int, int] = {}
        self.file_size = f.size()
        if f.read(0, 8) != SIGNATURE:
            raise ImageOpenError("Image not in VHDX format (no 'vhdxfile' signature)")
        self._parse_headers()
        self.log_replayed = self._parse_log()
        self._regions: list[tuple[int, int]] = []
        hdr = self.headers[self.current]
        if hdr.log_length:
            self._regions.append((hdr.log_offset, hdr.log_offset + hdr.log_length))
        self._parse_region_table()
        # the regions as QEMU registers them (the log even when empty, then the region table's entries),
        # for check_image's overlap test
        table = self._regions[1:] if hdr.log_length else self._regions
        self._qemu_regions = [(hdr.log_offset, (hdr.log_offset + hdr.log_length) & _U64)] + \
            [(a, b & _U64) for a, b in table]
        self._parse_metadata()
        self._load_bat()

    def _parse_headers(self) -> None:
        f = self.file
        assert f is not None
        blocks = [f.read(off, HEADER_SIZE) for off in HEADER_OFFSETS]
        parsed = [Header.parse(b) for b in blocks]
        h1, h2 = parsed
        if h1 is None and h2 is None:
            raise ImageOpenError("No valid VHDX header found")
        if h1 is not None and h2 is not None:
            if h1.sequence > h2.sequence:
                cur = 0
            elif h2.sequence > h1.sequence:
                cur = 1
            elif blocks[0] == blocks[1]:
                cur = 0
            else:
                raise ImageOpenError("No valid VHDX header found (both headers have sequence number "
                                     f"{h1.sequence} but differ)")
        else:
            cur = 0 if h1 is not None else 1
        active = parsed[cur]
        assert active is not None
        # an invalid header is rewritten from the valid one on the next update (QEMU would write back the
        # invalid block's fields)
        self.headers = [h if h is not None else replace(active) for h in parsed]
        self.current = cur

    def _parse_log(self) -> bool:
        """Find the log's active sequence and replay it; True when something was replayed."""
        hdr = self.headers[self.current]
        if hdr.log_offset < LOG_MIN_SIZE or hdr.log_offset % LOG_MIN_SIZE:
            raise ImageOpenError(f"VHDX log offset {hdr.log_offset} is not a multiple of 1 MiB past the "
                                 "header section")
        if hdr.log_version != 0:
            raise ImageOpenError(f"Unsupported VHDX log version {hdr.log_version}", errno=95)
        if hdr.log_guid == ZERO_GUID or hdr.log_length == 0:
            return False
        if hdr.log_length % LOG_MIN_SIZE:
            raise ImageOpenError(f"VHDX log length {hdr.log_length} is not a multiple of 1 MiB")
        assert self.file is not None
        ring = _LogRing(self.file, hdr.log_offset, hdr.log_length, self.file_size)
        entries = _LogParser(ring, hdr.log_guid).search()
        if not entries:
            return False
        if self.read_only and self._checking:  # qemu-img check's words, hint included
            raise ImageOpenError(f"VHDX image file '{self.filename}' opened read-only, but contains a log "
                                 "that needs to be replayed\nTo replay the log, run:\n"
                                 f"parablock check -r all '{self.filename}'", errno=1)
        if self.read_only:
            raise ImageOpenError(f"VHDX image file '{self.filename}' opened read-only, but contains a log "
                                 "that needs to be replayed; open it read-write to replay it "
                                 f"(e.g. qemu-img check -r all '{self.filename}')", errno=1)
        self._replay(entries)
        return True

    def _replay(self, entries: list[LogEntry]) -> None:
        """Write the sequence's descriptors in place, grow the file, flush, clear the log GUID."""
        f = self.file
        assert f is not None
        for entry in entries:  # what no VHDX file can be: refuse before anything is written
            limit = _round_up(max(entry.last_file_offset, self.file_size), MiB)
            if entry.last_file_offset > MAX_FILE_SIZE or any(d.file_offset + d.length > limit
                                                             for d in entry.descriptors):
                raise ImageOpenError(f"VHDX log entry {entry.sequence} writes past its last file offset "
                                     f"({entry.last_file_offset})")
        try:
            self._visible_write()
            for entry in entries:
                size = f.size()
                if entry.flushed_file_offset > size:  # checked entry by entry, as QEMU does
                    raise ImageOpenError(f"VHDX log entry {entry.sequence} was written when the file had "
                                         f"{entry.flushed_file_offset} bytes, but it has {size}: the image "
                                         "has probably been truncated")
                for d in entry.descriptors:
                    if d.data is not None:
                        f.write(d.file_offset, d.data)
                    elif d.length:
                        f.write_zeroes(d.file_offset, d.length)
                if f.size() < entry.last_file_offset:
                    f.truncate(_round_up(entry.last_file_offset, MiB))
            f.flush()
        except OSError as exc:
            raise ImageOpenError(f"VHDX log replay failed: {os_error_text(exc)}", errno=exc.errno) from None
        self.file_size = f.size()
        self._update_headers(log_guid=ZERO_GUID)

    def _parse_region_table(self) -> None:
        f = self.file
        assert f is not None
        buf = f.read(REGION_TABLE_OFFSET, REGION_TABLE_SIZE)
        if len(buf) < REGION_TABLE_SIZE or REGION_TABLE_OFFSET + REGION_TABLE_SIZE > self.file_size:
            raise ImageOpenError("VHDX region table lies past the end of the file")
        sig, crc, count, _res = REGION_HDR_FMT.unpack_from(buf, 0)
        if crc != checksum(buf):
            raise ImageOpenError("VHDX region table has a bad checksum")
        if sig != b"regi":
            raise ImageOpenError("VHDX region table has a bad signature")
        if count > 2047:
            raise ImageOpenError(f"VHDX region table has {count} entries (at most 2047 allowed)")
        bat = meta = None
        for i in range(count):
            guid, offset, length, flags = REGION_ENTRY_FMT.unpack_from(buf, 16 + 32 * i)
            self._claim_region(offset, length)
            if guid == BAT_GUID:
                if bat is not None:
                    raise ImageOpenError("VHDX region table names two BATs")
                bat = (offset, length)
            elif guid == METADATA_GUID:
                if meta is not None:
                    raise ImageOpenError("VHDX region table names two metadata regions")
                meta = (offset, length)
            elif flags & REGION_REQUIRED:
                raise ImageOpenError(f"VHDX region {_guid_text(guid)} is required but not supported",
                                     errno=95)
        if bat is None or meta is None:
            raise ImageOpenError("VHDX region table lacks the " + ("BAT" if bat is None else "metadata region"))
        self.bat_offset, self.bat_length = bat
        self.metadata_offset, self.metadata_length = meta

    def _claim_region(self, start: int, length: int) -> None:
        end = start + length
        for a, b in self._regions:
            if not (start >= b or end <= a):
                raise ImageOpenError(f"VHDX region {start}-{end} overlaps with region {a}-{b}")
        self._regions.append((start, end))

    def _parse_metadata(self) -> None:
        f = self.file
        assert f is not None
        base = self.metadata_offset
        buf = f.read(base, METADATA_TABLE_SIZE)
        if len(buf) < METADATA_TABLE_SIZE or base + METADATA_TABLE_SIZE > self.file_size:
            raise ImageOpenError("VHDX metadata table lies past the end of the file")
        sig, _res, count = METADATA_HDR_FMT.unpack_from(buf, 0)
        if sig != b"metadata":
            raise ImageOpenError("VHDX metadata table has a bad signature")
        if count * 32 > METADATA_TABLE_SIZE - 32:
            raise ImageOpenError(f"VHDX metadata table has {count} entries, more than fit in it")
        items: dict[bytes, tuple[int, int]] = {}
        for i in range(count):
            guid, offset, length, flags = METADATA_ENTRY_FMT.unpack_from(buf, 32 + 32 * i)
            if guid in _METADATA_ITEMS:
                if guid in items:
                    raise ImageOpenError(f"VHDX metadata names the {_METADATA_ITEMS[guid]} twice")
                items[guid] = (offset, length)
            elif flags & META_IS_REQUIRED:
                raise ImageOpenError(f"VHDX metadata item {_guid_text(guid)} is required but not supported",
                                     errno=95)
        missing = [_METADATA_ITEMS[g] for g in _REQUIRED_ITEMS if g not in items]
        if missing:
            raise ImageOpenError("VHDX metadata lacks the " + ", ".join(missing), errno=95)

        def item(guid: bytes, size: int) -> bytes:
            offset, _length = items[guid]
            data = f.read(base + offset, size)
            return data + bytes(size - len(data))

        self.block_size, self.param_flags = struct.unpack("<II", item(FILE_PARAMETERS_GUID, 8))
        if self.param_flags & PARAMS_HAS_PARENT:
            if PARENT_LOCATOR_GUID in items:
                raise ImageOpenError("VHDX differencing images (with a parent) are not supported", errno=95)
            raise ImageOpenError("VHDX image has a parent but no parent locator")
        (self.virtual_disk_size,) = struct.unpack("<Q", item(VIRTUAL_DISK_SIZE_GUID, 8))
        self.page83 = item(PAGE83_GUID, 16)
        (self.logical_sector_size,) = struct.unpack("<I", item(LOGICAL_SECTOR_GUID, 4))
        (self.physical_sector_size,) = struct.unpack("<I", item(PHYSICAL_SECTOR_GUID, 4))
        bs = self.block_size
        if bs < BLOCK_SIZE_MIN or bs > BLOCK_SIZE_MAX or bs & (bs - 1):
            raise ImageOpenError(f"VHDX block size {bs} is not a power of two between 1 MiB and 256 MiB")
        if self.logical_sector_size not in (512, 4096):
            raise ImageOpenError(f"VHDX logical sector size {self.logical_sector_size} is neither 512 nor 4096")
        if self.virtual_disk_size > MAX_IMAGE_SIZE:
            raise ImageOpenError(f"VHDX virtual disk size {self.virtual_disk_size} exceeds 64 TiB")
        self.chunk_ratio = MAX_SECTORS_PER_BLOCK * self.logical_sector_size // bs

    def _load_bat(self) -> None:
        f = self.file
        assert f is not None
        bs = self.block_size
        self.data_blocks = -(-self.virtual_disk_size // bs)
        if self.data_blocks:
            self.bat_entries = self.data_blocks + (self.data_blocks - 1) // self.chunk_ratio
        else:
            self.bat_entries = 0
        nbytes = self.bat_entries * 8
        if nbytes > self.bat_length:
            raise ImageOpenError(f"VHDX BAT region ({self.bat_length} bytes) is too small for "
                                 f"{self.bat_entries} entries")
        if self.bat_offset + nbytes > self.file_size:
            raise ImageOpenError(f"VHDX BAT ({self.bat_entries} entries at offset {self.bat_offset}) extends "
                                 f"past the end of the file ({self.file_size} bytes)")
        raw = f.read(self.bat_offset, nbytes) if nbytes else b""
        if len(raw) < nbytes:
            raise ImageOpenError("VHDX BAT could not be read: the file is too short")
        bat = array.array("Q")
        bat.frombytes(raw)
        if sys.byteorder != "little":
            bat.byteswap()
        self.bat = bat
        self.leave_allocated = bool(self.param_flags & PARAMS_LEAVE_BLOCKS_ALLOCATED)
        # the end of everything allocated: new blocks go past it (and past EOF), 1 MiB aligned
        end = max([self.file_size] + [b for _a, b in self._regions])
        size = self.size()
        cr1 = self.chunk_ratio + 1
        for i, entry in enumerate(bat):
            if entry & STATE_MASK != PAYLOAD_FULLY_PRESENT:
                continue
            offset = entry & OFFSET_MASK
            if i % cr1 == self.chunk_ratio:  # a sector bitmap block (1 MiB)
                length = MiB
            else:
                block = i - i // cr1
                length = max(0, min(bs, size - block * bs))
            span = MiB if i % cr1 == self.chunk_ratio else bs
            if self._checking and (offset >= self.file_size or offset + length > self.file_size or any(
                    not (offset >= b or offset + span <= a) for a, b in self._regions)):
                continue  # check_image reports it; the open goes on, as QEMU's under qemu-img check
            if offset >= self.file_size:
                raise ImageOpenError(f"VHDX BAT entry {i} start offset {offset} points after end of file "
                                     f"({self.file_size}). Image has probably been truncated.")
            if offset + length > self.file_size:
                raise ImageOpenError(f"VHDX BAT entry {i} end offset {offset + length - 1} points after end "
                                     f"of file ({self.file_size}). Image has probably been truncated.")
            for a, b in self._regions:
                if not (offset >= b or offset + span <= a):
                    raise ImageOpenError(f"VHDX region {offset}-{offset + span} overlaps with region {a}-{b}")
            end = max(end, offset + span)
        self._alloc_end = end

    # --- checking ------------------------------------------------------------------------------------------
    def check_image(self, fix: int) -> CheckResult:
        """``parablock check``: QEMU 7.2's vhdx_co_check.  A log replayed by this (read-write, i.e. ``-r``)
        open counts as one corruption fixed; the BAT is then checked (see check_bat).  ``fix`` repairs
        nothing else, so ``-r leaks`` and ``-r all`` report what a plain check does.  When something was
        fixed, qemu-img checks again without repairing and reports that second check (its messages
        printed a second time) with the first one's fixed counts: so does this."""
        from engine.formats.qcow2_check import CheckResult

        first = CheckResult(corruptions_fixed=1 if self.log_replayed else 0)
        first.corruptions, first.messages = self.check_bat()
        if not first.corruptions_fixed:
            return first
        again, messages = self.check_bat()
        return CheckResult(corruptions=again, corruptions_fixed=first.corruptions_fixed,
                           messages=first.messages + messages)

    def check_bat(self) -> tuple[int, list[str]]:
        """QEMU 7.2's vhdx_check_bat_entries over the BAT as loaded: (errors, messages).  Every fully
        present entry must not overflow, must start (and, but for a partial last block, end) inside the
        file, and its block must not overlap a region (log, BAT, metadata; QEMU skips this for every
        ``chunk_ratio + 1``-th fully present entry, counting fully present entries only).  Messages carry
        the ``parablock:`` prefix where qemu-img's carry ``qemu-img:``, with QEMU's arithmetic (u64)."""
        assert self.file is not None
        file_size = self.file.size()
        bs = self.block_size
        total = self.size()
        payblocks = self.chunk_ratio
        regions = self._qemu_regions[::-1]  # QEMU inserts at the head of its list
        errors = 0
        messages: list[str] = []
        trunc = "Image has probably been truncated."
        for i, entry in enumerate(self.bat):
            if entry & STATE_MASK != PAYLOAD_FULLY_PRESENT:
                continue
            offset = entry & OFFSET_MASK
            block_length = min(bs, (total - i * bs) & _U64)
            if offset > _INT64_MAX - bs:
                messages.append(f"parablock: VHDX BAT entry {i} offset overflow.")
                errors += 1
            if offset >= file_size:
                messages.append(f"parablock: VHDX BAT entry {i} start offset {offset} points after end of "
                                f"file ({file_size}). {trunc}")
                errors += 1
            elif offset + block_length > file_size:
                messages.append(f"parablock: VHDX BAT entry {i} end offset {offset + block_length - 1} points "
                                f"after end of file ({file_size}). {trunc}")
                errors += 1
            if payblocks:
                payblocks -= 1
                end = (offset + bs) & _U64
                for a, b in regions:
                    if not (offset >= b or end <= a):
                        messages.append(f"parablock: VHDX region {offset}-{end} overlaps with region "
                                        f"{a}-{b or ''}")  # QEMU's "%." PRIu64 prints 0 as nothing
                        errors += 1
                        break
            else:
                payblocks = self.chunk_ratio
        return errors, messages

    # --- geometry ------------------------------------------------------------------------------------------
    def size(self) -> int:
        return self.virtual_disk_size // 512 * 512

    def cluster_size(self) -> int | None:
        return self.block_size

    def _index(self, block: int) -> int:
        return block + block // self.chunk_ratio

    def _entry(self, offset: int) -> tuple[int, int, int, int]:
        """(BAT index, state, in-block offset, bytes left in the block) of guest ``offset``."""
        bs = self.block_size
        block = offset // bs
        idx = self._index(block)
        in_block = offset - block * bs
        return idx, self.bat[idx] & STATE_MASK, in_block, bs - in_block

    def _bad_state(self, idx: int, state: int) -> CorruptImage:
        if state == PAYLOAD_PARTIALLY_PRESENT:
            return CorruptImage(f"VHDX BAT entry {idx} is partially present, which only a differencing "
                                "image may use")
        return CorruptImage(f"VHDX BAT entry {idx} has the invalid payload state {state}")

    def _host(self, offset: int) -> tuple[int | None, int]:
        idx, state, in_block, left = self._entry(offset)
        if state in ZERO_STATES:
            return None, left
        if state == PAYLOAD_FULLY_PRESENT:
            return (self.bat[idx] & OFFSET_MASK) + in_block, left
        raise self._bad_state(idx, state)

    # --- I/O -------------------------------------------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        """Guest bytes; zero-state blocks read as zeros.  Raises CorruptImage for a partially present or
        invalid BAT state (QEMU answers EIO)."""
        assert self.file is not None
        return read_mapped(self.file, self._host, offset, length)

    def block_status(self, offset: int, length: int) -> Extent:
        idx, state, in_block, left = self._entry(offset)
        n = min(left, length)
        bs = self.block_size
        if state == PAYLOAD_FULLY_PRESENT:
            host = (self.bat[idx] & OFFSET_MASK) + in_block
            nxt_host = host + n
            while n < length:  # merge blocks that continue on the host
                j, st, _ib, _l = self._entry(offset + n)
                if st != PAYLOAD_FULLY_PRESENT or self.bat[j] & OFFSET_MASK != nxt_host:
                    break
                m = min(bs, length - n)
                n += m
                nxt_host += m
            return Extent(Status.DATA | Status.OFFSET_VALID | Status.RECURSE, n, host, self.file)
        if state not in ZERO_STATES:
            raise self._bad_state(idx, state)
        zero = state == PAYLOAD_ZERO
        while n < length:
            _j, st, _ib, _l = self._entry(offset + n)
            if st not in ZERO_STATES or (st == PAYLOAD_ZERO) != zero:
                break
            n += min(bs, length - n)
        return Extent(Status.ZERO if zero else Status(0), n, 0, self.file)

    def _segments(self, offset: int, length: int):
        """(guest offset, BAT index, state, in-block offset, bytes) of each block piece of a request."""
        pos = offset
        end = offset + length
        while pos < end:
            idx, state, in_block, left = self._entry(pos)
            n = min(left, end - pos)
            yield pos, idx, state, in_block, n
            pos += n

    def write(self, offset: int, data: bytes) -> None:
        """Write guest bytes, allocating blocks at the end of the file; new blocks' BAT entries are written
        after their data was flushed.  Raises ReadOnlyError, CorruptImage (partially present or invalid
        state, a block placed inside the header section)."""
        self.check_writable()
        f = self.file
        assert f is not None
        if not data:
            return
        view = memoryview(data)
        self._visible_write()
        new_entries: list[tuple[int, int]] = []
        try:
            for pos, idx, state, in_block, n in self._segments(offset, len(data)):
                chunk = view[pos - offset:pos - offset + n]
                if state == PAYLOAD_FULLY_PRESENT:
                    host = self.bat[idx] & OFFSET_MASK
                    if host < HEADER_SECTION_END:
                        raise CorruptImage(f"VHDX BAT entry {idx} points into the header section")
                    mark = self._fresh.get(idx)
                    if (mark is not None and in_block >= mark) or self._host_is_hole(host + in_block, n):
                        self._write_sparse(host + in_block, chunk)  # it reads as zeros: keep it sparse
                    else:
                        f.write(host + in_block, bytes(chunk))
                elif state in ZERO_STATES:
                    host = self._allocate_block()
                    self._write_sparse(host + in_block, chunk)
                    new_entries.append((idx, host | PAYLOAD_FULLY_PRESENT))
                else:
                    raise self._bad_state(idx, state)
                if state != PAYLOAD_FULLY_PRESENT or idx in self._fresh:
                    end = in_block + n
                    if end >= self.block_size:
                        self._fresh.pop(idx, None)
                    else:
                        self._fresh[idx] = max(self._fresh.get(idx, 0), end)
        finally:
            if new_entries:
                f.flush()  # data before the BAT entries that point at it
                self._set_bat_entries(new_entries)

    def _host_is_hole(self, host: int, n: int) -> bool:
        """Whether the host file reports [host, host+n) as one hole (a fixed image's untouched block)."""
        f = self.file
        assert f is not None
        if n < 64 * KiB:  # small writes: not worth asking
            return False
        ext = f.block_status(host, n)
        return bool(ext.status & Status.ZERO) and not ext.status & Status.DATA and ext.length >= n

    def _write_sparse(self, host: int, data: memoryview) -> None:
        """Write ``data`` into a freshly allocated (zero) block, skipping its all-zero 4 KiB pieces so the
        host file stays sparse, as QEMU's writes of only the guest's data leave it."""
        f = self.file
        assert f is not None
        n = len(data)
        gran = LOG_SECTOR
        zero = bytes(gran)
        run: int | None = None
        pos = 0
        while pos < n:
            m = min(gran - (host + pos) % gran, n - pos)  # pieces aligned on the host
            nonzero = data[pos:pos + m] != zero[:m]
            if nonzero and run is None:
                run = pos
            elif not nonzero and run is not None:
                f.write(host + run, bytes(data[run:pos]))
                run = None
            pos += m
        if run is not None:
            f.write(host + run, bytes(data[run:n]))

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        """Zero guest bytes: blocks that read as zeros stay as they are; allocated blocks are zeroed in
        place, or (``unmap``, a whole block, not a fixed image) set to the ZERO state and their host range
        discarded."""
        self.check_writable()
        f = self.file
        assert f is not None
        changes: list[tuple[int, int]] = []
        freed: list[tuple[int, int]] = []
        for _pos, idx, state, in_block, n in self._segments(offset, length):
            if state in ZERO_STATES:
                continue
            if state != PAYLOAD_FULLY_PRESENT:
                raise self._bad_state(idx, state)
            host = self.bat[idx] & OFFSET_MASK
            if host < HEADER_SECTION_END:
                raise CorruptImage(f"VHDX BAT entry {idx} points into the header section")
            self._visible_write()
            if unmap and not self.leave_allocated and in_block == 0 and n == self.block_size:
                changes.append((idx, PAYLOAD_ZERO))
                freed.append((host, n))
                self._fresh.pop(idx, None)
            else:
                f.write_zeroes(host + in_block, n, unmap)
        if changes:
            self._set_bat_entries(changes)
            f.flush()  # the BAT no longer points at the blocks before their space goes
            for host, n in freed:
                f.discard(host, n)

    def _allocate_block(self) -> int:
        """A new payload block at the end of the file (1 MiB aligned), the file grown by a whole block."""
        f = self.file
        assert f is not None
        host = _round_up(max(self._alloc_end, self.file_size), MiB)
        f.truncate(host + self.block_size)
        self.file_size = host + self.block_size
        self._alloc_end = self.file_size
        return host

    def _set_bat_entries(self, entries: list[tuple[int, int]]) -> None:
        """Store BAT entries in memory and on disk, contiguous runs in one write each."""
        f = self.file
        assert f is not None
        for idx, value in entries:
            self.bat[idx] = value
        for lo, hi in consecutive_runs(sorted({i for i, _v in entries})):
            f.write(self.bat_offset + lo * 8, struct.pack(f"<{hi - lo}Q", *self.bat[lo:hi]))

    def _visible_write(self) -> None:
        """Before the first guest-visible change: both headers get a new data-write GUID (QEMU's
        vhdx_user_visible_write)."""
        if not self._dirty_visible:
            self._dirty_visible = True
            self._update_headers(new_data_guid=True)

    def _update_headers(self, new_data_guid: bool = False, log_guid: bytes | None = None) -> None:
        """QEMU's vhdx_update_headers: rewrite the non-current header (sequence + 1, the session's file-write
        GUID, optionally a new data-write GUID and a log GUID) and make it current, twice."""
        f = self.file
        assert f is not None
        for _ in range(2):
            inactive = 1 - self.current
            hdr = self.headers[inactive]
            hdr.sequence = (self.headers[self.current].sequence + 1) & 0xFFFFFFFFFFFFFFFF
            hdr.file_write_guid = self._session_guid
            if new_data_guid:
                hdr.data_write_guid = _new_guid()
            if log_guid is not None:
                hdr.log_guid = log_guid
            off = HEADER_OFFSETS[inactive]
            f.write(off, hdr.pack(f.read(off, HEADER_SIZE)))
            f.flush()
            self.current = inactive

    def flush(self) -> None:
        if self.file is not None:
            self.file.flush()

    def close(self) -> None:
        if self.file is not None and not self.read_only and getattr(self, "_dirty_visible", False):
            self.file.flush()
        super().close()

    def truncate(self, size: int, prealloc: str = "off", shrink: bool = False) -> None:
        raise NotSupported("Image format driver does not support resize")

    # --- creation -----------------------------------------------------------------------------------------
    @classmethod
    def create(cls, filename: str, size: int, executor: Executor, options: dict[str, Any]) -> None:
        """qemu-img create -f vhdx: options subformat (dynamic|fixed), block_size (0 = by size), log_size,
        block_state_zero (default on).  Raises InvalidArgument with qemu-img's texts."""
        from engine.formats.file import FileDriver

        layout = plan_create(size, options)
        f = FileDriver(filename, executor, read_only=False, create=True)
        try:
            write_new_image(f, layout)
        finally:
            f.close()


@dataclass(frozen=True, slots=True)
class CreateLayout:
    """Where qemu-img 7.2 puts everything of a new image."""

    size: int
    fixed: bool
    block_size: int
    log_size: int
    block_state_zero: bool
    bat_offset: int
    bat_length: int
    metadata_offset: int
    data_offset: int
    bat_entries: int


_CREATE_OPTIONS = ("subformat", "block_size", "log_size", "block_state_zero", "size")


def plan_create(size: int, options: dict[str, Any]) -> CreateLayout:
    """The layout of a new image (pure).  Raises InvalidArgument with qemu-img 7.2's messages."""
    for key in options:
        if key not in _CREATE_OPTIONS:
            raise InvalidArgument(f"Invalid parameter '{key}'")
    subformat = options.get("subformat") or "dynamic"
    if subformat not in ("dynamic", "fixed"):
        raise InvalidArgument(f"Parameter 'subformat' does not accept value '{subformat}'")
    size = _round_up(int(size), 512)
    if size > MAX_IMAGE_SIZE:
        raise InvalidArgument("Image size too large; max of 64TB")
    log_size = options.get("log_size")
    if log_size is None:
        log_size = DEFAULT_LOG_SIZE
    else:
        log_size = _round_up(int(log_size), MiB)
        if log_size > 0xFFFFFFFF:
            raise InvalidArgument("Log size must be smaller than 4 GB")
    if log_size < MiB or log_size % MiB:
        raise InvalidArgument("Log size must be a multiple of 1 MB")
    block_size = _round_up(int(options.get("block_size") or 0), MiB)
    block_size = min(block_size, BLOCK_SIZE_MAX)
    if block_size == 0:
        if size > 32 * TiB:
            block_size = 64 * MiB
        elif size > 100 * GiB:
            block_size = 32 * MiB
        elif size > 1 * GiB:
            block_size = 16 * MiB
        else:
            block_size = 8 * MiB
    if block_size & (block_size - 1):
        raise InvalidArgument("Block size must be a power of two")
    zero = options.get("block_state_zero")
    zero = True if zero is None else bool(zero)
    sector = 512
    chunk_ratio = MAX_SECTORS_PER_BLOCK * sector // block_size
    data_blocks = -(-size // block_size)
    # qemu's arithmetic, u32 wrap included: an empty image still gets 2**32 >> chunk_bits entries' room
    bat_entries = data_blocks + (((data_blocks - 1) & 0xFFFFFFFF) >> (chunk_ratio.bit_length() - 1))
    bat_length = _round_up(bat_entries * 8, MiB)
    bat_offset = _round_up(HEADER_SECTION_END + log_size, MiB)
    metadata_offset = _round_up(bat_offset + bat_length, MiB)
    return CreateLayout(size, subformat == "fixed", block_size, log_size, zero, bat_offset, bat_length,
                        metadata_offset, bat_offset + bat_length + 5 * MiB, bat_entries)


def write_new_image(f: BlockDriver, lay: CreateLayout) -> None:
    """Write a new image laid out by ``lay`` into the empty file ``f`` (qemu-img 7.2's order)."""
    f.write(0, SIGNATURE + CREATOR.encode("utf-16-le"))
    seq = random.getrandbits(32)
    hdr = Header(seq, _new_guid(), _new_guid(), ZERO_GUID, 0, 1, lay.log_size, HEADER_SECTION_END)
    f.write(HEADER_OFFSETS[0], hdr.pack())
    hdr.sequence += 1
    f.write(HEADER_OFFSETS[1], hdr.pack())
    # the BAT (file length first, as qemu truncates before writing it)
    f.truncate(lay.data_offset + (lay.size if lay.fixed else 0))
    if lay.fixed or lay.block_state_zero:
        bat = array.array("Q", bytes(lay.bat_length))
        state = PAYLOAD_ZERO if lay.block_state_zero else PAYLOAD_FULLY_PRESENT
        chunk_ratio = MAX_SECTORS_PER_BLOCK * 512 // lay.block_size
        for block in range(-(-lay.size // lay.block_size)):
            idx = block + block // chunk_ratio
            if state == PAYLOAD_FULLY_PRESENT:
                bat[idx] = _round_up(lay.data_offset + block * lay.block_size, MiB) | state
            else:
                bat[idx] = state
        if sys.byteorder != "little":
            bat.byteswap()
        f.write(lay.bat_offset, bat.tobytes())
    # region tables
    rt = bytearray(REGION_TABLE_SIZE)
    REGION_HDR_FMT.pack_into(rt, 0, b"regi", 0, 2, 0)
    REGION_ENTRY_FMT.pack_into(rt, 16, BAT_GUID, lay.bat_offset, lay.bat_length, 0)
    REGION_ENTRY_FMT.pack_into(rt, 48, METADATA_GUID, lay.metadata_offset, MiB, 0)
    struct.pack_into("<I", rt, 4, checksum(rt))
    f.write(REGION_TABLE_OFFSET, bytes(rt))
    f.write(REGION_TABLE2_OFFSET, bytes(rt))
    # metadata table and items
    items = [
        (FILE_PARAMETERS_GUID, struct.pack("<II", lay.block_size,
                                           PARAMS_LEAVE_BLOCKS_ALLOCATED if lay.fixed else 0), META_IS_REQUIRED),
        (VIRTUAL_DISK_SIZE_GUID, struct.pack("<Q", lay.size), META_IS_REQUIRED | META_IS_VIRTUAL_DISK),
        (PAGE83_GUID, _new_guid(), META_IS_REQUIRED | META_IS_VIRTUAL_DISK),
        (LOGICAL_SECTOR_GUID, struct.pack("<I", 512), META_IS_REQUIRED | META_IS_VIRTUAL_DISK),
        (PHYSICAL_SECTOR_GUID, struct.pack("<I", 512), META_IS_REQUIRED | META_IS_VIRTUAL_DISK),
    ]
    table = bytearray(METADATA_TABLE_SIZE)
    METADATA_HDR_FMT.pack_into(table, 0, b"metadata", 0, len(items))
    offset = METADATA_TABLE_SIZE
    payload = b""
    for i, (guid, data, flags) in enumerate(items):
        METADATA_ENTRY_FMT.pack_into(table, 32 + 32 * i, guid, offset, len(data), flags)
        offset += len(data)
        payload += data
    f.write(lay.metadata_offset, bytes(table))
    f.write(lay.metadata_offset + METADATA_TABLE_SIZE, payload)
    f.flush()
