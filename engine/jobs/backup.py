"""blockdev-backup / drive-backup: a point-in-time copy with copy-before-write.

Layer: engine.  At job start a cluster bitmap ``todo`` says what must reach the target (full: every
cluster; top: the source's own layer; bitmap/incremental: the user bitmap's dirty clusters; none:
nothing in the background).  A before-write hook on the source copies the *old* contents of any cluster
a guest write is about to change and that the target does not have yet (copy-before-write), so the
target ends up holding the disk as it was when the job started.  One lock orders the background copy
and the hook per job, so a cluster is copied once.

Bitmap modes (sync bitmap/incremental, or full/top with a bitmap): the user bitmap stops recording for
the job's duration and a successor records new writes; afterwards on-success keeps only the new writes
if the job succeeded (else restores the old bits plus new writes), always also drops copied clusters on
failure, never leaves the old bits and adds the new writes.
"""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from engine.bitmap import DirtyBitmap
from engine.block import block_status_above, is_allocated_above
from engine.driver import Status
from engine.jobs.job import Job, read_source, run_locked

if TYPE_CHECKING:
    from engine.daemon.graph import DaemonGraph
    from engine.pipeline import BlockNode

MAX_CHUNK = 1 << 20


class BackupJob(Job):
    job_type = "backup"

    def __init__(self, manager: Any, job_id: str, graph: "DaemonGraph", *, source: "BlockNode",
                 target: "BlockNode", sync: str, cluster_size: int, bitmap: DirtyBitmap | None = None,
                 bitmap_mode: str | None = None, compress: bool = False, on_source_error: str = "report",
                 on_target_error: str = "report", owned_target: bool = False, **kw: Any) -> None:
        super().__init__(manager, job_id, **kw)
        self.graph = graph
        self.source = source
        self.target = target
        self.sync = sync
        self.cs = cluster_size
        self.user_bitmap = bitmap
        self.bitmap_mode = bitmap_mode
        self.compress = compress
        self.on_source_error = on_source_error
        self.on_target_error = on_target_error
        self.owned_target = owned_target
        self.todo = DirtyBitmap(source.size(), cluster_size)
        self.copied = DirtyBitmap(source.size(), cluster_size)
        self.successor: DirtyBitmap | None = None
        self.lock = asyncio.Lock()
        self.finished = False
        self.reopened: list["BlockNode"] = []
        self._was_enabled = True

    # ------------------------------------------------------------------ setup / teardown
    def setup(self) -> None:
        self.graph.add_user(self.source.name, f"job:{self.id}", "block device is in use by block job: backup")
        self.graph.add_user(self.target.name, f"blk:{self.id}", "in use")  # written through a BlockBackend
        if self.target.driver.read_only:
            self.graph.reopen(self.target, False)
            self.reopened.append(self.target)
        if self.sync in ("full", "none"):
            self.todo.fill()
        bm = self.user_bitmap
        if bm is not None:
            if self.sync == "bitmap":
                for off, ln in bm.dirty_extents():
                    self.todo.set(off, ln)
            self.successor = DirtyBitmap(bm.size, bm.granularity)
            self.source.bitmaps.append(self.successor)
            self._was_enabled = bm.enabled
            bm.enabled = False
            bm.busy = True
        self.source.before_write.append(self._cbw)

    def clean(self) -> None:
        self.finished = True
        if self._cbw in self.source.before_write:
            self.source.before_write.remove(self._cbw)
        if self.successor is not None:  # by identity: DirtyBitmap's == compares contents
            self.source.bitmaps[:] = [b for b in self.source.bitmaps if b is not self.successor]
        if self.user_bitmap is not None:
            self.user_bitmap.enabled = self._was_enabled
            self.user_bitmap.busy = False
        self.graph.remove_user(self.source.name, f"job:{self.id}")
        self.graph.remove_user(self.target.name, f"blk:{self.id}")
        for n in self.reopened:
            if n.name in self.graph.nodes:
                try:
                    self.graph.reopen(n, True)
                except Exception:
                    pass
        if self.owned_target and self.target.name in self.graph.nodes and not self.graph.parents(self.target):
            self.graph._drop(self.target)

    # ------------------------------------------------------------------ bitmap outcome
    def _apply_bitmap(self, success: bool) -> None:
        bm, succ = self.user_bitmap, self.successor
        if bm is None or succ is None:
            return
        bm.busy = False  # the job hands the bitmap back before merging into it
        mode = self.bitmap_mode
        if mode == "on-success" and success:
            bm.clear()
        elif mode == "always" or (mode == "on-success" and success):
            for off, ln in self.copied.dirty_extents():
                end = min(off + ln, bm.size)
                g = bm.granularity
                lo = -(-off // g) * g
                hi = end if end == bm.size else end // g * g
                if hi > lo:
                    bm.reset(lo, hi - lo)
        bm.merge_from(succ)

    def commit(self) -> None:
        self._apply_bitmap(True)

    def abort(self) -> None:
        self._apply_bitmap(False)

    # ------------------------------------------------------------------ copying
    async def _locked(self, fn: Any, *args: Any) -> Any:
        return await run_locked(self.graph, fn, *args)

    async def _copy(self, off: int, n: int) -> None:
        """Copy [off, off+n) (cluster aligned, all in ``todo``) from source to target; caller holds lock."""
        data = await read_source(self.graph, self.source, off, n)
        try:
            if data is None:
                tst, tn = await self._locked(block_status_above, self.target.driver, off, n)
                if not (tst & Status.ZERO and tn >= n):
                    await self.target.write_zeroes(off, n)
            elif self.compress:
                for c in range(off, off + n, self.cs):
                    chunk = data[c - off:c - off + self.cs]
                    await self._locked(self.target.driver.write_compressed, c, chunk)
            else:
                await self.target.write(off, data)
        except Exception as exc:
            exc.job_stage = "write"  # type: ignore[attr-defined]
            raise
        self.todo.reset(off, n)
        self.copied.set(off, n)

    async def _cbw(self, kind: str, offset: int, length: int, data: bytes | None) -> None:
        """Before a guest write: copy the old contents of the clusters it touches that are still due."""
        if self.finished or self.cancelled or not length:
            return
        lo = offset // self.cs * self.cs
        hi = min(-(-(offset + length) // self.cs) * self.cs, self.source.size())
        async with self.lock:
            for off, n in list(self.todo.dirty_extents(lo, hi - lo)):
                if self.sync == "none":
                    self.total += n
                await self._copy(off, n)
                if self.sync == "none":
                    self.current += n

    async def _seed_top(self) -> None:
        src, size = self.source.driver, self.source.size()
        pos = 0
        while pos < size:
            alloc, n = await self._locked(is_allocated_above, src, src.backing, pos, size - pos)
            n = max(n, 1)
            if alloc:
                self.todo.set(pos, n)
            pos += n

    async def run(self) -> None:
        if self.sync == "top":
            await self._seed_top()
        if self.sync == "none":
            while not self.cancelled:
                await self.sleep_ns(1_000_000_000)
            return
        self.total = self.todo.count()
        pos = 0
        while True:
            await self.yield_now()
            async with self.lock:
                off = self.todo.next_dirty(pos)
                if off < 0 and pos:
                    pos = 0
                    off = self.todo.next_dirty(0)
                if off < 0:
                    break
                end = self.todo.next_clean(off, min(self.source.size(), off + max(MAX_CHUNK, self.cs)))
                if end < 0:
                    end = min(self.source.size(), off + max(MAX_CHUNK, self.cs))
                n = end - off
                try:
                    await self._copy(off, n)
                except Exception as exc:
                    self.chunk_failed(exc, self.on_source_error, self.on_target_error)
                    continue
            self.current += n
            pos = end
            await self.ratelimit(n)
        await self._locked(self.target.driver.flush)
