"""block-commit where ``top`` has a writer (a writable NBD export of an intermediate node): QEMU makes it
an active commit, refuses ``backing-file``, and switches the writer to base on completion without
rewriting any header (qmp-surface.md §4.1 item 6-7, §4.3, §5.1 scenario 3)."""
from __future__ import annotations

from tests.daemon.conftest import MiB, chain_blockdevs, make_chain
from tests.daemon.test_commit_stream import header_backing, reads
from tests.util import assert_qemu_clean, needs_qemu, qemu_io

pytestmark = needs_qemu


def test_commit_with_a_writer_on_top_is_active(qsd, tmp_path):
    paths = make_chain(tmp_path)
    nsock = tmp_path / "nbd.sock"
    d = qsd(*chain_blockdevs(), "--nbd-server", f"addr.type=unix,addr.path={nsock}",
            "--export", "type=nbd,id=emid,node-name=mid,name=mid,writable=on")
    assert d.err("block-commit", **{"job-id": "j", "device": "top", "top-node": "mid", "base-node": "base",
                                    "backing-file": "x"}) == \
        ("GenericError", "'backing-file' specified, but 'top' has a writer on it")
    assert d.ok("query-jobs") == []
    d.ok("block-commit", **{"job-id": "ac", "device": "top", "top-node": "mid", "base-node": "base"})
    ready = d.wait_event("BLOCK_JOB_READY", device="ac")
    assert ready["data"]["type"] == "commit"
    uri = f"nbd+unix:///mid?socket={nsock}"
    qemu_io("-f", "raw", "-c", "write -P 0xdd 3M 64k", uri)  # a write through the export during the job
    d.ok("job-complete", id="ac")
    d.wait_job_gone("ac")
    # the export now serves base, which holds mid's data and the write
    assert d.ok("query-block-exports")[0]["node-name"] == "base"
    qemu_io("-f", "raw", "-c", "read -P 0xaa 0 1M", "-c", "read -P 0xbb 1M 1M", "-c", "read -P 0xdd 3M 64k", uri)
    nodes = {n["node-name"]: n for n in d.ok("query-named-block-nodes")}
    assert nodes["top"]["backing_file_depth"] == 1  # in memory, top now backs onto base
    assert d.stop() == 0
    assert header_backing(paths["top"]) == ("mid.qcow2", "qcow2")  # no header rewrite in active commit
    reads(str(paths["base"]), (0xaa, 0, MiB), (0xbb, MiB, MiB), (0xdd, 3 * MiB, 65536))
    for p in paths.values():
        assert_qemu_clean(p)
