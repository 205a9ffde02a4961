"""The job state machine, driven live: real Job objects on an event loop are brought into each state a
client can observe, and every verb is tried there.  Expected answers are QEMU 7.2's verb table
(../shared/reference/qmp-surface.md §3), written out here independently of engine.jobs.state."""
from __future__ import annotations

import asyncio

import pytest

from engine.jobs.job import Job, JobError, JobManager, JobTxn

# state -> verbs QEMU 7.2 accepts there (qmp-surface.md §3)
ACCEPTS = {
    "running": {"cancel", "pause", "resume", "set-speed"},
    "paused": {"cancel", "pause", "resume", "set-speed"},
    "ready": {"cancel", "pause", "resume", "set-speed", "complete"},
    "standby": {"cancel", "pause", "resume", "set-speed", "complete"},
    "waiting": {"cancel"},
    "pending": {"cancel", "finalize"},
    "concluded": {"dismiss"},
}
VERBS = ["cancel", "pause", "resume", "set-speed", "complete", "finalize", "dismiss"]


class Events:
    def __init__(self) -> None:
        self.items: list[tuple[str, dict]] = []

    def __call__(self, name: str, data: dict) -> None:
        self.items.append((name, data))

    def statuses(self, job_id: str) -> list[str]:
        return [d["status"] for n, d in self.items if n == "JOB_STATUS_CHANGE" and d["id"] == job_id]

    def names(self) -> list[str]:
        return [n for n, _ in self.items if n != "JOB_STATUS_CHANGE"]


class LoopJob(Job):
    """Copies nothing: loops over pause points until told to stop (or to converge, then waits for
    complete, like a mirror)."""

    job_type = "commit"

    def __init__(self, *a, converge: bool = False, fail: bool = False, **kw) -> None:
        super().__init__(*a, **kw)
        self.converge = converge
        self.fail = fail
        self.stop = False
        self.total = 100

    async def run(self) -> None:
        while not self.stop and not self.cancelled:
            if self.converge and self.status == "running" and not self.ready_flag:
                self.current = self.total
                self.set_ready()
            if self.should_complete:
                return
            if self.fail:
                raise OSError(5, "Input/output error")
            await self.sleep_ns(1_000_000)

    def on_complete(self) -> None:
        if not self.converge:
            super().on_complete()


async def settle(cond, timeout: float = 2.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        if loop.time() > end:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.002)


async def job_in_state(state: str) -> tuple[JobManager, Job, Events]:
    ev = Events()
    mgr = JobManager(ev)
    conv = state in ("ready", "standby")
    job = mgr.add(LoopJob(mgr, "j", converge=conv, auto_finalize=state != "pending",
                          auto_dismiss=state != "concluded"))
    if state == "waiting":
        other = LoopJob(mgr, "other", txn=job.txn)
        mgr.add(other)
        other.start()
    job.start()
    if state in ("running",):
        await asyncio.sleep(0.01)
    elif state == "paused":
        job.user_pause()
        await settle(lambda: job.status == "paused")
    elif state == "ready":
        await settle(lambda: job.status == "ready")
    elif state == "standby":
        await settle(lambda: job.status == "ready")
        job.user_pause()
        await settle(lambda: job.status == "standby")
    elif state in ("waiting", "pending", "concluded"):
        job.stop = True
        await settle(lambda: job.status == state)
    assert job.status == state
    return mgr, job, ev


def try_verb(job: Job, verb: str) -> bool:
    try:
        if verb == "cancel":
            job.cancel(True)
        elif verb == "pause":
            job.user_pause()
        elif verb == "resume":
            job.user_resume()
        elif verb == "set-speed":
            job.set_speed(1 << 20)
        elif verb == "complete":
            job.complete()
        elif verb == "finalize":
            job.finalize()
        elif verb == "dismiss":
            job.dismiss()
        return True
    except JobError as exc:
        if f"cannot accept command verb '{verb}'" in exc.message:
            assert exc.message == f"Job 'j' in state '{job.status}' cannot accept command verb '{verb}'"
            return False
        # a command-level check (already paused, not paused, cannot be completed) passed the table
        return True


async def cleanup(mgr: JobManager) -> None:
    for j in list(mgr.jobs.values()):
        j.stop = True  # type: ignore[attr-defined]
    await mgr.cancel_all(timeout=2)


@pytest.mark.parametrize("state", list(ACCEPTS))
@pytest.mark.parametrize("verb", VERBS)
def test_verb_table(state: str, verb: str) -> None:
    async def main() -> None:
        mgr, job, _ = await job_in_state(state)
        try:
            assert try_verb(job, verb) == (verb in ACCEPTS[state])
        finally:
            await cleanup(mgr)

    asyncio.run(main())


def test_success_sequence_and_events() -> None:
    async def main() -> None:
        mgr, job, ev = await job_in_state("running")
        job.stop = True
        await settle(lambda: not mgr.jobs)
        assert ev.statuses("j") == ["created", "running", "waiting", "pending", "concluded", "null"]
        assert ev.names() == ["BLOCK_JOB_COMPLETED"]
        done = [d for n, d in ev.items if n == "BLOCK_JOB_COMPLETED"][0]
        assert done == {"device": "j", "len": 100, "offset": 0, "speed": 0, "type": "commit"}

    asyncio.run(main())


def test_manual_finalize_and_dismiss() -> None:
    async def main() -> None:
        ev = Events()
        mgr = JobManager(ev)
        job = mgr.add(LoopJob(mgr, "j", auto_finalize=False, auto_dismiss=False))
        job.start()
        job.stop = True
        await settle(lambda: job.status == "pending")
        assert ev.names() == ["BLOCK_JOB_PENDING"]
        job.finalize()
        assert job.status == "concluded" and "j" in mgr.jobs
        assert job.info()["status"] == "concluded" and "error" not in job.info()
        job.dismiss()
        assert "j" not in mgr.jobs
        assert ev.statuses("j")[-3:] == ["pending", "concluded", "null"]

    asyncio.run(main())


def test_cancel_pause_resume_rules() -> None:
    async def main() -> None:
        mgr, job, ev = await job_in_state("paused")
        with pytest.raises(JobError, match="^Job is already paused$"):
            job.user_pause()
        job.user_resume()
        await settle(lambda: job.status == "running")
        with pytest.raises(JobError, match="^Can't resume a job that was not paused$"):
            job.user_resume()
        with pytest.raises(JobError, match="^Job 'j' in state 'running' cannot accept command verb 'complete'$"):
            job.complete()
        job.auto_dismiss = False
        job.cancel(False)
        await settle(lambda: job.status == "concluded")
        assert ev.statuses("j")[-3:] == ["running", "aborting", "concluded"]
        assert "BLOCK_JOB_CANCELLED" in ev.names()
        assert job.info()["error"] == "Operation canceled"
        await cleanup(mgr)

    asyncio.run(main())


def test_error_fails_job_with_strerror() -> None:
    async def main() -> None:
        ev = Events()
        mgr = JobManager(ev)
        job = mgr.add(LoopJob(mgr, "j", fail=True, auto_dismiss=False))
        job.start()
        await settle(lambda: job.status == "concluded")
        done = [d for n, d in ev.items if n == "BLOCK_JOB_COMPLETED"][0]
        assert done["error"] == "Input/output error"
        assert ev.statuses("j") == ["created", "running", "aborting", "concluded"]

    asyncio.run(main())


def test_soft_cancel_of_ready_job_completes() -> None:
    """block-job-cancel without force on a READY converging job: COMPLETED, not CANCELLED."""

    class Soft(LoopJob):
        def soft_cancel_is_forced(self, force: bool) -> bool:
            return force or not self.ready_flag

    async def main() -> None:
        ev = Events()
        mgr = JobManager(ev)
        job = mgr.add(Soft(mgr, "j", converge=True))
        job.start()
        await settle(lambda: job.status == "ready")
        job.cancel(False)
        await settle(lambda: not mgr.jobs)
        assert "BLOCK_JOB_COMPLETED" in ev.names() and "BLOCK_JOB_CANCELLED" not in ev.names()
        assert ev.names()[0] == "BLOCK_JOB_READY"

    asyncio.run(main())


def test_transaction_aborts_together() -> None:
    async def main() -> None:
        ev = Events()
        mgr = JobManager(ev)
        txn = JobTxn()
        a = mgr.add(LoopJob(mgr, "a", txn=txn))
        b = mgr.add(LoopJob(mgr, "b", txn=txn, fail=True))
        a.start()
        b.start()
        await settle(lambda: not mgr.jobs)
        assert ev.statuses("a")[-3:] == ["aborting", "concluded", "null"]
        kinds = {d["device"]: n for n, d in ev.items if n.startswith("BLOCK_JOB_")}
        assert kinds == {"a": "BLOCK_JOB_CANCELLED", "b": "BLOCK_JOB_COMPLETED"}

    asyncio.run(main())
