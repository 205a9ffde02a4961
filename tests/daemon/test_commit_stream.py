"""block-commit and block-stream against `parablock daemon`, on qcow2 chains made by qemu-img, with the
results checked by qemu-img after the daemon has stopped.  The seed feature: the ``backing-file`` string
written into the overlay of ``top``; the active-layer error; a failing header update."""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest

from tests.daemon.conftest import MiB, chain_blockdevs, make_chain
from tests.util import assert_qemu_clean, needs_qemu, qemu_img, qemu_io

pytestmark = needs_qemu

SUCCESS = ["created", "running", "waiting", "pending", "concluded", "null"]


def digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def header_backing(p: Path) -> tuple[str | None, str | None]:
    info = json.loads(qemu_img("info", "--output=json", str(p)).stdout)
    return info.get("backing-filename"), info.get("backing-filename-format")


def alone(p: Path) -> str:
    """A json: filename opening ``p`` without its backing chain."""
    return "json:" + json.dumps({"driver": "qcow2", "backing": None,
                                 "file": {"driver": "file", "filename": str(p)}})


def check_alone(p: Path) -> None:
    """qemu-img check of ``p`` alone (its backing string may name a file that does not exist)."""
    out = qemu_img("check", "--output=json", alone(p), check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    data = json.loads(out.stdout)
    assert "corruptions" not in data and "leaks" not in data, data


def reads(path: str, *patterns: tuple[int, int, int], cwd=None) -> None:
    """Every (pattern, offset, length) reads back from ``path`` (qemu-io read -P)."""
    args = []
    for pat, off, ln in patterns:
        args += ["-c", f"read -P {pat:#x} {off} {ln}"]
    out = qemu_io(*args, path, cwd=cwd).stdout
    assert "Pattern verification failed" not in out, out


@pytest.mark.parametrize("backing_file", ["custom/base-name.qcow2", "base.qcow2", "ABSOLUTE", "../up/b.img"])
def test_commit_writes_backing_file_string(qsd, tmp_path, backing_file):
    paths = make_chain(tmp_path)
    if backing_file == "ABSOLUTE":
        backing_file = str(paths["base"])
    d = qsd(*chain_blockdevs())
    d.ok("block-commit", **{"job-id": "c1", "device": "top", "top-node": "mid", "base-node": "base",
                            "backing-file": backing_file})
    done = d.wait_event("BLOCK_JOB_COMPLETED", device="c1")
    assert done["data"] == {"device": "c1", "len": 4 * MiB, "offset": 4 * MiB, "speed": 0, "type": "commit"}
    d.wait_job_gone("c1")
    assert d.statuses("c1") == SUCCESS
    nodes = {n["node-name"]: n for n in d.ok("query-named-block-nodes")}
    assert nodes["top"]["backing_file"] == backing_file
    assert nodes["top"]["backing_file_depth"] == 1
    assert nodes["top"]["image"]["backing-image"]["filename"] == "base.qcow2"
    assert "mid" in nodes  # added by blockdev-add: it stays, out of the chain
    assert d.stop() == 0
    assert header_backing(paths["top"]) == (backing_file, "qcow2")
    reads(str(paths["base"]), (0xaa, 0, MiB), (0xbb, MiB, MiB), (0, 2 * MiB, 2 * MiB))
    for p in paths.values():
        check_alone(p)
    if backing_file in ("base.qcow2", str(paths["base"])):
        reads(str(paths["top"]), (0xaa, 0, MiB), (0xbb, MiB, MiB), (0xcc, 2 * MiB, MiB))


def test_commit_default_string_is_base_filename(qsd, tmp_path):
    paths = make_chain(tmp_path)
    args = chain_blockdevs()
    args[1] = f"driver=file,node-name=base-file,filename={paths['base']}"  # base opened by absolute path
    d = qsd(*args)
    d.ok("block-commit", **{"job-id": "c1", "device": "top", "top-node": "mid", "base-node": "base"})
    d.wait_job_gone("c1")
    assert d.stop() == 0
    assert header_backing(paths["top"]) == (str(paths["base"]), "qcow2")
    reads(str(paths["top"]), (0xaa, 0, MiB), (0xbb, MiB, MiB), (0xcc, 2 * MiB, MiB))


def test_commit_default_string_cwd_relative_chain(qsd, tmp_path):
    """Top opened as ``sub/top.qcow2`` with its chain from the headers: the string QEMU writes is base's
    filename as it opened it, ``sub/base.qcow2`` (relative to the daemon's cwd, not to the overlay)."""
    sub = tmp_path / "sub"
    sub.mkdir()
    paths = make_chain(sub)
    d = qsd("--blockdev", "driver=qcow2,node-name=top,file.driver=file,file.filename=sub/top.qcow2")
    d.ok("block-commit", **{"job-id": "c1", "device": "top", "top": "mid.qcow2"})
    d.wait_job_gone("c1")
    names = [n["node-name"] for n in d.ok("query-named-block-nodes")]
    assert len(names) == 4  # top, its file, and base with its file: mid's implicit nodes are gone
    assert d.stop() == 0
    assert header_backing(paths["top"]) == ("sub/base.qcow2", "qcow2")


@pytest.mark.parametrize("extra", [{}, {"top-node": "top"}])
def test_backing_file_with_active_layer_is_refused_cleanly(qsd, tmp_path, extra):
    paths = make_chain(tmp_path)
    before = {n: digest(p) for n, p in paths.items()}
    d = qsd(*chain_blockdevs())
    d.pull()
    assert d.err("block-commit", **{"job-id": "j", "device": "top", "backing-file": "x", **extra}) == \
        ("GenericError", "'backing-file' specified, but 'top' is the active layer")
    assert d.ok("query-jobs") == []
    assert d.ok("query-block-jobs") == []
    time.sleep(0.2)
    assert d.pull() == []
    assert d.stop() == 0
    assert {n: digest(p) for n, p in paths.items()} == before


@pytest.mark.parametrize("case", ["name-too-long", "overlay-read-only"])
def test_failing_header_write_fails_commit_cleanly(qsd, tmp_path, case):
    paths = make_chain(tmp_path)
    top_before = digest(paths["top"])
    args = chain_blockdevs()
    bf = "custom.qcow2"
    if case == "name-too-long":
        bf = "x" * 2000
    else:
        args[-3] += ",read-only=on"
        args[-1] += ",read-only=on"
    d = qsd(*args)
    d.ok("block-commit", **{"job-id": "c1", "device": "top", "top-node": "mid", "base-node": "base",
                            "backing-file": bf})
    done = d.wait_event("BLOCK_JOB_COMPLETED", device="c1")
    assert done["data"]["error"]
    d.wait_job_gone("c1")
    assert d.statuses("c1") == ["created", "running", "waiting", "pending", "aborting", "concluded", "null"]
    nodes = {n["node-name"]: n for n in d.ok("query-named-block-nodes")}
    assert nodes["top"]["backing_file"] == "mid.qcow2" and nodes["top"]["backing_file_depth"] == 2
    assert nodes["base"]["ro"] is False
    assert d.stop() == 0
    assert digest(paths["top"]) == top_before
    assert header_backing(paths["top"]) == ("mid.qcow2", "qcow2")
    reads(str(paths["top"]), (0xaa, 0, MiB), (0xbb, MiB, MiB), (0xcc, 2 * MiB, MiB))
    for p in paths.values():
        assert_qemu_clean(p)


def test_commit_argument_errors(qsd, tmp_path):
    make_chain(tmp_path)
    qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "lone.qcow2"), "4M")
    d = qsd(*chain_blockdevs(), "--blockdev", "driver=file,node-name=lone-file,filename=lone.qcow2",
            "--blockdev", "driver=qcow2,node-name=lone,file=lone-file")
    cases = [
        ({"device": "nope"}, ("DeviceNotFound", "Device 'nope' not found")),
        ({"device": "mid"}, ("GenericError", "Need a root block node")),
        ({"device": "top", "top-node": "mid", "base-node": "mid"},
         ("GenericError", "cannot commit an image into itself")),
        ({"device": "top", "top-node": "base"}, ("GenericError", "cannot commit an image into itself")),
        ({"device": "top", "top-node": "lone"}, ("GenericError", "'lone' is not in this backing file chain")),
        ({"device": "top", "top-node": "mid", "base-node": "top"},
         ("GenericError", "'top' is not in this backing file chain")),
        ({"device": "top", "top-node": "nope"}, ("GenericError", "Cannot find device='' nor node-name='nope'")),
        ({"device": "top", "top": "nope.qcow2"}, ("GenericError", "Top image file nope.qcow2 not found")),
        ({"device": "top", "top-node": "mid", "base": "zz"}, ("GenericError", "Can't find 'zz' in the backing chain")),
        ({"device": "top", "top-node": "mid", "top": "mid.qcow2"},
         ("GenericError", "'top-node' and 'top' are mutually exclusive")),
        ({"device": "top", "top-node": "mid", "base": "zz", "base-node": "base"},
         ("GenericError", "'base-node' and 'base' are mutually exclusive")),
        ({"device": "top", "top-node": "mid", "speed": -1},
         ("GenericError", "Parameter 'speed' expects a non-negative value")),
        ({"device": "top", "top-node": "mid", "on-error": "bogus"},
         ("GenericError", "Parameter 'on-error' does not accept value 'bogus'")),
    ]
    for args, expected in cases:
        assert d.err("block-commit", **{"job-id": "j", **args}) == expected, args
    assert d.err("block-commit", **{"device": "top", "top-node": "mid"}) == ("GenericError", "Invalid job ID ''")
    assert d.err("block-commit", **{"job-id": "1bad", "device": "top", "top-node": "mid"}) == \
        ("GenericError", "Invalid job ID '1bad'")
    assert d.ok("query-jobs") == []


def test_stream_with_base_and_backing_file(qsd, tmp_path):
    paths = make_chain(tmp_path)
    d = qsd(*chain_blockdevs())
    assert d.err("block-stream", **{"job-id": "s", "device": "top", "backing-file": "x"}) == \
        ("GenericError", "backing file specified, but streaming the entire chain")
    assert d.err("block-stream", **{"job-id": "s", "device": "top", "base": "x", "base-node": "base"}) == \
        ("GenericError", "'base' and 'base-node' cannot be specified at the same time")
    assert d.err("block-stream", **{"job-id": "s", "device": "mid", "base-node": "top"}) == \
        ("GenericError", "Node 'top' is not a backing image of 'mid'")
    assert d.err("block-stream", **{"job-id": "s", "device": "top", "base": "nope.qcow2"}) == \
        ("GenericError", "Can't find 'nope.qcow2' in the backing chain")
    assert d.err("block-stream", **{"job-id": "s", "device": "nope"}) == \
        ("GenericError", "Cannot find device='nope' nor node-name='nope'")
    d.ok("block-stream", **{"job-id": "s1", "device": "top", "base-node": "base",
                            "backing-file": "my-base-string.qcow2"})
    done = d.wait_event("BLOCK_JOB_COMPLETED", device="s1")
    assert done["data"] == {"device": "s1", "len": 4 * MiB, "offset": 4 * MiB, "speed": 0, "type": "stream"}
    d.wait_job_gone("s1")
    assert d.statuses("s1") == SUCCESS
    assert d.stop() == 0
    assert header_backing(paths["top"]) == ("my-base-string.qcow2", "qcow2")
    reads(alone(paths["top"]), (0, 0, MiB), (0xbb, MiB, MiB), (0xcc, 2 * MiB, MiB))
    check_alone(paths["top"])


def test_stream_whole_chain_makes_top_standalone(qsd, tmp_path):
    paths = make_chain(tmp_path)
    d = qsd(*chain_blockdevs())
    d.ok("block-stream", **{"job-id": "s1", "device": "top"})
    d.wait_job_gone("s1")
    nodes = {n["node-name"]: n for n in d.ok("query-named-block-nodes")}
    assert "backing_file" not in nodes["top"] and nodes["top"]["backing_file_depth"] == 0
    assert d.stop() == 0
    assert header_backing(paths["top"]) == (None, None)
    reads(str(paths["top"]), (0xaa, 0, MiB), (0xbb, MiB, MiB), (0xcc, 2 * MiB, MiB), (0, 3 * MiB, MiB))
    assert_qemu_clean(paths["top"])
    assert qemu_img("compare", "-f", "qcow2", "-F", "qcow2", str(paths["top"]), str(paths["top"])).returncode == 0


def test_job_verbs_on_a_slow_commit(qsd, tmp_path):
    """qmp-surface.md §5.1 scenario 6: the verb/state table on a live, speed-limited commit."""
    make_chain(tmp_path)
    d = qsd(*chain_blockdevs())
    d.ok("block-commit", **{"job-id": "c1", "device": "top", "top-node": "mid", "speed": 1,
                            "auto-finalize": False, "auto-dismiss": False})
    assert d.err("job-complete", id="c1") == \
        ("GenericError", "Job 'c1' in state 'running' cannot accept command verb 'complete'")
    d.ok("job-pause", id="c1")
    d.wait_event("JOB_STATUS_CHANGE", id="c1", status="paused")
    assert d.ok("query-block-jobs")[0]["paused"] is True
    assert d.err("job-pause", id="c1") == ("GenericError", "Job is already paused")
    assert d.err("block-job-cancel", device="c1") == \
        ("GenericError", "The block job for device 'c1' is currently paused")
    d.ok("block-job-set-speed", device="c1", speed=0)
    d.ok("job-resume", id="c1")
    assert d.err("job-resume", id="c1") == ("GenericError", "Can't resume a job that was not paused")
    d.wait_event("BLOCK_JOB_PENDING", id="c1")
    assert d.ok("query-jobs")[0]["status"] == "pending"
    for verb in ("job-dismiss", "job-pause", "job-complete"):
        assert d.err(verb, id="c1") == \
            ("GenericError", f"Job 'c1' in state 'pending' cannot accept command verb '{verb[4:]}'")
    d.ok("job-finalize", id="c1")
    assert d.ok("query-jobs")[0]["status"] == "concluded"
    assert d.err("job-cancel", id="c1") == \
        ("GenericError", "Job 'c1' in state 'concluded' cannot accept command verb 'cancel'")
    d.ok("job-dismiss", id="c1")
    assert d.ok("query-jobs") == []
    assert d.err("job-pause", id="c1") == ("GenericError", "Job not found")
    assert d.err("block-job-pause", device="c1") == ("DeviceNotActive", "Block job 'c1' not found")
    assert d.statuses("c1")[-5:] == ["running", "waiting", "pending", "concluded", "null"]


def test_cancel_leaves_chain_untouched(qsd, tmp_path):
    paths = make_chain(tmp_path)
    top_before = digest(paths["top"])
    d = qsd(*chain_blockdevs())
    d.ok("block-commit", **{"job-id": "c1", "device": "top", "top-node": "mid", "speed": 1,
                            "auto-dismiss": False})
    d.ok("job-cancel", id="c1")
    ev = d.wait_event("BLOCK_JOB_CANCELLED", device="c1")
    assert ev["data"]["offset"] < ev["data"]["len"] == 4 * MiB
    jobs = d.ok("query-jobs")
    assert jobs[0]["status"] == "concluded" and jobs[0]["error"] == "Operation canceled"
    assert d.stop() == 0
    assert digest(paths["top"]) == top_before
    assert header_backing(paths["top"]) == ("mid.qcow2", "qcow2")


def test_commit_speed_is_held_and_jobs_run_in_parallel(qsd, tmp_path):
    """Two commits on two chains at once, each at 4 MiB/s over 8 MiB of data: each takes 2 s ±10 %."""
    dirs = []
    for name in ("a", "b"):
        sub = tmp_path / name
        sub.mkdir()
        qemu_img("create", "-q", "-f", "qcow2", str(sub / "base.qcow2"), "16M")
        qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(sub / "mid.qcow2"))
        qemu_img("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", str(sub / "top.qcow2"))
        qemu_io("-c", "write -P 0x5a 0 8M", str(sub / "mid.qcow2"))
        dirs.append(sub)
    d = qsd("--blockdev", "driver=qcow2,node-name=ta,file.driver=file,file.filename=a/top.qcow2",
            "--blockdev", "driver=qcow2,node-name=tb,file.driver=file,file.filename=b/top.qcow2", workers=2)
    speed = 4 * MiB
    for j, top in (("ca", "ta"), ("cb", "tb")):
        d.ok("block-commit", **{"job-id": j, "device": top, "top": "mid.qcow2", "speed": speed})
    seen_progress = []
    while len(seen_progress) < 5:
        jobs = d.ok("query-block-jobs")
        if not jobs:
            break
        seen_progress.append([j["offset"] for j in jobs])
        time.sleep(0.2)
    for j in ("ca", "cb"):
        start = d.wait_event("JOB_STATUS_CHANGE", id=j, status="running")["timestamp"]
        end = d.wait_event("BLOCK_JOB_COMPLETED", device=j)["timestamp"]
        took = (end["seconds"] + end["microseconds"] / 1e6) - (start["seconds"] + start["microseconds"] / 1e6)
        assert 1.8 <= took <= 2.2, f"{j}: 8 MiB at 4 MiB/s took {took:.2f} s"
    # progress was visible and monotonic while both ran
    assert any(0 < off < 16 * MiB for row in seen_progress for off in row)
    for a, b in zip(seen_progress, seen_progress[1:]):
        if len(a) == len(b):
            assert all(x <= y for x, y in zip(a, b))
    assert d.stop() == 0
    for sub in dirs:
        assert header_backing(sub / "top.qcow2")[0] == os.path.join(sub.name, "base.qcow2")
        reads(str(sub / "base.qcow2"), (0x5a, 0, 8 * MiB))
        assert_qemu_clean(sub / "base.qcow2")
