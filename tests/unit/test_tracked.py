"""Unit tests of engine/tracked.py (pure tracked requests) and engine/tracked_async.py (asyncio adapter)."""
from __future__ import annotations

import asyncio
import errno

import pytest

from engine.errors import BlockError, InvalidArgument
from engine.tracked import (
    BDRV_MAX_LENGTH,
    RequestState,
    TrackedKind,
    TrackedRequests,
    WaitCycle,
    ranges_overlap,
    requests_conflict,
    serialising_range,
)
from engine.tracked_async import AsyncTrackedRequests, RequestTimeout

KiB = 1024


def running(t: TrackedRequests, offset: int, nbytes: int, kind: str = "read", align: int | None = None,
            owner: object = None):
    req = t.begin(offset, nbytes, kind, owner=owner)
    if align is not None:
        t.make_serialising(req, align)
    assert t.start(req) is None
    assert req.state is RequestState.RUNNING
    return req


# --- overlap math ------------------------------------------------------------------------------------


def test_begin_defaults():
    t = TrackedRequests()
    a = t.begin(4096, 512, "write")
    b = t.begin(0, 0, TrackedKind.TRUNCATE)
    assert (a.id, b.id) == (1, 2)
    assert a.kind is TrackedKind.WRITE and b.kind is TrackedKind.TRUNCATE
    assert (a.overlap_offset, a.overlap_bytes) == (4096, 512)
    assert not a.serialising and a.waiting_for is None and a.state is RequestState.NEW
    assert list(t) == [a, b] and len(t) == 2 and a in t


@pytest.mark.parametrize(
    "offset,nbytes,align,expected",
    [
        (4097, 10, 4096, (4096, 4096)),
        (4096, 4096, 4096, (4096, 4096)),
        (4095, 2, 4096, (0, 8192)),
        (1000, 100, 512, (512, 1024)),
        (100, 0, 512, (0, 512)),
        (4096, 0, 4096, (4096, 0)),
        (123, 45, 1, (123, 45)),
        (0, 1, 1 << 16, (0, 1 << 16)),
    ],
)
def test_serialising_range(offset, nbytes, align, expected):
    assert serialising_range(offset, nbytes, align) == expected
    t = TrackedRequests()
    req = t.begin(offset, nbytes, "write")
    t.make_serialising(req, align)
    assert req.serialising
    assert (req.overlap_offset, req.overlap_bytes) == expected
    assert t.serialising_in_flight == 1


def test_widening_never_shrinks_and_counts_once():
    t = TrackedRequests()
    req = t.begin(5000, 100, "write")
    t.make_serialising(req, 4096)
    assert (req.overlap_offset, req.overlap_bytes) == (4096, 4096)
    t.make_serialising(req, 512)  # QEMU: MIN(offset), MAX(bytes)
    assert (req.overlap_offset, req.overlap_bytes) == (4096, 4096)
    t.make_serialising(req, 64 * KiB)
    assert (req.overlap_offset, req.overlap_bytes) == (0, 64 * KiB)
    assert t.serialising_in_flight == 1
    t.end(req)
    assert t.serialising_in_flight == 0


@pytest.mark.parametrize("align", [0, -512, 3, 768])
def test_bad_alignment(align):
    t = TrackedRequests()
    req = t.begin(0, 512, "write")
    with pytest.raises(InvalidArgument):
        t.make_serialising(req, align)


@pytest.mark.parametrize("offset,nbytes", [(-1, 1), (0, -1), (BDRV_MAX_LENGTH, 1), (BDRV_MAX_LENGTH + 1, 0)])
def test_bad_range(offset, nbytes):
    with pytest.raises(InvalidArgument) as info:
        TrackedRequests().begin(offset, nbytes, "read")
    assert info.value.errno == errno.EIO


def test_bad_kind():
    with pytest.raises(InvalidArgument):
        TrackedRequests().begin(0, 1, "flush")


def test_ranges_overlap_half_open():
    assert ranges_overlap(0, 512, 511, 1)
    assert not ranges_overlap(0, 512, 512, 512)
    assert not ranges_overlap(512, 512, 0, 512)
    assert ranges_overlap(0, 4096, 1000, 10)
    # QEMU's tracked_request_overlaps: a zero-length range strictly inside another intersects it ...
    assert ranges_overlap(0, 4096, 100, 0)
    # ... but not at its start or end, nor another empty range at the same offset.
    assert not ranges_overlap(0, 4096, 4096, 0)
    assert not ranges_overlap(100, 0, 100, 0)


# --- conflicts ---------------------------------------------------------------------------------------


def test_read_vs_serialising_rmw_write():
    t = TrackedRequests()
    read = running(t, 1024, 512)  # [1024, 1536)
    write = t.begin(1000, 100, "write")  # unaligned: RMW on 512-byte blocks -> [512, 1536)
    t.make_serialising(write, 512)
    assert t.conflicts(write) == [read]
    assert not t.can_run(write)
    assert t.start(write) is read
    assert write.waiting_for is read and write.state is RequestState.WAITING
    assert t.waiters(read) == [write]

    # A read of an unrelated block runs; one inside the widened range waits for the write.
    far = t.begin(2048, 512, "read")
    assert t.start(far) is None
    t.end(far)

    assert t.end(read) == [write]
    assert write.state is RequestState.WOKEN
    assert t.start(write) is None and write.waiting_for is None
    late_read = t.begin(600, 10, "read")
    assert t.conflicts(late_read) == [write]
    assert t.start(late_read) is write
    assert t.end(write) == [late_read]
    assert t.start(late_read) is None


def test_non_serialising_overlapping_requests_never_wait():
    t = TrackedRequests()
    reqs = [running(t, 0, 4096, kind) for kind in ("read", "write", "zero", "discard", "write")]
    for req in reqs:
        assert t.conflicts(req) == []


def test_non_overlapping_serialising_requests_never_wait():
    t = TrackedRequests()
    a = running(t, 0, 100, "write", align=4096)  # [0, 4096)
    b = running(t, 4096, 1, "write", align=4096)  # [4096, 8192)
    c = running(t, 8192, 4096, "read")
    assert t.conflicts(a) == t.conflicts(b) == t.conflicts(c) == []


def test_self_never_conflicts():
    t = TrackedRequests()
    req = t.begin(0, 4096, "write")
    t.make_serialising(req, 1 << 20)
    assert t.conflicts(req) == [] and t.can_run(req)
    assert not requests_conflict(req, req)
    assert t.start(req) is None


def test_serialising_read_waits_for_plain_write():
    t = TrackedRequests()
    write = running(t, 0, 512, "write")
    cor_read = t.begin(256, 10, "read")  # copy-on-read: serialising to the cluster
    t.make_serialising(cor_read, 64 * KiB)
    assert t.start(cor_read) is write


def test_waits_for_most_recently_begun_conflict():
    t = TrackedRequests()
    first = running(t, 0, 512, "read")
    second = running(t, 512, 512, "read")
    write = t.begin(0, 1024, "write")
    t.make_serialising(write, 1)
    assert t.conflicts(write) == [second, first]
    assert t.start(write) is second
    assert t.end(second) == [write]
    assert t.start(write) is first


def test_does_not_wait_for_a_waiting_request():
    t = TrackedRequests()
    read = running(t, 0, 512)
    w1 = t.begin(0, 512, "write")
    t.make_serialising(w1, 512)
    assert t.start(w1) is read
    # w2 conflicts with the waiting w1 and the running read: it waits for the read only.
    w2 = t.begin(0, 512, "write")
    t.make_serialising(w2, 512)
    assert t.conflicts(w2) == [read]
    assert t.start(w2) is read
    # A request that conflicts with waiting requests only goes ahead; they will find it when they wake.
    w3 = t.begin(256, 1, "read")
    t.make_serialising(w3, 1)
    assert t.conflicts(w3) == [read]
    t.end(read)  # wakes w1 and w2, which pass each other by while woken
    assert w1.state is RequestState.WOKEN and w2.state is RequestState.WOKEN
    assert t.start(w3) is None
    assert t.start(w1) is w3
    assert t.start(w2) is w3
    assert t.end(w3) == [w1, w2]
    assert t.start(w1) is None
    assert t.start(w2) is w1


def test_new_request_is_waited_for_then_passes_waiter():
    t = TrackedRequests()
    a = t.begin(0, 512, "write")
    b = t.begin(0, 512, "write")
    t.make_serialising(a, 512)
    t.make_serialising(b, 512)
    assert t.start(a) is b  # b is NEW: not waiting, so a waits for it
    assert t.start(b) is None  # a is waiting: b goes ahead
    assert t.end(b) == [a]
    assert t.start(a) is None


def test_make_serialising_running_request_rechecks():
    t = TrackedRequests()
    other = running(t, 4096, 512, "read")
    req = running(t, 0, 512, "read")
    t.make_serialising(req, 64 * KiB)
    assert req.state is RequestState.NEW
    assert t.start(req) is other


def test_end_wakes_only_its_waiters_in_fifo_order():
    t = TrackedRequests()
    a = running(t, 0, 512, "write", align=512)
    b = running(t, 4096, 512, "write", align=512)
    waiters_a = []
    for _ in range(3):
        w = t.begin(0, 1, "read")
        assert t.start(w) is a
        waiters_a.append(w)
    wb = t.begin(4096, 1, "read")
    assert t.start(wb) is b
    assert t.end(a) == waiters_a
    assert wb.state is RequestState.WAITING
    assert t.end(b) == [wb]


def test_end_of_waiting_request_leaves_queue():
    t = TrackedRequests()
    a = running(t, 0, 512, "write", align=512)
    w = t.begin(0, 512, "read")
    assert t.start(w) is a
    assert t.end(w) == []  # timed out / cancelled
    assert t.waiters(a) == []
    assert t.end(a) == []
    assert len(t) == 0 and t.serialising_in_flight == 0


def test_unknown_or_ended_request():
    t = TrackedRequests()
    req = t.begin(0, 1, "read")
    t.end(req)
    assert req.state is RequestState.ENDED
    for op in (t.end, t.start, t.conflicts, t.waiters):
        with pytest.raises(InvalidArgument):
            op(req)
    foreign = TrackedRequests().begin(0, 1, "read")
    with pytest.raises(InvalidArgument):
        t.start(foreign)


# --- deadlock detection ------------------------------------------------------------------------------


def test_nested_request_of_same_owner_raises_wait_cycle():
    t = TrackedRequests()
    outer = running(t, 0, 4096, "write", align=4096, owner="task-1")
    nested = t.begin(512, 512, "read", owner="task-1")
    with pytest.raises(WaitCycle) as info:
        t.start(nested)
    err = info.value
    assert isinstance(err, BlockError) and err.errno == errno.EDEADLK
    assert err.cycle == (nested.id, outer.id, nested.id)
    assert "#1" in err.message and "#2" in err.message
    assert nested.state is RequestState.NEW and nested.waiting_for is None
    t.end(nested)
    # A nested request on a free range is fine.
    free = t.begin(8192, 512, "read", owner="task-1")
    assert t.start(free) is None


def test_conflict_with_own_request_raises_even_behind_another_conflict():
    t = TrackedRequests()
    own = running(t, 0, 512, "read", owner="t1")
    other = running(t, 0, 512, "read")  # most recently begun: QEMU would wait for it first
    nested = t.begin(0, 1, "write", owner="t1")
    t.make_serialising(nested, 512)
    assert t.conflicts(nested) == [other, own]
    with pytest.raises(WaitCycle) as info:
        t.start(nested)
    assert info.value.cycle == (nested.id, own.id, nested.id)


def test_two_owner_cycle_raises_wait_cycle():
    t = TrackedRequests()
    a = running(t, 0, 4096, "write", align=4096, owner="t1")
    c = running(t, 8192, 4096, "write", align=4096, owner="t2")
    b = t.begin(8192, 1, "read", owner="t1")  # t1, holding a, now waits for c
    assert t.start(b) is c
    d = t.begin(0, 1, "read", owner="t2")  # t2, holding c, would wait for a: deadlock
    with pytest.raises(WaitCycle) as info:
        t.start(d)
    assert info.value.cycle == (d.id, a.id, b.id, c.id, d.id)
    for req in (a, b, c, d):
        assert f"#{req.id}" in info.value.message
    # Failing d un-blocks t2, c finishes, b runs, and so on.
    assert t.end(d) == []
    assert t.end(c) == [b]
    assert t.start(b) is None


def test_anonymous_owners_do_not_form_cycles():
    t = TrackedRequests()
    outer = running(t, 0, 4096, "write", align=4096)
    nested = t.begin(0, 1, "read")
    assert t.start(nested) is outer


def test_woken_request_is_not_a_wait_edge():
    t = TrackedRequests()
    a = running(t, 0, 512, "write", align=512, owner="t1")
    x = running(t, 4096, 512, "write", align=512, owner="t2")
    w = t.begin(4096, 1, "read", owner="t1")
    assert t.start(w) is x
    t.end(x)  # w is woken: t1 will re-check, so t3 may wait for a
    y = t.begin(0, 1, "read", owner="t3")
    assert t.start(y) is a


# --- asyncio adapter ---------------------------------------------------------------------------------


def test_async_serialises_conflicting_requests():
    async def main():
        tracked = AsyncTrackedRequests(timeout=5)
        order = []

        async def worker(name, offset, align, hold):
            async with tracked.request(offset, 512, "write", serialising_align=align) as req:
                order.append(("in", name))
                assert req.state is RequestState.RUNNING
                for _ in range(hold):
                    await asyncio.sleep(0)
                order.append(("out", name))

        await asyncio.gather(worker("a", 0, 4096, 5), worker("b", 1024, 4096, 1), worker("c", 8192, None, 1))
        assert len(tracked.table) == 0
        return order

    order = asyncio.run(main())
    a_in, a_out, b_in = order.index(("in", "a")), order.index(("out", "a")), order.index(("in", "b"))
    assert a_in < a_out < b_in
    assert order.index(("in", "c")) < a_out  # no conflict: ran alongside a


def test_async_nested_conflicting_request_raises_wait_cycle():
    async def main():
        tracked = AsyncTrackedRequests(timeout=5)
        async with tracked.request(0, 4096, "write", serialising_align=4096):
            with pytest.raises(WaitCycle):
                async with tracked.request(100, 1, "read"):
                    pass  # pragma: no cover
            async with tracked.request(4096, 1, "read"):
                pass
            assert len(tracked.table) == 1
        assert len(tracked.table) == 0

    asyncio.run(main())


def test_async_timeout_raises_block_error_and_cleans_up():
    async def main():
        tracked = AsyncTrackedRequests()
        holder_in = asyncio.Event()
        release = asyncio.Event()

        async def holder():
            async with tracked.request(0, 512, "write", serialising_align=512):
                holder_in.set()
                await release.wait()

        task = asyncio.create_task(holder())
        await holder_in.wait()
        with pytest.raises(RequestTimeout) as info:
            async with tracked.request(0, 512, "read", timeout=0.01):
                pass  # pragma: no cover
        assert isinstance(info.value, BlockError) and info.value.errno == errno.ETIMEDOUT
        assert len(tracked.table) == 1 and tracked.table.waiters(tracked.table.running[0]) == []
        release.set()
        await task
        assert len(tracked.table) == 0

    asyncio.run(main())


def test_async_cancelled_waiter_is_ended():
    async def main():
        tracked = AsyncTrackedRequests()
        release = asyncio.Event()

        async def holder():
            async with tracked.request(0, 512, "write", serialising_align=512):
                await release.wait()

        async def waiter():
            async with tracked.request(0, 1, "read"):
                pass  # pragma: no cover

        h = asyncio.create_task(holder())
        await asyncio.sleep(0)
        w = asyncio.create_task(waiter())
        await asyncio.sleep(0)
        assert len(tracked.table.waiting) == 1
        w.cancel()
        with pytest.raises(asyncio.CancelledError):
            await w
        assert len(tracked.table) == 1
        release.set()
        await h
        assert len(tracked.table) == 0

    asyncio.run(main())


def test_async_make_serialising_mid_flight():
    async def main():
        tracked = AsyncTrackedRequests(timeout=5)
        events = []
        first_in = asyncio.Event()

        async def plain():
            async with tracked.request(4096, 512, "read"):
                first_in.set()
                for _ in range(3):
                    await asyncio.sleep(0)
                events.append("plain out")

        async def cor():
            await first_in.wait()
            async with tracked.request(0, 512, "read") as req:
                await tracked.make_serialising(req, 64 * KiB)  # copy-on-read of the whole cluster
                events.append("cor serialised")

        await asyncio.gather(plain(), cor())
        return events

    assert asyncio.run(main()) == ["plain out", "cor serialised"]
