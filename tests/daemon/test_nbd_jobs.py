"""NBD clients while jobs run: qemu-io writes and nbdcopy reads through a writable export of the active
layer during an intermediate commit; the commit's result and the copies are checked by qemu-img."""
from __future__ import annotations

import shutil

import pytest

from tests.daemon.conftest import MiB, chain_blockdevs, make_chain
from tests.daemon.test_commit_stream import header_backing, reads
from tests.util import assert_qemu_clean, needs_qemu, qemu_img, qemu_io, run

pytestmark = needs_qemu
NBDCOPY = shutil.which("nbdcopy")


@pytest.mark.skipif(NBDCOPY is None, reason="nbdcopy (libnbd-bin) not installed")
def test_nbd_io_during_intermediate_commit(qsd, tmp_path):
    paths = make_chain(tmp_path)
    nsock = tmp_path / "nbd.sock"
    d = qsd(*chain_blockdevs(), "--nbd-server", f"addr.type=unix,addr.path={nsock}",
            "--export", "type=nbd,id=e,node-name=top,name=top,writable=on", workers=2)
    uri = f"nbd+unix:///top?socket={nsock}"
    d.ok("block-commit", **{"job-id": "c", "device": "top", "top-node": "mid", "base-node": "base",
                            "speed": 2 * MiB})
    # while the job copies mid into base, the guest writes and a backup tool reads through the export
    qemu_io("-f", "raw", "-c", "write -P 0x77 3M 64k", "-c", "write -z 0 4k", uri)
    run([NBDCOPY, uri, str(tmp_path / "copy.raw")])
    assert d.ok("query-block-jobs")[0]["status"] == "running"  # the copy really overlapped the job
    d.ok("block-job-set-speed", device="c", speed=0)
    d.wait_job_gone("c")
    qemu_io("-f", "raw", "-c", "read -P 0x77 3M 64k", "-c", "read -P 0 0 4k", "-c", "read -P 0xbb 1M 1M", uri)
    assert d.stop() == 0
    assert header_backing(paths["top"]) == ("base.qcow2", "qcow2")
    reads(str(paths["top"]), (0, 0, 4096), (0xaa, 4096, MiB - 4096), (0xbb, MiB, MiB), (0xcc, 2 * MiB, MiB),
          (0x77, 3 * MiB, 65536))
    reads(str(tmp_path / "copy.raw"), (0, 0, 4096), (0xaa, 4096, MiB - 4096), (0xbb, MiB, MiB),
          (0xcc, 2 * MiB, MiB), (0x77, 3 * MiB, 65536))
    for p in paths.values():
        assert_qemu_clean(p)
    assert qemu_img("compare", "-f", "raw", "-F", "qcow2", str(tmp_path / "copy.raw"),
                    str(paths["top"])).returncode == 0
