"""The coordinator's node graph and the one request pipeline every read, write, zero and discard goes
through (QEMU's BlockBackend + block/io.c path, on asyncio).

Layer: engine.  Order of a request, as in QEMU:
  bounds check -> throttling (BlockBackend; a node's own limits or its throttle group's, round-robin) ->
  tracked request (overlapping serialising requests wait; read-modify-write of an unaligned head/tail
  and copy-on-read make the request serialising at the node's alignment) -> detect-zeroes -> driver ->
  statistics.
Driver calls are synchronous (format metadata lives in this process, bytes move through the executor);
they run one at a time per graph in a helper thread so the event loop keeps serving timers and other
requests meanwhile.  Invariants: no two running requests with overlapping ranges where one is
serialising (engine.tracked); accounted throughput never exceeds the throttle limits (engine.throttle).
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from engine.block import block_status, is_allocated_above
from engine.driver import BlockDriver, Extent
from engine.errors import BlockError, DeviceNotFound, InvalidArgument, OutOfBounds
from engine.throttle import ThrottleConfig, ThrottleGroup
from engine.tracked_async import AsyncTrackedRequests

DETECT_ZEROES = ("off", "on", "unmap")
#: reads and block status up to this size may run on the event loop (``BlockNode._driver_read``)
INLINE_READ_MAX = 64 << 10


@dataclass
class OpStats:
    bytes: int = 0
    ops: int = 0
    total_time_ns: int = 0


@dataclass
class NodeStats:
    """Per-node I/O statistics (the fields QMP's query-blockstats reports)."""

    read: OpStats = field(default_factory=OpStats)
    write: OpStats = field(default_factory=OpStats)
    flush: OpStats = field(default_factory=OpStats)
    discard: OpStats = field(default_factory=OpStats)
    zero: OpStats = field(default_factory=OpStats)

    def account(self, kind: str, nbytes: int, elapsed_ns: int) -> None:
        s: OpStats = getattr(self, kind)
        s.bytes += nbytes
        s.ops += 1
        s.total_time_ns += elapsed_ns


class AsyncThrottle:
    """Drives a pure ThrottleGroup on an event loop: queued requests wake when the group says so."""

    def __init__(self, group: ThrottleGroup, clock: Callable[[], int] = time.monotonic_ns) -> None:
        self.group = group
        self.clock = clock
        self._waiters: dict[Any, asyncio.Future] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_ns: int | None = None

    async def admit(self, member: str, is_write: bool, nbytes: int) -> None:
        loop = asyncio.get_running_loop()
        adm = self.group.submit(member, is_write, nbytes, self.clock())
        if adm.run_now:
            self._arm(adm.timer_ns)
            return
        fut = loop.create_future()
        self._waiters[adm.token] = fut
        self._arm(adm.timer_ns)
        await fut

    def _arm(self, timer_ns: int | None) -> None:
        if timer_ns is None:
            return
        if self._timer is not None and self._timer_ns is not None and self._timer_ns <= timer_ns:
            return
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        self._timer_ns = timer_ns
        self._timer = loop.call_later(max(0, timer_ns - self.clock()) / 1e9, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._timer_ns = None
        while True:
            nr = self.group.next_ready(self.clock())
            if nr.ready is None:
                self._arm(nr.timer_ns)
                return
            fut = self._waiters.pop(nr.ready.token, None)
            if fut is not None and not fut.done():
                fut.set_result(None)


class Graph:
    """The coordinator's node graph: named nodes, their children, op blockers, throttle groups."""

    def __init__(self) -> None:
        self.nodes: dict[str, BlockNode] = {}
        self.groups: dict[str, AsyncThrottle] = {}
        self.driver_lock = asyncio.Lock()
        self._auto = 0
        self.blockers: dict[str, dict[str, str]] = {}

    def add(self, driver: BlockDriver, node_name: str | None = None, **kw: Any) -> BlockNode:
        """Wrap ``driver`` in a pipeline node named ``node_name`` (a generated '#blockN' name if None).
        Raises InvalidArgument for a duplicate name."""
        if node_name is None:
            node_name = f"#block{self._auto}"
            self._auto += 1
        if node_name in self.nodes:
            raise InvalidArgument(f"Duplicate nodes with node-name='{node_name}'")
        node = BlockNode(self, driver, node_name, **kw)
        driver.node_name = node_name
        self.nodes[node_name] = node
        return node

    def get(self, name: str) -> BlockNode:
        try:
            return self.nodes[name]
        except KeyError:
            raise DeviceNotFound(f"Cannot find device='{name}' nor node-name='{name}'") from None

    def remove(self, name: str) -> None:
        node = self.get(name)
        if self.blockers.get(name):
            reason = next(iter(self.blockers[name].values()))
            raise BlockError(f"Node '{name}' is busy: {reason}")
        del self.nodes[name]
        node.driver.close()

    def block(self, name: str, op: str, reason: str) -> None:
        self.blockers.setdefault(name, {})[op] = reason

    def unblock(self, name: str, op: str) -> None:
        self.blockers.get(name, {}).pop(op, None)

    def check_op(self, name: str, op: str) -> None:
        reason = self.blockers.get(name, {}).get(op) or self.blockers.get(name, {}).get("*")
        if reason:
            raise BlockError(f"Node '{name}' is busy: {reason}")

    def throttle_group(self, name: str, config: ThrottleConfig | None = None) -> AsyncThrottle:
        if name not in self.groups:
            self.groups[name] = AsyncThrottle(ThrottleGroup(name, config, time.monotonic_ns()))
        elif config is not None:
            self.groups[name].group.set_config(config, time.monotonic_ns())
        return self.groups[name]

    def children(self, node: BlockNode) -> dict[str, BlockDriver]:
        d = node.driver
        out = {}
        if d.file is not None:
            out["file"] = d.file
        if d.backing is not None:
            out["backing"] = d.backing
        return out


class BlockNode:
    """A driver in the graph, with the request pipeline in front of it."""

    def __init__(self, graph: Graph, driver: BlockDriver, node_name: str, *, request_alignment: int = 1,
                 detect_zeroes: str = "off", copy_on_read: bool = False, throttle_group: str | None = None,
                 throttle: ThrottleConfig | None = None, wait_timeout: float | None = 120.0) -> None:
        if detect_zeroes not in DETECT_ZEROES:
            raise InvalidArgument(f"Parameter 'detect-zeroes' does not accept value '{detect_zeroes}'")
        if request_alignment < 1 or request_alignment & (request_alignment - 1):
            raise InvalidArgument("request alignment must be a power of two")
        self.graph = graph
        self.driver = driver
        self.name = node_name
        self.align = request_alignment
        self.detect_zeroes = detect_zeroes
        self.copy_on_read = copy_on_read
        self.tracked = AsyncTrackedRequests(timeout=wait_timeout)
        self.stats = NodeStats()
        self.wr_highest = 0
        #: daemon bookkeeping: added by blockdev-add at top level (deletable), discard mode, cache flags
        self.owned = False
        self.discard_mode = "ignore"
        self.cache = {"no-flush": False, "direct": False, "writeback": True}
        #: dirty bitmaps recording this node's writes (engine.bitmap.DirtyBitmap)
        self.bitmaps: list[Any] = []
        #: ``async hook(kind, offset, length, data)`` run before / after every write, zero and discard
        #: (copy-before-write for backup; write-blocking mirror)
        self.before_write: list[Callable[..., Any]] = []
        self.after_write: list[Callable[..., Any]] = []
        self.in_flight = 0
        self._quiesce = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._open_gate = asyncio.Event()
        self._open_gate.set()
        self.throttle: AsyncThrottle | None = None
        if throttle_group is not None or throttle is not None:
            group = throttle_group or f"#throttle-{node_name}"
            self.throttle = graph.throttle_group(group, throttle)
            self.throttle.group.register(node_name)

    # --- helpers -----------------------------------------------------------------------------------
    def size(self) -> int:
        return self.driver.size()

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0:
            raise InvalidArgument(f"Invalid request: offset {offset}, length {length}")
        if offset + length > self.driver.size():
            raise OutOfBounds(f"Request beyond the end of node '{self.name}' "
                              f"({offset}+{length} > {self.driver.size()})")

    async def _driver(self, fn: Callable, *args: Any) -> Any:
        """Run a synchronous driver call in a helper thread; drivers with metadata state of their own
        (qcow2) take one call at a time per graph."""
        if self._lock_free():
            return await asyncio.to_thread(fn, *args)
        async with self.graph.driver_lock:
            return await asyncio.to_thread(fn, *args)

    def _lock_free(self) -> bool:
        """Whether this node's driver calls may run concurrently (raw and file, not qcow2)."""
        return self.driver.thread_safe and (self.driver.backing is None or self.driver.backing.thread_safe)

    def _inline_ok(self, length: int) -> bool:
        """Whether a read or block status of ``length`` bytes may run on the event loop: small, and every
        driver below this node (files, formats, backing chain) says its reads never block for long."""
        if length > INLINE_READ_MAX:
            return False
        stack = [self.driver]
        while stack:
            d = stack.pop()
            if not d.inline_reads:
                return False
            stack.extend(c for c in (d.file, d.backing) if c is not None)
        return True

    async def _driver_read(self, length: int, fn: Callable, *args: Any) -> Any:
        """``_driver`` for reads and block status: small ones on drivers that allow it run right here on
        the loop (under the graph's driver lock when the driver needs one to itself), saving the thread
        round trip that dominates a 4 KiB request."""
        if not self._inline_ok(length):
            return await self._driver(fn, *args)
        if self._lock_free():
            return fn(*args)
        async with self.graph.driver_lock:
            return fn(*args)

    async def _throttle(self, is_write: bool, nbytes: int) -> None:
        if self.throttle is not None:
            await self.throttle.admit(self.name, is_write, nbytes)

    # --- in-flight accounting and drain -------------------------------------------------------------
    async def _enter(self) -> None:
        while self._quiesce:
            await self._open_gate.wait()
        self.in_flight += 1
        self._idle.clear()

    def _exit(self) -> None:
        self.in_flight -= 1
        if not self.in_flight:
            self._idle.set()

    async def drain_begin(self) -> None:
        """QEMU's bdrv_drained_begin: new requests wait, and this returns once none is in flight."""
        self._quiesce += 1
        self._open_gate.clear()
        await self._idle.wait()

    def drain_end(self) -> None:
        if self._quiesce:
            self._quiesce -= 1
        if not self._quiesce:
            self._open_gate.set()

    def _mark_dirty(self, offset: int, length: int) -> None:
        for bm in self.bitmaps:
            if bm.enabled and length:
                bm.set(offset, length)

    async def _guest_write(self, kind: str, offset: int, length: int, data: bytes | None, fn: Any) -> None:
        await self._enter()
        try:
            for hook in list(self.before_write):
                await hook(kind, offset, length, data)
            await fn
            self._mark_dirty(offset, length)
            for hook in list(self.after_write):
                await hook(kind, offset, length, data)
        finally:
            self._exit()

    # --- requests -----------------------------------------------------------------------------------
    async def read(self, offset: int, length: int) -> bytes:
        """Read through the pipeline.  Raises OutOfBounds, InvalidArgument, BlockError, OSError."""
        await self._enter()
        try:
            return await self._do_read(offset, length)
        finally:
            self._exit()

    async def write(self, offset: int, data: bytes) -> None:
        """Write through the pipeline (read-modify-write for an unaligned head or tail); dirty bitmaps
        record it and write hooks see it."""
        self._check(offset, len(data))
        await self._guest_write("write", offset, len(data), data, self._do_write(offset, data))

    async def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        self._check(offset, length)
        await self._guest_write("zero", offset, length, None, self._do_write_zeroes(offset, length, unmap))

    async def discard(self, offset: int, length: int) -> None:
        self._check(offset, length)
        await self._guest_write("discard", offset, length, None, self._do_discard(offset, length))

    async def _do_read(self, offset: int, length: int) -> bytes:
        """Read through the pipeline.  Raises OutOfBounds, InvalidArgument, BlockError, OSError."""
        t0 = time.monotonic_ns()
        self._check(offset, length)
        await self._throttle(False, length)
        align = self.align
        lo = offset // align * align
        hi = min(-(-(offset + length) // align) * align, self.driver.size())
        cor = self.copy_on_read and self.driver.backing is not None
        ser = (align if cor else None)
        async with self.tracked.request(lo, hi - lo, "read", serialising_align=ser):
            if cor:
                data = await self._copy_on_read(lo, hi - lo)
            else:
                data = await self._driver_read(hi - lo, self.driver.read, lo, hi - lo)
        out = data[offset - lo:offset - lo + length]
        self.stats.account("read", length, time.monotonic_ns() - t0)
        return out

    async def _copy_on_read(self, offset: int, length: int) -> bytes:
        """QEMU's bdrv_co_do_copy_on_readv: ranges not allocated in this node are read from the chain
        and written into it, so later reads find them locally."""
        data = await self._driver(self.driver.read, offset, length)
        pos = offset
        while pos < offset + length:
            allocated, n = await self._driver(is_allocated_above, self.driver, self.driver.backing, pos,
                                              offset + length - pos)
            if not allocated:
                await self._driver(self.driver.write, pos, data[pos - offset:pos - offset + n])
            pos += n
        return data

    async def _do_write(self, offset: int, data: bytes) -> None:
        """Write through the pipeline (read-modify-write for an unaligned head or tail)."""
        t0 = time.monotonic_ns()
        length = len(data)
        self._check(offset, length)
        self.driver.check_writable()
        await self._throttle(True, length)
        align = self.align
        if self.detect_zeroes != "off" and data.count(0) == length and length:
            await self._zero(offset, length, self.detect_zeroes == "unmap")
            self.stats.account("write", length, time.monotonic_ns() - t0)
            return
        if offset % align or length % align:
            lo = offset // align * align
            hi = min(-(-(offset + length) // align) * align, self.driver.size())
            async with self.tracked.request(lo, hi - lo, "write", serialising_align=align):
                old = await self._driver(self.driver.read, lo, hi - lo)
                buf = bytearray(old)
                buf[offset - lo:offset - lo + length] = data
                await self._driver(self.driver.write, lo, bytes(buf))
        else:
            async with self.tracked.request(offset, length, "write"):
                await self._driver(self.driver.write, offset, data)
        self.wr_highest = max(self.wr_highest, offset + length)
        self.stats.account("write", length, time.monotonic_ns() - t0)

    async def _zero(self, offset: int, length: int, unmap: bool) -> None:
        align = self.align
        ser = align if (offset % align or length % align) else None
        async with self.tracked.request(offset, length, "zero", serialising_align=ser):
            await self._driver(self.driver.write_zeroes, offset, length, unmap)

    async def _do_write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        t0 = time.monotonic_ns()
        self._check(offset, length)
        self.driver.check_writable()
        await self._throttle(True, length)
        await self._zero(offset, length, unmap)
        self.wr_highest = max(self.wr_highest, offset + length)
        self.stats.account("zero", length, time.monotonic_ns() - t0)

    async def _do_discard(self, offset: int, length: int) -> None:
        t0 = time.monotonic_ns()
        self._check(offset, length)
        self.driver.check_writable()
        await self._throttle(True, length)
        async with self.tracked.request(offset, length, "discard"):
            await self._driver(self.driver.discard, offset, length)
        self.stats.account("discard", length, time.monotonic_ns() - t0)

    async def flush(self) -> None:
        t0 = time.monotonic_ns()
        await self._driver(self.driver.flush)
        self.stats.account("flush", 0, time.monotonic_ns() - t0)

    async def block_status(self, offset: int, length: int) -> Extent:
        self._check(offset, length)
        return await self._driver(block_status, self.driver, offset, length)

    def close(self) -> None:
        if self.throttle is not None:
            self.throttle.group.unregister(self.name)
            self.throttle = None
        self.graph.nodes.pop(self.name, None)
        self.driver.close()
