"""The ``vpc`` format (VHD, Virtual PC / Hyper-V), read side: fixed and dynamic images.

Layer: engine.  Big-endian.  A 512-byte footer ("conectix") sits at the end of the file; dynamic images
keep a copy at offset 0, followed (at the footer's data offset) by a 1024-byte dynamic header
("cxsparse") naming the block allocation table: u32 sector numbers, 0xFFFFFFFF for unallocated blocks.
Each allocated block is a sector bitmap padded to 512 bytes, then the data.  The virtual size is QEMU
7.2's: cylinders x heads x sectors x 512 from the footer's CHS geometry, except for images made by
Hyper-V-like creators ('win ', 'qem2', 'd2v ', 'CTXS', 'tap\\0') or with the maximum geometry, which use
the footer's current size.  A fixed image cannot be probed (its data is raw); open it with -f vpc.
Writing VHD is not supported yet.
"""
from __future__ import annotations

import struct
from typing import Any

from engine.driver import BlockDriver, Extent, Status, read_mapped, register
from engine.errors import ImageOpenError

COOKIE = b"conectix"
DYN_COOKIE = b"cxsparse"
CURRENT_SIZE_CREATORS = (b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0")
MAX_GEOMETRY = 65535 * 16 * 255
TYPE_FIXED, TYPE_DYNAMIC, TYPE_DIFF = 2, 3, 4
MAX_BAT = 0x40000000 // 4


@register
class VpcDriver(BlockDriver):
    format_name = "vpc"

    @classmethod
    def probe(cls, head: bytes, filename: str) -> int:
        return 100 if head[:8] == COOKIE else 0

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
        checksum = struct.unpack_from(">I", footer, 64)[0]
        zeroed = footer[:64] + b"\0\0\0\0" + footer[68:]
        if (~sum(zeroed)) & 0xFFFFFFFF != checksum:
            raise ImageOpenError("Incorrect header checksum")
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
        bat_offset = struct.unpack_from(">Q", dyn, 16)[0]
        entries, self.block_size = struct.unpack_from(">II", dyn, 28, )
        if not self.block_size or self.block_size % 512 or self.block_size & (self.block_size - 1):
            raise ImageOpenError(f"Invalid VPC image: block size {self.block_size}")
        if entries > MAX_BAT or entries * self.block_size < self.total or bat_offset > fsize:
            raise ImageOpenError("Invalid VPC image: block allocation table does not fit")
        raw = f.read(bat_offset, entries * 4)
        if len(raw) < entries * 4:
            raise ImageOpenError("Invalid VPC image: block allocation table past the end of the file")
        self.bat = struct.unpack(f">{entries}I", raw)
        self.bitmap_size = -(-(self.block_size // 512 // 8) // 512) * 512

    def size(self) -> int:
        return self.total

    def cluster_size(self) -> int | None:
        return self.block_size if self.disk_type == TYPE_DYNAMIC else None

    def _host(self, offset: int) -> tuple[int | None, int]:
        if self.disk_type == TYPE_FIXED:
            return offset, self.total - offset
        bs = self.block_size
        entry = self.bat[offset // bs]
        in_block = offset % bs
        if entry == 0xFFFFFFFF:
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
