"""Harness for ``parablock daemon`` tests: start the daemon as its own process (as a management script
would), talk to it with the real qemu.qmp client, stop it, and check that it left nothing behind."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from tests.util import ROOT, qemu_img, qemu_io


class Qsd:
    """One running daemon and a connected legacy (synchronous) qemu.qmp client."""

    def __init__(self, proc: subprocess.Popen, sock: Path, cwd: Path) -> None:
        self.proc = proc
        self.sock = sock
        self.cwd = cwd
        self.qmp = QEMUMonitorProtocol(str(sock))
        self.greeting = self.qmp.connect(negotiate=True)
        self.events: list[dict[str, Any]] = []

    def cmd(self, name: str, /, **args: Any) -> dict[str, Any]:
        return self.qmp.cmd_raw(name, args or None)

    def ok(self, name: str, /, **args: Any) -> Any:
        res = self.cmd(name, **args)
        assert "return" in res, f"{name} {args}: {res}"
        return res["return"]

    def err(self, name: str, /, **args: Any) -> tuple[str, str]:
        res = self.cmd(name, **args)
        assert "error" in res, f"{name} {args} unexpectedly succeeded: {res}"
        return res["error"]["class"], res["error"]["desc"]

    def pull(self, wait: float = 0.0) -> list[dict[str, Any]]:
        try:
            new = self.qmp.get_events(wait=wait) if wait else self.qmp.get_events()
        except (TimeoutError, __import__("asyncio").TimeoutError):
            new = []
        self.events += new
        return new

    def wait_event(self, name: str, timeout: float = 30.0, **match: Any) -> dict[str, Any]:
        """The first event (already received or arriving) named ``name`` whose data contains ``match``."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for ev in self.events[seen:]:
                if ev["event"] == name and all(ev.get("data", {}).get(k) == v for k, v in match.items()):
                    return ev
            seen = len(self.events)
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {name} {match} within {timeout}s; got {[e['event'] for e in self.events]}")
            self.pull(wait=min(left, 0.5))

    def statuses(self, job_id: str) -> list[str]:
        self.pull()
        return [e["data"]["status"] for e in self.events
                if e["event"] == "JOB_STATUS_CHANGE" and e["data"]["id"] == job_id]

    def wait_job_gone(self, job_id: str, timeout: float = 30.0) -> None:
        self.wait_event("JOB_STATUS_CHANGE", timeout, id=job_id, status="null")

    def stop(self) -> int:
        """``quit``, then wait for the exit; asserts that no worker outlives the daemon."""
        if self.proc.poll() is not None:
            return self.proc.returncode
        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            kids = []
        try:
            self.cmd("quit")
        except Exception:
            pass
        try:
            self.qmp.close()
        except Exception:
            pass
        rc = self.proc.wait(timeout=60)
        deadline = time.monotonic() + 10
        alive = [k for k in kids if k.is_running() and k.status() != psutil.STATUS_ZOMBIE]
        while alive and time.monotonic() < deadline:
            time.sleep(0.05)
            alive = [k for k in alive if k.is_running() and k.status() != psutil.STATUS_ZOMBIE]
        assert not alive, f"daemon left processes behind: {alive}"
        assert not self.sock.exists(), "monitor socket left behind"
        return rc


def start_daemon(cwd: Path, *args: str, workers: int = 1, sock_name: str = "qmp.sock",
                 timeout: float = 30.0) -> Qsd:
    sock = cwd / sock_name
    cmd = [sys.executable, "-m", "engine", "daemon", "--workers", str(workers),
           "--chardev", f"socket,id=mon0,path={sock},server=on,wait=off", "--monitor", "chardev=mon0", *args]
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + timeout
    while not sock.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"daemon exited {proc.returncode}: {err.decode()}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.communicate()
            raise AssertionError("daemon did not create its monitor socket")
        time.sleep(0.02)
    return Qsd(proc, sock, cwd)


@pytest.fixture
def qsd(tmp_path):
    """Factory: ``qsd(*daemon_args, workers=1)`` -> a running Qsd (stopped at teardown)."""
    running: list[Qsd] = []

    def factory(*args: str, **kw: Any) -> Qsd:
        d = start_daemon(tmp_path, *args, **kw)
        running.append(d)
        return d

    yield factory
    for d in running:
        if d.proc.poll() is None:
            d.stop()
        if d.proc.stdout:
            d.proc.stdout.close()
        if d.proc.stderr:
            d.proc.stderr.close()


MiB = 1 << 20


def make_chain(d: Path, size: str = "4M") -> dict[str, Path]:
    """The reference fixture (qmp-surface.md §5.1): base <- mid <- top, qcow2, base 0xaa at [0,1M), mid
    0xbb at [1M,2M), top 0xcc at [2M,3M), made by qemu-img and qemu-io."""
    paths = {n: d / f"{n}.qcow2" for n in ("base", "mid", "top")}
    qemu_img("create", "-q", "-f", "qcow2", str(paths["base"]), size)
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(paths["mid"]))
    qemu_img("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", str(paths["top"]))
    qemu_io("-c", "write -P 0xaa 0 1M", str(paths["base"]))
    qemu_io("-c", "write -P 0xbb 1M 1M", str(paths["mid"]))
    qemu_io("-c", "write -P 0xcc 2M 1M", str(paths["top"]))
    return paths


def chain_blockdevs(backing_of_base: str = "null") -> list[str]:
    """--blockdev arguments adding base, mid and top with explicit node names (files base-file, ...)."""
    out = []
    for name, backing in (("base", None), ("mid", "base"), ("top", "mid")):
        out += ["--blockdev", f"driver=file,node-name={name}-file,filename={name}.qcow2"]
        if backing is None:
            out += ["--blockdev", f'{{"driver": "qcow2", "node-name": "{name}", "file": "{name}-file", '
                                  f'"backing": null}}']
        else:
            out += ["--blockdev", f"driver=qcow2,node-name={name},file={name}-file,backing={backing}"]
    return out
