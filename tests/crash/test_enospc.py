"""ENOSPC from a real full file system (a small tmpfs): a commit with on-error=enospc pauses with io-status
nospace, and once space is freed and the job resumed it completes with every byte in place."""
from __future__ import annotations

import os
import subprocess

import pytest

from tests.daemon.conftest import MiB, start_daemon
from tests.util import assert_qemu_clean, needs_qemu, qemu_img, qemu_io

pytestmark = needs_qemu


@pytest.fixture
def small_fs(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6M", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_commit_enospc_pauses_then_completes(tmp_path, small_fs):
    base = small_fs / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), "16M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(tmp_path / "top.qcow2"))
    qemu_io("-c", "write -P 0x5e 0 4M", str(tmp_path / "top.qcow2"))
    filler = small_fs / "filler"
    free = os.statvfs(small_fs).f_bavail * os.statvfs(small_fs).f_frsize
    filler.write_bytes(b"\1" * (free - 2 * MiB))  # room for half of what the commit needs
    mid = tmp_path / "mid.qcow2"
    os.rename(tmp_path / "top.qcow2", mid)
    qemu_img("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", str(tmp_path / "top.qcow2"))
    d = start_daemon(tmp_path, "--blockdev", "driver=qcow2,node-name=top,file.driver=file,file.filename=top.qcow2")
    try:
        d.ok("block-commit", **{"job-id": "c", "device": "top", "top": "mid.qcow2", "on-error": "enospc"})
        err = d.wait_event("BLOCK_JOB_ERROR", device="c")
        assert err["data"] == {"device": "c", "operation": "write", "action": "stop"}
        d.wait_event("JOB_STATUS_CHANGE", id="c", status="paused")
        info = d.ok("query-block-jobs")[0]
        assert (info["io-status"], info["paused"]) == ("nospace", True)
        filler.unlink()
        d.ok("job-resume", id="c")
        done = d.wait_event("BLOCK_JOB_COMPLETED", device="c")
        assert "error" not in done["data"] and done["data"]["offset"] == done["data"]["len"]
        d.wait_job_gone("c")
    finally:
        assert d.stop() == 0
        d.proc.stdout.close()
        d.proc.stderr.close()
    out = qemu_io("-c", "read -P 0x5e 0 4M", str(base)).stdout
    assert "Pattern verification failed" not in out, out
    rc = subprocess.run(["qemu-img", "check", str(base)], capture_output=True, text=True)
    assert rc.returncode in (0, 3), rc.stdout  # clean, or clusters leaked by the failed writes
    qemu_img("check", "-r", "leaks", str(base))
    assert_qemu_clean(base)
    assert "backing file: " + str(base) in qemu_img("info", str(tmp_path / "top.qcow2")).stdout
