"""block-commit (intermediate: ``top`` below the active layer) and block-stream, on the job runtime.

Layer: engine.  Both copy 512 KiB chunks through the request pipeline of the graph's nodes (so the bytes
move through the worker pool, and tracked requests and throttling see them), honour ``speed`` and the
on-error policy, and finish by rewriting one image header's backing-file string and relinking the
in-memory chain:

* commit: every range allocated in top..(above base) is copied into base; then the overlay of ``top``
  gets ``backing-file`` (or base's filename) and base's format in its header and backs onto base.  If
  that header write fails, the job fails and the chain is left exactly as it was.
* stream: every range of ``device`` not allocated in it but allocated in the chain above base is copied
  into ``device``; then device's header names base (or nothing).
Intermediate nodes leave the chain; implicit ones (opened from headers) are closed.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from engine.block import block_status, is_allocated_above
from engine.driver import Status
from engine.jobs.job import Job, JobCancelled, run_locked

if TYPE_CHECKING:
    from engine.daemon.graph import DaemonGraph
    from engine.pipeline import BlockNode

CHUNK = 512 << 10


class ChainJob(Job):
    """What commit and stream share: blockers on the nodes involved, base/device reopened read-write
    for the duration, the chunk loop with error policy, and the final relink."""

    def __init__(self, manager: Any, job_id: str, graph: "DaemonGraph", nodes: list["BlockNode"], *,
                 on_error: str = "report", **kw: Any) -> None:
        super().__init__(manager, job_id, **kw)
        self.graph = graph
        self.nodes = nodes
        self.on_error = on_error
        self.reopened: list["BlockNode"] = []
        for n in nodes:
            graph.add_user(n.name, f"job:{job_id}", f"block device is in use by block job: {self.job_type}")

    def setup(self) -> None:
        """Reopen the node the job writes into read-write (undone in ``clean``).  On failure the caller
        calls ``clean`` and reports the error; no job was started."""
        for node in getattr(self, "writable", []):
            if node.driver.read_only:
                self.graph.reopen(node, False)
                self.reopened.append(node)

    async def locked(self, fn: Any, *args: Any) -> Any:
        return await run_locked(self.graph, fn, *args)

    async def copy_loop(self, size: int, want: Any, copy: Any) -> None:
        """For each chunk: ``want(off, n) -> (copy?, n)`` then ``copy(off, n)``; errors go through the
        policy (retry after ignore/stop, fail on report)."""
        self.total = size
        off = self.current
        while off < size:
            await self.yield_now()
            n = min(CHUNK, size - off)
            try:
                do_copy, n = await want(off, n)
                if do_copy:
                    await copy(off, n)
            except JobCancelled:
                raise
            except Exception as exc:  # an I/O error: the policy decides
                self.chunk_failed(exc, self.on_error, self.on_error)
                continue
            off += n
            self.current = off
            if do_copy:
                await self.ratelimit(n)

    def drop_intermediates(self, upper: "BlockNode", lower_driver: Any, between: list["BlockNode"]) -> None:
        upper.driver.backing = lower_driver
        for n in between:
            if n.name in self.graph.nodes and not n.owned and not self.graph.parents(n) \
                    and not any(k != f"job:{self.id}" for k in self.graph.users.get(n.name, {})):
                self.graph.remove_user(n.name, f"job:{self.id}")
                self.graph._drop(n)

    def clean(self) -> None:
        for n in self.nodes:
            self.graph.remove_user(n.name, f"job:{self.id}")
        for n in self.reopened:
            if n.name in self.graph.nodes:
                try:
                    self.graph.reopen(n, True)
                except Exception:
                    pass
        self.reopened = []


class _Stage:
    """Tags an exception with the stage (read/write) it came from, for BLOCK_JOB_ERROR's operation."""

    def __init__(self, stage: str) -> None:
        self.stage = stage

    def __enter__(self) -> None:
        return None

    def __exit__(self, et: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc is not None:
            try:
                exc.job_stage = self.stage  # type: ignore[attr-defined]
            except AttributeError:
                pass
        return False


class CommitJob(ChainJob):
    job_type = "commit"

    def __init__(self, manager: Any, job_id: str, graph: "DaemonGraph", *, top: "BlockNode",
                 base: "BlockNode", overlay: "BlockNode", intermediates: list["BlockNode"],
                 backing_file: str | None, **kw: Any) -> None:
        super().__init__(manager, job_id, graph, [overlay, top, *intermediates, base], **kw)
        self.top = top
        self.base = base
        self.overlay = overlay
        self.intermediates = [top, *intermediates]
        self.backing_file = backing_file
        self.writable = [base]

    async def run(self) -> None:
        top, base = self.top, self.base
        size = top.size()
        if base.size() < size:
            with _Stage("write"):
                await self.locked(base.driver.truncate, size)

        async def want(off: int, n: int) -> tuple[bool, int]:
            with _Stage("read"):
                return await self.locked(is_allocated_above, top.driver, base.driver, off, n)

        async def copy(off: int, n: int) -> None:
            with _Stage("read"):
                data = await top.read(off, n)
            with _Stage("write"):
                await base.write(off, data)

        await self.copy_loop(size, want, copy)
        with _Stage("write"):
            await self.locked(base.driver.flush)

    def prepare(self) -> None:
        """Write the overlay's header: backing-file string (or base's filename) and base's format.  A
        failure here fails the job with the chain untouched."""
        name = self.backing_file if self.backing_file is not None else self.base.driver.filename
        set_backing = getattr(self.overlay.driver, "set_backing", None)
        if set_backing is None:
            raise OSError(95, "Operation not supported")
        set_backing(name, self.base.driver.format_name)

    def commit(self) -> None:
        self.drop_intermediates(self.overlay, self.base.driver, self.intermediates)


class StreamJob(ChainJob):
    job_type = "stream"

    def __init__(self, manager: Any, job_id: str, graph: "DaemonGraph", *, device: "BlockNode",
                 base: "BlockNode | None", intermediates: list["BlockNode"], backing_file: str | None,
                 **kw: Any) -> None:
        super().__init__(manager, job_id, graph, [device, *intermediates], **kw)
        self.device = device
        self.base = base
        self.intermediates = intermediates
        self.backing_file = backing_file
        self.writable = [device]

    async def run(self) -> None:
        dev = self.device
        below = dev.driver.backing
        base_drv = self.base.driver if self.base is not None else None

        async def want(off: int, n: int) -> tuple[bool, int]:
            with _Stage("read"):
                ext = await self.locked(block_status, dev.driver, off, n)
                if ext.status & Status.ALLOCATED:
                    return False, ext.length
                if below is None:
                    return False, ext.length
                return await self.locked(is_allocated_above, below, base_drv, off, ext.length)

        async def copy(off: int, n: int) -> None:
            with _Stage("read"):
                data = await dev.read(off, n)
            with _Stage("write"):
                # only where the device still has nothing of its own: a guest write that landed since
                # the check must not be overwritten with older chain data
                async with dev.tracked.request(off, n, "write", serialising_align=dev.align):
                    pos, end = off, off + n
                    while pos < end:
                        ext = await self.locked(block_status, dev.driver, pos, end - pos)
                        step = max(1, min(ext.length, end - pos))
                        if not ext.status & Status.ALLOCATED:
                            await dev._driver(dev.driver.write, pos, data[pos - off:pos - off + step])
                        pos += step

        if self.intermediates:
            await self.copy_loop(dev.size(), want, copy)
        else:
            self.total = dev.size() if below is not None else 0
            self.current = self.total
        with _Stage("write"):
            await self.locked(dev.driver.flush)

    def prepare(self) -> None:
        """stream_prepare: a device with a backing file gets the new backing string and format even when
        nothing had to be copied (base already its backing file), as QEMU 7.2 does."""
        if self.device.driver.backing is None:
            return
        if self.base is None:
            name, fmt = None, None
        else:
            name = self.backing_file if self.backing_file is not None else self.base.driver.filename
            fmt = self.base.driver.format_name
        set_backing = getattr(self.device.driver, "set_backing", None)
        if set_backing is None:
            raise OSError(95, "Operation not supported")
        set_backing(name, fmt)

    def commit(self) -> None:
        if self.device.driver.backing is not None:
            self.drop_intermediates(self.device, self.base.driver if self.base else None, self.intermediates)
