"""The job runtime: QEMU's job lifecycle on asyncio, with its events, verbs, pause points, rate limit and
error policies.

Layer: engine.  A job is an asyncio task in the coordinator.  Subclasses implement ``run`` (the copy
loop, which calls ``pause_point``/``ratelimit`` between chunks and ``handle_error`` on an I/O error) and
the ``prepare``/``commit``/``abort``/``clean`` hooks of QEMU's finalisation.  Status changes follow
``engine.jobs.state``; every change is a JOB_STATUS_CHANGE event, sent through the manager's ``emit``.

Lifecycle (job.c): created -> running -> [ready/standby for jobs that converge] -> waiting -> pending
-> [BLOCK_JOB_PENDING and wait for finalize when auto-finalize is off] -> prepare -> commit -> COMPLETED
-> concluded -> null (when auto-dismiss).  Failure or cancel: aborting -> abort -> COMPLETED(error) or
CANCELLED -> concluded -> null.  Jobs in one transaction move to pending together and abort together.
"""
from __future__ import annotations

import asyncio
import errno as _errno
import os
import re
import time
from typing import Any, Callable, ClassVar

from engine.errors import BlockError
from engine.jobs.state import JobStateError, can_transition, check_verb
from engine.throttle import RateLimiter

JOB_ID_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")
ON_ERROR = ("report", "ignore", "enospc", "stop", "auto")


class JobCancelled(Exception):
    """Raised at a pause point of a force-cancelled job: the run loop unwinds."""


class JobError(BlockError):
    """A QMP-visible job command error (GenericError unless ``qmp_class`` says otherwise)."""

    def __init__(self, message: str, qmp_class: str = "GenericError") -> None:
        super().__init__(message)
        self.qmp_class = qmp_class


def error_text(exc: BaseException) -> str:
    """The ``error`` string of a failed job, as QEMU renders an errno (strerror)."""
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)
    if isinstance(exc, BlockError):
        return exc.message
    return str(exc) or type(exc).__name__


def exc_errno(exc: BaseException) -> int:
    return getattr(exc, "errno", None) or _errno.EIO


async def run_locked(graph: Any, fn: Callable[..., Any], *args: Any) -> Any:
    """A synchronous driver call in a helper thread, holding the graph's driver lock (format metadata
    has one owner at a time)."""
    async with graph.driver_lock:
        return await asyncio.to_thread(fn, *args)


async def read_source(graph: Any, node: Any, off: int, n: int) -> bytes | None:
    """[off, off+n) of ``node`` through its request pipeline, or None when block status says all of it
    reads as zeros (the caller writes zeros instead).  Errors are tagged ``job_stage = "read"`` for
    BLOCK_JOB_ERROR's ``operation``."""
    from engine.block import block_status_above
    from engine.driver import Status

    try:
        st, zn = await run_locked(graph, block_status_above, node.driver, off, n)
        if st & Status.ZERO and zn >= n:
            return None
        return await node.read(off, n)
    except Exception as exc:
        exc.job_stage = "read"  # type: ignore[attr-defined]
        raise


class JobTxn:
    """Jobs that complete together (QMP ``transaction`` with completion-mode grouped)."""

    def __init__(self) -> None:
        self.jobs: list[Job] = []
        self.aborting = False


class Job:
    job_type: ClassVar[str] = ""

    def __init__(self, manager: "JobManager", job_id: str, *, speed: int = 0, auto_finalize: bool = True,
                 auto_dismiss: bool = True, txn: JobTxn | None = None) -> None:
        self.manager = manager
        self.id = job_id
        self.status = "undefined"
        self.auto_finalize = auto_finalize
        self.auto_dismiss = auto_dismiss
        self.limiter = RateLimiter(speed)
        self.speed = speed
        self.current = 0
        self.total = 0
        self.busy = False
        self.pause_count = 0
        self.user_paused = False
        self.cancelled = False
        self.force_cancel = False
        self.io_status = "ok"
        self.ready_flag = False
        self.should_complete = False
        self.error: str | None = None
        self.ret_exc: BaseException | None = None
        self.done_running = False
        self.txn = txn or JobTxn()
        self.txn.jobs.append(self)
        self._wake = asyncio.Event()
        self._resumed = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._finalized = asyncio.Event()

    # ------------------------------------------------------------------ subclass hooks
    async def run(self) -> None:
        raise NotImplementedError

    def prepare(self) -> None:
        """Last step that may still fail the job (e.g. commit's header update).  Raises to fail."""

    def commit(self) -> None:
        """The job succeeded: make its result visible (graph changes)."""

    def abort(self) -> None:
        """The job failed or was cancelled: undo what prepare/run left half done."""

    def clean(self) -> None:
        """Always run last: drop blockers, restore read-only state."""

    def on_complete(self) -> None:
        """``job-complete`` for jobs that converge (mirror, active commit); others refuse."""
        raise JobError(f"The active block job '{self.id}' cannot be completed")

    # ------------------------------------------------------------------ state changes
    def _transition(self, new: str) -> None:
        if not can_transition(self.status, new):
            raise AssertionError(f"job {self.id}: illegal transition {self.status} -> {new}")
        self.status = new
        self.manager.emit("JOB_STATUS_CHANGE", {"status": new, "id": self.id})

    def start(self) -> None:
        self._transition("created")
        self._transition("running")
        self.busy = True
        self._task = asyncio.get_running_loop().create_task(self._main(), name=f"job-{self.id}")

    @property
    def paused(self) -> bool:
        return self.pause_count > 0

    def _kick(self) -> None:
        self._wake.set()

    async def sleep_ns(self, ns: int) -> None:
        """QEMU's job_sleep_ns: sleep unless kicked (cancel, resume, faster speed), then a pause point."""
        if ns > 0 and not self.cancelled and not self.pause_count:
            # a kick that came while the job was busy (pause, cancel, set-speed) ends the sleep at once
            self.busy = False
            try:
                await asyncio.wait_for(self._wake.wait(), ns / 1e9)
            except asyncio.TimeoutError:
                pass
            finally:
                self.busy = True
        self._wake.clear()
        await self.pause_point()

    async def yield_now(self) -> None:
        """Let other tasks (QMP commands, other jobs) run between chunks."""
        await asyncio.sleep(0)
        await self.pause_point()

    async def pause_point(self) -> None:
        """Park here while paused (status paused, or standby when ready); raise JobCancelled when
        force-cancelled."""
        if self.force_cancel:
            raise JobCancelled()
        if self.pause_count > 0 and not self.cancelled:
            self._transition("standby" if self.status == "ready" else "paused")
            self.busy = False
            while self.pause_count > 0 and not self.cancelled:
                self._resumed.clear()
                await self._resumed.wait()
            self.busy = True
            self._transition("ready" if self.status == "standby" else "running")
        if self.force_cancel:
            raise JobCancelled()

    async def ratelimit(self, nbytes: int) -> None:
        """Account ``nbytes`` copied and sleep as the speed limit says (block_job_ratelimit_*)."""
        self.limiter.calculate_delay(nbytes, time.monotonic_ns())
        while True:
            delay = self.limiter.calculate_delay(0, time.monotonic_ns())
            await self.sleep_ns(delay)
            if not delay or self.cancelled:
                return

    def set_ready(self) -> None:
        """Mirror-type jobs: the source and target have converged."""
        self.ready_flag = True
        self._transition("ready")
        self.manager.emit("BLOCK_JOB_READY", {"device": self.id, "len": self.total, "offset": self.current,
                                              "speed": self.speed, "type": self.job_type})

    def handle_error(self, exc: BaseException, is_read: bool, policy: str) -> str:
        """QEMU's block_job_error_action: decide, emit BLOCK_JOB_ERROR, and on 'stop' pause the job with
        io-status failed/nospace.  Returns 'report' (caller fails the job), 'ignore' or 'stop' (caller
        retries the same chunk after its next pause point)."""
        err = exc_errno(exc)
        if policy in ("enospc", "auto"):
            action = "stop" if err == _errno.ENOSPC else "report"
        else:
            action = policy
        if not self.cancelled:
            self.manager.emit("BLOCK_JOB_ERROR", {"device": self.id, "operation": "read" if is_read else "write",
                                                  "action": action})
        if action == "stop":
            if not self.user_paused:
                self.pause_count += 1
                self.user_paused = True
            self.io_status = "nospace" if err == _errno.ENOSPC else "failed"
        return action

    def chunk_failed(self, exc: BaseException, on_source: str, on_target: str) -> None:
        """A chunk copy failed: apply the policy of the side it failed on (``exc.job_stage``, read by
        default).  Re-raises for 'report' (the job fails); returns for ignore/stop, and the caller retries
        the chunk after its next pause point."""
        is_read = getattr(exc, "job_stage", "read") == "read"
        if self.handle_error(exc, is_read, on_source if is_read else on_target) == "report":
            raise exc

    # ------------------------------------------------------------------ the lifecycle
    async def _main(self) -> None:
        try:
            await self.pause_point()
            await self.run()
        except JobCancelled:
            self.ret_exc = asyncio.CancelledError()
        except Exception as exc:  # an I/O or engine error fails the job, it never kills the daemon
            self.ret_exc = exc
        self.busy = False
        self.done_running = True
        if self.ret_exc is None and self.force_cancel:
            self.ret_exc = asyncio.CancelledError()
        if self.ret_exc is None and not self.txn.aborting:
            self._completed_success()
        else:
            self._txn_abort()

    def _completed_success(self) -> None:
        self._transition("waiting")
        if any(j.status not in ("waiting",) for j in self.txn.jobs):
            return
        for j in self.txn.jobs:
            j._transition("pending")
        manual = [j for j in self.txn.jobs if not j.auto_finalize]
        for j in manual:
            self.manager.emit("BLOCK_JOB_PENDING", {"type": j.job_type, "id": j.id})
        if not manual:
            self._do_finalize()

    def _do_finalize(self) -> None:
        for j in self.txn.jobs:
            try:
                j.prepare()
            except Exception as exc:
                j.ret_exc = exc
                self._txn_abort()
                return
        for j in list(self.txn.jobs):
            j._finalize_single()

    def _txn_abort(self) -> None:
        """job_completed_txn_abort: every job of the transaction still running is force-cancelled; once
        the last one has unwound, all of them are aborted and concluded."""
        txn = self.txn
        txn.aborting = True
        self.done_running = True
        if self.status not in ("aborting", "concluded", "null"):
            self._transition("aborting")
        for j in txn.jobs:
            if not j.done_running:
                j.cancelled = j.force_cancel = True
                j.pause_count = 0
                j._resumed.set()
                j._kick()
        if not all(j.done_running for j in txn.jobs):
            return
        for j in txn.jobs:
            if j.status in ("concluded", "null"):
                continue
            if j.status != "aborting":
                j._transition("aborting")
            if j.ret_exc is None:
                j.ret_exc = asyncio.CancelledError()
            j._finalize_single()

    def _finalize_single(self) -> None:
        ok = self.ret_exc is None
        try:
            if ok:
                self.commit()
            else:
                self.abort()
        except Exception as exc:  # a hook failing must still conclude the job, with its error
            if ok:
                ok = False
                self.ret_exc = exc
        finally:
            self.clean()
        data = {"device": self.id, "len": self.total, "offset": self.current, "speed": self.speed,
                "type": self.job_type}
        if not ok and isinstance(self.ret_exc, asyncio.CancelledError):
            self.error = "Operation canceled"
            self.manager.emit("BLOCK_JOB_CANCELLED", data)
        else:
            if not ok:
                self.error = error_text(self.ret_exc)  # type: ignore[arg-type]
                data["error"] = self.error
            self.manager.emit("BLOCK_JOB_COMPLETED", data)
        self._transition("concluded")
        self._finalized.set()
        if self.auto_dismiss:
            self._dismiss()

    def _dismiss(self) -> None:
        self._transition("null")
        self.manager.jobs.pop(self.id, None)

    # ------------------------------------------------------------------ verbs (QMP)
    def verb(self, name: str) -> None:
        try:
            check_verb(self.id, self.status, name)
        except JobStateError as exc:
            raise JobError(exc.desc) from None

    def user_pause(self) -> None:
        self.verb("pause")
        if self.user_paused:
            raise JobError("Job is already paused")
        self.user_paused = True
        self.pause_count += 1
        self._kick()

    def user_resume(self) -> None:
        self.verb("resume")
        if not self.user_paused:
            raise JobError("Can't resume a job that was not paused")
        self.io_status = "ok"
        self.user_paused = False
        self.pause_count = max(0, self.pause_count - 1)
        self._resumed.set()
        self._kick()

    def set_speed(self, speed: int) -> None:
        self.verb("set-speed")
        if speed < 0:
            raise JobError("Parameter 'speed' expects a non-negative value")
        self.speed = speed
        self.limiter.set_speed(speed)
        self._kick()

    def cancel(self, force: bool) -> None:
        """job_cancel: jobs without a soft-cancel meaning are always force-cancelled."""
        self.verb("cancel")
        if self.status == "pending" or self.status == "waiting":
            self.cancelled = self.force_cancel = True
            self.ret_exc = asyncio.CancelledError()
            self._txn_abort()
            return
        force = self.soft_cancel_is_forced(force)
        self.cancelled = True
        self.force_cancel = self.force_cancel or force
        self.pause_count = 0
        self.user_paused = False
        self._resumed.set()
        self._kick()

    def soft_cancel_is_forced(self, force: bool) -> bool:
        """mirror_cancel's rule, overridden by converging jobs; other jobs: every cancel is forced."""
        return True

    def complete(self) -> None:
        self.verb("complete")
        if self.cancelled:
            raise JobError(f"The active block job '{self.id}' cannot be completed")
        self.on_complete()
        self.should_complete = True
        self._kick()

    def finalize(self) -> None:
        self.verb("finalize")
        self._do_finalize()

    def dismiss(self) -> None:
        self.verb("dismiss")
        self._dismiss()

    # ------------------------------------------------------------------ queries
    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {"current-progress": self.current, "status": self.status,
                               "total-progress": self.total, "type": self.job_type, "id": self.id}
        if self.error is not None:
            out["error"] = self.error
        return out

    def block_info(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "auto-finalize": self.auto_finalize, "io-status": self.io_status, "device": self.id,
            "auto-dismiss": self.auto_dismiss, "busy": self.busy, "len": self.total,
            "offset": self.current, "status": self.status, "paused": self.pause_count > 0 and
            self.status in ("paused", "standby") or self.user_paused,
            "speed": self.speed, "ready": self.ready_flag and self.status in ("ready", "standby"),
            "type": self.job_type}
        if self.error is not None:
            out["error"] = self.error
        return out


class JobManager:
    """All jobs of a daemon; ``emit(name, data)`` sends an event to every monitor."""

    def __init__(self, emit: Callable[[str, dict[str, Any]], None]) -> None:
        self.emit = emit
        self.jobs: dict[str, Job] = {}

    def check_new_id(self, job_id: Any) -> str:
        if job_id is None:
            job_id = ""
        if not JOB_ID_RE.match(job_id):
            raise JobError(f"Invalid job ID '{job_id}'")
        if job_id in self.jobs:
            raise JobError(f"Job ID '{job_id}' already in use")
        return job_id

    def add(self, job: Job) -> Job:
        self.jobs[job.id] = job
        return job

    def get(self, job_id: str, legacy: bool = False) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            if legacy:
                raise JobError(f"Block job '{job_id}' not found", "DeviceNotActive")
            raise JobError("Job not found")
        return job

    async def cancel_all(self, timeout: float = 30.0) -> None:
        """``quit``/SIGTERM: resume paused jobs and force-cancel everything, then wait for them."""
        for job in list(self.jobs.values()):
            if job.status in ("created", "running", "paused", "ready", "standby", "waiting", "pending"):
                try:
                    job.cancel(force=True)
                except JobError:
                    pass
        deadline = time.monotonic() + timeout
        for job in list(self.jobs.values()):
            if job._task is not None and not job._task.done():
                try:
                    await asyncio.wait_for(asyncio.shield(job._task), max(0.1, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    job._task.cancel()
