"""Content digests of images: what ``batch --verify`` compares between a source and its copy.

Layer: engine.  The digest covers the guest-visible bytes only, so a raw file, a compressed qcow2 and a
vmdk holding the same disk have the same digest: SHA-256 over the virtual size (8 bytes, little-endian)
followed by the BLAKE2b-256 digest of every 4 MiB window.  Windows are planned like convert's (block
status through the whole chain): a window that is all zeros by block status is hashed here from a
table, without reading anything; any other window is gathered into a shared-memory slot by a worker,
which hashes it there.  Data never crosses the coordinator.
"""
from __future__ import annotations

import hashlib
import struct
from collections import deque
from typing import Callable

from engine.convert import Mover, SourcePlanner, fill_read_pieces, wire_pieces
from engine.driver import BlockDriver

WINDOW = 4 << 20

_ZERO_DIGESTS: dict[int, bytes] = {}


def _zero_digest(n: int) -> bytes:
    d = _ZERO_DIGESTS.get(n)
    if d is None:
        d = _ZERO_DIGESTS[n] = hashlib.blake2b(bytes(n), digest_size=32).digest()
    return d


def content_digest(node: BlockDriver, mover: Mover, progress: Callable[[int], None] | None = None,
                   max_inflight: int = 4) -> str:
    """``sha256:HEX`` of ``node``'s guest content (through its backing chain).  ``progress(n)`` is told
    of every window hashed."""
    size = node.size()
    window = min(WINDOW, mover.slot_size)
    planner = SourcePlanner([node])
    total = hashlib.sha256(struct.pack("<Q", size))
    pending: deque = deque()  # (future or digest, slot or None, length) in window order

    def reap() -> None:
        item, slot, n = pending.popleft()
        try:
            d = item if isinstance(item, bytes) else bytes(item.result())
        finally:
            if slot is not None:
                mover.slots.release(slot)
        total.update(d)
        if progress is not None:
            progress(n)

    try:
        pos = 0
        while pos < size:
            n = min(window, size - pos)
            pieces = planner.pieces(pos, n)
            if all(p.kind == "zero" for p in pieces):
                pending.append((_zero_digest(n), None, n))
            else:
                slot = mover.slots.lease()
                try:
                    fill_read_pieces(pieces, pos, mover.slots.slot(slot))
                    fut = mover.submit("gather_digest", [slot, wire_pieces(pieces, pos), n])
                except BaseException:
                    mover.slots.release(slot)
                    raise
                pending.append((fut, slot, n))
            while len(pending) > max_inflight or (pending and isinstance(pending[0][0], bytes)):
                reap()
            pos += n
        while pending:
            reap()
    except BaseException:
        for item, slot, _n in pending:
            if slot is not None:
                try:
                    if not isinstance(item, bytes):
                        item.result(60)
                except BaseException:
                    pass
                mover.slots.release(slot)
        raise
    return "sha256:" + total.hexdigest()
