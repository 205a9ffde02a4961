"""asyncio adapter over the pure tracked-request table (:mod:`engine.tracked`).

Layer: engine, I/O edge.  Imports asyncio, the standard library, :mod:`engine.errors` and
:mod:`engine.tracked`; holds no rules of its own.  ``async with tracked.request(offset, bytes, kind)``
begins a tracked request, optionally makes it serialising, waits until the table lets it run and ends it
on the way out, however the block exits (error, cancellation, timeout), waking whoever was parked on it.

Invariants: every request begun here is ended exactly once; a parked request is woken only through the
table's :meth:`~engine.tracked.TrackedRequests.end` answer, and its wake-up event is cleared before each
re-check, so no wake-up is lost; every wait has a deadline when a timeout is given.  The owner of a
request defaults to the current asyncio task, so a task that opens a conflicting nested request on a
range it already holds gets :class:`~engine.tracked.WaitCycle` instead of hanging.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno as _errno
from collections.abc import AsyncIterator, Hashable

from engine.errors import BlockError
from engine.tracked import TrackedKind, TrackedRequest, TrackedRequests


class RequestTimeout(BlockError):
    """A tracked request waited longer than its timeout for conflicting requests to finish."""

    errno = _errno.ETIMEDOUT


class _CurrentTask:
    def __repr__(self) -> str:
        return "<current task>"


CURRENT_TASK: Hashable = _CurrentTask()
"""Default ``owner``: the asyncio task that opens the request."""

_DEFAULT = object()


class AsyncTrackedRequests:
    """Tracked requests of one node, for coroutines on one event loop.

    ``timeout`` (seconds, ``None`` for none) is the default deadline of every wait.
    """

    def __init__(self, table: TrackedRequests | None = None, *, timeout: float | None = None) -> None:
        self.table = table if table is not None else TrackedRequests()
        self.timeout = timeout
        self._wakeups: dict[int, asyncio.Event] = {}

    @contextlib.asynccontextmanager
    async def request(
        self,
        offset: int,
        bytes: int,
        kind: TrackedKind | str,
        serialising_align: int | None = None,
        *,
        timeout: float | None | object = _DEFAULT,
        owner: Hashable | None = CURRENT_TASK,
    ) -> AsyncIterator[TrackedRequest]:
        """Hold a tracked request for the body of the ``async with``; yields the TrackedRequest.

        With ``serialising_align`` the request is made serialising with that alignment first.
        Raises InvalidArgument (bad range, kind or alignment), WaitCycle (the wait would deadlock),
        RequestTimeout (conflicts did not finish within ``timeout``); the request is ended in all cases.
        """
        if owner is CURRENT_TASK:
            owner = asyncio.current_task()
        req = self.table.begin(offset, bytes, kind, owner=owner)
        try:
            if serialising_align is not None:
                self.table.make_serialising(req, serialising_align)
            await self._wait(req, self.timeout if timeout is _DEFAULT else timeout)  # type: ignore[arg-type]
            yield req
        finally:
            self._end(req)

    async def make_serialising(
        self, req: TrackedRequest, align: int, *, timeout: float | None | object = _DEFAULT
    ) -> None:
        """Make a held request serialising and wait until that is safe (bdrv_make_request_serialising).

        Raises InvalidArgument, WaitCycle or RequestTimeout as :meth:`request`; the request stays held
        (the enclosing ``async with`` ends it).
        """
        self.table.make_serialising(req, align)
        await self._wait(req, self.timeout if timeout is _DEFAULT else timeout)  # type: ignore[arg-type]

    async def _wait(self, req: TrackedRequest, timeout: float | None) -> None:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        event = asyncio.Event()
        self._wakeups[req.id] = event
        try:
            while True:
                event.clear()
                blocker = self.table.start(req)
                if blocker is None:
                    return
                try:
                    async with asyncio.timeout_at(deadline):
                        await event.wait()
                except TimeoutError:
                    raise RequestTimeout(
                        f"Request {req.describe()} timed out after {timeout}s waiting for request "
                        f"{blocker.describe()}"
                    ) from None
        finally:
            self._wakeups.pop(req.id, None)

    def _end(self, req: TrackedRequest) -> None:
        for woken in self.table.end(req):
            event = self._wakeups.get(woken.id)
            if event is not None:
                event.set()
