"""``parablock job`` (one-shot block jobs on images, no daemon) and ``parablock jobs --qmp`` (a running
daemon's jobs, listed or watched), on chains made by qemu-img/qemu-io, with results checked by qemu-img
and qemu-io."""
from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.daemon.conftest import MiB, chain_blockdevs, make_chain
from tests.util import ROOT, needs_qemu, parablock, qemu_img, qemu_io

pytestmark = [needs_qemu, pytest.mark.timeout(60)]


def job(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return parablock("job", "--workers", "1", *args, cwd=cwd, check=False, timeout=60)


def one_line_error(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("parablock: "), p.stderr
    assert "Traceback" not in p.stderr + p.stdout
    return lines[0][len("parablock: "):]


def backing(p: Path) -> str | None:
    return json.loads(qemu_img("info", "--output=json", str(p)).stdout).get("backing-filename")


def check_clean(*paths: Path) -> None:
    for p in paths:
        out = qemu_img("check", "--output=json", str(p), check=False)
        assert out.returncode == 0, out.stdout + out.stderr
        data = json.loads(out.stdout)
        assert "corruptions" not in data and "leaks" not in data, data


def reads(path: Path, *patterns: tuple[int, int, int]) -> None:
    args = []
    for pat, off, ln in patterns:
        args += ["-c", f"read -P {pat:#x} {off} {ln}"]
    out = qemu_io(*args, str(path), cwd=path.parent).stdout
    assert "Pattern verification failed" not in out, out


GUEST = ((0xaa, 0, MiB), (0xbb, MiB, MiB), (0xcc, 2 * MiB, MiB), (0, 3 * MiB, MiB))


def digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------ parablock job
def test_job_commit_intermediate(tmp_path):
    paths = make_chain(tmp_path)
    p = job("commit", "--top", "mid.qcow2", "top.qcow2", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "top: commit completed"
    assert p.stderr == ""
    assert backing(paths["top"]) == "base.qcow2"
    reads(paths["top"], *GUEST)
    reads(paths["base"], (0xaa, 0, MiB), (0xbb, MiB, MiB), (0, 2 * MiB, 2 * MiB))
    check_clean(paths["top"], paths["base"])


def test_job_commit_backing_file_and_base(tmp_path):
    paths = make_chain(tmp_path)
    p = job("-q", "commit", "--top", str(paths["mid"]), "--base", "base.qcow2", "--backing-file",
            "./base.qcow2", "--job-id", "c1", "--speed", "64M", "top.qcow2", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout == ""
    assert backing(paths["top"]) == "./base.qcow2"
    reads(paths["top"], *GUEST)
    check_clean(paths["top"], paths["base"])


def test_job_stream_with_progress(tmp_path):
    paths = make_chain(tmp_path)
    p = job("stream", "-p", "--base", "base.qcow2", "top.qcow2", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "top [stream" in p.stderr and "100%" in p.stderr and "4.00M/4.00M" in p.stderr, p.stderr
    assert "top: stream completed" in p.stdout
    assert backing(paths["top"]) == "base.qcow2"
    reads(paths["top"], *GUEST)
    reads(paths["mid"], (0xaa, 0, MiB), (0xbb, MiB, MiB), (0, 2 * MiB, 2 * MiB))  # untouched
    check_clean(paths["top"])
    # mid's data now lives in top itself: top reads the same with only base below it
    info = json.loads(qemu_img("map", "--output=json", str(paths["top"])).stdout)
    top_layer = [e for e in info if e["depth"] == 0 and e["data"]]
    assert sum(e["length"] for e in top_layer) == 2 * MiB


def test_job_stream_whole_chain(tmp_path):
    paths = make_chain(tmp_path)
    p = job("stream", "top.qcow2", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert backing(paths["top"]) is None
    os.unlink(paths["base"])
    os.unlink(paths["mid"])
    reads(paths["top"], *GUEST)
    check_clean(paths["top"])


def test_job_parallel_commit_and_stream(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "c").mkdir()
    a, b, c = (make_chain(tmp_path / d) for d in "abc")
    t0 = time.monotonic()
    p = job("-p", "commit", "--top", "a/mid.qcow2", "a/top.qcow2", "stream", "--node-name", "sb",
            "b/top.qcow2", "--", "commit", "--top", "c/mid.qcow2", "--speed", "8M", "c/top.qcow2",
            cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert time.monotonic() - t0 < 30
    assert p.stdout.splitlines() == ["top: commit completed", "sb: stream completed",
                                     "top-2: commit completed"]
    for jid in ("top [commit", "sb [stream", "top-2 [commit"):
        assert jid in p.stderr, p.stderr
    assert backing(a["top"]) == "base.qcow2"
    assert backing(b["top"]) is None
    assert backing(c["top"]) == "base.qcow2"
    for chain in (a, b, c):
        reads(chain["top"], *GUEST)
        check_clean(chain["top"])


def test_job_active_layer_backing_file_fails(tmp_path):
    paths = make_chain(tmp_path)
    before = {n: digest(p) for n, p in paths.items()}
    p = job("commit", "--backing-file", "foo.qcow2", "top.qcow2", cwd=tmp_path)
    assert one_line_error(p) == "'backing-file' specified, but 'top' is the active layer"
    assert {n: digest(p) for n, p in paths.items()} == before


@pytest.mark.parametrize("args, text", [
    (["commit", "nope.qcow2"], "Could not open 'nope.qcow2': No such file or directory"),
    (["commit", "--top", "nope.qcow2", "top.qcow2"], "Top image file nope.qcow2 not found"),
    (["commit", "--base", "nope.qcow2", "--top", "mid.qcow2", "top.qcow2"],
     "Can't find 'nope.qcow2' in the backing chain"),
    (["commit", "--top", "base.qcow2", "--base", "base.qcow2", "top.qcow2"], "cannot commit an image into itself"),
    (["stream", "--base", "base.qcow2", "--backing-file", "x", "--bottom", "mid.qcow2", "top.qcow2"],
     "'base' and 'bottom' cannot be specified at the same time"),
    (["commit", "top.qcow2", "--top", "mid.qcow2"],
     "option '--top' after a job's image: put each job's options before its image(s)"),
    (["commit", "--speed", "fast", "top.qcow2"], None),
    (["commit"], "Missing argument 'IMAGE'."),
    (["frobnicate", "top.qcow2"], None),
    ([], None),
])
def test_job_bad_input_is_one_line(tmp_path, args, text):
    make_chain(tmp_path)
    msg = one_line_error(job(*args, cwd=tmp_path))
    if text is not None:
        assert msg == text


def test_job_start_failure_leaves_nothing_running(tmp_path):
    """The second spec cannot start: the first is cancelled and nothing of its chain changes."""
    (tmp_path / "a").mkdir()
    a = make_chain(tmp_path / "a")
    paths = make_chain(tmp_path)
    before = digest(a["top"])
    p = job("commit", "--top", "a/mid.qcow2", "--speed", "1", "a/top.qcow2",
            "stream", "--base", "nope.qcow2", "top.qcow2", cwd=tmp_path)
    msg = one_line_error(p)
    assert msg == "stream of 'top.qcow2': Can't find 'nope.qcow2' in the backing chain"
    assert digest(a["top"]) == before
    assert backing(a["top"]) == "mid.qcow2"
    reads(a["top"], *GUEST)
    assert backing(paths["top"]) == "mid.qcow2"


def _not_landed(p: subprocess.CompletedProcess, what: str) -> None:
    """Mirror and backup arrive separately: until then the command must fail cleanly."""
    if p.returncode == 1 and ("has not been found" in p.stderr or "not supported by parablock" in p.stderr):
        one_line_error(p)
        pytest.skip(f"{what} not implemented yet: {p.stderr.strip()}")


def test_job_active_commit(tmp_path):
    paths = make_chain(tmp_path)
    p = job("commit", "-p", "top.qcow2", cwd=tmp_path)
    _not_landed(p, "active commit")
    assert p.returncode == 0, p.stderr
    reads(paths["base"], *GUEST)
    check_clean(paths["base"], paths["top"])


@pytest.mark.parametrize("sync", ["full", "top"])
def test_job_mirror(tmp_path, sync):
    paths = make_chain(tmp_path)
    p = job("mirror", "-p", "--sync", sync, "top.qcow2", "copy.qcow2", cwd=tmp_path)
    _not_landed(p, "drive-mirror")
    assert p.returncode == 0, p.stderr
    assert "top: mirror completed" in p.stdout
    copy = tmp_path / "copy.qcow2"
    check_clean(copy)
    if sync == "full":
        assert backing(copy) is None
    else:
        assert backing(copy) is not None
    reads(copy, *GUEST)
    cmp = qemu_img("compare", str(paths["top"]), str(copy), check=False)
    assert cmp.returncode == 0, cmp.stdout


def test_job_backup(tmp_path):
    paths = make_chain(tmp_path)
    p = job("backup", "--sync", "full", "-O", "qcow2", "top.qcow2", "bk.qcow2", cwd=tmp_path)
    _not_landed(p, "drive-backup")
    assert p.returncode == 0, p.stderr
    bk = tmp_path / "bk.qcow2"
    check_clean(bk)
    reads(bk, *GUEST)
    assert qemu_img("compare", str(paths["top"]), str(bk), check=False).returncode == 0


# ----------------------------------------------------------------------------------- parablock jobs
def jobs(*args: str, cwd: Path, timeout: float = 30) -> subprocess.CompletedProcess:
    return parablock("jobs", *args, cwd=cwd, check=False, timeout=timeout)


def test_jobs_lists_and_watches_a_running_commit(qsd, tmp_path):
    make_chain(tmp_path)
    d = qsd(*chain_blockdevs())
    d.ok("block-commit", **{"job-id": "c1", "device": "top", "top-node": "mid", "speed": 1})
    d.wait_event("JOB_STATUS_CHANGE", id="c1", status="running")
    p = jobs("--qmp", str(d.sock), cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].split() == ["ID", "TYPE", "STATUS", "PROGRESS", "SPEED"]
    row = lines[1].split()
    assert row[:3] == ["c1", "commit", "running"]
    assert row[3].endswith(f"/{4 * MiB}")
    assert row[-2:] == ["1", "B/s"]

    p = jobs("--qmp", str(d.sock), "--output", "json", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    listed = json.loads(p.stdout)
    assert listed == d.ok("query-jobs")
    assert [(j["id"], j["type"], j["status"], j["total-progress"]) for j in listed] == \
        [("c1", "commit", "running", 4 * MiB)]

    watch = subprocess.Popen([sys.executable, "-m", "engine", "jobs", "--qmp", str(d.sock), "--watch",
                              "--interval", "0.1"], cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        time.sleep(1.0)
        assert watch.poll() is None, watch.communicate()
        d.ok("block-job-set-speed", device="c1", speed=0)
        out, err = watch.communicate(timeout=30)
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.communicate()
    assert watch.returncode == 0, err
    assert err == ""
    assert "c1 [commit running]" in out
    assert f"c1: commit completed ({4 * MiB}/{4 * MiB} bytes)" in out
    d.wait_job_gone("c1")
    p = jobs("--qmp", str(d.sock), cwd=tmp_path)
    assert p.stdout.strip() == "No active jobs"
    p = jobs("--qmp", str(d.sock), "--output", "json", cwd=tmp_path)
    assert json.loads(p.stdout) == []
    p = jobs("--qmp", str(d.sock), "--watch", cwd=tmp_path)  # nothing to watch: returns at once
    assert p.returncode == 0, p.stderr


def test_jobs_watch_json_lines(qsd, tmp_path):
    make_chain(tmp_path)
    d = qsd(*chain_blockdevs())
    d.ok("block-commit", **{"job-id": "c1", "device": "top", "top-node": "mid", "speed": 4 * MiB})
    p = jobs("--qmp", str(d.sock), "--watch", "--interval", "0.1", "--output", "json", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    frames = [json.loads(line) for line in p.stdout.splitlines()]
    assert frames[-1] == []
    assert all(j["id"] == "c1" for f in frames[:-1] for j in f)


def test_jobs_missing_socket(tmp_path):
    msg = one_line_error(jobs("--qmp", str(tmp_path / "nope.sock"), cwd=tmp_path))
    assert msg == f"Could not connect to '{tmp_path / 'nope.sock'}': No such file or directory"


def test_jobs_refused(tmp_path):
    path = tmp_path / "dead.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))  # bound, never listening: connect is refused
    try:
        msg = one_line_error(jobs("--qmp", str(path), cwd=tmp_path))
    finally:
        s.close()
    assert msg == f"Could not connect to '{path}': Connection refused"


@pytest.mark.parametrize("behaviour", ["garbage", "close", "not-qmp-json"])
def test_jobs_not_a_qmp_server(tmp_path, behaviour):
    path = tmp_path / "fake.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)

    def serve() -> None:
        try:
            conn, _ = srv.accept()
        except OSError:
            return
        with conn:
            if behaviour == "garbage":
                conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
            elif behaviour == "not-qmp-json":
                conn.sendall(b'{"hello": "world"}\r\n')
            time.sleep(0.2 if behaviour != "close" else 0)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        msg = one_line_error(jobs("--qmp", str(path), cwd=tmp_path))
    finally:
        srv.close()
        t.join(5)
    assert msg.startswith(f"'{path}' is not a QMP server ("), msg


def test_jobs_requires_qmp(tmp_path):
    msg = one_line_error(jobs(cwd=tmp_path))
    assert "--qmp" in msg
