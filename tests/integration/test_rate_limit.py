"""convert -r and commit -r: the copied bytes per second follow the limit (QEMU's slice rate limiter)."""
from __future__ import annotations

import os
import time

import pytest

from engine.cli.main import main
from tests.util import needs_qemu, qemu_compare, qemu_img, qemu_io

MiB = 1 << 20


@needs_qemu
def test_convert_rate_limit(tmp_path):
    src = tmp_path / "s.raw"
    src.write_bytes(os.urandom(4 * MiB))
    out = tmp_path / "o.qcow2"
    t0 = time.monotonic()
    assert main(["convert", "--workers", "2", "-r", "2M", "-f", "raw", "-O", "qcow2", str(src), str(out)]) == 0
    elapsed = time.monotonic() - t0
    # 4 MiB at 2 MiB/s: the first slice is free, so a little under 2 s of sleeping
    assert 1.5 <= elapsed <= 3.0, elapsed
    assert qemu_compare(src, out, "raw", "qcow2").returncode == 0


@needs_qemu
def test_commit_rate_limit(tmp_path):
    base, top = tmp_path / "b.qcow2", tmp_path / "t.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), "8M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", str(top))
    qemu_io("-c", "write -P 5 0 3M", str(top))
    t0 = time.monotonic()
    assert main(["commit", "--workers", "1", "-r", "2M", str(top)]) == 0
    elapsed = time.monotonic() - t0
    # 3 MiB at 2 MiB/s: about 1.5 s of sleeping; the rest is start-up, which a loaded 2-core machine
    # can stretch
    assert 1.0 <= elapsed <= 3.0, elapsed
    assert qemu_io("-c", "read -P 5 0 3M", str(base)).returncode == 0


@pytest.mark.parametrize("cmd", ["convert", "commit"])
def test_bad_rate(tmp_path, capsys, cmd):
    args = [cmd, "-r", "abc", "x", "y"] if cmd == "convert" else [cmd, "-r", "abc", "x"]
    assert main(args) == 1
    assert "Invalid rate limit specified" in capsys.readouterr().err
