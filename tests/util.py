"""Helpers shared by the tests: run parablock and the QEMU oracles, make patterned images."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")

needs_qemu = pytest.mark.skipif(not (QEMU_IMG and QEMU_IO), reason="qemu-img/qemu-io not installed")


def run(args: list[str], cwd: str | os.PathLike | None = None, check: bool = True,
        timeout: float = 120) -> subprocess.CompletedProcess:
    p = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} failed rc={p.returncode}\nstdout:{p.stdout}\nstderr:{p.stderr}")
    return p


def parablock(*args: str, cwd: str | os.PathLike | None = None, check: bool = True,
              timeout: float = 120) -> subprocess.CompletedProcess:
    env_args = [sys.executable, "-m", "engine", *args]
    p = subprocess.run(env_args, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    if check and p.returncode != 0:
        raise AssertionError(f"parablock {args} failed rc={p.returncode}\nstdout:{p.stdout}\nstderr:{p.stderr}")
    return p


def qemu_img(*args: str, cwd=None, check: bool = True) -> subprocess.CompletedProcess:
    return run(["qemu-img", *args], cwd=cwd, check=check)


def qemu_io(*args: str, cwd=None, check: bool = True) -> subprocess.CompletedProcess:
    return run(["qemu-io", *args], cwd=cwd, check=check)


def qemu_json(*args: str, cwd=None):
    return json.loads(qemu_img(*args, "--output=json", cwd=cwd).stdout)


def qemu_check(path: str | os.PathLike, fmt: str = "qcow2") -> tuple[int, dict]:
    p = run(["qemu-img", "check", "-f", fmt, "--output=json", str(path)], check=False)
    try:
        data = json.loads(p.stdout) if p.stdout.strip() else {}
    except json.JSONDecodeError:
        data = {"raw": p.stdout}
    return p.returncode, data


def assert_qemu_clean(path: str | os.PathLike) -> None:
    rc, data = qemu_check(path)
    assert rc == 0, f"qemu-img check rc={rc}: {data}"
    assert "corruptions" not in data and "leaks" not in data, data


def qemu_compare(a, b, fmt_a: str, fmt_b: str) -> subprocess.CompletedProcess:
    return run(["qemu-img", "compare", "-f", fmt_a, "-F", fmt_b, str(a), str(b)], check=False)


def open_node(path, fmt=None, read_only=True):
    from engine.image import open_image
    from workers.inproc import InProcessExecutor

    return open_image(str(path), InProcessExecutor(), fmt=fmt, read_only=read_only)


def read_all(path, fmt=None) -> bytes:
    node = open_node(path, fmt)
    try:
        out = bytearray()
        size = node.size()
        pos = 0
        while pos < size:
            n = min(8 << 20, size - pos)
            out += node.read(pos, n)
            pos += n
        return bytes(out)
    finally:
        node.close()
