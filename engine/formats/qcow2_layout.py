"""qcow2 on-disk structures: header, header extensions, L1/L2 entries, refcounts, snapshot table.

Layer: engine (pure: no files, no clock).  Everything here turns bytes into values and values into bytes,
big-endian as the format demands.  Invariants kept by the serialisers: unknown header extensions and
unknown additional header fields survive a parse/serialise round trip; the header, its extensions and the
backing file name fit in cluster 0 (the feature-name table is dropped first when they would not).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag

from engine.errors import CorruptImage, ImageOpenError, InvalidArgument

QCOW_MAGIC = 0x514649FB
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21

# header extension types
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441


class Incompat(IntFlag):
    DIRTY = 1 << 0
    CORRUPT = 1 << 1
    DATA_FILE = 1 << 2
    COMPRESSION = 1 << 3
    EXTL2 = 1 << 4


class Compat(IntFlag):
    LAZY_REFCOUNTS = 1 << 0


class Autoclear(IntFlag):
    BITMAPS = 1 << 0
    DATA_FILE_RAW = 1 << 1


KNOWN_INCOMPAT = Incompat.DIRTY | Incompat.CORRUPT | Incompat.DATA_FILE | Incompat.COMPRESSION | Incompat.EXTL2
KNOWN_AUTOCLEAR = Autoclear.BITMAPS | Autoclear.DATA_FILE_RAW

# (type, bit, name) as QEMU 7.2 writes the feature-name table
FEATURE_NAMES = [
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
]

L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1 << 0
L1E_RESERVED = 0x7F000000000001FF
L2E_STD_RESERVED = 0x3F000000000001FE
BITMAP_ALL_ZEROES = 0xFFFFFFFF00000000
BITMAP_ALL_ALLOC = 0x00000000FFFFFFFF
SUBCLUSTERS = 32


class SubclusterType(IntEnum):
    UNALLOCATED_PLAIN = 0
    UNALLOCATED_ALLOC = 1
    ZERO_PLAIN = 2
    ZERO_ALLOC = 3
    NORMAL = 4
    COMPRESSED = 5
    INVALID = 6


_HDR_V2 = struct.Struct(">IIQIIQIIQQIIQ")  # 72 bytes
_HDR_V3 = struct.Struct(">QQQII")  # 32 bytes: features, refcount_order, header_length


@dataclass
class Qcow2Header:
    version: int = 3
    backing_file_offset: int = 0
    backing_file_size: int = 0
    cluster_bits: int = 16
    size: int = 0
    crypt_method: int = 0
    l1_size: int = 0
    l1_table_offset: int = 0
    refcount_table_offset: int = 0
    refcount_table_clusters: int = 0
    nb_snapshots: int = 0
    snapshots_offset: int = 0
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = 112
    compression_type: int = 0
    extra_fields: bytes = b""  # additional header fields past byte 104 that we do not know (kept)
    backing_file: str | None = None
    backing_format: str | None = None
    bitmaps_ext: bytes | None = None
    data_file: str | None = None
    crypto_ext: bytes | None = None
    unknown_exts: list[tuple[int, bytes]] = field(default_factory=list)
    had_feature_table: bool = False

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & Incompat.EXTL2)

    @property
    def compression(self) -> str:
        return "zstd" if self.compression_type == 1 else "zlib"


def parse_header(buf: bytes, file_size: int | None = None) -> Qcow2Header:
    """Parse cluster 0 (``buf`` must hold at least the whole first cluster or the whole file).

    Raises ImageOpenError for a bad magic, version, size or layout and for unknown incompatible features.
    """
    if len(buf) < 72:
        raise ImageOpenError("Image is not in qcow2 format")
    (magic, version, bfo, bfs, cbits, size, crypt, l1_size, l1_off, rt_off, rt_clusters, nb_snap,
     snap_off) = _HDR_V2.unpack_from(buf, 0)
    if magic != QCOW_MAGIC:
        raise ImageOpenError("Image is not in qcow2 format")
    if version not in (2, 3):
        raise ImageOpenError(f"Unsupported qcow2 version {version}", errno=95)
    if cbits < MIN_CLUSTER_BITS or cbits > MAX_CLUSTER_BITS:
        raise ImageOpenError(f"Unsupported cluster size: 2^{cbits}")
    h = Qcow2Header(version=version, backing_file_offset=bfo, backing_file_size=bfs, cluster_bits=cbits,
                    size=size, crypt_method=crypt, l1_size=l1_size, l1_table_offset=l1_off,
                    refcount_table_offset=rt_off, refcount_table_clusters=rt_clusters,
                    nb_snapshots=nb_snap, snapshots_offset=snap_off)
    cs = 1 << cbits
    if version == 2:
        h.header_length = 72
        h.refcount_order = 4
    else:
        if len(buf) < 104:
            raise ImageOpenError("qcow2 header exceeds cluster size")
        (h.incompatible_features, h.compatible_features, h.autoclear_features, h.refcount_order,
         h.header_length) = _HDR_V3.unpack_from(buf, 72)
        if h.header_length < 104:
            raise ImageOpenError("qcow2 header too short")
        if h.header_length > cs:
            raise ImageOpenError("qcow2 header exceeds cluster size")
        if h.header_length > 104:
            h.compression_type = buf[104]
            h.extra_fields = bytes(buf[105:h.header_length])
        if h.refcount_order > 6:
            raise ImageOpenError("Reference count entry width too large; may not exceed 64 bits")
    if h.crypt_method:
        raise ImageOpenError("Encrypted qcow2 images are not supported by parablock", errno=95)
    unknown = h.incompatible_features & ~int(KNOWN_INCOMPAT)
    if unknown:
        raise ImageOpenError(f"Unsupported qcow2 feature(s): Unknown incompatible feature: {unknown:x}",
                             errno=95)
    if h.incompatible_features & Incompat.DATA_FILE:
        raise ImageOpenError("qcow2 images with an external data file are not supported by parablock",
                             errno=95)
    if bool(h.compression_type) != bool(h.incompatible_features & Incompat.COMPRESSION):
        raise ImageOpenError("qcow2: Compression type incompatible feature bit must be set if and only "
                             "if compression type is not zlib")
    if h.compression_type > 1:
        raise ImageOpenError(f"qcow2: Unknown compression type {h.compression_type}", errno=95)
    if h.extended_l2 and cbits < 14:
        raise ImageOpenError("Extended L2 entries are only supported with cluster sizes of at least "
                             "16384 bytes")
    if rt_off % cs or l1_off % cs or (nb_snap and snap_off % cs):
        raise ImageOpenError("Image is not in qcow2 format: metadata table not cluster-aligned")
    if rt_clusters == 0 or rt_clusters > (8 << 20) // cs + 1:
        raise ImageOpenError("Reference count table too large" if rt_clusters else "Image has no refcount table")
    if size > (1 << 62):
        raise ImageOpenError("Image size is too big")
    l2_entries = cs // (16 if h.extended_l2 else 8)
    needed_l1 = -(-size // (cs * l2_entries))
    if l1_size < needed_l1:
        raise ImageOpenError("L1 table is too small")
    if l1_size > (32 << 20) // 8:
        raise ImageOpenError("Active L1 table too large")
    if l1_off > (1 << 62) or rt_off > (1 << 62) or (nb_snap and snap_off > (1 << 62)):
        raise ImageOpenError("Active L1 table offset invalid" if l1_off > (1 << 62) else
                             "Reference count table offset invalid" if rt_off > (1 << 62) else
                             "Snapshot table offset invalid")
    if bfo > cs:
        raise ImageOpenError("Invalid backing file offset")
    _parse_extensions(h, buf, cs)
    if bfo:
        if bfs > 1023 or bfo + bfs > min(len(buf), cs):
            raise ImageOpenError("Backing file name too long")
        # a C string, as QEMU reads it: anything after a NUL byte is not part of the name
        h.backing_file = bytes(buf[bfo:bfo + bfs]).split(b"\0", 1)[0].decode("utf-8", "replace")
    return h


def _parse_extensions(h: Qcow2Header, buf: bytes, cs: int) -> None:
    off = h.header_length
    end = min(h.backing_file_offset or cs, len(buf), cs)
    seen: set[int] = set()
    while off + 8 <= end:
        etype, elen = struct.unpack_from(">II", buf, off)
        off += 8
        if etype == EXT_END:
            return
        if off + elen > end:
            raise ImageOpenError("Invalid qcow2 header extension: ext_backing_format: Invalid extension length")
        data = bytes(buf[off:off + elen])
        off += (elen + 7) & ~7
        if etype in seen and etype != EXT_END:
            continue
        seen.add(etype)
        if etype == EXT_BACKING_FORMAT:
            h.backing_format = data.decode("utf-8", "replace")
        elif etype == EXT_FEATURE_TABLE:
            h.had_feature_table = True
        elif etype == EXT_BITMAPS:
            h.bitmaps_ext = data
        elif etype == EXT_CRYPTO:
            h.crypto_ext = data
        elif etype == EXT_DATA_FILE:
            h.data_file = data.decode("utf-8", "replace")
        else:
            h.unknown_exts.append((etype, data))


def _ext(etype: int, data: bytes) -> bytes:
    pad = (-len(data)) % 8
    return struct.pack(">II", etype, len(data)) + data + bytes(pad)


def feature_table() -> bytes:
    out = b""
    for t, bit, name in FEATURE_NAMES:
        out += struct.pack(">BB", t, bit) + name.encode().ljust(46, b"\0")
    return out


def serialize_header(h: Qcow2Header) -> bytes:
    """Build cluster 0's bytes (header, extensions, backing name); updates backing_file_offset/size.

    Raises InvalidArgument when everything does not fit in one cluster.
    """
    cs = h.cluster_size
    for with_table in (True, False):
        exts = b""
        if h.crypto_ext is not None:
            exts += _ext(EXT_CRYPTO, h.crypto_ext)
        if h.data_file is not None:
            exts += _ext(EXT_DATA_FILE, h.data_file.encode())
        if h.backing_format:
            exts += _ext(EXT_BACKING_FORMAT, h.backing_format.encode())
        if h.version >= 3 and with_table and cs >= 8192:  # qemu-img 7.2 omits it for clusters <= 4 KiB
            exts += _ext(EXT_FEATURE_TABLE, feature_table())
        if h.bitmaps_ext is not None:
            exts += _ext(EXT_BITMAPS, h.bitmaps_ext)
        for etype, data in h.unknown_exts:
            exts += _ext(etype, data)
        exts += bytes(8)
        hlen = 72 if h.version == 2 else h.header_length
        name = (h.backing_file or "").encode()
        if len(name) > 1023:
            raise InvalidArgument("Backing file name too long")
        total = hlen + len(exts) + len(name)
        if total <= cs:
            break
    else:
        raise InvalidArgument("Header and backing file name do not fit in the first cluster")
    if name:
        h.backing_file_offset = hlen + len(exts)
        h.backing_file_size = len(name)
    else:
        h.backing_file_offset = 0
        h.backing_file_size = 0
    out = bytearray(_HDR_V2.pack(QCOW_MAGIC, h.version, h.backing_file_offset, h.backing_file_size,
                                 h.cluster_bits, h.size, h.crypt_method, h.l1_size, h.l1_table_offset,
                                 h.refcount_table_offset, h.refcount_table_clusters, h.nb_snapshots,
                                 h.snapshots_offset))
    if h.version >= 3:
        out += _HDR_V3.pack(h.incompatible_features, h.compatible_features, h.autoclear_features,
                            h.refcount_order, h.header_length)
        if h.header_length > 104:
            tail = bytes([h.compression_type]) + h.extra_fields
            tail = tail[:h.header_length - 104].ljust(h.header_length - 104, b"\0")
            out += tail
    out += exts + name
    return bytes(out)


# --- L2 entries -------------------------------------------------------------------------------------

def compressed_geometry(cluster_bits: int) -> tuple[int, int]:
    """(offset bits, sector-count mask) of a compressed descriptor."""
    csize_shift = 62 - (cluster_bits - 8)
    csize_mask = (1 << (cluster_bits - 8)) - 1
    return csize_shift, csize_mask


def decode_compressed(entry: int, cluster_bits: int) -> tuple[int, int]:
    """(host byte offset, byte length to read) of a compressed L2 entry."""
    shift, mask = compressed_geometry(cluster_bits)
    coffset = entry & ((1 << shift) - 1)
    nsect = ((entry >> shift) & mask) + 1
    return coffset, nsect * 512 - (coffset & 511)


def encode_compressed(coffset: int, clen: int, cluster_bits: int) -> int:
    shift, _ = compressed_geometry(cluster_bits)
    nb_csectors = ((coffset + clen - 1) >> 9) - (coffset >> 9)
    return OFLAG_COMPRESSED | (nb_csectors << shift) | coffset


def compressed_host_range(entry: int, cluster_bits: int) -> tuple[int, int]:
    """The host byte range [start, end) that refcounts of a compressed cluster cover."""
    shift, mask = compressed_geometry(cluster_bits)
    coffset = entry & ((1 << shift) - 1)
    nsect = ((entry >> shift) & mask) + 1
    start = coffset & ~511
    return start, start + nsect * 512


def cluster_type(entry: int, version: int) -> SubclusterType:
    """Type of a whole cluster for standard (non-extended) L2 entries."""
    if entry & OFLAG_COMPRESSED:
        return SubclusterType.COMPRESSED
    off = entry & L2E_OFFSET_MASK
    if entry & OFLAG_ZERO and version >= 3:
        return SubclusterType.ZERO_ALLOC if off else SubclusterType.ZERO_PLAIN
    if off:
        return SubclusterType.NORMAL
    return SubclusterType.UNALLOCATED_PLAIN


def subcluster_type(entry: int, bitmap: int, sc: int) -> SubclusterType:
    """Type of subcluster ``sc`` for an extended L2 entry."""
    if entry & OFLAG_COMPRESSED:
        return SubclusterType.COMPRESSED
    off = entry & L2E_OFFSET_MASK
    alloc = (bitmap >> sc) & 1
    zero = (bitmap >> (32 + sc)) & 1
    if alloc and zero:
        return SubclusterType.INVALID
    if zero:
        return SubclusterType.ZERO_ALLOC if off else SubclusterType.ZERO_PLAIN
    if alloc:
        return SubclusterType.NORMAL if off else SubclusterType.INVALID
    return SubclusterType.UNALLOCATED_ALLOC if off else SubclusterType.UNALLOCATED_PLAIN


# --- refcounts --------------------------------------------------------------------------------------

def get_refcount(block: bytes | bytearray, index: int, order: int) -> int:
    if order == 4:
        return (block[2 * index] << 8) | block[2 * index + 1]
    if order < 3:
        bits = 1 << order
        per_byte = 8 // bits
        byte = block[index // per_byte]
        return (byte >> ((index % per_byte) * bits)) & ((1 << bits) - 1)
    width = 1 << (order - 3)
    return int.from_bytes(block[index * width:(index + 1) * width], "big")


def set_refcount(block: bytearray, index: int, value: int, order: int) -> None:
    if order < 3:
        bits = 1 << order
        per_byte = 8 // bits
        shift = (index % per_byte) * bits
        mask = ((1 << bits) - 1) << shift
        i = index // per_byte
        block[i] = (block[i] & ~mask) | ((value << shift) & mask)
        return
    width = 1 << (order - 3)
    block[index * width:(index + 1) * width] = value.to_bytes(width, "big")


def refcounts_per_block(cluster_bits: int, order: int) -> int:
    return (1 << (cluster_bits + 3)) >> order


def unpack_u64_table(buf: bytes) -> list[int]:
    n = len(buf) // 8
    return list(struct.unpack(f">{n}Q", buf[:n * 8]))


def pack_u64_table(values: list[int]) -> bytes:
    return struct.pack(f">{len(values)}Q", *values)


# --- snapshots --------------------------------------------------------------------------------------

@dataclass
class Snapshot:
    l1_table_offset: int
    l1_size: int
    id_str: str
    name: str
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    disk_size: int | None
    icount: int | None
    extra_unknown: bytes = b""


_SN_HDR = struct.Struct(">QIHHIIQII")  # 40 bytes


def parse_snapshots(buf: bytes, count: int, version: int) -> tuple[list[Snapshot], int]:
    """Parse ``count`` snapshot entries; return them and the table's size in bytes.

    Raises CorruptImage when the table is malformed."""
    out: list[Snapshot] = []
    off = 0
    for _ in range(count):
        if off + _SN_HDR.size > len(buf):
            raise CorruptImage("Snapshot table is truncated")
        l1_off, l1_size, id_len, name_len, dsec, dnsec, vmclock, vmstate, extra = _SN_HDR.unpack_from(buf, off)
        off += _SN_HDR.size
        if off + extra + id_len + name_len > len(buf):
            raise CorruptImage("Snapshot table is truncated")
        ex = buf[off:off + extra]
        off += extra
        vm_state = vmstate
        disk = None
        icount = None
        if len(ex) >= 8:
            vm_state = struct.unpack_from(">Q", ex, 0)[0]
        if len(ex) >= 16:
            disk = struct.unpack_from(">Q", ex, 8)[0]
        if len(ex) >= 24:
            icount = struct.unpack_from(">q", ex, 16)[0]
        id_str = bytes(buf[off:off + id_len]).decode("utf-8", "replace")
        off += id_len
        name = bytes(buf[off:off + name_len]).decode("utf-8", "replace")
        off += name_len
        off = (off + 7) & ~7
        out.append(Snapshot(l1_off, l1_size, id_str, name, dsec, dnsec, vmclock, vm_state, disk,
                            icount, bytes(ex[24:])))
    return out, off


def serialize_snapshots(snaps: list[Snapshot]) -> bytes:
    out = bytearray()
    for sn in snaps:
        extra = struct.pack(">QQq", sn.vm_state_size, sn.disk_size or 0,
                            -1 if sn.icount is None else sn.icount) + sn.extra_unknown
        idb = sn.id_str.encode()
        nameb = sn.name.encode()
        out += _SN_HDR.pack(sn.l1_table_offset, sn.l1_size, len(idb), len(nameb), sn.date_sec, sn.date_nsec,
                            sn.vm_clock_nsec, min(sn.vm_state_size, 0xFFFFFFFF), len(extra))
        out += extra + idb + nameb
        out += bytes((-len(out)) % 8)
    return bytes(out)
