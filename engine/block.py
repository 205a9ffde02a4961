"""Generic block-layer logic above the drivers: QEMU's io.c block-status rules and chain helpers.

Layer: engine.  ``block_status`` refines a driver's answer the way bdrv_co_block_status does: a RAW
answer is passed down to the file; DATA or ZERO means ALLOCATED; an unallocated range with no backing
file (or past the backing file's end) reads as ZERO; RECURSE asks the protocol layer whether the data
is really a hole.
"""
from __future__ import annotations

from engine.driver import BlockDriver, Extent, Status


def block_status(node: BlockDriver, offset: int, length: int) -> Extent:
    """Status of the run starting at ``offset`` within ``node`` alone (want_zero semantics)."""
    size = node.size()
    if offset >= size:
        return Extent(Status.EOF, 0, 0, None)
    length = min(length, size - offset)
    if node.is_filter and node.file is not None:
        return block_status(node.file, offset, length)
    ext = node.block_status(offset, length)
    status, pnum, host, file = ext.status, max(1, min(ext.length, length)), ext.offset, ext.node
    if status & Status.RAW:
        assert file is not None
        inner = file.block_status(host, pnum)
        status = inner.status & ~Status.EOF
        pnum = inner.length
        host = inner.offset
        file = inner.node
    if status & (Status.DATA | Status.ZERO):
        status |= Status.ALLOCATED
    elif node.supports_backing:
        backing = node.backing
        if backing is None:
            status |= Status.ZERO
        elif offset >= backing.size():
            status |= Status.ZERO
    if (status & Status.RECURSE and file is not None and file is not node and status & Status.DATA
            and not status & Status.ZERO and status & Status.OFFSET_VALID):
        inner = file.block_status(host, pnum)
        if inner.status & Status.EOF and (inner.length == 0 or inner.status & Status.ZERO):
            status |= Status.ZERO
        else:
            pnum = inner.length
            status |= inner.status & Status.ZERO
    status &= ~Status.RECURSE
    return Extent(status, pnum, host, file)


def chain_block_status(node: BlockDriver, offset: int, length: int) -> tuple[Extent, int]:
    """qemu-img map's get_block_status: walk down the chain until a layer answers DATA or ZERO.

    Returns the extent (its flags with ALLOCATED only if some layer holds the range) and the depth of
    the layer that answered."""
    depth = 0
    cur = node
    while True:
        ext = block_status(cur, offset, length)
        length = ext.length
        if ext.status & (Status.ZERO | Status.DATA):
            return ext, depth
        if cur.backing is None:
            return Extent(Status(0), length, 0, None), depth
        cur = cur.backing
        depth += 1


def is_zero_above(node: BlockDriver, offset: int, length: int) -> bool:
    """Whether the whole range reads as zeros according to block status alone (QEMU's qcow2 is_zero)."""
    length = min(length, max(0, node.size() - offset))
    while length > 0:
        ext, _ = chain_block_status(node, offset, length)
        if not ext.status & Status.ZERO or ext.length <= 0:
            return False
        offset += ext.length
        length -= ext.length
    return True


def chain(node: BlockDriver) -> list[BlockDriver]:
    """The node and its backing images, top first."""
    out = []
    cur: BlockDriver | None = node
    while cur is not None:
        out.append(cur)
        cur = cur.backing
    return out


def is_allocated_above(top: BlockDriver, base: BlockDriver | None, offset: int, length: int) -> tuple[bool, int]:
    """Whether [offset, offset+n) is allocated in some layer from ``top`` down to (excluding) ``base``;
    returns (allocated, n)."""
    n = length
    cur: BlockDriver | None = top
    while cur is not None and cur is not base:
        if offset >= cur.size():
            cur = cur.backing
            continue
        ext = block_status(cur, offset, n)
        if ext.status & Status.ALLOCATED:
            return True, ext.length
        n = min(n, ext.length)
        cur = cur.backing
    return False, n


def node_status(node: BlockDriver, offset: int, length: int) -> tuple[Status, int]:
    """bdrv_co_block_status for one node: flags (EOF added when the run reaches the node's end), pnum.

    pnum is 0 (with EOF) when ``offset`` is at or past the node's end."""
    size = node.size()
    if offset >= size:
        return Status.EOF, 0
    length = min(length, size - offset)
    ext = block_status(node, offset, length)
    st = Status(ext.status) & ~Status.EOF
    pnum = max(1, min(ext.length, length))
    if offset + pnum == size:
        st |= Status.EOF
    return st, pnum


def block_status_above(top: BlockDriver, offset: int, length: int) -> tuple[Status, int]:
    """bdrv_block_status_above(top, NULL, ...) with want_zero: status of the whole chain at ``offset``."""
    st, pnum = node_status(top, offset, length)
    if pnum == 0 or st & Status.ALLOCATED:
        return st, pnum
    eof = offset + pnum if st & Status.EOF else None
    length = pnum
    p = top.backing
    while p is not None:
        st, pnum = node_status(p, offset, length)
        if pnum == 0:
            # the layer is short: zeros beyond its end behave as allocated there
            pnum = length
            st = Status.ZERO | Status.ALLOCATED
            break
        if st & Status.ALLOCATED:
            st &= ~Status.EOF
            break
        length = pnum
        p = p.backing
    if offset + pnum == eof:
        st |= Status.EOF
    return st, pnum
