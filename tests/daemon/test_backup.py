"""blockdev-backup / drive-backup: point-in-time copies with copy-before-write, bitmap modes, errors.
Over QMP for the argument surface and the plain copies; in process where a client writes during the job."""
from __future__ import annotations

import asyncio
import json

import pytest

from engine.bitmap import DirtyBitmap
from tests.daemon.conftest import MiB, chain_blockdevs, make_chain
from tests.daemon.test_commit_stream import reads
from tests.daemon.test_mirror import _add_chain, _daemon
from tests.util import assert_qemu_clean, needs_qemu, qemu_img

pytestmark = needs_qemu


def _add_target(name: str, path) -> list[str]:
    return ["--blockdev", json.dumps({"driver": "qcow2", "node-name": name, "backing": None,
                                      "file": {"driver": "file", "filename": str(path)}})]


def test_backup_full_top_and_errors(qsd, tmp_path):
    make_chain(tmp_path)
    for t in ("t1", "t2"):
        qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / f"{t}.qcow2"), "4M")
    qemu_img("create", "-q", "-f", "raw", str(tmp_path / "r.raw"), "4M")
    d = qsd(*chain_blockdevs(), *_add_target("t1", tmp_path / "t1.qcow2"), *_add_target("t2", tmp_path / "t2.qcow2"),
            "--blockdev", "driver=raw,node-name=r,file.driver=file,file.filename=r.raw")
    errors = [
        ({"target": "t1", "sync": "incremental"}, "must provide a valid bitmap name for 'incremental' sync mode"),
        ({"target": "t1", "sync": "bitmap"}, "must provide a valid bitmap name for 'bitmap' sync mode"),
        ({"target": "t1", "sync": "full", "bitmap": "zz", "bitmap-mode": "always"}, "Bitmap 'zz' could not be found"),
        ({"target": "t1", "sync": "full", "bitmap-mode": "always"}, "Cannot specify bitmap sync mode without a bitmap"),
        ({"target": "t1", "sync": "incremental", "bitmap": "zz", "bitmap-mode": "never"},
         "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'"),
        ({"target": "top", "sync": "full"}, "Source and target cannot be the same"),
        ({"target": "r", "sync": "full", "compress": True}, "Compression is not supported for this drive "),
        ({"target": "nope", "sync": "full"}, "Cannot find device='nope' nor node-name='nope'"),
    ]
    for args, desc in errors:
        assert d.err("blockdev-backup", **{"job-id": "b", "device": "top", **args}) == ("GenericError", desc), args
    assert d.ok("query-jobs") == []
    d.ok("blockdev-backup", **{"job-id": "b1", "device": "top", "target": "t1", "sync": "full"})
    done = d.wait_event("BLOCK_JOB_COMPLETED", device="b1")
    assert done["data"]["type"] == "backup" and "error" not in done["data"]
    assert done["data"]["len"] == done["data"]["offset"] == 4 * MiB
    d.wait_job_gone("b1")
    d.ok("blockdev-backup", **{"job-id": "b2", "device": "top", "target": "t2", "sync": "top", "compress": True})
    done = d.wait_event("BLOCK_JOB_COMPLETED", device="b2")
    assert done["data"]["len"] == MiB
    d.wait_job_gone("b2")
    assert d.stop() == 0
    reads(str(tmp_path / "t1.qcow2"), (0xaa, 0, MiB), (0xbb, MiB, MiB), (0xcc, 2 * MiB, MiB), (0, 3 * MiB, MiB))
    reads(str(tmp_path / "t2.qcow2"), (0, 0, 2 * MiB), (0xcc, 2 * MiB, MiB))
    info = json.loads(qemu_img("check", "--output=json", str(tmp_path / "t2.qcow2")).stdout)
    assert info["compressed-clusters"] == 16
    for t in ("t1", "t2"):
        assert_qemu_clean(tmp_path / f"{t}.qcow2")
    assert qemu_img("compare", "-f", "qcow2", "-F", "qcow2", str(tmp_path / "t1.qcow2"),
                    str(tmp_path / "top.qcow2")).returncode == 0


def test_drive_backup_creates_target(qsd, tmp_path):
    make_chain(tmp_path)
    d = qsd(*chain_blockdevs())
    d.ok("drive-backup", **{"job-id": "b", "device": "top", "target": str(tmp_path / "bk.qcow2"), "sync": "full"})
    d.wait_job_gone("b")
    assert d.stop() == 0
    assert_qemu_clean(tmp_path / "bk.qcow2")
    assert qemu_img("compare", "-f", "qcow2", "-F", "qcow2", str(tmp_path / "bk.qcow2"),
                    str(tmp_path / "top.qcow2")).returncode == 0


async def _setup(tmp_path, workers=0):
    d, ev, pool = await _daemon(tmp_path, workers)
    await _add_chain(d, tmp_path)
    await d.execute("blockdev-add", {"driver": "qcow2", "node-name": "tgt", "backing": None,
                                     "file": {"driver": "file", "filename": str(tmp_path / "tgt.qcow2")}})
    return d, ev, pool


@pytest.mark.parametrize("sync", ["full", "none"])
def test_copy_before_write_keeps_the_point_in_time(tmp_path, sync):
    """Guest writes during the job: the target holds the disk as it was when the job started (for
    sync=none, exactly the clusters the guest overwrote), the source holds the new data."""
    make_chain(tmp_path)
    qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "tgt.qcow2"), "4M")

    async def main() -> tuple[bytes, list[tuple[int, int]]]:
        d, ev, pool = await _setup(tmp_path, workers=1)
        try:
            top = d.graph.nodes["top"]
            before = await top.read(0, 4 * MiB)
            await d.execute("blockdev-backup", {"job-id": "b", "device": "top", "target": "tgt", "sync": sync,
                                                "speed": 2 * MiB, "auto-dismiss": False})
            written = []
            for i, off in enumerate((0, 2 * MiB + 4096, 3 * MiB + 100, 65536 * 5)):
                await top.write(off, bytes([0x10 + i]) * 8192)
                written.append((off, 8192))
                await asyncio.sleep(0.05)
            if sync == "none":
                await d.execute("job-cancel", {"id": "b"})
                await ev.wait("BLOCK_JOB_CANCELLED", device="b")
            else:
                await d.execute("block-job-set-speed", {"device": "b", "speed": 0})
                done = await ev.wait("BLOCK_JOB_COMPLETED", device="b")
                assert "error" not in done["data"]
            tgt = d.graph.nodes["tgt"]
            after_src = await top.read(0, 4 * MiB)
            for off, ln in written:
                assert after_src[off:off + ln] == bytes([after_src[off]]) * ln
            got = await tgt.read(0, 4 * MiB)
            if sync == "full":
                assert got == before
            else:
                for off, ln in written:  # the clusters touched hold the old data
                    lo, hi = off // 65536 * 65536, -(-(off + ln) // 65536) * 65536
                    assert got[lo:hi] == before[lo:hi]
            return before, written
        finally:
            await d.shutdown()
            if pool:
                pool.close()

    asyncio.run(main())
    assert_qemu_clean(tmp_path / "tgt.qcow2")
    assert_qemu_clean(tmp_path / "top.qcow2")


@pytest.mark.parametrize("fail", [False, True])
def test_incremental_backup_and_bitmap_outcome(tmp_path, fail):
    """qmp-surface.md §5.1 scenario 9 in process: one dirty 64 KiB cluster at 3 MiB -> len 65536, one
    allocated cluster in the target, bitmap cleared on success; when the job does not succeed
    (cancelled) the bits come back, plus the writes made meanwhile."""
    make_chain(tmp_path)
    qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "tgt.qcow2"), "4M")

    async def main() -> None:
        d, ev, pool = await _setup(tmp_path)
        try:
            top = d.graph.nodes["top"]
            bm = DirtyBitmap(top.size(), 65536, name="bm0")
            top.bitmaps.append(bm)
            await top.write(3 * MiB, b"\x77" * 65536)
            assert bm.count() == 65536
            if fail:
                await top.write(MiB, b"\x66" * 65536)
            await d.execute("blockdev-backup", {"job-id": "b", "device": "top", "target": "tgt",
                                                "sync": "incremental", "bitmap": "bm0",
                                                "speed": 1 if fail else 0})
            if fail:
                await top.write(2 * MiB, b"\x55" * 512)  # recorded by the successor, not by bm0 itself
                assert bm.count() == 2 * 65536 and bm.busy and not bm.enabled
                await d.execute("job-cancel", {"id": "b"})
                await ev.wait("BLOCK_JOB_CANCELLED", device="b")
                assert list(bm.dirty_extents()) == [(MiB, 65536), (2 * MiB, 65536), (3 * MiB, 65536)]
                assert bm.enabled and not bm.busy
            else:
                done = await ev.wait("BLOCK_JOB_COMPLETED", device="b")
                assert done["data"]["len"] == done["data"]["offset"] == 65536
                assert bm.count() == 0 and bm.enabled
                await top.write(0, b"\x01" * 512)  # recording again after the job
                assert bm.count() == 65536
        finally:
            await d.shutdown()
            if pool:
                pool.close()

    asyncio.run(main())
    if not fail:
        m = json.loads(qemu_img("map", "--output=json", str(tmp_path / "tgt.qcow2")).stdout)
        assert [(e["start"], e["length"]) for e in m if e["data"]] == [(3 * MiB, 65536)]
        reads(str(tmp_path / "tgt.qcow2"), (0x77, 3 * MiB, 65536))
        assert_qemu_clean(tmp_path / "tgt.qcow2")
