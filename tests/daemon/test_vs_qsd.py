"""Side by side with the real qemu-storage-daemon 7.2: one management script (the QMP a script written for
qsd sends: commit with backing-file, the active-layer error, stream, persistent bitmap, backup, mirror,
verbs) runs unchanged against both daemons on identical images made by qemu-img; the replies, the job
event sequences and the images left behind (qemu-img compare / info / check) must be the same.

tests/run.sh unpacks qsd into .cache/ when it is not installed; the test skips only without it."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.daemon.conftest import Qsd, chain_blockdevs, make_chain
from tests.util import ROOT, needs_qemu, qemu_img

QSD = next((p for p in (shutil.which("qemu-storage-daemon"), str(ROOT / ".cache/qsd/usr/bin/qemu-storage-daemon"),
                        "/tmp/qsd/root/usr/bin/qemu-storage-daemon") if p and os.access(p, os.X_OK)), None)

pytestmark = [needs_qemu, pytest.mark.skipif(QSD is None, reason="qemu-storage-daemon not available")]


def start(prog: list[str], cwd: Path, *args: str) -> Qsd:
    sock = cwd / "qmp.sock"
    proc = subprocess.Popen([*prog, "--chardev", f"socket,id=mon0,path={sock},server=on,wait=off",
                             "--monitor", "chardev=mon0", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 30
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{prog[0]} did not start: {proc.communicate()[1].decode()}")
        time.sleep(0.02)
    time.sleep(0.05)  # qsd binds before it listens
    return Qsd(proc, sock, cwd)


def job_events(d: Qsd, job: str) -> list[str]:
    """The job's events as 'STATUS' / 'EVENT' names, without backup's transient paused/running pair."""
    out = []
    for e in d.events:
        data = e.get("data", {})
        if e["event"] == "JOB_STATUS_CHANGE" and data.get("id") == job:
            out.append(data["status"])
        elif e["event"].startswith("BLOCK_JOB_") and data.get("device", data.get("id")) == job:
            out.append(e["event"])
    cleaned = []
    for s in out:
        if cleaned[-1:] == ["paused"] and s == "running":
            cleaned.pop()
            continue
        cleaned.append(s)
    return cleaned


def script(d: Qsd, wd: Path) -> list[Any]:
    """The management script.  Returns what it saw: replies, job event sequences and final states."""
    seen: list[Any] = []

    def call(name: str, /, **args: Any) -> Any:
        res = d.cmd(name, **args)
        seen.append((name, res.get("return") if "return" in res else ("error", res["error"]["class"],
                                                                        res["error"]["desc"])))
        return res

    def finish(job: str) -> None:
        d.wait_event("JOB_STATUS_CHANGE", id=job, status="null")
        seen.append((job, job_events(d, job)))

    call("object-add", **{"qom-type": "throttle-group", "id": "tg0",
                          "limits": {"bps-total": 1048576, "iops-total": 100}})
    call("object-add", **{"qom-type": "throttle-group", "id": "tg1", "limits": {"bps-total": 10, "bps-read": 5}})
    call("qom-get", path="tg0", property="limits")
    call("qom-set", path="tg0", property="limits", value={"bps-total-max": 100})
    call("blockdev-add", **{"driver": "throttle", "node-name": "thr", "throttle-group": "tg0",
                            "file": {"driver": "null-co", "node-name": "nul", "size": 1048576}})
    call("object-del", id="tg0")
    call("blockdev-del", **{"node-name": "nul"})
    call("blockdev-del", **{"node-name": "thr"})
    call("object-del", id="tg0")
    call("block-commit", **{"job-id": "j", "device": "top", "backing-file": "x"})
    call("block-commit", **{"job-id": "c1", "device": "top", "top-node": "mid", "base-node": "base",
                            "backing-file": "custom/base-name.qcow2"})
    finish("c1")
    call("block-dirty-bitmap-add", **{"node": "top", "name": "bm0", "persistent": True})
    call("block-dirty-bitmap-add", **{"node": "top", "name": "bm0"})
    call("blockdev-backup", **{"job-id": "b1", "device": "top", "target": "bk", "sync": "full"})
    finish("b1")
    call("blockdev-backup", **{"job-id": "b2", "device": "top", "target": "bk", "sync": "incremental",
                               "bitmap": "bm0", "bitmap-mode": "never"})
    call("block-stream", **{"job-id": "s1", "device": "top", "base-node": "base", "backing-file": "x"})
    call("block-stream", **{"job-id": "s2", "device": "top", "backing-file": "x"})
    finish("s1")
    call("blockdev-mirror", **{"job-id": "m1", "device": "top", "target": "mir", "sync": "full",
                               "auto-dismiss": False})
    d.wait_event("BLOCK_JOB_READY", device="m1")
    call("job-complete", id="m1")
    d.wait_event("JOB_STATUS_CHANGE", id="m1", status="concluded")
    jobs = d.ok("query-jobs")
    seen.append(("query-jobs", [{k: v for k, v in j.items()} for j in jobs]))
    call("job-dismiss", id="m1")
    seen.append(("m1", job_events(d, "m1")))
    call("query-jobs")
    return seen


def images(wd: Path) -> None:
    make_chain(wd)
    for name in ("bk", "mir"):
        qemu_img("create", "-q", "-f", "qcow2", str(wd / f"{name}.qcow2"), "4M")


def blockdevs() -> list[str]:
    extra = []
    for name in ("bk", "mir"):
        extra += ["--blockdev", json.dumps({"driver": "qcow2", "node-name": name, "backing": None,
                                            "file": {"driver": "file", "filename": f"{name}.qcow2"}})]
    return [*chain_blockdevs(), *extra]


def test_same_script_same_results(tmp_path):
    qa, pa = tmp_path / "qsd", tmp_path / "parablock"
    runs = {}
    for wd, prog in ((qa, [QSD]), (pa, [sys.executable, "-m", "engine", "daemon", "--workers", "1"])):
        wd.mkdir()
        images(wd)
        d = start(prog, wd, *blockdevs())
        try:
            runs[wd.name] = script(d, wd)
        finally:
            assert d.stop() == 0
            d.proc.stdout.close()
            d.proc.stderr.close()
    assert runs["parablock"] == runs["qsd"]
    for name in ("base", "mid", "top", "bk", "mir"):
        a, b = qa / f"{name}.qcow2", pa / f"{name}.qcow2"
        ia = json.loads(qemu_img("info", "--output=json", "-U", str(a)).stdout)
        ib = json.loads(qemu_img("info", "--output=json", "-U", str(b)).stdout)
        for key in ("virtual-size", "backing-filename", "backing-filename-format"):
            assert ia.get(key) == ib.get(key), (name, key)
        bm_a = ia.get("format-specific", {}).get("data", {}).get("bitmaps")
        bm_b = ib.get("format-specific", {}).get("data", {}).get("bitmaps")
        assert bm_a == bm_b, name
        alone = lambda p: "json:" + json.dumps({"driver": "qcow2", "backing": None,  # noqa: E731
                                                "file": {"driver": "file", "filename": str(p)}})
        assert qemu_img("compare", alone(a), alone(b)).returncode == 0, name
        for p in (a, b):
            assert qemu_img("check", alone(p), check=False).returncode == 0, p
