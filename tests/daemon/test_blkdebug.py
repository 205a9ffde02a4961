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
