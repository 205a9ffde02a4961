"""The mirror machinery: blockdev-mirror / drive-mirror and active commit (``top`` is the active layer).

Layer: engine.  A dirty bitmap on the source records every guest write from the moment the job is
created.  The job seeds it (sync full: everything allocated in the chain or not known to be zero on the
target; top: the source's own layer; none: nothing; active commit: everything above base), then copies
dirty chunks to the target — clearing the bits first, so a write that lands during the copy dirties them
again — until the bitmap is empty: READY.  It keeps copying new writes (``copy-mode=write-blocking``
also copies each guest write synchronously) until ``complete``: the source is drained, the last bits
copied, and every user of the source (or ``replaces``) is switched to the target.  A soft cancel after
READY ends the job without the switch (COMPLETED), a forced one cancels it (CANCELLED).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from engine.bitmap import DirtyBitmap
from engine.block import is_allocated_above
from engine.errors import BlockError
from engine.jobs.job import Job, read_source, run_locked

if TYPE_CHECKING:
    from engine.daemon.graph import DaemonGraph
    from engine.pipeline import BlockNode

MAX_CHUNK = 1 << 20
IDLE_NS = 100_000_000  # how long a converged job waits for new writes before looking again


def replace_node(graph: "DaemonGraph", old: "BlockNode", new: "BlockNode") -> None:
    """bdrv_replace_node: every parent that uses ``old`` as a child now uses ``new``."""
    for parent, role in graph.parents(old):
        if parent is new:
            continue
        if role == "file":
            parent.driver.file = new.driver
        else:
            parent.driver.backing = new.driver
    for listener in getattr(graph, "replace_listeners", []):
        listener(old, new)


class MirrorJob(Job):
    job_type = "mirror"

    def __init__(self, manager: Any, job_id: str, graph: "DaemonGraph", *, source: "BlockNode",
                 target: "BlockNode", sync: str, granularity: int, buf_size: int = 16 << 20,
                 on_source_error: str = "report", on_target_error: str = "report",
                 replaces: "BlockNode | None" = None, copy_mode: str = "background",
                 base: "BlockNode | None" = None, intermediates: list["BlockNode"] | None = None,
                 set_backing: Any = None, zero_target: bool = True, **kw: Any) -> None:
        super().__init__(manager, job_id, **kw)
        self.graph = graph
        self.source = source
        self.target = target
        self.sync = sync
        self.granularity = granularity
        self.buf_size = buf_size or (16 << 20)
        self.on_source_error = on_source_error
        self.on_target_error = on_target_error
        self.replaces = replaces
        self.copy_mode = copy_mode
        self.base = base  # active commit: the node everything above it is copied into
        self.intermediates = intermediates or []
        self.set_backing = set_backing  # drive-mirror sync=top: the target backs onto the source's backing
        self.zero_target = zero_target
        self.bitmap: DirtyBitmap | None = None
        self.reopened: list["BlockNode"] = []
        self.drained = False
        self.pivoted = False
        self.nodes = [source, target, *self.intermediates]
        if replaces is not None and replaces not in self.nodes:
            self.nodes.append(replaces)

    # ------------------------------------------------------------------ setup / teardown
    def setup(self) -> None:
        key = f"job:{self.id}"
        for n in self.nodes:
            if n is self.target and self.base is None:  # the job writes it through a BlockBackend
                self.graph.add_user(n.name, f"blk:{self.id}", "in use")
            else:
                self.graph.add_user(n.name, key, f"block device is in use by block job: {self.job_type}")
        if self.target.driver.read_only:
            self.graph.reopen(self.target, False)
            self.reopened.append(self.target)
        self.bitmap = DirtyBitmap(self.source.size(), self.granularity)
        self.source.bitmaps.append(self.bitmap)
        self.source.after_write.append(self._on_guest_write)

    async def _on_guest_write(self, kind: str, offset: int, length: int, data: bytes | None) -> None:
        """Kick a converged job; in write-blocking mode copy the write to the target right away."""
        if self.copy_mode == "write-blocking" and self.ready_flag and self.bitmap is not None \
                and not self.cancelled:
            g = self.granularity
            if kind == "write" and data is not None:
                await self.target.write(offset, data)
            elif kind in ("zero", "discard"):
                await self.target.write_zeroes(offset, length)
            lo = -(-offset // g) * g
            hi = (offset + length) // g * g
            if offset + length >= self.source.size():
                hi = self.source.size()
            if hi > lo:
                self.bitmap.reset(lo, hi - lo)
        self._kick()

    def clean(self) -> None:
        if self.bitmap is not None:  # by identity: DirtyBitmap's == compares contents
            self.source.bitmaps[:] = [b for b in self.source.bitmaps if b is not self.bitmap]
        if self._on_guest_write in self.source.after_write:
            self.source.after_write.remove(self._on_guest_write)
        if self.drained:
            self.source.drain_end()
            self.drained = False
        for n in self.nodes:
            self.graph.remove_user(n.name, f"job:{self.id}")
            self.graph.remove_user(n.name, f"blk:{self.id}")
        for n in self.reopened:
            if n.name in self.graph.nodes and not self.pivoted:
                try:
                    self.graph.reopen(n, True)
                except Exception:
                    pass

    def soft_cancel_is_forced(self, force: bool) -> bool:
        return force or not self.ready_flag

    def on_complete(self) -> None:
        """Accepted once READY (the verb table already checked the state)."""

    # ------------------------------------------------------------------ the copy loop
    async def _locked(self, fn: Any, *args: Any) -> Any:
        return await run_locked(self.graph, fn, *args)

    async def _seed(self) -> None:
        """mirror_dirty_init: mark what the sync mode says must be copied.  With ``zero_target`` (sync
        full into an existing target) the target is first zeroed when it can unmap, or everything is
        marked dirty when it cannot (QEMU's bdrv_can_write_zeroes_with_unmap needs discard=unmap)."""
        bm = self.bitmap
        assert bm is not None
        src, size = self.source.driver, self.source.size()
        if self.sync == "none":
            return
        if self.sync == "full" and self.base is None and self.zero_target:
            if self.target.discard_mode != "unmap":
                bm.fill()
                return
            await self.target.write_zeroes(0, size, True)
        pos = 0
        while pos < size:
            await self.yield_now()
            n = min(size - pos, 1 << 30)
            if self.base is not None or self.sync == "top":
                stop = self.base.driver if self.base is not None else src.backing
            else:
                stop = None
            alloc, n = await self._locked(is_allocated_above, src, stop, pos, n)
            n = max(n, 1)
            if alloc:
                bm.set(pos, n)
            pos += n

    async def _copy_chunk(self, off: int, n: int) -> None:
        bm = self.bitmap
        assert bm is not None
        bm.reset(off, n)
        try:
            data = await read_source(self.graph, self.source, off, n)
            try:
                if data is None:
                    await self.target.write_zeroes(off, n)
                else:
                    await self.target.write(off, data)
            except Exception as exc:
                exc.job_stage = "write"  # type: ignore[attr-defined]
                raise
        except Exception:
            bm.set(off, n)
            raise
        self.current += n

    async def run(self) -> None:
        bm = self.bitmap
        assert bm is not None
        src, tgt = self.source, self.target
        if self.base is not None and tgt.size() < src.size():
            await self._locked(tgt.driver.truncate, src.size())
        if tgt.size() != src.size():
            raise BlockError("Source and target image have different sizes")
        await self._seed()
        chunk = max(MAX_CHUNK, self.granularity)
        size = src.size()
        pos = 0
        while True:
            await self.pause_point()
            remaining = bm.count()
            self.total = self.current + min(remaining, size)
            if remaining == 0:
                if not self.ready_flag:
                    await self._locked(tgt.driver.flush)
                    self.set_ready()
                if self.should_complete or self.cancelled:
                    await src.drain_begin()
                    if bm.count() == 0:
                        self.drained = True
                        return
                    src.drain_end()
                    continue
                await self.sleep_ns(IDLE_NS)
                continue
            off = bm.next_dirty(pos)
            if off < 0:
                pos = 0
                off = bm.next_dirty(0)
                if off < 0:
                    continue
            end = bm.next_clean(off, min(size, off + chunk))
            if end < 0:
                end = min(size, off + chunk)
            n = end - off
            try:
                await self._copy_chunk(off, n)
            except Exception as exc:
                self.chunk_failed(exc, self.on_source_error, self.on_target_error)
                continue
            pos = off + n if off + n < size else 0
            await self.ratelimit(n)

    # ------------------------------------------------------------------ completion
    def commit(self) -> None:
        if not self.should_complete or self.cancelled:
            return
        old = self.replaces or self.source
        if self.set_backing is not None:
            self.target.driver.backing = self.set_backing
        replace_node(self.graph, old, self.target)
        self.pivoted = True
        if self.base is not None:
            for n in self.intermediates:
                self.graph.remove_user(n.name, f"job:{self.id}")
                if n.name in self.graph.nodes and not n.owned and not self.graph.parents(n) \
                        and not self.graph.users.get(n.name):
                    self.graph._drop(n)


class ActiveCommitJob(MirrorJob):
    """block-commit with ``top`` the active layer: mirror into base, then base replaces top."""

    job_type = "commit"
