"""Mirror and active commit: over QMP against `parablock daemon`, and in process where a client must write
while the job runs (writes driven through the engine's own request pipeline)."""
from __future__ import annotations

import asyncio
import os
import random

import pytest

from tests.daemon.conftest import MiB, chain_blockdevs, make_chain
from tests.daemon.test_commit_stream import header_backing, reads
from tests.util import assert_qemu_clean, needs_qemu, qemu_img

pytestmark = needs_qemu

READY_THEN_DONE = ["created", "running", "ready", "waiting", "pending", "concluded", "null"]


def test_blockdev_mirror_full_and_top(qsd, tmp_path):
    make_chain(tmp_path)
    for t in ("tgt", "tgt2"):
        qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / f"{t}.qcow2"), "4M")
    qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "small.qcow2"), "1M")
    d = qsd(*chain_blockdevs(), *[a for t in ("tgt", "tgt2", "small") for a in (
        "--blockdev", f'{{"driver": "qcow2", "node-name": "{t}", "backing": null, '
                      f'"file": {{"driver": "file", "filename": "{t}.qcow2"}}}}')])
    # argument errors first: none of them may leave a job behind
    errors = [
        ({"target": "tgt", "sync": "full", "granularity": 1000},
         "Parameter 'granularity' expects a power of 2"),
        ({"target": "tgt", "sync": "full", "granularity": 256},
         "Parameter 'granularity' expects a value in range [512B, 64MB]"),
        ({"target": "top", "sync": "full"}, "Can't mirror node into itself"),
        ({"target": "base", "sync": "full"}, "Node 'base' is busy: node is used as backing hd of 'mid'"),
        ({"target": "nope", "sync": "full"}, "Cannot find device='nope' nor node-name='nope'"),
        ({"target": "tgt", "sync": "full", "replaces": "nope"}, "Failed to find node with node-name='nope'"),
        ({"target": "tgt", "sync": "incremental"}, "Sync mode 'incremental' not supported"),
        ({"target": "tgt"}, "Parameter 'sync' is missing"),
    ]
    for args, desc in errors:
        assert d.err("blockdev-mirror", **{"job-id": "m", "device": "top", **args}) == ("GenericError", desc)
    assert d.ok("query-jobs") == []
    d.ok("blockdev-mirror", **{"job-id": "m1", "device": "top", "target": "tgt", "sync": "full"})
    ready = d.wait_event("BLOCK_JOB_READY", device="m1")
    # an existing target without discard=unmap cannot be zeroed: everything is copied (as qsd 7.2 does)
    assert ready["data"] == {"device": "m1", "len": 4 * MiB, "offset": 4 * MiB, "speed": 0, "type": "mirror"}
    info = d.ok("query-block-jobs")[0]
    assert info["status"] == "ready" and info["ready"] is True
    d.ok("job-pause", id="m1")
    d.wait_event("JOB_STATUS_CHANGE", id="m1", status="standby")
    d.ok("job-resume", id="m1")
    d.wait_event("JOB_STATUS_CHANGE", id="m1", status="ready")
    d.ok("job-complete", id="m1")
    d.wait_job_gone("m1")
    st = d.statuses("m1")
    assert st[:3] == ["created", "running", "ready"] and st[-5:] == READY_THEN_DONE[-5:]
    d.ok("blockdev-mirror", **{"job-id": "m2", "device": "top", "target": "tgt2", "sync": "top"})
    ready = d.wait_event("BLOCK_JOB_READY", device="m2")
    assert ready["data"]["len"] == MiB
    d.ok("block-job-complete", device="m2")
    d.wait_job_gone("m2")
    d.ok("blockdev-mirror", **{"job-id": "m3", "device": "top", "target": "small", "sync": "full"})
    done = d.wait_event("BLOCK_JOB_COMPLETED", device="m3")
    assert done["data"]["error"] == "Source and target image have different sizes"
    assert d.stop() == 0
    reads(str(tmp_path / "tgt.qcow2"), (0xaa, 0, MiB), (0xbb, MiB, MiB), (0xcc, 2 * MiB, MiB), (0, 3 * MiB, MiB))
    reads(str(tmp_path / "tgt2.qcow2"), (0, 0, 2 * MiB), (0xcc, 2 * MiB, MiB))
    for t in ("tgt", "tgt2", "small"):
        assert_qemu_clean(tmp_path / f"{t}.qcow2")


def test_drive_mirror_creates_target(qsd, tmp_path):
    paths = make_chain(tmp_path)
    d = qsd(*chain_blockdevs())
    d.ok("drive-mirror", **{"job-id": "m", "device": "top", "target": str(tmp_path / "copy.qcow2"),
                            "sync": "top", "format": "qcow2"})
    d.wait_event("BLOCK_JOB_READY", device="m")
    d.ok("job-complete", id="m")
    d.wait_job_gone("m")
    assert d.stop() == 0
    assert header_backing(tmp_path / "copy.qcow2") == (str(paths["mid"]), "qcow2")
    reads(str(tmp_path / "copy.qcow2"), (0xaa, 0, MiB), (0xbb, MiB, MiB), (0xcc, 2 * MiB, MiB))
    assert_qemu_clean(tmp_path / "copy.qcow2")


def test_active_commit_over_qmp(qsd, tmp_path):
    """qmp-surface.md §5.1 scenario 5: READY with len = offset = 2 MiB, complete, base holds everything."""
    paths = make_chain(tmp_path)
    d = qsd(*chain_blockdevs())
    d.ok("block-commit", **{"job-id": "ac", "device": "top"})
    ready = d.wait_event("BLOCK_JOB_READY", device="ac")
    assert ready["data"] == {"device": "ac", "len": 2 * MiB, "offset": 2 * MiB, "speed": 0, "type": "commit"}
    info = d.ok("query-block-jobs")[0]
    assert (info["type"], info["status"], info["ready"]) == ("commit", "ready", True)
    d.ok("job-complete", id="ac")
    d.wait_job_gone("ac")
    assert d.stop() == 0
    reads(str(paths["base"]), (0xaa, 0, MiB), (0xbb, MiB, MiB), (0xcc, 2 * MiB, MiB))
    assert header_backing(paths["top"]) == ("mid.qcow2", "qcow2")  # no header rewrite in active commit
    assert_qemu_clean(paths["base"])


# --------------------------------------------------------------------------------------------------
# in process: a client writes while the job runs
# --------------------------------------------------------------------------------------------------
class Events:
    def __init__(self) -> None:
        self.items: list[dict] = []
        self.new = asyncio.Event()

    def send_event(self, ev: dict) -> None:
        self.items.append(ev)
        self.new.set()

    async def wait(self, name: str, timeout: float = 30.0, **match) -> dict:
        async def look() -> dict:
            seen = 0
            while True:
                for ev in self.items[seen:]:
                    if ev["event"] == name and all(ev["data"].get(k) == v for k, v in match.items()):
                        return ev
                seen = len(self.items)
                self.new.clear()
                await self.new.wait()
        return await asyncio.wait_for(look(), timeout)


async def _daemon(tmp_path, workers: int):
    from engine.daemon.core import Daemon

    if workers:
        from workers.pool import PoolExecutor, WorkerPool

        pool = WorkerPool(workers)
        ex = PoolExecutor(pool)
    else:
        from workers.inproc import InProcessExecutor

        pool, ex = None, InProcessExecutor()
    d = Daemon(ex)
    ev = Events()
    d.monitors.append(ev)
    return d, ev, pool


def _add_chain(d, tmp_path):
    async def go():
        for name, backing in (("base", None), ("mid", "base"), ("top", "mid")):
            await d.execute("blockdev-add", {"driver": "qcow2", "node-name": name, "backing": backing,
                                             "file": {"driver": "file", "filename": str(tmp_path / f"{name}.qcow2")}})
    return go()


async def _writer(node, model: bytearray, stop: asyncio.Event, seed: int) -> int:
    rnd = random.Random(seed)
    n = 0
    while not stop.is_set():
        off = rnd.randrange(0, len(model) - 65536) // 512 * 512
        ln = rnd.choice([512, 4096, 65536, 3 * 512])
        data = bytes([rnd.randrange(1, 256)]) * ln
        await node.write(off, data)
        model[off:off + ln] = data
        n += 1
        await asyncio.sleep(0.005)  # a guest that dirties less than the job copies, so it converges
    return n


@pytest.mark.parametrize("copy_mode", ["background", "write-blocking"])
def test_mirror_converges_under_writes(tmp_path, copy_mode):
    paths = make_chain(tmp_path)
    qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "tgt.qcow2"), "4M")

    async def main() -> None:
        d, ev, pool = await _daemon(tmp_path, workers=1)
        try:
            await _add_chain(d, tmp_path)
            await d.execute("blockdev-add", {"driver": "qcow2", "node-name": "tgt", "backing": None,
                                             "file": {"driver": "file", "filename": str(tmp_path / "tgt.qcow2")}})
            top = d.graph.nodes["top"]
            model = bytearray(await top.read(0, 4 * MiB))
            stop = asyncio.Event()
            w = asyncio.create_task(_writer(top, model, stop, 1))
            await d.execute("blockdev-mirror", {"job-id": "m", "device": "top", "target": "tgt", "sync": "full",
                                                "copy-mode": copy_mode})
            await ev.wait("BLOCK_JOB_READY", device="m")
            await asyncio.sleep(0.3)  # writes keep coming after READY
            stop.set()
            nwrites = await w
            assert nwrites > 10
            await d.execute("job-complete", {"id": "m"})
            await ev.wait("JOB_STATUS_CHANGE", id="m", status="null")
            assert [e["event"] for e in ev.items if e["event"].startswith("BLOCK_JOB")] == \
                ["BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED"]
            tgt = d.graph.nodes["tgt"]
            assert await tgt.read(0, 4 * MiB) == bytes(model)
        finally:
            await d.shutdown()
            if pool:
                pool.close()

    asyncio.run(main())
    assert_qemu_clean(tmp_path / "tgt.qcow2")
    assert_qemu_clean(paths["top"])


@pytest.mark.parametrize("how", ["complete", "soft-cancel", "force-cancel"])
def test_active_commit_with_writes(tmp_path, how):
    paths = make_chain(tmp_path)

    async def main() -> bytes:
        d, ev, pool = await _daemon(tmp_path, workers=0)
        try:
            await _add_chain(d, tmp_path)
            top = d.graph.nodes["top"]
            model = bytearray(await top.read(0, 4 * MiB))
            stop = asyncio.Event()
            w = asyncio.create_task(_writer(top, model, stop, 2))
            await d.execute("block-commit", {"job-id": "ac", "device": "top"})
            await ev.wait("BLOCK_JOB_READY", device="ac")
            await asyncio.sleep(0.2)
            stop.set()
            await w
            if how == "complete":
                await d.execute("job-complete", {"id": "ac"})
            elif how == "soft-cancel":
                await d.execute("block-job-cancel", {"device": "ac"})
            else:
                await d.execute("block-job-cancel", {"device": "ac", "force": True})
            await ev.wait("JOB_STATUS_CHANGE", id="ac", status="null")
            kinds = [e["event"] for e in ev.items if e["event"].startswith("BLOCK_JOB")]
            assert kinds == ["BLOCK_JOB_READY",
                             "BLOCK_JOB_CANCELLED" if how == "force-cancel" else "BLOCK_JOB_COMPLETED"]
            assert await top.read(0, 4 * MiB) == bytes(model)  # the guest's view never changes
            base = d.graph.nodes["base"]
            if how != "force-cancel":  # converged: base holds the whole disk as the guest sees it
                assert await base.read(0, 4 * MiB) == bytes(model)
            return bytes(model)
        finally:
            await d.shutdown()
            if pool:
                pool.close()

    model = asyncio.run(main())
    assert_qemu_clean(paths["base"])
    assert_qemu_clean(paths["top"])
    if how != "force-cancel":
        with open(os.devnull, "w"):
            pass
        from tests.util import read_all

        assert read_all(paths["base"], "qcow2") == model
