"""``transaction`` (all or nothing: bitmap actions, backups, snapshots) and the snapshot commands."""
from __future__ import annotations

import asyncio
import json

from tests.daemon.conftest import MiB, chain_blockdevs, make_chain
from tests.daemon.test_backup import _setup
from tests.util import assert_qemu_clean, needs_qemu, qemu_img

pytestmark = needs_qemu


def _bitmaps(d, node: str) -> dict[str, dict]:
    for n in d.ok("query-named-block-nodes"):
        if n["node-name"] == node:
            return {b["name"]: b for b in n.get("dirty-bitmaps", [])}
    raise AssertionError(node)


def test_abort_action_rolls_everything_back(qsd, tmp_path):
    make_chain(tmp_path)
    qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "tgt.qcow2"), "4M")
    d = qsd(*chain_blockdevs(), "--blockdev",
            json.dumps({"driver": "qcow2", "node-name": "tgt", "backing": None,
                        "file": {"driver": "file", "filename": "tgt.qcow2"}}))
    import shutil

    shutil.copy(tmp_path / "top.qcow2", tmp_path / "orig.qcow2")
    d.ok("block-dirty-bitmap-add", **{"node": "top", "name": "keep"})
    assert d.err("transaction", actions=[
        {"type": "block-dirty-bitmap-add", "data": {"node": "top", "name": "b1"}},
        {"type": "block-dirty-bitmap-disable", "data": {"node": "top", "name": "keep"}},
        {"type": "blockdev-snapshot-internal-sync", "data": {"device": "top", "name": "snap"}},
        {"type": "blockdev-backup", "data": {"job-id": "b", "device": "top", "target": "tgt", "sync": "full"}},
        {"type": "abort", "data": {}}]) == ("GenericError", "Transaction aborted using Abort action")
    assert set(_bitmaps(d, "top")) == {"keep"} and _bitmaps(d, "top")["keep"]["recording"] is True
    assert d.ok("query-jobs") == []
    # a failing action in the middle: same all-or-nothing
    assert d.err("transaction", actions=[
        {"type": "block-dirty-bitmap-add", "data": {"node": "top", "name": "b2"}},
        {"type": "block-dirty-bitmap-add", "data": {"node": "top", "name": "b2"}}]) == \
        ("GenericError", "Bitmap already exists: b2")
    assert set(_bitmaps(d, "top")) == {"keep"}
    d.ok("block-dirty-bitmap-remove", **{"node": "top", "name": "keep"})
    assert d.stop() == 0
    # the snapshot taken while preparing was deleted again, no bitmap is left, the data is unchanged
    assert qemu_img("snapshot", "-l", str(tmp_path / "top.qcow2")).stdout == ""
    assert "bitmaps" not in qemu_img("info", str(tmp_path / "top.qcow2")).stdout
    assert qemu_img("compare", "-f", "qcow2", "-F", "qcow2", str(tmp_path / "top.qcow2"),
                    str(tmp_path / "orig.qcow2")).returncode == 0
    assert_qemu_clean(tmp_path / "top.qcow2")


def test_bitmap_and_backup_together(tmp_path):
    """libvirt's full backup + new checkpoint: add a bitmap and start a backup in one transaction; writes
    after it land in the bitmap and the backup holds the point in time."""
    make_chain(tmp_path)
    qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "tgt.qcow2"), "4M")

    async def main() -> None:
        d, ev, pool = await _setup(tmp_path)
        try:
            top = d.graph.nodes["top"]
            before = await top.read(0, 4 * MiB)
            await d.execute("transaction", {"actions": [
                {"type": "block-dirty-bitmap-add", "data": {"node": "top", "name": "cp1"}},
                {"type": "blockdev-backup", "data": {"job-id": "b", "device": "top", "target": "tgt",
                                                     "sync": "full", "speed": 4 * MiB}}]})
            await top.write(MiB, b"\x42" * 4096)
            await ev.wait("BLOCK_JOB_COMPLETED", device="b")
            bm = next(b for b in top.bitmaps if b.name == "cp1")
            assert list(bm.dirty_extents()) == [(MiB, 65536)]
            assert await d.graph.nodes["tgt"].read(0, 4 * MiB) == before
        finally:
            await d.shutdown()
            if pool:
                pool.close()

    asyncio.run(main())
    assert_qemu_clean(tmp_path / "tgt.qcow2")


def test_grouped_completion_cancels_together(tmp_path):
    make_chain(tmp_path)
    for t in ("tgt", "tgt2"):
        qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / f"{t}.qcow2"), "4M")

    async def main() -> None:
        d, ev, pool = await _setup(tmp_path)
        try:
            await d.execute("blockdev-add", {"driver": "qcow2", "node-name": "tgt2", "backing": None,
                                             "file": {"driver": "file", "filename": str(tmp_path / "tgt2.qcow2")}})
            await d.execute("transaction", {"properties": {"completion-mode": "grouped"}, "actions": [
                {"type": "blockdev-backup", "data": {"job-id": "b1", "device": "top", "target": "tgt",
                                                     "sync": "full", "speed": 1}},
                {"type": "blockdev-backup", "data": {"job-id": "b2", "device": "mid", "target": "tgt2",
                                                     "sync": "full"}}]})
            await ev.wait("JOB_STATUS_CHANGE", id="b2", status="waiting")  # done, but waits for b1
            await d.execute("job-cancel", {"id": "b1"})
            await ev.wait("JOB_STATUS_CHANGE", id="b2", status="null")
            kinds = {e["data"]["device"]: e["event"] for e in ev.items if e["event"].startswith("BLOCK_JOB_")}
            assert kinds == {"b1": "BLOCK_JOB_CANCELLED", "b2": "BLOCK_JOB_CANCELLED"}
        finally:
            await d.shutdown()
            if pool:
                pool.close()

    asyncio.run(main())


def test_snapshot_commands(qsd, tmp_path):
    paths = make_chain(tmp_path)
    d = qsd(*chain_blockdevs())
    d.ok("blockdev-snapshot-internal-sync", **{"device": "top", "name": "s1"})
    assert d.err("blockdev-snapshot-internal-sync", **{"device": "top", "name": "s1"}) == \
        ("GenericError", "Snapshot with name 's1' already exists on device 'top'")
    d.ok("blockdev-snapshot-sync", **{"node-name": "top", "snapshot-file": str(tmp_path / "ext.qcow2"),
                                      "snapshot-node-name": "ext"})
    nodes = {n["node-name"]: n for n in d.ok("query-named-block-nodes")}
    assert nodes["ext"]["backing_file"] == "top.qcow2" and nodes["ext"]["backing_file_depth"] == 3
    assert d.stop() == 0
    assert "s1" in qemu_img("snapshot", "-l", str(paths["top"])).stdout
    info = json.loads(qemu_img("info", "--output=json", str(tmp_path / "ext.qcow2")).stdout)
    assert (info["backing-filename"], info["backing-filename-format"]) == ("top.qcow2", "qcow2")
    assert qemu_img("compare", "-f", "qcow2", "-F", "qcow2", str(tmp_path / "ext.qcow2"),
                    str(paths["top"])).returncode == 0
    assert_qemu_clean(paths["top"])
