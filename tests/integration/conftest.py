"""Every integration test starts processes: check that none of them, nor an fd, outlives the test."""
from __future__ import annotations

import os
import time

import psutil
import pytest


def _fds() -> set[str]:
    out = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            out.add(f"{name}->{os.readlink(f'/proc/self/fd/{name}')}")
        except OSError:
            pass
    return out


@pytest.fixture(autouse=True)
def no_leaks():
    before_fds = _fds()
    yield
    deadline = time.monotonic() + 5
    children = psutil.Process().children(recursive=True)
    while children and time.monotonic() < deadline:
        time.sleep(0.05)
        children = [c for c in psutil.Process().children(recursive=True) if c.is_running()
                    and c.status() != psutil.STATUS_ZOMBIE]
    assert not children, f"child processes left behind: {children}"
    leaked = {fd for fd in _fds() - before_fds if "memfd:" in fd or "pipe:" in fd or "socket:" in fd
              or "/tmp" in fd}
    assert not leaked, f"file descriptors left open: {sorted(leaked)}"
