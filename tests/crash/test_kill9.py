"""SIGKILL the whole daemon, or a CLI convert / commit / io, at seeded random points (issue 5 item 5,
part 2).  Afterwards every image passes ``qemu-img check`` with leaks at most (``-r leaks`` repairs
them), the guest view through the top of a chain is what it was, every write acknowledged after a flush
before the kill reads back with qemu-io, and no worker outlives its killed coordinator."""
from __future__ import annotations

import random
import time

import pytest

from tests.crash.conftest import (MiB, assert_all_exit, assert_recoverable, descendants, patterned,
                                  reads_ok, sigkill, spawn, wait_until, workers_of)
from tests.crash.test_worker_kill import CHAIN_VIEW, _chain, _reap_daemon
from tests.daemon.conftest import start_daemon
from tests.util import needs_qemu, parablock

pytestmark = [needs_qemu, pytest.mark.timeout(120)]

SEEDS = [11, 22, 33]


@pytest.mark.parametrize("seed", SEEDS[:2])
@pytest.mark.parametrize("job", ["commit", "mirror"])
def test_daemon_killed_mid_job(tmp_path, job, seed):
    rnd = random.Random(seed)
    d = start_daemon(tmp_path, *_chain(tmp_path), workers=2)
    try:
        assert wait_until(lambda: len(workers_of(d.proc.pid)) == 2, 20)
        if job == "commit":
            d.ok("block-commit", **{"job-id": "j", "device": "top", "top-node": "mid", "base-node": "base",
                                    "speed": 24 * MiB})
        else:
            d.ok("blockdev-mirror", **{"job-id": "j", "device": "top", "target": "tgt", "sync": "full",
                                       "speed": 24 * MiB})
        time.sleep(rnd.uniform(0.02, 1.5))  # the job needs ~2 s: the kill lands anywhere in it
        kids = descendants(d.proc.pid)
        sigkill(d.proc.pid)
        d.proc.wait(10)
        assert_all_exit(kids, what="by the killed daemon")  # workers notice their coordinator is gone
    finally:
        _reap_daemon(d)
    for name in ("base", "mid", "top", "tgt"):
        assert_recoverable(tmp_path / f"{name}.qcow2")
    reads_ok(tmp_path / "top.qcow2", *CHAIN_VIEW)  # the guest's view never changes during a commit


def _io(img, *cmds, check=True):
    args = ["io"]
    for c in cmds:
        args += ["-c", c]
    return parablock(*args, str(img), check=check)


@pytest.mark.parametrize("seed", SEEDS)
def test_cli_io_killed_keeps_flushed_writes(tmp_path, seed):
    """Completed ``write`` + ``flush`` runs survive a later run killed mid-way (4 KiB clusters, so the
    killed run allocates L2 tables and refblocks as it goes)."""
    rnd = random.Random(seed)
    img = patterned(tmp_path / "d.qcow2", 64 * MiB, opts="cluster_size=4096")
    acked = []
    for i in range(4):
        off, pat = rnd.randrange(0, 60) * MiB + rnd.randrange(0, 256) * 4096, 0x10 + i
        ln = rnd.choice([4096, 65536 + 512, 300 * 1024])
        _io(img, f"write -P {pat:#x} {off} {ln}", "flush")
        acked.append((pat, off, ln))
    cmds = []
    for i in range(200):
        cmds += ["-c", f"write -P {0x80 + i % 64:#x} {rnd.randrange(0, 63 * MiB) // 512 * 512} {rnd.choice([512, 4096, 65536])}",
                 "-c", "flush"]
    proc = spawn("io", *cmds, str(img), cwd=tmp_path)
    time.sleep(rnd.uniform(0.15, 0.8))
    kids = descendants(proc.pid)
    sigkill(proc.pid)
    proc.wait(10)
    try:
        assert_all_exit(kids, what="by the killed io")
    finally:
        proc.communicate(timeout=30)
    # the killed run may have overwritten parts of the earlier writes: check those it did not touch
    touched = []
    for c in cmds[1::4]:
        _, _, pat, off, ln = c.split()
        touched.append((int(off), int(ln)))
    assert_recoverable(img)
    for pat, off, ln in acked:
        for o in range(off, off + ln, 512):
            if not any(t <= o < t + tl for t, tl in touched):
                reads_ok(img, (pat, o, 512))


@pytest.mark.parametrize("seed", SEEDS[:2])
def test_cli_convert_killed(tmp_path, seed):
    rnd = random.Random(seed)
    src = patterned(tmp_path / "src.qcow2", 192 * MiB, (0x5a, 0, 64 * MiB), (0x33, 96 * MiB, 96 * MiB))
    dst = tmp_path / "dst.qcow2"
    proc = spawn("convert", "--workers", "2", "-r", "160M", "-O", "qcow2", str(src), str(dst), cwd=tmp_path)
    time.sleep(rnd.uniform(0.1, 1.2))
    kids = descendants(proc.pid)
    sigkill(proc.pid)
    proc.wait(10)
    try:
        assert_all_exit(kids, what="by the killed convert")
    finally:
        proc.communicate(timeout=30)
    if dst.exists() and dst.stat().st_size:
        assert_recoverable(dst)
    assert_recoverable(src)


@pytest.mark.parametrize("seed", SEEDS[:2])
def test_cli_commit_killed(tmp_path, seed):
    rnd = random.Random(seed)
    base = patterned(tmp_path / "base.qcow2", 192 * MiB, (0x11, 0, 64 * MiB))
    top = patterned(tmp_path / "top.qcow2", 192 * MiB, (0xcc, 32 * MiB, 128 * MiB), backing="base.qcow2")
    proc = spawn("commit", "--workers", "2", "-r", "160M", str(top), cwd=tmp_path)
    time.sleep(rnd.uniform(0.1, 1.2))
    kids = descendants(proc.pid)
    sigkill(proc.pid)
    proc.wait(10)
    try:
        assert_all_exit(kids, what="by the killed commit")
    finally:
        proc.communicate(timeout=30)
    assert_recoverable(base)
    assert_recoverable(top)
    reads_ok(top, (0x11, 0, 32 * MiB), (0xcc, 32 * MiB, 128 * MiB), (0, 160 * MiB, 32 * MiB))
