"""Throttle nodes measured over a few seconds, quit with running jobs, blockdev-reopen, and query-blockstats
after I/O — the daemon's I/O path, driven in process through the engine's request pipeline."""
from __future__ import annotations

import asyncio
import time

import pytest

from tests.daemon.conftest import MiB, chain_blockdevs, make_chain
from tests.daemon.test_mirror import _add_chain, _daemon
from tests.util import assert_qemu_clean, needs_qemu, qemu_img

pytestmark = needs_qemu


@pytest.mark.parametrize("limits,lo,hi", [
    ({"bps-write": 2 * MiB}, 1.8, 2.3),                                      # 4 MiB at 2 MiB/s
    # a burst: the 8 MiB bucket (max x max-length) takes all 4 MiB, paced at the max rate (4 MiB/s)
    ({"bps-write": 2 * MiB, "bps-write-max": 4 * MiB, "bps-write-max-length": 2}, 0.8, 1.2),
    ({"iops-write": 40}, 1.4, 1.75),                                         # 64 requests at 40/s
])
def test_throttle_node_holds_its_limits(tmp_path, limits, lo, hi):
    qemu_img("create", "-q", "-f", "raw", str(tmp_path / "d.raw"), "8M")

    async def main() -> float:
        d, ev, pool = await _daemon(tmp_path, workers=1)
        try:
            await d.execute("object-add", {"qom-type": "throttle-group", "id": "tg0", "limits": limits})
            await d.execute("blockdev-add", {"driver": "throttle", "node-name": "thr", "throttle-group": "tg0",
                                             "file": {"driver": "raw", "file": {"driver": "file",
                                                                                "filename": str(tmp_path / "d.raw")}}})
            thr = d.graph.nodes["thr"]
            t0 = time.monotonic()
            for i in range(64):
                await thr.write(i * 65536, b"\x5a" * 65536)
            took = time.monotonic() - t0
            stats = await d.execute("query-blockstats", {"query-nodes": True})
            mine = next(s for s in stats if s["node-name"] == "thr")["stats"]
            assert mine["wr_bytes"] == 4 * MiB and mine["wr_operations"] == 64
            assert mine["wr_highest_offset"] == 4 * MiB
            assert await thr.read(0, 4 * MiB) == b"\x5a" * (4 * MiB)
            return took
        finally:
            await d.shutdown()
            if pool:
                pool.close()

    took = asyncio.run(main())
    assert lo <= took <= hi, f"{limits}: took {took:.2f} s"


def test_quit_cancels_running_jobs_and_leaves_clean_images(qsd, tmp_path):
    paths = make_chain(tmp_path)
    for name in ("lone", "tgt"):
        qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / f"{name}.qcow2"), "4M")
    d = qsd(*chain_blockdevs(), *[a for n in ("lone", "tgt") for a in (
        "--blockdev", f"driver=qcow2,node-name={n},file.driver=file,file.filename={n}.qcow2")])
    d.ok("block-commit", **{"job-id": "c", "device": "top", "top-node": "mid", "speed": 1})
    d.ok("job-pause", id="c")
    d.ok("blockdev-mirror", **{"job-id": "m", "device": "lone", "target": "tgt", "sync": "full"})
    d.wait_event("BLOCK_JOB_READY", device="m")
    assert d.cmd("quit") == {"return": {}}
    for job in ("c", "m"):
        d.wait_event("BLOCK_JOB_CANCELLED", device=job)
        d.wait_event("JOB_STATUS_CHANGE", id=job, status="null")
    assert d.proc.wait(timeout=30) == 0
    for p in [*paths.values(), tmp_path / "lone.qcow2", tmp_path / "tgt.qcow2"]:
        assert_qemu_clean(p)
    assert "backing file: mid.qcow2" in qemu_img("info", str(paths["top"])).stdout  # commit changed no header


def test_blockdev_reopen_read_only_and_back(tmp_path):
    make_chain(tmp_path)

    async def main() -> None:
        d, ev, pool = await _daemon(tmp_path, workers=0)
        try:
            await _add_chain(d, tmp_path)
            top = d.graph.nodes["top"]
            await d.execute("blockdev-reopen", {"options": [
                {"driver": "qcow2", "node-name": "top", "read-only": True,
                 "file": {"driver": "file", "filename": str(tmp_path / "top.qcow2")}, "backing": "mid"}]})
            assert top.driver.read_only
            with pytest.raises(Exception, match="read-only"):
                await top.write(0, b"x" * 512)
            await d.execute("blockdev-reopen", {"options": [
                {"driver": "qcow2", "node-name": "top", "read-only": False,
                 "file": {"driver": "file", "filename": str(tmp_path / "top.qcow2")}, "backing": "mid"}]})
            await top.write(0, b"y" * 512)
            assert await top.read(0, 512) == b"y" * 512
            nodes = {n["node-name"]: n for n in await d.execute("query-named-block-nodes", {})}
            assert nodes["top"]["ro"] is False
        finally:
            await d.shutdown()
            if pool:
                pool.close()

    asyncio.run(main())
    assert_qemu_clean(tmp_path / "top.qcow2")


def test_legacy_job_verbs_and_reopen_over_qmp(qsd, tmp_path):
    paths = make_chain(tmp_path)
    d = qsd(*chain_blockdevs())
    d.ok("block-commit", **{"job-id": "c", "device": "top", "top-node": "mid", "speed": 1,
                            "auto-finalize": False, "auto-dismiss": False})
    d.ok("block-job-pause", device="c")
    d.wait_event("JOB_STATUS_CHANGE", id="c", status="paused")
    assert d.err("block-job-pause", device="c") == ("GenericError", "Job is already paused")
    d.ok("block-job-resume", device="c")
    d.ok("block-job-set-speed", device="c", speed=0)
    d.wait_event("BLOCK_JOB_PENDING", id="c")
    assert d.ok("query-block-jobs")[0]["status"] == "pending"
    d.ok("block-job-finalize", id="c")
    d.wait_event("BLOCK_JOB_COMPLETED", device="c")
    d.ok("block-job-dismiss", id="c")
    assert d.ok("query-block-jobs") == []
    spec = {"driver": "qcow2", "node-name": "top", "file": "top-file", "backing": "base"}
    d.ok("blockdev-reopen", options=[{**spec, "read-only": True}])
    ro = {n["node-name"]: n["ro"] for n in d.ok("query-named-block-nodes")}
    assert ro["top"] is True
    d.ok("blockdev-reopen", options=[{**spec, "read-only": False}])
    ro = {n["node-name"]: n["ro"] for n in d.ok("query-named-block-nodes")}
    assert ro["top"] is False
    assert d.stop() == 0
    assert "backing file: base.qcow2" in qemu_img("info", str(paths["top"])).stdout
    for p in paths.values():
        assert_qemu_clean(p)


def test_blockdev_del_refused_while_a_job_uses_the_node(qsd, tmp_path):
    for name in ("a", "b"):
        qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / f"{name}.qcow2"), "8M")
    from tests.util import qemu_io

    qemu_io("-c", "write -P 7 0 8M", str(tmp_path / "a.qcow2"))
    d = qsd(*[x for n in ("a", "b") for x in (
        "--blockdev", f"driver=qcow2,node-name={n},file.driver=file,file.filename={n}.qcow2")])
    d.ok("blockdev-mirror", **{"job-id": "j", "device": "a", "target": "b", "sync": "full", "speed": 1})
    # as qsd 7.2: the source is op-blocked by the job, the target is held by the job's BlockBackend
    assert d.err("blockdev-del", **{"node-name": "a"}) == \
        ("GenericError", "Node 'a' is busy: block device is in use by block job: mirror")
    assert d.err("blockdev-del", **{"node-name": "b"}) == ("GenericError", "Node b is in use")
    d.ok("job-cancel", id="j")
    d.wait_job_gone("j")
    d.ok("blockdev-del", **{"node-name": "b"})
    d.ok("blockdev-del", **{"node-name": "a"})
    assert d.ok("query-named-block-nodes") == []


def test_image_locks_are_qemus(qsd, tmp_path):
    """The daemon locks images the way QEMU does (OFD locks on bytes 100+ / 200+), so qemu-img and qemu-io
    refuse to touch an image it writes, exactly as they refuse with qemu-storage-daemon, and a second
    daemon cannot open it read-write either."""
    from tests.daemon.conftest import start_daemon

    img = tmp_path / "d.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "4M")
    d = qsd("--blockdev", "driver=qcow2,node-name=d,file.driver=file,file.filename=d.qcow2")
    out = qemu_img("info", str(img), check=False)
    assert out.returncode == 1 and 'Failed to get shared "write" lock' in out.stderr
    assert qemu_img("info", "-U", str(img)).returncode == 0
    from tests.util import qemu_io

    out = qemu_io("-c", "write 0 512", str(img), check=False)
    assert 'Failed to get "write" lock' in out.stderr + out.stdout
    other = tmp_path / "o"
    other.mkdir()
    d2 = start_daemon(other)
    try:
        assert d2.err("blockdev-add", **{"driver": "qcow2", "node-name": "x",
                                         "file": {"driver": "file", "filename": str(img)}}) == \
            ("GenericError", 'Failed to get "write" lock')
        d2.ok("blockdev-add", **{"driver": "qcow2", "node-name": "y", "read-only": True, "force-share": True,
                                 "file": {"driver": "file", "filename": str(img)}})
    finally:
        assert d2.stop() == 0
        d2.proc.stdout.close()
        d2.proc.stderr.close()
    # read-only users share: reading is fine while the daemon has the image read-only
    d.ok("blockdev-reopen", options=[{"driver": "qcow2", "node-name": "d", "read-only": True,
                                      "file": {"driver": "file", "filename": "d.qcow2"}}])
    assert qemu_img("info", str(img)).returncode == 0
    out = qemu_io("-c", "write 0 512", str(img), check=False)  # but writers are still kept out
    assert 'Failed to get "write" lock' in out.stderr + out.stdout
    assert d.stop() == 0
    assert qemu_img("info", str(img)).returncode == 0
    assert_qemu_clean(img)


def _drop_backing_format(path) -> None:
    """Turn the backing-format header extension into an unknown (ignored) one: the image then records a
    backing file name but no format, as old qemu-img versions wrote them."""
    import struct

    b = bytearray(path.read_bytes())
    off = struct.unpack_from(">I", b, 100)[0]  # header_length (v3)
    while True:
        etype, elen = struct.unpack_from(">II", b, off)
        if etype == 0:
            break
        if etype == 0xE2792ACA:
            struct.pack_into(">I", b, off, 0x12345678)
        off += 8 + ((elen + 7) & ~7)
    path.write_bytes(bytes(b))


def test_backing_file_never_probed_as_raw_without_a_format(qsd, tmp_path):
    qemu_img("create", "-q", "-f", "raw", str(tmp_path / "r.raw"), "1M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "r.raw", "-F", "raw", str(tmp_path / "o.qcow2"))
    _drop_backing_format(tmp_path / "o.qcow2")
    assert "backing file format" not in qemu_img("info", str(tmp_path / "o.qcow2")).stdout
    d = qsd()
    cls, desc = d.err("blockdev-add", **{"driver": "qcow2", "node-name": "o",
                                         "file": {"driver": "file", "filename": "o.qcow2"}})
    assert cls == "GenericError" and desc.startswith("Could not open backing file: ") \
        and "would be probed as raw" in desc
    assert d.ok("query-named-block-nodes") == []
    # naming the backing node (and so its format) explicitly is the way
    d.ok("blockdev-add", **{"driver": "qcow2", "node-name": "o", "backing": {
        "driver": "raw", "node-name": "rb", "file": {"driver": "file", "filename": "r.raw"}},
        "file": {"driver": "file", "filename": "o.qcow2"}})
    assert d.stop() == 0
