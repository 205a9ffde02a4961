"""The ``vdi`` format (VirtualBox), read side: static and dynamic images as qemu-img 7.2 makes them.

Layer: engine.  Little-endian header: 64 bytes of text, signature 0xBEDA107F at byte 64, version 1.1,
then the v1.1 header (image type, block map offset, data offset, sector size, disk size, 1 MiB blocks).
The block map holds one u32 per block: the block's index in the data area (data at
``offset_data + index * block_size``), 0xFFFFFFFF for unallocated, 0xFFFFFFFE for discarded (zero).
Unallocated and discarded blocks read as zeros and report ZERO in block status, as QEMU's vdi driver
does; allocated blocks report DATA with their host offset (static images let the file say where it
has holes, as QEMU's driver does).
Writing VDI (convert -O vdi) is not supported yet.
"""
from __future__ import annotations

import struct
from typing import Any

from engine.driver import BlockDriver, Extent, Status, read_mapped, register
from engine.errors import ImageOpenError

SIGNATURE = 0xBEDA107F
VERSION_1_1 = 0x00010001
UNALLOCATED = 0xFFFFFFFF
DISCARDED = 0xFFFFFFFE
MAX_BLOCKS = 0x3FFFFFFF  # QEMU's VDI_BLOCKS_IN_IMAGE_MAX


@register
class VdiDriver(BlockDriver):
    format_name = "vdi"

    @classmethod
    def probe(cls, head: bytes, filename: str) -> int:
        if len(head) >= 68 and struct.unpack_from("<I", head, 64)[0] == SIGNATURE:
            return 100
        return 0

    def open(self, options: dict[str, Any]) -> None:
        assert self.file is not None
        head = self.file.read(0, 512)
        if len(head) < 400 or struct.unpack_from("<I", head, 64)[0] != SIGNATURE:
            raise ImageOpenError("Image not in VDI format (bad signature)")
        version = struct.unpack_from("<I", head, 68)[0]
        if version != VERSION_1_1:
            raise ImageOpenError(f"unsupported VDI image (version {version >> 16}.{version & 0xFFFF})",
                                 errno=95)
        (self.header_size, self.image_type, self.flags) = struct.unpack_from("<III", head, 72)
        self.offset_bmap, self.offset_data = struct.unpack_from("<II", head, 340)
        sector_size = struct.unpack_from("<I", head, 360)[0]
        (self.disk_size, self.block_size, block_extra, self.blocks_in_image,
         self.blocks_allocated) = struct.unpack_from("<QIIII", head, 368)
        link_uuid, parent_uuid = head[424:440], head[440:456]
        if self.image_type not in (1, 2):
            raise ImageOpenError(f"unsupported VDI image (image type {self.image_type})", errno=95)
        if sector_size != 512:
            raise ImageOpenError(f"unsupported VDI image (sector size {sector_size} is not 512)", errno=95)
        if self.block_size != 1 << 20:
            raise ImageOpenError(f"unsupported VDI image (block size {self.block_size} is not 1048576)",
                                 errno=95)
        if block_extra:
            raise ImageOpenError(f"unsupported VDI image (block extra {block_extra})", errno=95)
        if self.offset_bmap % 512 or self.offset_data % 512:
            raise ImageOpenError("unsupported VDI image (unaligned block map or data offset)", errno=95)
        if self.blocks_in_image > MAX_BLOCKS or \
                self.disk_size > self.blocks_in_image * self.block_size:
            raise ImageOpenError(f"unsupported VDI image (disk size {self.disk_size}, image bitmap has room "
                                 f"for {self.blocks_in_image})", errno=95)
        if any(link_uuid):
            raise ImageOpenError("unsupported VDI image (non-NULL link UUID)", errno=95)
        if any(parent_uuid):
            raise ImageOpenError("unsupported VDI image (non-NULL parent UUID)", errno=95)
        raw = self.file.read(self.offset_bmap, self.blocks_in_image * 4)
        if len(raw) < self.blocks_in_image * 4:
            raise ImageOpenError("Could not read VDI block map: the file is too short")
        self.bmap = struct.unpack(f"<{self.blocks_in_image}I", raw)
        for entry in self.bmap:
            if entry < DISCARDED and entry >= self.blocks_in_image:
                raise ImageOpenError(f"VDI block map entry {entry:#x} out of range")

    def size(self) -> int:
        return self.disk_size

    def cluster_size(self) -> int | None:
        return self.block_size

    def _host(self, offset: int) -> tuple[int | None, int]:
        """(host offset or None for zeros, bytes left in this block)."""
        bs = self.block_size
        entry = self.bmap[offset // bs]
        in_block = offset % bs
        left = bs - in_block
        if entry >= DISCARDED:
            return None, left
        return self.offset_data + entry * bs + in_block, left

    def read(self, offset: int, length: int) -> bytes:
        assert self.file is not None
        return read_mapped(self.file, self._host, offset, length)

    def block_status(self, offset: int, length: int) -> Extent:
        host, left = self._host(offset)
        n = min(left, length)
        if host is None:
            return Extent(Status.ZERO, n, 0, self.file)
        recurse = Status.RECURSE if self.image_type == 2 else Status(0)  # static images: ask the file
        return Extent(Status.DATA | Status.OFFSET_VALID | recurse, n, host, self.file)
