"""Tracked requests and request serialisation, sans-I/O (QEMU's ``BdrvTrackedRequest`` in block/io.c).

Layer: engine, pure.  Imports only the standard library and :mod:`engine.errors`; no clock, no asyncio,
no threads.  One :class:`TrackedRequests` table belongs to one node.  A request path calls
:meth:`~TrackedRequests.begin`, optionally :meth:`~TrackedRequests.make_serialising`, then
:meth:`~TrackedRequests.start` until it returns ``None`` (each non-``None`` answer is the request to
wait for; the caller parks until :meth:`~TrackedRequests.end` of that request names it among the woken),
does its I/O, and finally calls :meth:`~TrackedRequests.end`.  ``engine/tracked_async.py`` is the asyncio
wrapper that does exactly that.

QEMU's rules, kept exactly:

- A request's overlap range starts as ``[offset, offset + bytes)``.  Making it serialising with ``align``
  widens it to ``ROUND_DOWN(offset, align)`` .. ``ROUND_UP(offset + bytes, align)``, combined with the old
  range by ``overlap_offset = MIN(old, new)`` and ``overlap_bytes = MAX(old, new)``, so it never shrinks.
- Two requests conflict iff their overlap ranges intersect (``tracked_request_overlaps``: neither starts
  at or after the other's end, so a zero-length range strictly inside another one intersects it) and at
  least one of them is serialising.  Read/write/discard/truncate/zero kinds do not change the rule.
- A request never conflicts with itself, and never waits for a request that is itself waiting
  (``req->waiting_for`` set): that request is already waiting, directly or indirectly, for us or will
  find us when it wakes and re-checks.  Among several conflicts it waits for the most recently begun one
  (QEMU inserts at the list head and returns the first hit).
- Ending a request wakes every request queued on it (``qemu_co_queue_restart_all``); a woken request
  keeps ``waiting_for`` until it re-checks, so others still pass it by, and re-checks from scratch.

Invariants (held by the code, checked by tests/property/test_tracked_props.py): no two RUNNING requests
conflict; every WAITING request sits in the wait queue of a tracked request that conflicts with it, so
:meth:`end` of that request wakes it; the waits-for graph has no cycle.  QEMU asserts against the one
deadlock its rule admits, a coroutine waiting for a request it holds itself; here a request may carry an
``owner`` token (the asyncio adapter passes the current task), a request held by an owner that is blocked
in another request waits for that request, and a wait that would close a cycle (including a request
conflicting with one its own owner holds) raises :class:`WaitCycle` instead of hanging.
"""
from __future__ import annotations

import errno as _errno
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum

from engine.errors import BlockError, InvalidArgument

#: QEMU's BDRV_MAX_LENGTH: INT64_MAX aligned down to BDRV_MAX_ALIGNMENT (1 GiB).
BDRV_MAX_LENGTH = ((1 << 63) - 1) & ~((1 << 30) - 1)


class WaitCycle(BlockError):
    """Waiting would close a cycle in the waits-for graph: the requests would deadlock.

    ``cycle`` lists the request ids along the cycle, starting and ending with the request that asked to
    wait.
    """

    errno = _errno.EDEADLK

    def __init__(self, message: str, cycle: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.cycle = cycle


class TrackedKind(StrEnum):
    """What a tracked request does (QEMU's BdrvTrackedRequestType, plus ``zero`` for write-zeroes)."""

    READ = "read"
    WRITE = "write"
    DISCARD = "discard"
    TRUNCATE = "truncate"
    ZERO = "zero"


class RequestState(StrEnum):
    """Where a tracked request is.

    NEW: begun (or made serialising while running) and not yet checked; others do wait for it.
    WAITING: parked in ``waiting_for``'s wait queue.
    WOKEN: ``waiting_for`` ended; must re-check with :meth:`TrackedRequests.start`; others pass it by.
    RUNNING: checked with no conflict; may do its I/O.
    ENDED: removed from the table.
    """

    NEW = "new"
    WAITING = "waiting"
    WOKEN = "woken"
    RUNNING = "running"
    ENDED = "ended"


@dataclass(slots=True, eq=False)
class TrackedRequest:
    """One in-flight request of a node.

    Not frozen: this is the live record of a request, owned and mutated only by its
    :class:`TrackedRequests` table (as QEMU's BdrvTrackedRequest is by block/io.c).  Callers read it.
    Equality is identity.
    """

    id: int
    offset: int
    bytes: int
    kind: TrackedKind
    owner: Hashable | None = None
    serialising: bool = False
    overlap_offset: int = 0
    overlap_bytes: int = 0
    state: RequestState = RequestState.NEW
    waiting_for: TrackedRequest | None = field(default=None, repr=False)

    @property
    def overlap_end(self) -> int:
        return self.overlap_offset + self.overlap_bytes

    def describe(self) -> str:
        """``#3 write 4096+512`` plus the widened range when serialising and the owner when known."""
        text = f"#{self.id} {self.kind.value} {self.offset}+{self.bytes}"
        if self.serialising:
            text += f" (serialising {self.overlap_offset}+{self.overlap_bytes})"
        if self.owner is not None:
            text += f" [owner {self.owner!r}]"
        return text

    def __repr__(self) -> str:
        waiting = f" waiting_for=#{self.waiting_for.id}" if self.waiting_for is not None else ""
        return f"<TrackedRequest {self.describe()} {self.state.value}{waiting}>"


def ranges_overlap(offset_a: int, bytes_a: int, offset_b: int, bytes_b: int) -> bool:
    """QEMU's tracked_request_overlaps on two (offset, bytes) ranges."""
    if offset_b >= offset_a + bytes_a:
        return False
    if offset_a >= offset_b + bytes_b:
        return False
    return True


def requests_conflict(a: TrackedRequest, b: TrackedRequest) -> bool:
    """True iff ``a`` and ``b`` are different requests, one is serialising and their overlap ranges meet."""
    if a is b or not (a.serialising or b.serialising):
        return False
    return ranges_overlap(a.overlap_offset, a.overlap_bytes, b.overlap_offset, b.overlap_bytes)


def serialising_range(offset: int, bytes: int, align: int) -> tuple[int, int]:
    """(overlap_offset, overlap_bytes) of ``offset``/``bytes`` widened to ``align`` (a power of two)."""
    start = offset & ~(align - 1)
    end = (offset + bytes + align - 1) & ~(align - 1)
    return start, end - start


def _check_request(offset: int, bytes: int) -> None:
    """QEMU's bdrv_check_request (which answers -EIO)."""
    if offset < 0:
        raise InvalidArgument(f"offset is negative: {offset}", _errno.EIO)
    if bytes < 0:
        raise InvalidArgument(f"bytes is negative: {bytes}", _errno.EIO)
    if bytes > BDRV_MAX_LENGTH:
        raise InvalidArgument(f"bytes({bytes}) exceeds maximum({BDRV_MAX_LENGTH})", _errno.EIO)
    if offset > BDRV_MAX_LENGTH:
        raise InvalidArgument(f"offset({offset}) exceeds maximum({BDRV_MAX_LENGTH})", _errno.EIO)
    if offset > BDRV_MAX_LENGTH - bytes:
        raise InvalidArgument(
            f"sum of offset({offset}) and bytes({bytes}) exceeds maximum({BDRV_MAX_LENGTH})", _errno.EIO
        )


class TrackedRequests:
    """The tracked-request list of one node, with serialisation and deadlock detection.

    Every method is synchronous and does no I/O.  Methods taking a request raise
    :class:`~engine.errors.InvalidArgument` if it is not in this table (never begun here, or ended).
    """

    __slots__ = ("_requests", "_queues", "_next_id", "_serialising_in_flight")

    def __init__(self) -> None:
        self._requests: dict[int, TrackedRequest] = {}  # begin order; QEMU's list is this reversed
        self._queues: dict[int, list[TrackedRequest]] = {}  # request id -> requests parked on it (FIFO)
        self._next_id = 1
        self._serialising_in_flight = 0

    # --- inspection --------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._requests)

    def __iter__(self) -> Iterator[TrackedRequest]:
        """Requests in begin order."""
        return iter(list(self._requests.values()))

    def __contains__(self, req: object) -> bool:
        return isinstance(req, TrackedRequest) and self._requests.get(req.id) is req

    def get(self, request_id: int) -> TrackedRequest | None:
        return self._requests.get(request_id)

    @property
    def serialising_in_flight(self) -> int:
        """Number of tracked serialising requests (QEMU's bs->serialising_in_flight)."""
        return self._serialising_in_flight

    def in_state(self, *states: RequestState) -> list[TrackedRequest]:
        """Requests in any of ``states``, in begin order."""
        return [r for r in self._requests.values() if r.state in states]

    @property
    def running(self) -> list[TrackedRequest]:
        return self.in_state(RequestState.RUNNING)

    @property
    def waiting(self) -> list[TrackedRequest]:
        """Requests parked in a wait queue (WAITING, not yet woken)."""
        return self.in_state(RequestState.WAITING)

    def waiters(self, req: TrackedRequest) -> list[TrackedRequest]:
        """Requests parked on ``req``, in the order they started waiting."""
        self._require(req)
        return list(self._queues.get(req.id, ()))

    def conflicts(self, req: TrackedRequest) -> list[TrackedRequest]:
        """The tracked requests ``req`` must wait for right now, most recently begun first.

        QEMU's rule: conflicting (see :func:`requests_conflict`), not ``req`` itself, and not waiting
        (``waiting_for`` unset, i.e. NEW or RUNNING).  Raises InvalidArgument for an unknown request.
        """
        self._require(req)
        if not req.serialising and self._serialising_in_flight == 0:
            return []  # QEMU's fast path: nothing serialising in flight
        return [
            other
            for other in reversed(self._requests.values())
            if other.waiting_for is None and requests_conflict(other, req)
        ]

    def can_run(self, req: TrackedRequest) -> bool:
        """True iff :meth:`start` would let ``req`` run now.  Raises InvalidArgument as :meth:`conflicts`."""
        return not self.conflicts(req)

    # --- transitions -------------------------------------------------------------------------------

    def begin(self, offset: int, bytes: int, kind: TrackedKind | str, *, owner: Hashable | None = None
              ) -> TrackedRequest:
        """Track a new request (QEMU's tracked_request_begin); it is NEW and not serialising.

        ``owner`` identifies who holds the request (a task); ``None`` means nobody else shares it.
        Raises InvalidArgument for a negative or too large range (QEMU's -EIO) or an unknown kind.
        """
        _check_request(offset, bytes)
        try:
            kind = TrackedKind(kind)
        except ValueError:
            raise InvalidArgument(f"Unknown tracked request kind '{kind}'") from None
        req = TrackedRequest(
            id=self._next_id, offset=offset, bytes=bytes, kind=kind, owner=owner,
            overlap_offset=offset, overlap_bytes=bytes,
        )
        self._next_id += 1
        self._requests[req.id] = req
        return req

    def make_serialising(self, req: TrackedRequest, align: int) -> None:
        """Mark ``req`` serialising and widen its overlap range to ``align``.

        This is QEMU's tracked_request_set_serialising.  As in its bdrv_make_request_serialising, the
        request must then wait before going on: a RUNNING request becomes NEW, and the caller calls
        :meth:`start` again.
        Raises InvalidArgument if ``align`` is not a positive power of two or ``req`` is unknown.
        """
        self._require(req)
        if align <= 0 or align & (align - 1):
            raise InvalidArgument(f"Serialising alignment must be a power of two, not {align}")
        offset, nbytes = serialising_range(req.offset, req.bytes, align)
        _check_request(offset, nbytes)
        if not req.serialising:
            req.serialising = True
            self._serialising_in_flight += 1
        req.overlap_offset = min(req.overlap_offset, offset)
        req.overlap_bytes = max(req.overlap_bytes, nbytes)
        if req.state is RequestState.RUNNING:
            req.state = RequestState.NEW

    def start(self, req: TrackedRequest) -> TrackedRequest | None:
        """One round of QEMU's bdrv_wait_serialising_requests_locked loop for ``req``.

        Returns ``None`` when ``req`` has no conflict: it is now RUNNING.  Otherwise returns the request it
        now waits for (``req.waiting_for``; ``req`` is WAITING, queued on it); call again once :meth:`end`
        of that request has reported ``req`` as woken.  Calling it on a RUNNING request re-checks it.

        Raises WaitCycle, leaving ``req`` NEW and tracked (the caller ends it), if the wait would close
        a cycle in the waits-for graph or ``req`` conflicts with a request of its own owner (which
        cannot end while the owner waits here); InvalidArgument if ``req`` is unknown.
        """
        self._require(req)
        self._unqueue(req)
        req.waiting_for = None
        req.state = RequestState.NEW
        found = self.conflicts(req)
        if not found:
            req.state = RequestState.RUNNING
            return None
        blocker = found[0]
        if req.owner is not None:
            # QEMU asserts this (qemu_coroutine_self() != req->co) for every conflict it scans: a
            # request held by our own owner cannot end while the owner waits here, so sooner or later
            # we would wait for it.
            for other in found:
                if other.owner == req.owner:
                    raise self._wait_cycle(req, other, [req, other, req])
        cycle = self._cycle_through(req, blocker)
        if cycle is not None:
            raise self._wait_cycle(req, blocker, cycle)
        req.waiting_for = blocker
        req.state = RequestState.WAITING
        self._queues.setdefault(blocker.id, []).append(req)
        return blocker

    def end(self, req: TrackedRequest) -> list[TrackedRequest]:
        """Stop tracking ``req`` (tracked_request_end) in whatever state it is; return whom that wakes.

        The returned requests (parked on ``req``, in FIFO order) are now WOKEN and must each call
        :meth:`start` again.  Ending a WAITING request (a timed-out or cancelled wait) is allowed.
        Raises InvalidArgument if ``req`` is unknown or already ended.
        """
        self._require(req)
        self._unqueue(req)
        del self._requests[req.id]
        if req.serialising:
            self._serialising_in_flight -= 1
        req.state = RequestState.ENDED
        woken = self._queues.pop(req.id, [])
        for waiter in woken:
            waiter.state = RequestState.WOKEN  # keeps waiting_for until it re-checks, as in QEMU
        return woken

    # --- internals ---------------------------------------------------------------------------------

    def _require(self, req: TrackedRequest) -> None:
        if req not in self:
            raise InvalidArgument(f"Request {req.describe()} is not tracked on this node")

    def _unqueue(self, req: TrackedRequest) -> None:
        if req.state is RequestState.WAITING and req.waiting_for is not None:
            queue = self._queues.get(req.waiting_for.id)
            if queue is not None and req in queue:
                queue.remove(req)

    @staticmethod
    def _wait_cycle(req: TrackedRequest, blocker: TrackedRequest, cycle: list[TrackedRequest]) -> WaitCycle:
        path = " -> ".join(r.describe() for r in cycle)
        return WaitCycle(
            f"Request {req.describe()} cannot wait for request {blocker.describe()}: "
            f"the wait would deadlock ({path})",
            tuple(r.id for r in cycle),
        )

    def _cycle_through(self, req: TrackedRequest, blocker: TrackedRequest) -> list[TrackedRequest] | None:
        """The cycle ``req -> blocker -> ... -> req`` that waiting would close, or None.

        Edges of the waits-for graph: a WAITING request waits for ``waiting_for``; a NEW or RUNNING
        request cannot finish while its owner is blocked, so it waits for every WAITING request of the
        same owner (``req`` counts as WAITING here).  WOKEN requests will re-check: no edge.
        """
        blocked: dict[Hashable, list[TrackedRequest]] = {}
        for r in self._requests.values():
            if r.owner is not None and (r is req or r.state is RequestState.WAITING):
                blocked.setdefault(r.owner, []).append(r)

        def successors(r: TrackedRequest) -> list[TrackedRequest]:
            if r is req:
                return [blocker]
            if r.state is RequestState.WAITING:
                return [r.waiting_for] if r.waiting_for is not None else []
            if r.state in (RequestState.NEW, RequestState.RUNNING) and r.owner is not None:
                return [s for s in blocked.get(r.owner, ()) if s is not r]
            return []

        parent: dict[int, TrackedRequest | None] = {blocker.id: None}
        stack = [blocker]
        while stack:
            r = stack.pop()
            for nxt in successors(r):
                if nxt is req:
                    path = [r]
                    while (up := parent[path[-1].id]) is not None:
                        path.append(up)
                    return [req, *reversed(path), req]
                if nxt.id not in parent:
                    parent[nxt.id] = r
                    stack.append(nxt)
        return None
