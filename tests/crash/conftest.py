"""Helpers for the crash tests (issue 5 item 5): start parablock as its own process, find and kill its
workers or itself with SIGKILL, check that nothing it started outlives it, and judge images the way
QEMU does (``qemu-img check``: clean or leaks only, and ``-r leaks`` repairs them)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tests.util import ROOT, qemu_check, qemu_img, run

MiB = 1 << 20


def spawn(*args: str, cwd: Path) -> subprocess.Popen:
    """``parablock ARGS`` as a child process (stdout/stderr captured)."""
    return subprocess.Popen([sys.executable, "-m", "engine", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def alive(procs) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            pass
    return out


def assert_all_exit(procs, timeout: float = 10.0, what: str = "") -> None:
    """Every process in ``procs`` is gone within ``timeout`` seconds (kills the stragglers, then fails)."""
    deadline = time.monotonic() + timeout
    left = alive(procs)
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = alive(left)
    for p in left:
        try:
            p.kill()
        except psutil.Error:
            pass
    assert not left, f"processes left behind {what}: {[p.pid for p in left]}"


def workers_of(pid: int) -> list[psutil.Process]:
    """The worker processes of a parablock process: its live descendants except multiprocess's
    fork server and resource tracker (direct children running those modules).  Replacement workers are
    forked by the fork server, so they carry its command line but are its children."""
    out = []
    for p in alive(descendants(pid)):
        try:
            cmd = " ".join(p.cmdline())
            helper = p.ppid() == pid and ("forkserver" in cmd or "resource_tracker" in cmd)
        except psutil.Error:
            continue
        if not helper:
            out.append(p)
    return out


def allocated(path: Path) -> int:
    try:
        return os.stat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


def wait_until(pred, timeout: float, step: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


def sigkill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def assert_recoverable(path: Path) -> int:
    """``qemu-img check``: clean (0) or leaks only (3), never corruptions; ``-r leaks`` then leaves it
    clean.  Returns the first check's exit code."""
    rc, data = qemu_check(path)
    assert rc in (0, 3), f"{path.name}: qemu-img check rc={rc}: {data}"
    assert not data.get("corruptions"), f"{path.name}: {data}"
    if rc == 3:
        assert data.get("leaks"), data
        rep = run(["qemu-img", "check", "-r", "leaks", str(path)], check=False)
        assert rep.returncode == 0, f"{path.name}: repair rc={rep.returncode}: {rep.stdout}{rep.stderr}"
        rc2, data2 = qemu_check(path)
        assert rc2 == 0 and not data2.get("leaks") and not data2.get("corruptions"), data2
    return rc


def reads_ok(path: Path, *ranges: tuple[int, int, int], fmt: str = "qcow2") -> None:
    """qemu-io ``read -P pattern off len`` succeeds for every (pattern, off, len) of ``ranges``."""
    cmds = []
    for pat, off, ln in ranges:
        cmds += ["-c", f"read -q -P {pat:#x} {off} {ln}"]
    p = run(["qemu-io", "-f", fmt, "-r", *cmds, str(path)], check=False)
    assert p.returncode == 0 and "Pattern verification failed" not in p.stdout + p.stderr, \
        f"{path.name}: {ranges}: {p.stdout[-2000:]}{p.stderr[-2000:]}"


def patterned(path: Path, size: int, *writes: tuple[int, int, int], backing: str | None = None,
              opts: str | None = None) -> Path:
    """A qcow2 image made by qemu-img/qemu-io with ``writes`` = (pattern, off, len)."""
    args = ["create", "-q", "-f", "qcow2"]
    if opts:
        args += ["-o", opts]
    if backing:
        args += ["-b", backing, "-F", "qcow2"]
    qemu_img(*args, str(path), str(size))
    if writes:
        cmds = []
        for pat, off, ln in writes:
            cmds += ["-c", f"write -q -P {pat:#x} {off} {ln}"]
        run(["qemu-io", "-f", "qcow2", *cmds, str(path)])
    return path
