"""The blkdebug fault-injection filter: QEMU's inject-error / set-state rules on the events formats
announce, driving every on-error policy of a commit over QMP (qmp-surface.md §5.1 scenario 11), and
metadata-write failures that leave images QEMU still accepts."""
from __future__ import annotations

import asyncio
import json

import pytest

from tests.daemon.conftest import MiB, make_chain
from tests.daemon.test_commit_stream import reads
from tests.daemon.test_mirror import _daemon
from tests.util import assert_qemu_clean, needs_qemu, qemu_img

pytestmark = needs_qemu


def chain_with_blkdebug_base(rules: dict) -> list[str]:
    base = {"driver": "qcow2", "node-name": "base", "backing": None,
            "file": {"driver": "blkdebug", "node-name": "dbg",
                     "image": {"driver": "file", "filename": "base.qcow2"}, **rules}}
    return ["--blockdev", json.dumps(base),
            "--blockdev", "driver=qcow2,node-name=mid,file.driver=file,file.filename=mid.qcow2,backing=base",
            "--blockdev", "driver=qcow2,node-name=top,file.driver=file,file.filename=top.qcow2,backing=mid"]


@pytest.mark.parametrize("policy", ["report", "stop", "ignore"])
def test_commit_error_policies_over_qmp(qsd, tmp_path, policy):
    paths = make_chain(tmp_path)
    d = qsd(*chain_with_blkdebug_base({"inject-error": [{"event": "write_aio", "errno": 5, "once": True}]}))
    d.ok("block-commit", **{"job-id": "c", "device": "top", "top-node": "mid", "base-node": "base",
                            "on-error": policy})
    err = d.wait_event("BLOCK_JOB_ERROR", device="c")
    assert err["data"] == {"device": "c", "operation": "write", "action": policy}
    if policy == "stop":
        d.wait_event("JOB_STATUS_CHANGE", id="c", status="paused")
        info = d.ok("query-block-jobs")[0]
        assert (info["status"], info["paused"], info["io-status"]) == ("paused", True, "failed")
        d.ok("block-job-resume", device="c")
    done = d.wait_event("BLOCK_JOB_COMPLETED", device="c")
    if policy == "report":
        assert done["data"]["error"] == "Input/output error"
        assert d.statuses("c")[-3:] == ["aborting", "concluded", "null"] or \
            d.wait_event("JOB_STATUS_CHANGE", id="c", status="null")
    else:
        assert "error" not in done["data"]
    d.wait_job_gone("c")
    assert d.stop() == 0
    for p in paths.values():
        assert_qemu_clean(p)
    if policy == "report":
        assert "backing file: mid.qcow2" in qemu_img("info", str(paths["top"])).stdout
    else:
        reads(str(paths["base"]), (0xaa, 0, MiB), (0xbb, MiB, MiB))
        assert "backing file: base.qcow2" in qemu_img("info", str(paths["top"])).stdout


@pytest.mark.parametrize("event", ["l2_update", "refblock_update", "cluster_alloc", "write_aio", "l1_update"])
def test_metadata_write_failures_keep_the_image_valid(tmp_path, event):
    """A failure at each metadata step of a qcow2 write (armed through set-state only after a first
    write was flushed and read back): the request or flush fails, the image stays one qemu-img accepts (leaks at most), and
    everything acknowledged before reads back."""
    qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "d.qcow2"), "4G")

    async def main() -> None:
        d, ev, pool = await _daemon(tmp_path, workers=0)
        try:
            await d.execute("blockdev-add", {
                "driver": "qcow2", "node-name": "q",
                "file": {"driver": "blkdebug", "image": {"driver": "file", "filename": str(tmp_path / "d.qcow2")},
                         "set-state": [{"event": "read_aio", "state": 1, "new_state": 2}],
                         "inject-error": [{"event": event, "state": 2, "errno": 5, "once": True}]}})
            q = d.graph.nodes["q"]
            await q.write(0, b"\x11" * 65536)
            await q.flush()  # acknowledged
            assert await q.read(0, 512) == b"\x11" * 512  # read_aio: state 2, the next `event` arms the error
            failed = False
            for i in range(1, 8):
                try:
                    await q.write(i * 512 * MiB, bytes([0x20 + i]) * 65536)  # a new L2 table each time
                    await q.flush()
                except OSError as exc:
                    assert exc.errno == 5
                    failed = True
                    break
            assert failed, f"no failure injected at {event}"
            assert await q.read(0, 65536) == b"\x11" * 65536
        finally:
            try:
                await d.shutdown()
            except OSError:
                pass  # closing may hit the armed rule again; the image must still be valid
            if pool:
                pool.close()

    asyncio.run(main())
    out = qemu_img("check", "--output=json", str(tmp_path / "d.qcow2"), check=False)
    data = json.loads(out.stdout)
    assert "corruptions" not in data or data["corruptions"] == 0, data
    assert out.returncode in (0, 3), out.stdout  # clean, or leaked clusters only
    reads(str(tmp_path / "d.qcow2"), (0x11, 0, 65536))


def _qcow2_on_blkdebug(name: str, path: str, rules: dict, backing=None) -> list[str]:
    spec = {"driver": "qcow2", "node-name": name, "backing": backing,
            "file": {"driver": "blkdebug", "image": {"driver": "file", "filename": path}, **rules}}
    if backing == "HEADER":
        del spec["backing"]
    return ["--blockdev", json.dumps(spec)]


def test_stream_stop_policy_on_write_error(qsd, tmp_path):
    paths = make_chain(tmp_path)
    d = qsd("--blockdev", json.dumps({"driver": "qcow2", "node-name": "base", "backing": None,
                                      "file": {"driver": "file", "filename": "base.qcow2"}}),
            "--blockdev", "driver=qcow2,node-name=mid,file.driver=file,file.filename=mid.qcow2,backing=base",
            *_qcow2_on_blkdebug("top", "top.qcow2", {"inject-error": [{"event": "write_aio", "errno": 5,
                                                                        "once": True}]}, backing="mid"))
    d.ok("block-stream", **{"job-id": "s", "device": "top", "on-error": "stop"})
    assert d.wait_event("BLOCK_JOB_ERROR", device="s")["data"] == {"device": "s", "operation": "write",
                                                                    "action": "stop"}
    d.wait_event("JOB_STATUS_CHANGE", id="s", status="paused")
    d.ok("job-resume", id="s")
    done = d.wait_event("BLOCK_JOB_COMPLETED", device="s")
    assert "error" not in done["data"]
    d.wait_job_gone("s")
    assert d.stop() == 0
    assert "backing file" not in qemu_img("info", str(paths["top"])).stdout
    reads(str(paths["top"]), (0xaa, 0, MiB), (0xbb, MiB, MiB), (0xcc, 2 * MiB, MiB))
    assert_qemu_clean(paths["top"])


@pytest.mark.parametrize("side,policy,err", [("target", "report", 5), ("source", "ignore", 5),
                                             ("target", "enospc", 28)])
def test_mirror_source_and_target_error_policies(qsd, tmp_path, side, policy, err):
    make_chain(tmp_path)
    qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "tgt.qcow2"), "4M")
    event = "write_aio" if side == "target" else "read_aio"
    rules = {"inject-error": [{"event": event, "errno": err, "once": True}]}
    src_rules = rules if side == "source" else {}
    tgt_rules = rules if side == "target" else {}
    d = qsd(*_qcow2_on_blkdebug("src", "top.qcow2", src_rules, backing="HEADER"),
            *_qcow2_on_blkdebug("tgt", "tgt.qcow2", tgt_rules))
    key = "on-target-error" if side == "target" else "on-source-error"
    d.ok("blockdev-mirror", **{"job-id": "m", "device": "src", "target": "tgt", "sync": "full", key: policy})
    expect = "stop" if err == 28 else policy
    e = d.wait_event("BLOCK_JOB_ERROR", device="m")
    assert e["data"] == {"device": "m", "operation": "write" if side == "target" else "read", "action": expect}
    if expect == "report":
        done = d.wait_event("BLOCK_JOB_COMPLETED", device="m")
        assert done["data"]["error"] == "Input/output error"
    else:
        if expect == "stop":
            d.wait_event("JOB_STATUS_CHANGE", id="m", status="paused")
            assert d.ok("query-block-jobs")[0]["io-status"] == "nospace"
            d.ok("job-resume", id="m")
        d.wait_event("BLOCK_JOB_READY", device="m")
        d.ok("job-complete", id="m")
        d.wait_job_gone("m")
    assert d.stop() == 0
    assert_qemu_clean(tmp_path / "tgt.qcow2")
    if expect != "report":
        reads(str(tmp_path / "tgt.qcow2"), (0xaa, 0, MiB), (0xbb, MiB, MiB), (0xcc, 2 * MiB, MiB))


def test_backup_target_enospc_pauses_then_completes(qsd, tmp_path):
    paths = make_chain(tmp_path)
    qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "bk.qcow2"), "4M")
    d = qsd("--blockdev", "driver=qcow2,node-name=top,file.driver=file,file.filename=top.qcow2",
            *_qcow2_on_blkdebug("bk", "bk.qcow2", {"inject-error": [{"event": "write_aio", "errno": 28,
                                                                      "once": True}]}))
    d.ok("blockdev-backup", **{"job-id": "b", "device": "top", "target": "bk", "sync": "full",
                               "on-target-error": "enospc"})
    assert d.wait_event("BLOCK_JOB_ERROR", device="b")["data"]["action"] == "stop"
    d.wait_event("JOB_STATUS_CHANGE", id="b", status="paused")
    d.ok("job-resume", id="b")
    done = d.wait_event("BLOCK_JOB_COMPLETED", device="b")
    assert "error" not in done["data"]
    d.wait_job_gone("b")
    assert d.stop() == 0
    assert_qemu_clean(tmp_path / "bk.qcow2")
    assert qemu_img("compare", "-f", "qcow2", "-F", "qcow2", str(tmp_path / "bk.qcow2"),
                    str(paths["top"])).returncode == 0
