"""SIGKILL one worker process in the middle of a CLI convert/commit and of daemon commit, mirror and
backup jobs (issue 5 item 5, part 1).  Whatever request the worker held, the user sees either a correct
result (the pool replaced the worker; a job whose on-error policy is ``stop`` retries the chunk after
resume) or one clear error line / a failed job naming the dead worker.  Nothing outlives the command,
the daemon keeps serving with a full pool and no fd growth, and every image passes ``qemu-img check``."""
from __future__ import annotations

import time

import pytest

from tests.crash.conftest import (MiB, alive, allocated, assert_all_exit, assert_recoverable, descendants,
                                  patterned, reads_ok, spawn, wait_until, workers_of)
from tests.daemon.conftest import start_daemon
from tests.util import assert_qemu_clean, needs_qemu, qemu_compare, qemu_img

pytestmark = [needs_qemu, pytest.mark.timeout(120)]


def _kill(worker, freeze: bool) -> None:
    """SIGKILL ``worker``.  With ``freeze`` it is first stopped (SIGSTOP) for a moment, so that the
    requests the pool keeps sending it are surely in flight when it dies."""
    if freeze:
        worker.suspend()
        time.sleep(0.4)
    worker.kill()


def _kill_worker_when(proc, pred, freeze: bool, timeout: float = 12.0):
    """Once ``pred()`` holds, SIGKILL one worker of ``proc``; keep collecting every descendant until
    ``proc`` exits.  Returns (killed pid or None, all descendants seen, stdout, stderr)."""
    seen: dict[int, object] = {}
    killed = None
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        for p in descendants(proc.pid):
            seen.setdefault(p.pid, p)
        if killed is None and pred():
            ws = workers_of(proc.pid)
            if ws:
                killed = ws[0].pid
                _kill(ws[0], freeze)
        time.sleep(0.005)
    if proc.poll() is None:  # hung: show the user's view, then clean up
        for p in alive(descendants(proc.pid)):
            p.kill()
        proc.kill()
        proc.wait()
        proc.returncode = None
    out, err = proc.communicate(timeout=30)
    return killed, list(seen.values()), out, err


def _assert_clear_failure(rc: int, err: str, killed: int) -> None:
    lines = err.strip().splitlines()
    assert rc == 1, (rc, err)
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("parablock: ") and f"pid {killed}" in lines[0] and "died" in lines[0], err




def _cli_kill_run(tmp_path, args, watch, threshold, check):
    """Run ``parablock ARGS``, freeze+kill a worker once ``watch`` has ``threshold`` more bytes
    allocated, then ``check(rc, err, killed)``; the CLI must exit promptly leaving no process behind."""
    start = allocated(watch)
    proc = spawn(*args, cwd=tmp_path)
    killed, seen, out, err = _kill_worker_when(proc, lambda: allocated(watch) >= start + threshold, True)
    assert killed is not None, f"{args[0]} finished before a worker could be killed: {err}"
    assert proc.returncode is not None, f"{args[0]} still running 12 s after its worker was killed"
    assert_all_exit(seen, what=f"by {args[0]}")
    check(proc.returncode, err, killed)


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_convert_worker_killed(tmp_path, fmt):
    """A worker frozen (so a 'copy' is surely in flight) then SIGKILLed mid-convert: convert has no
    retry, so it must fail with one clear line naming the dead worker, promptly, leaving no process; the
    half-written target has leaks at most.  Three runs, since the failure is a race."""
    src = patterned(tmp_path / "src.qcow2", 320 * MiB, (0x5a, 0, 128 * MiB), (0x33, 160 * MiB, 160 * MiB))
    for i in range(3):
        dst = tmp_path / f"dst{i}.{fmt}"

        def check(rc, err, killed):
            if rc == 0:
                assert qemu_compare(src, dst, "qcow2", fmt).returncode == 0
            else:
                _assert_clear_failure(rc, err, killed)
                if fmt == "qcow2":
                    assert_recoverable(dst)
        _cli_kill_run(tmp_path, ["convert", "--workers", "2", "-O", fmt, str(src), str(dst)], dst, 48 * MiB,
                      check)
    assert_qemu_clean(src)


def test_commit_worker_killed(tmp_path):
    """The same for commit: base keeps leaks at most, the top is untouched and its guest view intact."""
    for i in range(3):
        base = patterned(tmp_path / f"base{i}.qcow2", 256 * MiB, (0x11, 0, 64 * MiB))
        top = patterned(tmp_path / f"top{i}.qcow2", 256 * MiB, (0xcc, 0, 224 * MiB), backing=base.name)

        def check(rc, err, killed):
            if rc == 0:
                assert_qemu_clean(base)
                reads_ok(base, (0xcc, 0, 224 * MiB), (0, 224 * MiB, 32 * MiB))
            else:
                _assert_clear_failure(rc, err, killed)
                assert_recoverable(base)
            assert_qemu_clean(top)
            reads_ok(top, (0xcc, 0, 224 * MiB), (0, 224 * MiB, 32 * MiB))
        _cli_kill_run(tmp_path, ["commit", "--workers", "2", str(top)], base, 48 * MiB, check)


# --------------------------------------------------------------------------------------------------
# daemon jobs
# --------------------------------------------------------------------------------------------------
SIZE = 48 * MiB
# base 0x11 everywhere, mid 0x22 over [8M,32M), top 0x33 over [16M,24M)
CHAIN_VIEW = [(0x11, 0, 8 * MiB), (0x22, 8 * MiB, 8 * MiB), (0x33, 16 * MiB, 8 * MiB),
              (0x22, 24 * MiB, 8 * MiB), (0x11, 32 * MiB, 16 * MiB)]
BASE_AFTER_COMMIT = [(0x11, 0, 8 * MiB), (0x22, 8 * MiB, 24 * MiB), (0x11, 32 * MiB, 16 * MiB)]


def _chain(d):
    patterned(d / "base.qcow2", SIZE, (0x11, 0, SIZE))
    patterned(d / "mid.qcow2", SIZE, (0x22, 8 * MiB, 24 * MiB), backing="base.qcow2")
    patterned(d / "top.qcow2", SIZE, (0x33, 16 * MiB, 8 * MiB), backing="mid.qcow2")
    for t in ("tgt", "tgt2", "tgt3"):
        qemu_img("create", "-q", "-f", "qcow2", str(d / f"{t}.qcow2"), str(SIZE))
    args = []
    for name, backing in (("base", "null"), ("mid", '"base"'), ("top", '"mid"')):
        args += ["--blockdev", f'{{"driver": "qcow2", "node-name": "{name}", "backing": {backing}, '
                               f'"file": {{"driver": "file", "filename": "{name}.qcow2"}}}}']
    for t in ("tgt", "tgt2", "tgt3"):
        args += ["--blockdev", f'{{"driver": "qcow2", "node-name": "{t}", "backing": null, '
                               f'"file": {{"driver": "file", "filename": "{t}.qcow2"}}}}']
    return args


JOBS = {
    # (QMP command, arguments, on-error policy arguments, needs job-complete)
    "commit": ("block-commit", {"device": "top", "top-node": "mid", "base-node": "base"},
               {"on-error": "stop"}, False),
    "mirror": ("blockdev-mirror", {"device": "top", "target": "tgt", "sync": "full"},
               {"on-source-error": "stop", "on-target-error": "stop"}, True),
    "backup": ("blockdev-backup", {"device": "top", "target": "tgt", "sync": "full"}, {}, False),
}


def _progress(d, job_id: str) -> int:
    for j in d.ok("query-jobs"):
        if j["id"] == job_id:
            return j["current-progress"]
    return -1


def _run_job_killing_workers(d, job: str, job_id: str, kills: int) -> tuple[list[int], dict]:
    """Start ``job`` speed-limited, SIGKILL workers ``kills`` times while it copies (the first time
    every worker, frozen first so that a request is surely in flight), resume it after every stop;
    returns the killed pids and its BLOCK_JOB_COMPLETED data."""
    cmd, args, policy, needs_complete = JOBS[job]
    d.ok(cmd, **{"job-id": job_id, "speed": 12 * MiB, "auto-dismiss": True, **args, **policy})
    seen = [0]

    def service() -> bool:
        """Handle new events; True once the job has ended."""
        d.pull()
        for e in d.events[seen[0]:]:
            if e["event"] == "BLOCK_JOB_ERROR":
                assert e["data"]["action"] == ("stop" if policy else "report"), e
            if e["event"] == "JOB_STATUS_CHANGE" and e["data"]["status"] == "paused":
                d.ok("job-resume", id=job_id)  # retry the failed chunk on the replacement worker
            if e["event"] == "BLOCK_JOB_READY" and needs_complete:
                d.ok("job-complete", id=job_id)
        seen[0] = len(d.events)
        return any(e["event"] in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED") for e in d.events)

    killed: list[int] = []
    for n in range(kills):
        assert wait_until(lambda: service() or _progress(d, job_id) >= (n + 1) * SIZE // (kills + 2), 30, 0.02)
        ws = workers_of(d.proc.pid)
        if service():
            break
        if n == 0:  # freeze every worker, so the job's next request is surely in flight, kill them all
            for w in ws:
                w.suspend()
            time.sleep(0.4)
            for w in ws:
                w.kill()
            killed += [w.pid for w in ws]
        else:
            ws[-1].kill()
            killed.append(ws[-1].pid)
        # the pool replaces them: two live workers again, no dead one among them
        assert wait_until(lambda: len(workers_of(d.proc.pid)) == 2
                          and not set(killed) & {w.pid for w in workers_of(d.proc.pid)}, 20, 0.02)
    assert wait_until(service, 60, 0.05), [e["event"] for e in d.events]
    done = [e for e in d.events if e["event"] in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")][0]
    return killed, done["data"]


def _reap_daemon(d) -> None:
    kids = descendants(d.proc.pid)
    if d.proc.poll() is None:
        d.proc.kill()
    for k in alive(kids):
        k.kill()
    d.proc.communicate(timeout=30)


@pytest.mark.parametrize("job", sorted(JOBS))
def test_daemon_job_worker_kill(tmp_path, job):
    d = start_daemon(tmp_path, *_chain(tmp_path), workers=2)
    try:
        assert wait_until(lambda: len(workers_of(d.proc.pid)) == 2, 20)
        killed, done = _run_job_killing_workers(d, job, "j1", kills=2)
        assert killed, "the job ended before any worker was killed"
        errors = [e for e in d.events if e["event"] == "BLOCK_JOB_ERROR"]
        if "error" in done:
            # only a 'report' policy may fail the job, and it must say which worker died
            assert job == "backup" and errors, done
            assert ("died" in done["error"] or "is gone" in done["error"]) and any(f"pid {p}" in done["error"] for p in killed), done
        else:
            assert done["offset"] == done["len"] == SIZE, done
        d.wait_job_gone("j1")
        # the daemon keeps serving: a full pool, query-jobs answers, a new (unthrottled) job succeeds
        assert d.ok("query-jobs") == []
        fds = d.proc and __import__("psutil").Process(d.proc.pid).num_fds()
        d.events.clear()
        d.ok("blockdev-backup", **{"job-id": "j2", "device": "top", "target": "tgt2", "sync": "full"})
        assert "error" not in d.wait_event("BLOCK_JOB_COMPLETED", device="j2")["data"]
        d.wait_job_gone("j2")
        # one more kill and recovery leaves the daemon with as many fds and workers as before
        d.events.clear()
        ws = workers_of(d.proc.pid)
        ws[0].kill()
        assert wait_until(lambda: len(workers_of(d.proc.pid)) == 2
                          and ws[0].pid not in [w.pid for w in workers_of(d.proc.pid)], 20, 0.02)
        d.ok("blockdev-backup", **{"job-id": "j3", "device": "top", "target": "tgt3", "sync": "full"})
        assert "error" not in d.wait_event("BLOCK_JOB_COMPLETED", device="j3")["data"]
        d.wait_job_gone("j3")
        assert __import__("psutil").Process(d.proc.pid).num_fds() == fds
        kids = descendants(d.proc.pid)
        assert d.stop() == 0
        assert_all_exit(kids, what="by the daemon")
    finally:
        _reap_daemon(d)
    for name in ("base", "mid", "top", "tgt", "tgt2", "tgt3"):
        assert_qemu_clean(tmp_path / f"{name}.qcow2")
    for name in ("tgt2", "tgt3"):
        reads_ok(tmp_path / f"{name}.qcow2", *CHAIN_VIEW)
    reads_ok(tmp_path / "top.qcow2", *CHAIN_VIEW)
    if "error" not in done:
        if job == "commit":
            reads_ok(tmp_path / "base.qcow2", *BASE_AFTER_COMMIT)
        else:
            reads_ok(tmp_path / "tgt.qcow2", *CHAIN_VIEW)
