"""The ``vdi`` format (VirtualBox): static and dynamic images, read, written and created as qemu-img 7.2 does.

Layer: engine (imports engine.driver, engine.errors, engine.units and, to create, engine.formats.file).
Little-endian header: 64 bytes of text, signature 0xBEDA107F at byte 64, version 1.1, then the v1.1
header (image type, block map offset, data offset, sector size, disk size, 1 MiB blocks).  The block map
holds one u32 per block: the block's index in the data area (data at ``offset_data + index * block_size``),
0xFFFFFFFF for unallocated, 0xFFFFFFFE for discarded (zero).  Unallocated and discarded blocks read as
zeros and report ZERO in block status, as QEMU's vdi driver does; allocated blocks report DATA with their
host offset (static images let the file say where it has holes, as QEMU's driver does).

Writing follows QEMU's block/vdi.c: an allocated block is overwritten in place; an unallocated one gets
the next index of the data area (``blocks_allocated``, so the file grows by whole blocks at its end) and is
written whole, the new data padded with zeros.  Invariant (crash consistency): data before metadata.  A
request first writes every block's data, then (after a flush, a barrier that cache=unsafe turns into a
no-op) the header with the new ``blocks_allocated``, then the block-map sectors it changed.  The header
goes first, as in QEMU: a crash between the two leaves a counted but unmapped block (a leak qemu-img check
reports), never a mapped block that the next allocation would hand out again.  ``write_zeroes`` keeps
unallocated blocks unallocated and zeroes allocated ones in place (QEMU writes zero buffers, allocating;
both read the same).  ``create`` writes qemu-img's layout: a 512-byte header (header_size 384), the map at
512, data at 512 + the map rounded up to 512, random UUIDs stored as QEMU stores them; ``static=on``
gives image type 2, every block allocated in order.

``check_image`` is qemu-img check's vdi_co_check (map entries past the data area, blocks mapped twice, a
wrong ``blocks_allocated``; no repair).  An open with the ``check`` option keeps map entries past the
data area for it to report, where any other open refuses them.
"""
from __future__ import annotations

import struct
import uuid
from typing import TYPE_CHECKING, Any

from engine.driver import BlockDriver, Extent, Status, leftover_create_options, read_mapped, register
from engine.errors import CorruptImage, ImageOpenError, InvalidArgument, NotSupported, OutOfBounds
from engine.units import round_up

if TYPE_CHECKING:
    from engine.formats.qcow2_check import CheckResult
    from ipc.executor import Executor

SIGNATURE = 0xBEDA107F
VERSION_1_1 = 0x00010001
UNALLOCATED = 0xFFFFFFFF
DISCARDED = 0xFFFFFFFE
MAX_BLOCKS = 0x3FFFFFFF  # QEMU's VDI_BLOCKS_IN_IMAGE_MAX
TYPE_DYNAMIC, TYPE_STATIC = 1, 2
HEADER_TEXT = b"<<< QEMU VM Virtual Disk Image >>>\n"
HEADER_SIZE = 0x180  # the v1.1 header's size as QEMU records it (the structure on disk is 512 bytes)
OFFSET_BMAP = 512
DEFAULT_BLOCK_SIZE = 1 << 20
#: the largest disk qemu-img 7.2 creates: 0x1fffff80 blocks of 1 MiB (its error message says so)
DISK_SIZE_MAX = 0x1FFFFF80 * DEFAULT_BLOCK_SIZE
_OFF_BLOCKS_ALLOCATED = 388


def vdi_header(size: int, static: bool) -> tuple[bytes, list[int]]:
    """The 512-byte header and the block map qemu-img 7.2 writes for a ``size``-byte image (``size`` a
    multiple of 512).  Pure; the UUIDs are random (version 4, fields little-endian as QEMU stores them)."""
    blocks = -(-size // DEFAULT_BLOCK_SIZE)
    bmap_bytes = round_up(blocks * 4, 512)
    h = bytearray(512)
    h[:len(HEADER_TEXT)] = HEADER_TEXT
    struct.pack_into("<IIIII", h, 64, SIGNATURE, VERSION_1_1, HEADER_SIZE,
                     TYPE_STATIC if static else TYPE_DYNAMIC, 0)
    struct.pack_into("<II", h, 340, OFFSET_BMAP, OFFSET_BMAP + bmap_bytes)
    struct.pack_into("<I", h, 360, 512)
    struct.pack_into("<QIIII", h, 368, size, DEFAULT_BLOCK_SIZE, 0, blocks, blocks if static else 0)
    h[392:408] = uuid.uuid4().bytes_le  # uuid_image
    h[408:424] = uuid.uuid4().bytes_le  # uuid_last_snap; link and parent stay null
    bmap = list(range(blocks)) if static else [UNALLOCATED] * blocks
    return bytes(h), bmap


@register
class VdiDriver(BlockDriver):
    format_name = "vdi"

    @classmethod
    def probe(cls, head: bytes, filename: str) -> int:
        if len(head) >= 68 and struct.unpack_from("<I", head, 64)[0] == SIGNATURE:
            return 100
        return 0

    @classmethod
    def create(cls, filename: str, size: int | None, executor: Executor, options: dict[str, Any]) -> None:
        """``qemu-img create -f vdi [-o static=on]``: header, block map and (static) the data area as a
        sparse file of the full size.  ``preallocation`` off/falloc/full is accepted and, as with qemu-img
        (it reaches only the empty protocol file), changes nothing.  Raises InvalidArgument (unknown
        option, bad value, no size), NotSupported (preallocation=metadata, size above qemu's limit) and
        ImageOpenError (the file cannot be created)."""
        from engine.formats.file import FileDriver

        opts = dict(options)
        static = bool(opts.pop("static", False))
        check_protocol_prealloc(opts.pop("preallocation", "off"))
        leftover_create_options(opts, size)
        size = round_up(size, 512)
        if size > DISK_SIZE_MAX:
            raise NotSupported(f"Unsupported VDI image size (size is {size:#x}, max supported is "
                               f"{DISK_SIZE_MAX:#x})")
        header, bmap = vdi_header(size, static)
        offset_data = struct.unpack_from("<I", header, 344)[0]
        raw_map = struct.pack(f"<{len(bmap)}I", *bmap)
        raw_map += bytes(offset_data - OFFSET_BMAP - len(raw_map))
        f = FileDriver(filename, executor, read_only=False, create=True)
        try:
            f.write(0, header + raw_map)
            if static:
                f.truncate(offset_data + len(bmap) * DEFAULT_BLOCK_SIZE)
        finally:
            f.close()

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
        self.bmap = list(struct.unpack(f"<{self.blocks_in_image}I", raw))
        # ``check`` (qemu-img check's BDRV_O_CHECK open): keep a map with entries out of range, which
        # check_image reports, as QEMU (whose open never looks at the entries) does
        checking = bool(options.get("check"))
        top = -1
        for entry in self.bmap:
            if entry < DISCARDED:
                if entry >= self.blocks_in_image:
                    if checking:
                        continue
                    raise ImageOpenError(f"VDI block map entry {entry:#x} out of range")
                top = max(top, entry)
        self._header = bytearray(head)
        # the next block index to hand out: QEMU trusts blocks_allocated; a header that undercounts would
        # make it give out a block already mapped, so never go below the highest index in use
        self._next_index = max(self.blocks_allocated, top + 1)

    def size(self) -> int:
        return self.disk_size

    # --- checking -----------------------------------------------------------------------------------
    def check_image(self, fix: int) -> CheckResult:
        """``parablock check``: QEMU 7.2's vdi_co_check.  Every allocated map entry must name a block of
        the data area (an index below ``blocks_in_image``: "block index N too large"), no two entries the
        same block ("block index N also used by N", QEMU prints the index twice), and the entries in
        range must number ``blocks_allocated`` ("allocated blocks mismatch").  Each finding is one
        corruption; the messages go to stderr unprefixed, as QEMU fprintf's them.  There is no repair:
        any ``fix`` raises NotSupported (qemu-img's "This image format does not support checks", 63).
        Pure apart from what open read; nothing is written."""
        from engine.formats.qcow2_check import CheckResult

        if fix:
            raise NotSupported("This image format does not support checks")
        return CheckResult(**check_block_map(self.bmap, self.blocks_in_image, self.blocks_allocated))

    @property
    def preallocated(self) -> bool:
        """Every block has its place already (static images): convert writes only the non-zero runs."""
        return self.image_type == 2

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

    # --- writing ------------------------------------------------------------------------------------
    def _check_request(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.disk_size:
            raise OutOfBounds(f"Request [{offset}, {offset + length}) is beyond the end of the VDI image "
                              f"({self.disk_size} bytes)")

    def write(self, offset: int, data: bytes) -> None:
        """Write ``data`` at guest ``offset``: in place in allocated blocks, whole new blocks at the end of
        the data area for the others, then the metadata (see the module docstring for the order).

        Raises ReadOnlyError, OutOfBounds (past the disk size), CorruptImage (no block index left: the
        map and blocks_allocated disagree) and the file's BlockError/OSError; on an error no metadata has
        changed (blocks already overwritten in place keep their new bytes)."""
        self.check_writable()
        self._check_request(offset, len(data))
        assert self.file is not None
        bs = self.block_size
        view = memoryview(data)
        new: list[tuple[int, int]] = []  # (guest block, index in the data area) allocated by this request
        pos = 0
        while pos < len(data):
            block, in_block = divmod(offset + pos, bs)
            n = min(bs - in_block, len(data) - pos)
            entry = self.bmap[block]
            if entry < DISCARDED:
                self.file.write(self.offset_data + entry * bs + in_block, bytes(view[pos:pos + n]))
            else:
                index = self._next_index + len(new)
                if index >= self.blocks_in_image:
                    raise CorruptImage(f"VDI image has no free block left for block {block} "
                                       f"(blocks_allocated {self.blocks_allocated}, {self.blocks_in_image} "
                                       "blocks in the image)")
                if n == bs:
                    payload = bytes(view[pos:pos + n])
                else:  # unallocated and discarded blocks read as zeros: that is the rest of the block
                    buf = bytearray(bs)
                    buf[in_block:in_block + n] = view[pos:pos + n]
                    payload = bytes(buf)
                self.file.write(self.offset_data + index * bs, payload)
                new.append((block, index))
            pos += n
        if new:
            self._link(new)

    def _link(self, new: list[tuple[int, int]]) -> None:
        """Record blocks whose data is written: barrier, header (blocks_allocated), then the map sectors."""
        assert self.file is not None
        self.file.flush()
        self._next_index += len(new)
        self.blocks_allocated = self._next_index
        struct.pack_into("<I", self._header, _OFF_BLOCKS_ALLOCATED, self.blocks_allocated)
        self.file.write(0, bytes(self._header))
        for block, index in new:
            self.bmap[block] = index
        first = min(b for b, _ in new) // 128  # 128 u32 entries per 512-byte sector
        last = max(b for b, _ in new) // 128
        lo, hi = first * 128, min((last + 1) * 128, self.blocks_in_image)
        raw = struct.pack(f"<{hi - lo}I", *self.bmap[lo:hi])
        self.file.write(self.offset_bmap + lo * 4, raw)

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        """Zero [offset, offset+length): unallocated and discarded blocks already read as zeros and stay
        so; allocated ones are zeroed in place (whole or partly).  Raises ReadOnlyError, OutOfBounds and
        the file's errors."""
        self.check_writable()
        self._check_request(offset, length)
        assert self.file is not None
        pos, end = offset, offset + length
        while pos < end:
            host, left = self._host(pos)
            n = min(left, end - pos)
            if host is not None:
                self.file.write_zeroes(host, n, unmap)
            pos += n


def check_block_map(bmap: list[int], blocks_in_image: int, blocks_allocated: int) -> dict[str, Any]:
    """The findings of QEMU 7.2's vdi check on a block map (pure): ``{"corruptions": n, "messages":
    [...]}``, the messages in QEMU's order and words (without a program-name prefix)."""
    messages: list[str] = []
    corruptions = 0
    in_use: set[int] = set()
    counted = 0
    for block, entry in enumerate(bmap):
        if entry >= DISCARDED:  # unallocated or discarded
            continue
        if entry < blocks_in_image:
            counted += 1
            if entry in in_use:
                messages.append(f"ERROR: block index {entry} also used by {entry}")
                corruptions += 1
            else:
                in_use.add(entry)
        else:
            messages.append(f"ERROR: block index {block} too large, is {entry}")
            corruptions += 1
    if counted != blocks_allocated:
        messages.append(f"ERROR: allocated blocks mismatch, is {counted}, should be {blocks_allocated}")
        corruptions += 1
    return {"corruptions": corruptions, "messages": messages}


def check_protocol_prealloc(value: Any) -> None:
    """The preallocation option of vdi and vpc in qemu-img 7.2: only the (empty) protocol file sees it, so
    off, falloc and full are accepted and change nothing.  Raises NotSupported (metadata) and
    InvalidArgument (anything else)."""
    mode = str(value)
    if mode == "metadata":
        raise NotSupported("Unsupported preallocation mode: metadata")
    if mode not in ("off", "falloc", "full"):
        raise InvalidArgument(f"invalid parameter value: {mode}")
