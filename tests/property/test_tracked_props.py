"""Property tests of tracked requests: a state machine over the pure table and random asyncio tasks.

The machine begins requests at random offsets and lengths (some serialising with a random power-of-two
alignment, some held by one of a few owners, who are blocked while one of their requests is not
running), re-checks NEW/WOKEN requests, ends running requests, abandons waits (a timeout) and makes
running requests serialising mid-flight.  After every step:

- no two RUNNING requests conflict (overlap ranges meet and one of them is serialising);
- every WAITING request is queued on a tracked request that conflicts with it (no lost wake-up);
- the waits-for graph has no cycle, and a simulated drain (end what can end, re-check what can
  re-check) empties the table: nothing waits forever unless a WaitCycle was raised for it.

The asyncio test runs many random tasks through engine.tracked_async and checks the same exclusion at
run time, from intervals recorded inside the critical sections, and that every task finishes in time.
"""
from __future__ import annotations

import asyncio
import copy

import hypothesis.strategies as st
from hypothesis import HealthCheck, given, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from engine.tracked import RequestState, TrackedRequests, WaitCycle, ranges_overlap, requests_conflict
from engine.tracked_async import AsyncTrackedRequests

S = RequestState
BLOCK = 512
MAX_REQUESTS = 14

offsets = st.one_of(st.integers(min_value=0, max_value=32).map(lambda n: n * BLOCK),
                    st.integers(min_value=0, max_value=16 * BLOCK))
lengths = st.one_of(st.integers(min_value=1, max_value=4).map(lambda n: n * BLOCK),
                    st.integers(min_value=0, max_value=8 * BLOCK), st.sampled_from([0, 1]))
ALIGNS = [1 << k for k in range(0, 17)]
aligns = st.one_of(st.none(), st.sampled_from([1, 2, 512, 4096]), st.sampled_from(ALIGNS))
owners = st.sampled_from([None, 0, 1, 2])


def blocked_owners(table: TrackedRequests) -> set[object]:
    """Owners that have a request which is not running: they are parked and cannot end anything."""
    return {r.owner for r in table if r.owner is not None and r.state is not S.RUNNING}


def drain(table: TrackedRequests) -> tuple[bool, int]:
    """Run a copy of ``table`` to completion; (emptied, number of WaitCycles raised on the way)."""
    table = copy.deepcopy(table)
    cycles = 0
    while len(table):
        progressed = False
        blocked = blocked_owners(table)
        for req in table.running:
            if req.owner is None or req.owner not in blocked:
                table.end(req)
                progressed = True
        for req in table.in_state(S.NEW, S.WOKEN):
            try:
                if table.start(req) is None:
                    progressed = True
            except WaitCycle:
                table.end(req)
                cycles += 1
                progressed = True
        if not progressed:
            return False, cycles
    return True, cycles


class TrackedMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.table = TrackedRequests()
        self.cycles = 0

    # --- helpers ---

    def _start(self, req) -> None:
        conflicts_before = self.table.conflicts(req)
        try:
            blocker = self.table.start(req)
        except WaitCycle as err:
            self._check_cycle(req, err.cycle, conflicts_before)
            self.cycles += 1
            self.table.end(req)
            return
        if blocker is None:
            assert conflicts_before == [] and req.state is S.RUNNING
        else:
            assert blocker is conflicts_before[0] and req.waiting_for is blocker
            assert req.state is S.WAITING

    def _check_cycle(self, req, cycle, conflicts_before) -> None:
        """A reported cycle is real: every hop is an edge of the waits-for graph, one hop an owner's."""
        assert cycle[0] == cycle[-1] == req.id and len(cycle) >= 3
        path = [self.table.get(i) for i in cycle]
        assert all(r is not None for r in path)
        owner_hops = 0
        for a, b in zip(path, path[1:]):
            if a is req:
                assert b in conflicts_before
            elif a.state is S.WAITING:
                assert a.waiting_for is b
            else:
                assert a.owner is not None and b.owner == a.owner and (b is req or b.state is S.WAITING)
                owner_hops += 1
        assert owner_hops >= 1  # without owners QEMU's rule cannot deadlock

    def _pick(self, data, candidates):
        if not candidates:
            return None
        return data.draw(st.sampled_from(candidates))

    # --- rules ---

    @rule(offset=offsets, nbytes=lengths, align=aligns, owner=owners, kind=st.sampled_from(
        ["read", "write", "discard", "truncate", "zero"]))
    def begin(self, offset, nbytes, align, owner, kind):
        if len(self.table) >= MAX_REQUESTS:
            return
        if owner in blocked_owners(self.table):
            owner = None  # a parked owner issues nothing
        req = self.table.begin(offset, nbytes, kind, owner=owner)
        assert req.overlap_offset == offset and req.overlap_bytes == nbytes and not req.serialising
        if align is not None:
            self.table.make_serialising(req, align)
            assert req.overlap_offset % align == 0 and req.overlap_end % align == 0
            assert req.overlap_offset <= offset and offset + nbytes <= req.overlap_end
            assert req.overlap_bytes - nbytes < 2 * align
        self._start(req)

    @rule(data=st.data())
    def end_running(self, data):
        blocked = blocked_owners(self.table)
        req = self._pick(data, [r for r in self.table.running if r.owner is None or r.owner not in blocked])
        if req is None:
            return
        expected = self.table.waiters(req)
        woken = self.table.end(req)
        assert woken == expected
        assert all(w.state is S.WOKEN for w in woken)

    @rule(data=st.data())
    def run(self, data):
        """Re-check a NEW or WOKEN request: it runs iff its conflicts are empty, else it waits."""
        req = self._pick(data, self.table.in_state(S.NEW, S.WOKEN))
        if req is not None:
            self._start(req)

    @rule(data=st.data())
    def abandon_wait(self, data):
        req = self._pick(data, self.table.waiting)
        if req is not None:
            blocker = req.waiting_for
            self.table.end(req)
            assert req not in self.table.waiters(blocker)

    @rule(data=st.data(), align=st.sampled_from(ALIGNS))
    def serialise_mid_flight(self, data, align):
        blocked = blocked_owners(self.table)
        req = self._pick(data, [r for r in self.table.running if r.owner is None or r.owner not in blocked])
        if req is None:
            return
        self.table.make_serialising(req, align)
        assert req.state is S.NEW
        self._start(req)

    # --- invariants ---

    @invariant()
    def running_requests_never_conflict(self):
        run = self.table.running
        for i, a in enumerate(run):
            for b in run[i + 1:]:
                assert not requests_conflict(a, b), (a, b)

    @invariant()
    def no_lost_wakeups(self):
        for req in self.table.waiting:
            blocker = req.waiting_for
            assert blocker is not None and blocker in self.table
            assert blocker.state is not S.ENDED
            assert requests_conflict(req, blocker)
            assert req in self.table.waiters(blocker)
        queued = [w for r in self.table for w in self.table.waiters(r)]
        assert sorted(w.id for w in queued) == sorted(r.id for r in self.table.waiting)

    @invariant()
    def waits_for_graph_is_acyclic(self):
        for req in self.table.waiting:
            seen = {req.id}
            cur = req.waiting_for
            while cur is not None and cur.state is S.WAITING:
                assert cur.id not in seen
                seen.add(cur.id)
                cur = cur.waiting_for

    @invariant()
    def bookkeeping(self):
        assert self.table.serialising_in_flight == sum(r.serialising for r in self.table)
        for req in self.table:
            assert req.state is not S.ENDED
            assert (req.waiting_for is None) == (req.state in (S.NEW, S.RUNNING))

    @invariant()
    def nothing_waits_forever(self):
        if not self.table.running and self.table.waiting:
            # Every parked chain ends at a request that can make progress.
            assert self.table.in_state(S.NEW, S.WOKEN)
        emptied, _ = drain(self.table)
        assert emptied


TrackedMachine.TestCase.settings = settings(
    max_examples=120, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestTrackedMachine = TrackedMachine.TestCase


# --- asyncio adapter under random concurrent tasks --------------------------------------------------

task_specs = st.lists(
    st.tuples(
        offsets,  # offset
        lengths,  # bytes
        aligns,  # serialising alignment at begin
        st.one_of(st.none(), st.sampled_from([512, 4096, 65536])),  # made serialising mid-flight
        st.integers(min_value=0, max_value=4),  # yields before starting
        st.integers(min_value=0, max_value=6),  # yields inside the critical section
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=task_specs)
def test_async_adapter_excludes_conflicts_and_finishes(specs):
    async def main():
        tracked = AsyncTrackedRequests(timeout=1)  # a normal run takes milliseconds
        inside: dict[int, tuple[int, int, bool]] = {}  # id -> overlap range and serialising, while running
        violations: list[tuple] = []
        finished: list[int] = []

        def enter(req):
            me = (req.overlap_offset, req.overlap_bytes, req.serialising)
            for other_id, (o_off, o_bytes, o_ser) in inside.items():
                if (me[2] or o_ser) and ranges_overlap(me[0], me[1], o_off, o_bytes):
                    violations.append((req.id, other_id))
            inside[req.id] = me

        async def one(n, offset, nbytes, align, late_align, pre, hold):
            for _ in range(pre):
                await asyncio.sleep(0)
            async with tracked.request(offset, nbytes, "write", serialising_align=align) as req:
                enter(req)
                for _ in range(hold):
                    await asyncio.sleep(0)
                if late_align is not None:
                    del inside[req.id]  # parked again until serialising is safe
                    await tracked.make_serialising(req, late_align)
                    enter(req)
                    for _ in range(hold):
                        await asyncio.sleep(0)
                del inside[req.id]
            finished.append(n)

        async with asyncio.timeout(2):
            await asyncio.gather(*(one(n, *spec) for n, spec in enumerate(specs)))
        assert violations == []
        assert sorted(finished) == list(range(len(specs)))
        assert len(tracked.table) == 0 and tracked.table.serialising_in_flight == 0

    asyncio.run(main())
