"""The ``vpc`` format (VHD, Virtual PC / Hyper-V): fixed and dynamic images, read, written and created as
qemu-img 7.2 does.

Layer: engine (imports engine.driver, engine.errors, engine.units and, to create, engine.formats.file).
Big-endian.  A 512-byte footer ("conectix") sits at the end of the file; dynamic images keep a copy at
offset 0, followed (at the footer's data offset) by a 1024-byte dynamic header ("cxsparse") naming the
block allocation table: u32 sector numbers, 0xFFFFFFFF for unallocated blocks.  Each allocated block is
a sector bitmap padded to 512 bytes, then the data.  The virtual size is QEMU 7.2's: cylinders x heads x
sectors x 512 from the footer's CHS geometry, except for images made by Hyper-V-like creators ('win ',
'qem2', 'd2v ', 'CTXS', 'tap\\0') or with the maximum geometry, which use the footer's current size.  A
fixed image cannot be probed (its data is raw); open it with -f vpc.

Creation (``create``) follows QEMU's vpc_co_create: the requested size is rounded *up* to a CHS geometry
(so 8 MiB becomes 8390656 bytes), unless ``force_size=on`` (creator 'qem2', maximum geometry, the exact
size); ``subformat=dynamic`` (default) writes footer copy, dynamic header at 512, BAT at 1536 (0xFF
filled to a sector) and the footer after it, with 2 MiB blocks; ``subformat=fixed`` is the data area
(sparse) followed by the footer.

Writing: a fixed image is written in place.  A dynamic image overwrites allocated blocks in place (the
first write to a block in a session sets all bits of its sector bitmap, as QEMU does, since QEMU never
reads the bitmap and other readers must see every sector as present).  An unallocated block is appended
where the footer is (``free_data_block_offset``).  QEMU's alloc_block orders this allocation as: bitmap
(all ones, overwriting the old footer), new footer at the new end of file, BAT entry, and only then the
guest data.  We keep QEMU's metadata order but put the data first, so that the invariant is data before
metadata: (1) the bitmap (all ones) and the non-zero parts of the data (the rest of the block lies past
the old end of file and reads as zeros, so the file stays sparse as with qemu-img), (2) the footer at the
new end of file, (3) a flush (a barrier; no-op with cache=unsafe), (4) the BAT entry.  A crash before (4) leaves the block unreferenced: the guest still
reads zeros there, the footer copy at offset 0 keeps the image openable even when (2) did not happen, and
the next open computes the free offset from the BAT, so the orphan space is reused.  A crash after (4)
finds the data already in place.  ``write_zeroes`` leaves unallocated blocks unallocated and zeroes
allocated ones in place.
"""
from __future__ import annotations

import struct
import time
import uuid
from typing import TYPE_CHECKING, Any

from engine.driver import BlockDriver, Extent, Status, leftover_create_options, read_mapped, register
from engine.errors import CorruptImage, ImageOpenError, InvalidArgument, OutOfBounds
from engine.formats.vdi import check_protocol_prealloc
from engine.units import round_up

if TYPE_CHECKING:
    from ipc.executor import Executor

COOKIE = b"conectix"
DYN_COOKIE = b"cxsparse"
CURRENT_SIZE_CREATORS = (b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0")
MAX_GEOMETRY = 65535 * 16 * 255
TYPE_FIXED, TYPE_DYNAMIC, TYPE_DIFF = 2, 3, 4
MAX_BAT = 0x40000000 // 4
MAX_SECTORS = 0xFF000000  # QEMU's VHD_MAX_SECTORS: 2040 GiB
UNALLOCATED = 0xFFFFFFFF
BLOCK_SIZE = 0x200000  # what QEMU gives the dynamic images it creates
HEADER_OFFSET = 512  # the dynamic header, right after the footer copy
BAT_OFFSET = 3 * 512
TIMESTAMP_BASE = 946684800  # 2000-01-01T00:00:00Z


def checksum(buf: bytes | bytearray, field: int) -> int:
    """The VHD checksum: one's complement of the byte sum, with the 4-byte field at ``field`` taken as 0."""
    return (~(sum(buf) - sum(buf[field:field + 4]))) & 0xFFFFFFFF


def calculate_geometry(total_sectors: int) -> tuple[int, int, int]:
    """QEMU's calculate_geometry (the VHD spec's algorithm, with QEMU's integer types): (cyls, heads, spt)."""
    total_sectors = min(total_sectors, MAX_GEOMETRY)
    if total_sectors >= 65535 * 16 * 63:
        secs, heads = 255, 16
        cth = total_sectors // secs
    else:
        secs = 17
        cth = total_sectors // secs
        heads = (-(-cth // 1024)) & 0xFF  # a uint8_t in QEMU
        heads = max(heads, 4)
        if cth >= heads * 1024 or heads > 16:
            secs, heads = 31, 16
            cth = total_sectors // secs
        if cth >= heads * 1024:
            secs, heads = 63, 16
            cth = total_sectors // secs
    return (cth // heads) & 0xFFFF, heads, secs


def vhd_geometry(size: int, force_size: bool) -> tuple[int, int, int, int]:
    """(cyls, heads, spt, total sectors) qemu-img 7.2 gives a ``size``-byte (multiple of 512) request.

    Without force_size the size is rounded up until a CHS geometry holds it (the smallest geometry at
    least as large, trying ever larger sector counts as QEMU does); the maximum geometry, reached from
    about 127 GiB on or forced, means the footer's current size is the size."""
    if force_size:
        cyls, heads, secs = 65535, 16, 255
    else:
        want = min(MAX_GEOMETRY, size // 512)
        cyls = heads = secs = 0
        i = 0
        while want > cyls * heads * secs:
            cyls, heads, secs = calculate_geometry(want + i)
            i += 1
    if cyls * heads * secs == MAX_GEOMETRY:
        return cyls, heads, secs, size // 512
    return cyls, heads, secs, cyls * heads * secs


def vhd_footer(total_size: int, cyls: int, heads: int, secs: int, disk_type: int, creator: bytes,
               now: float) -> bytes:
    """The 512-byte footer QEMU writes (``now`` in Unix seconds; a random version-4 UUID)."""
    f = bytearray(512)
    f[0:8] = COOKIE
    struct.pack_into(">IIQI", f, 8, 0x2, 0x00010000,
                     HEADER_OFFSET if disk_type == TYPE_DYNAMIC else 0xFFFFFFFFFFFFFFFF,
                     (int(now) - TIMESTAMP_BASE) & 0xFFFFFFFF)
    f[28:32] = creator
    struct.pack_into(">HH", f, 32, 5, 3)  # Virtual PC 2007
    f[36:40] = b"Wi2k"
    struct.pack_into(">QQHBBI", f, 40, total_size, total_size, cyls, heads, secs, disk_type)
    f[68:84] = uuid.uuid4().bytes
    struct.pack_into(">I", f, 64, checksum(f, 64))
    return bytes(f)


def vhd_dynamic_header(entries: int) -> bytes:
    """The 1024-byte dynamic disk header QEMU writes: BAT at 1536, 2 MiB blocks, no parent."""
    h = bytearray(1024)
    h[0:8] = DYN_COOKIE
    struct.pack_into(">QQIII", h, 8, 0xFFFFFFFFFFFFFFFF, BAT_OFFSET, 0x00010000, entries, BLOCK_SIZE)
    struct.pack_into(">I", h, 36, checksum(h, 36))
    return bytes(h)


_ZERO_CHUNK = bytes(65536)


def _nonzero_runs(data: bytes) -> list[tuple[int, int]]:
    """(offset, length) runs of ``data`` that are not all zeros, at 64 KiB granularity."""
    runs: list[tuple[int, int]] = []
    step = len(_ZERO_CHUNK)
    for pos in range(0, len(data), step):
        chunk = data[pos:pos + step]
        if chunk == _ZERO_CHUNK[:len(chunk)]:
            continue
        if runs and runs[-1][0] + runs[-1][1] == pos:
            runs[-1] = (runs[-1][0], runs[-1][1] + len(chunk))
        else:
            runs.append((pos, len(chunk)))
    return runs


@register
class VpcDriver(BlockDriver):
    format_name = "vpc"

    @classmethod
    def probe(cls, head: bytes, filename: str) -> int:
        return 100 if head[:8] == COOKIE else 0

    @classmethod
    def create(cls, filename: str, size: int | None, executor: Executor, options: dict[str, Any]) -> None:
        """``qemu-img create -f vpc [-o subformat=dynamic|fixed,force_size=on]``.  ``preallocation``
        off/falloc/full is accepted and, as with qemu-img, changes nothing.  Raises InvalidArgument
        (unknown option, bad value, no size, above 2040 GiB), NotSupported (preallocation=metadata) and
        ImageOpenError (the file cannot be created)."""
        from engine.formats.file import FileDriver

        opts = dict(options)
        subformat = str(opts.pop("subformat", "dynamic"))
        if subformat not in ("dynamic", "fixed"):
            raise InvalidArgument(f"Parameter 'subformat' does not accept value '{subformat}'")
        force_size = bool(opts.pop("force_size", False))
        check_protocol_prealloc(opts.pop("preallocation", "off"))
        leftover_create_options(opts, size)
        size = round_up(size, 512)
        if size // 512 > MAX_SECTORS:
            raise InvalidArgument("The image size is too large for file format 'vpc'")
        cyls, heads, secs, sectors = vhd_geometry(size, force_size)
        total = sectors * 512
        disk_type = TYPE_FIXED if subformat == "fixed" else TYPE_DYNAMIC
        footer = vhd_footer(total, cyls, heads, secs, disk_type, b"qem2" if force_size else b"qemu",
                            time.time())
        f = FileDriver(filename, executor, read_only=False, create=True)
        try:
            if disk_type == TYPE_FIXED:
                f.truncate(total + 512)
                f.write(total, footer)
            else:
                entries = -(-sectors // (BLOCK_SIZE // 512))
                bat = b"\xff" * round_up(entries * 4, 512)
                f.write(0, footer + vhd_dynamic_header(entries) + bat + footer)
        finally:
            f.close()

    def open(self, options: dict[str, Any]) -> None:
        f = self.file
        assert f is not None
        fsize = f.size()
        footer = f.read(0, 512)
        if footer[:8] != COOKIE:
            if fsize < 512:
                raise ImageOpenError("Invalid VPC image: the file is too short")
            footer = f.read(fsize - 512, 512)
            if footer[:8] != COOKIE:
                raise ImageOpenError("Invalid VPC image: no footer")
        if checksum(footer, 64) != struct.unpack_from(">I", footer, 64)[0]:
            raise ImageOpenError("Incorrect header checksum")
        self.footer = bytes(footer)
        self.disk_type = struct.unpack_from(">I", footer, 60)[0]
        if self.disk_type not in (TYPE_FIXED, TYPE_DYNAMIC):
            raise ImageOpenError(f"Unsupported VPC disk type {self.disk_type}"
                                 + (" (differencing images are not supported)" if self.disk_type == TYPE_DIFF
                                    else ""), errno=95)
        cyls, heads, secs = struct.unpack_from(">HBB", footer, 56)
        sectors = cyls * heads * secs
        creator = footer[28:32]
        current_size = struct.unpack_from(">Q", footer, 48)[0]
        if creator in CURRENT_SIZE_CREATORS or sectors == MAX_GEOMETRY:
            sectors = current_size // 512
        self.total = sectors * 512
        if self.disk_type == TYPE_FIXED:
            if self.total > fsize - 512 + 512:  # data may end just before the footer
                raise ImageOpenError("Invalid VPC image: the image is shorter than its size")
            return
        data_offset = struct.unpack_from(">Q", footer, 16)[0]
        if data_offset > fsize:
            raise ImageOpenError("Invalid VPC image: dynamic header offset past the end of the file")
        dyn = f.read(data_offset, 1024)
        if dyn[:8] != DYN_COOKIE:
            raise ImageOpenError("Invalid VPC image: bad dynamic header")
        self.bat_offset = struct.unpack_from(">Q", dyn, 16)[0]
        entries, self.block_size = struct.unpack_from(">II", dyn, 28, )
        if not self.block_size or self.block_size % 512 or self.block_size & (self.block_size - 1):
            raise ImageOpenError(f"Invalid VPC image: block size {self.block_size}")
        if entries > MAX_BAT or entries * self.block_size < self.total or self.bat_offset > fsize:
            raise ImageOpenError("Invalid VPC image: block allocation table does not fit")
        raw = f.read(self.bat_offset, entries * 4)
        if len(raw) < entries * 4:
            raise ImageOpenError("Invalid VPC image: block allocation table past the end of the file")
        self.bat = list(struct.unpack(f">{entries}I", raw))
        self.bitmap_size = -(-(self.block_size // 512 // 8) // 512) * 512
        # where the next block goes (QEMU's free_data_block_offset): past the BAT and every block
        free = round_up(self.bat_offset + entries * 4, 512)
        for entry in self.bat:
            if entry != UNALLOCATED:
                free = max(free, entry * 512 + self.bitmap_size + self.block_size)
        if free > fsize:
            raise ImageOpenError("block-vpc: free_data_block_offset points after the end of file. The image "
                                 "has been truncated.")
        self.free_data_block_offset = free
        self._last_bitmap: int | None = None  # QEMU's last_bitmap_offset

    def size(self) -> int:
        return self.total

    def cluster_size(self) -> int | None:
        return self.block_size if self.disk_type == TYPE_DYNAMIC else None

    @property
    def preallocated(self) -> bool:
        """Every block has its place already (fixed disks): convert writes only the non-zero runs."""
        return self.disk_type == TYPE_FIXED

    def _host(self, offset: int) -> tuple[int | None, int]:
        if self.disk_type == TYPE_FIXED:
            return offset, self.total - offset
        bs = self.block_size
        entry = self.bat[offset // bs]
        in_block = offset % bs
        if entry == UNALLOCATED:
            return None, bs - in_block
        return entry * 512 + self.bitmap_size + in_block, bs - in_block

    def read(self, offset: int, length: int) -> bytes:
        assert self.file is not None
        return read_mapped(self.file, self._host, offset, length)

    def block_status(self, offset: int, length: int) -> Extent:
        host, left = self._host(offset)
        n = min(left, length)
        # what qemu-img map shows for VHD in 7.2: a fixed image is data whose holes the file reports as
        # zeros; a dynamic image's allocated blocks are data through to the block's end (no look at the
        # file), its unallocated ones read as zeros
        if self.disk_type == TYPE_FIXED:
            return Extent(Status.DATA | Status.OFFSET_VALID | Status.RECURSE, n, offset, self.file)
        if host is None:
            return Extent(Status.ZERO, n, 0, self.file)
        return Extent(Status.DATA | Status.OFFSET_VALID, n, host, self.file)

    # --- writing ------------------------------------------------------------------------------------
    def _check_request(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.total:
            raise OutOfBounds(f"Request [{offset}, {offset + length}) is beyond the end of the VHD image "
                              f"({self.total} bytes)")

    def _host_for_write(self, offset: int) -> tuple[int | None, int]:
        """As ``_host``, and for an allocated block not yet written in this session (QEMU's
        get_image_offset with write=true): set every bit of its sector bitmap first."""
        host, left = self._host(offset)
        if host is not None and self.disk_type == TYPE_DYNAMIC:
            bitmap = self.bat[offset // self.block_size] * 512
            if bitmap != self._last_bitmap:
                assert self.file is not None
                self.file.write(bitmap, b"\xff" * self.bitmap_size)
                self._last_bitmap = bitmap
        return host, left

    def write(self, offset: int, data: bytes) -> None:
        """Write ``data`` at guest ``offset``: in place (fixed images, allocated blocks), appending new
        blocks for the rest in the order the module docstring gives.

        Raises ReadOnlyError, OutOfBounds (past the virtual size), CorruptImage (a block that would not
        fit a u32 sector number) and the file's BlockError/OSError."""
        self.check_writable()
        self._check_request(offset, len(data))
        assert self.file is not None
        if self.disk_type == TYPE_FIXED:
            if data:
                self.file.write(offset, data)
            return
        view = memoryview(data)
        pos = 0
        while pos < len(data):
            host, left = self._host_for_write(offset + pos)
            n = min(left, len(data) - pos)
            if host is not None:
                self.file.write(host, bytes(view[pos:pos + n]))
            else:
                self._alloc_block(offset + pos, bytes(view[pos:pos + n]))
            pos += n

    def _alloc_block(self, offset: int, piece: bytes) -> None:
        """Append the block holding guest ``offset`` with ``piece`` written at ``offset`` in it: bitmap and
        data, footer at the new end of file, barrier, BAT entry."""
        f = self.file
        assert f is not None
        bs = self.block_size
        index, in_block = divmod(offset, bs)
        start = self.free_data_block_offset
        if start % 512 or start // 512 >= UNALLOCATED:
            raise CorruptImage(f"VHD block {index} cannot be allocated at offset {start}")
        data_start = start + self.bitmap_size
        end = data_start + bs
        # the block lies past the old footer, where the file ends in QEMU's images: it reads as zeros once
        # the new footer extends the file, so only the non-zero parts of ``piece`` are written (the file
        # stays sparse, as with qemu-img); anything another tool left there is zeroed first
        fsize = f.size()
        if fsize > data_start:
            f.write_zeroes(data_start, min(fsize, end) - data_start)
        f.write(start, b"\xff" * self.bitmap_size)
        for rel, n in _nonzero_runs(piece):
            f.write(data_start + in_block + rel, piece[rel:rel + n])
        f.write(end, self.footer)
        f.flush()
        f.write(self.bat_offset + 4 * index, struct.pack(">I", start // 512))
        self.bat[index] = start // 512
        self.free_data_block_offset = end
        self._last_bitmap = start

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        """Zero [offset, offset+length): in place in fixed images and allocated blocks; unallocated blocks
        already read as zeros and stay unallocated.  Raises ReadOnlyError, OutOfBounds and the file's
        errors."""
        self.check_writable()
        self._check_request(offset, length)
        assert self.file is not None
        if self.disk_type == TYPE_FIXED:
            if length:
                self.file.write_zeroes(offset, length, unmap)
            return
        pos, end = offset, offset + length
        while pos < end:
            host, left = self._host_for_write(pos)
            n = min(left, end - pos)
            if host is not None:
                self.file.write_zeroes(host, n, unmap)
            pos += n
