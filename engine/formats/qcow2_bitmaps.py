"""qcow2 persistent dirty bitmaps: the bitmaps header extension, the bitmap directory, bitmap tables.

Layer: engine, pure (no files, no clock).  Imports only the standard library and :mod:`engine.errors`.
Turns bytes into values and values into bytes, big-endian, following docs/interop/qcow2.txt
("Bitmaps extension") and the checks QEMU 7.2 applies in block/qcow2.c (extension) and
block/qcow2-bitmap.c (directory entries, tables, constraints on new bitmaps).  Error texts are QEMU's.

Layout recap:
- extension 0x23852875, 24 bytes: u32 nb_bitmaps, u32 reserved (0), u64 directory size, u64 directory offset;
- directory entry: u64 table offset, u32 table size (entries), u32 flags (bit 0 in_use, bit 1 auto,
  bit 2 extra_data_compatible), u8 type (1), u8 granularity_bits, u16 name size, u32 extra data size,
  then the extra data, the name (not NUL-terminated), zero padding to 8 bytes;
- table entry: bits 9-55 a data cluster offset; offset 0 with bit 0 set means "all ones", clear "all zeros".

Invariants: parsers never allocate more than their input (counts are checked against the buffer) and
reject every entry QEMU would reject, so what they return is safe to act on.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from engine.errors import CorruptImage, ImageOpenError, InvalidArgument

EXT_BITMAPS = 0x23852875
EXT_SIZE = 24

FLAG_IN_USE = 1 << 0
FLAG_AUTO = 1 << 1
FLAG_EXTRA_DATA_COMPATIBLE = 1 << 2
# QEMU 7.2 supports no extra data, so it treats bit 2 as reserved too (BME_RESERVED_FLAGS)
RESERVED_FLAGS = 0xFFFFFFFC

TYPE_DIRTY_TRACKING = 1

MAX_BITMAPS = 65535
MAX_DIRECTORY_SIZE = 1024 * MAX_BITMAPS
MAX_TABLE_SIZE = 0x8000000
MAX_PHYS_SIZE = 0x20000000
MIN_GRANULARITY_BITS = 9
MAX_GRANULARITY_BITS = 31
MAX_NAME_SIZE = 1023

TABLE_OFFSET_MASK = 0x00FFFFFFFFFFFE00
TABLE_RESERVED_MASK = 0xFF000000000001FE
TABLE_ALL_ONES = 1

_EXT = struct.Struct(">IIQQ")
_ENTRY = struct.Struct(">QIIBBHI")  # 24 bytes


@dataclass(frozen=True, slots=True)
class BitmapsExt:
    nb_bitmaps: int
    directory_size: int
    directory_offset: int


@dataclass(frozen=True, slots=True)
class DirEntry:
    """One bitmap directory entry."""

    table_offset: int
    table_size: int
    flags: int
    granularity_bits: int
    name: str
    type: int = TYPE_DIRTY_TRACKING
    extra_data: bytes = b""

    @property
    def granularity(self) -> int:
        return 1 << self.granularity_bits

    @property
    def in_use(self) -> bool:
        return bool(self.flags & FLAG_IN_USE)

    @property
    def auto(self) -> bool:
        return bool(self.flags & FLAG_AUTO)

    def info_flags(self) -> list[str]:
        """The flags as ``qemu-img info`` lists them."""
        out = []
        if self.flags & FLAG_IN_USE:
            out.append("in-use")
        if self.flags & FLAG_AUTO:
            out.append("auto")
        return out


def parse_ext(data: bytes, cluster_size: int) -> BitmapsExt:
    """The bitmaps extension of an image whose autoclear bit 0 is set.  Raises ImageOpenError (QEMU's
    texts) for a bad length, a reserved field, too many or zero bitmaps, a misaligned or too big
    directory."""
    if len(data) != EXT_SIZE:
        raise ImageOpenError("bitmaps_ext: Invalid extension length")
    nb, reserved, dsize, doff = _EXT.unpack(data)
    if reserved:
        raise ImageOpenError("bitmaps_ext: Reserved field is not zero")
    if nb > MAX_BITMAPS:
        raise ImageOpenError(f"bitmaps_ext: Image has {nb} bitmaps, exceeding the QEMU supported maximum of "
                             f"{MAX_BITMAPS}")
    if nb == 0:
        raise ImageOpenError("found bitmaps extension with zero bitmaps")
    if doff % cluster_size:
        raise ImageOpenError("bitmaps_ext: invalid bitmap directory offset")
    if dsize > MAX_DIRECTORY_SIZE:
        raise ImageOpenError(f"bitmaps_ext: bitmap directory size ({dsize}) exceeds the maximum supported "
                             f"size ({MAX_DIRECTORY_SIZE})")
    return BitmapsExt(nb, dsize, doff)


def build_ext(ext: BitmapsExt) -> bytes:
    return _EXT.pack(ext.nb_bitmaps, 0, ext.directory_size, ext.directory_offset)


def entry_size(name_size: int, extra_size: int = 0) -> int:
    """Bytes one directory entry takes, padding included."""
    return (24 + name_size + extra_size + 7) & ~7


def bitmap_bytes(image_size: int, granularity: int) -> int:
    """Bytes of serialised bitmap data for a disk of ``image_size`` (get_bitmap_bytes_needed)."""
    return -(-(-(-image_size // granularity)) // 8)


def table_size_for(image_size: int, granularity: int, cluster_size: int) -> int:
    """Bitmap table entries (data clusters) a bitmap of this disk and granularity needs."""
    return -(-bitmap_bytes(image_size, granularity) // cluster_size)


def entry_ok(e: DirEntry, cluster_size: int, image_size: int) -> bool:
    """QEMU's check_dir_entry: table placement and size, granularity, flags, name size, type, and (for a
    bitmap not in use) a table big enough for the disk."""
    if (e.table_size == 0 or e.table_offset == 0 or e.table_offset % cluster_size
            or e.table_size > MAX_TABLE_SIZE
            or not MIN_GRANULARITY_BITS <= e.granularity_bits <= MAX_GRANULARITY_BITS
            or e.flags & RESERVED_FLAGS or len(e.name.encode("utf-8", "surrogateescape")) > MAX_NAME_SIZE
            or e.type != TYPE_DIRTY_TRACKING):
        return False
    phys = e.table_size * cluster_size
    if phys > MAX_PHYS_SIZE:
        return False
    if not e.flags & FLAG_IN_USE and image_size > (phys * 8) << e.granularity_bits:
        return False
    return True


def _name(raw: bytes) -> str:
    # names are bytes on disk; undecodable bytes survive a round trip
    return raw.decode("utf-8", "surrogateescape")


def parse_directory(buf: bytes, nb_bitmaps: int, cluster_size: int, image_size: int) -> list[DirEntry]:
    """Parse the whole directory (``buf`` is exactly directory_size bytes).  Raises CorruptImage with
    QEMU's texts (bitmap_list_load): a broken or empty directory, a count that disagrees with the
    extension, extra data, or an entry that breaks the constraints."""
    if not buf:
        raise CorruptImage("Requested bitmap directory size is zero")
    if len(buf) > MAX_DIRECTORY_SIZE:
        raise CorruptImage("Requested bitmap directory size is too big")
    out: list[DirEntry] = []
    pos = 0
    end = len(buf)
    while pos < end:
        if pos + 24 > end:
            raise CorruptImage("Broken bitmap directory")
        if len(out) + 1 > nb_bitmaps:
            raise CorruptImage("More bitmaps found than specified in header extension")
        t_off, t_size, flags, btype, gbits, nsize, xsize = _ENTRY.unpack_from(buf, pos)
        size = entry_size(nsize, xsize)
        if pos + size > end:
            raise CorruptImage("Broken bitmap directory")
        if xsize:
            raise CorruptImage("Bitmap extra data is not supported")
        name = _name(bytes(buf[pos + 24:pos + 24 + nsize]))
        e = DirEntry(t_off, t_size, flags, gbits, name, btype)
        if not entry_ok(e, cluster_size, image_size):
            raise CorruptImage(f"Bitmap '{name}' doesn't satisfy the constraints")
        out.append(e)
        pos += size
    if len(out) != nb_bitmaps:
        raise CorruptImage("Less bitmaps found than specified in header extension")
    return out


def build_directory(entries: list[DirEntry]) -> bytes:
    """Serialise directory entries (no extra data).  Raises InvalidArgument when the directory would be
    empty or too big."""
    out = bytearray()
    for e in entries:
        name = e.name.encode("utf-8", "surrogateescape")
        out += _ENTRY.pack(e.table_offset, e.table_size, e.flags, e.type, e.granularity_bits, len(name), 0)
        out += name
        out += bytes((-len(out)) % 8)
    if not out or len(out) > MAX_DIRECTORY_SIZE:
        raise InvalidArgument("Invalid bitmap directory size")
    return bytes(out)


def table_entry_ok(entry: int, cluster_size: int) -> bool:
    """QEMU's check_table_entry: no reserved bits; with an offset, aligned and without the all-ones bit."""
    if entry & TABLE_RESERVED_MASK:
        return False
    off = entry & TABLE_OFFSET_MASK
    return not off or not (entry & TABLE_ALL_ONES or off % cluster_size)


def parse_table(buf: bytes, size: int, cluster_size: int) -> list[int]:
    """``size`` big-endian u64 entries.  Raises CorruptImage when one breaks the rules."""
    if len(buf) < size * 8:
        raise CorruptImage("Bitmap table is truncated")
    table = list(struct.unpack_from(f">{size}Q", buf, 0))
    for e in table:
        if not table_entry_ok(e, cluster_size):
            raise CorruptImage("Invalid bitmap table entry")
    return table


def build_table(entries: list[int]) -> bytes:
    return struct.pack(f">{len(entries)}Q", *entries)


def constraints_error(name: str, granularity: int, image_size: int, cluster_size: int) -> str | None:
    """QEMU's check_constraints_on_bitmap: the reason a bitmap cannot be stored in this image, or None."""
    gbits = granularity.bit_length() - 1
    if gbits > MAX_GRANULARITY_BITS:
        return f"Granularity exceeds maximum ({1 << MAX_GRANULARITY_BITS} bytes)"
    if gbits < MIN_GRANULARITY_BITS:
        return f"Granularity is under minimum ({1 << MIN_GRANULARITY_BITS} bytes)"
    nbytes = bitmap_bytes(image_size, granularity)
    if nbytes > MAX_PHYS_SIZE or nbytes > MAX_TABLE_SIZE * cluster_size:
        return "Too much space will be occupied by the bitmap. Use larger granularity"
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_SIZE:
        return f"Name length exceeds maximum ({MAX_NAME_SIZE} characters)"
    return None
