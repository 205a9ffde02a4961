"""Pull-mode backup as libvirt drives it: a disabled checkpoint bitmap plus blockdev-backup sync=none into
a fleecing overlay, in one transaction; an NBD export of the overlay with qemu:dirty-bitmap; a client
(qemu-img over NBD) reads the frozen point in time and the dirty extents while the source keeps taking
writes through its own writable export."""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from tests.daemon.conftest import MiB
from tests.util import assert_qemu_clean, needs_qemu, qemu_img, qemu_io

pytestmark = needs_qemu
NBDCOPY = shutil.which("nbdcopy")


def nbd(sock, name: str) -> str:
    return f"nbd+unix:///{name}?socket={sock}"


@pytest.mark.skipif(NBDCOPY is None, reason="nbdcopy (libnbd-bin) not installed")
def test_pull_backup_with_fleecing_and_dirty_bitmap(qsd, tmp_path):
    src, fleece = tmp_path / "src.qcow2", tmp_path / "fleece.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(src), "8M")
    qemu_io("-c", "write -P 0x11 0 8M", str(src))
    qemu_img("create", "-q", "-f", "qcow2", "-b", "src.qcow2", "-F", "qcow2", str(fleece))
    nsock = tmp_path / "nbd.sock"
    d = qsd("--blockdev", "driver=qcow2,node-name=src,file.driver=file,file.filename=src.qcow2",
            "--blockdev", "driver=qcow2,node-name=fleece,file.driver=file,file.filename=fleece.qcow2,backing=src",
            "--nbd-server", f"addr.type=unix,addr.path={nsock}",
            "--export", "type=nbd,id=esrc,node-name=src,name=src,writable=on", workers=2)
    # yesterday's full backup, then a checkpoint bitmap that records the guest's writes since
    qemu_img("convert", "-f", "raw", "-O", "raw", nbd(nsock, "src"), str(tmp_path / "full.raw"))
    d.ok("block-dirty-bitmap-add", **{"node": "src", "name": "cp1"})
    qemu_io("-f", "raw", "-c", "write -P 0x22 1M 64k", "-c", "write -P 0x33 5M 128k", nbd(nsock, "src"))
    qemu_img("convert", "-f", "raw", "-O", "raw", nbd(nsock, "src"), str(tmp_path / "expected.raw"))
    # freeze the checkpoint and start fleecing, together
    d.ok("transaction", actions=[
        {"type": "block-dirty-bitmap-disable", "data": {"node": "src", "name": "cp1"}},
        {"type": "blockdev-backup", "data": {"job-id": "fl", "device": "src", "target": "fleece",
                                             "sync": "none"}}])
    d.ok("block-export-add", **{"type": "nbd", "id": "efl", "node-name": "fleece", "name": "fleece",
                                "bitmaps": ["cp1"]})
    # the guest keeps writing, over the frozen ranges and elsewhere
    qemu_io("-f", "raw", "-c", "write -P 0x44 1M 32k", "-c", "write -P 0x55 3M 1M", "-c", "write -P 0x66 7M 64k",
            nbd(nsock, "src"))
    # the backup client: the frozen point in time (nbdcopy), and the dirty extents of the checkpoint
    subprocess.run([NBDCOPY, nbd(nsock, "fleece"), str(tmp_path / "got.raw")], check=True)
    got = (tmp_path / "got.raw").read_bytes()
    assert got == (tmp_path / "expected.raw").read_bytes()
    opts = f"driver=nbd,export=fleece,server.type=unix,server.path={nsock},x-dirty-bitmap=qemu:dirty-bitmap:cp1"
    m = json.loads(qemu_img("map", "--output=json", "--image-opts", opts).stdout)
    dirty = [(e["start"], e["length"]) for e in m if not e["data"]]  # x-dirty-bitmap: dirty shows as data=false
    assert dirty == [(MiB, 65536), (5 * MiB, 131072)]
    # the incremental restore: yesterday's full backup plus only the dirty extents equals the point in time
    restored = bytearray((tmp_path / "full.raw").read_bytes())
    for start, length in dirty:
        restored[start:start + length] = got[start:start + length]
    assert bytes(restored) == (tmp_path / "expected.raw").read_bytes()
    # the source has the new data
    qemu_io("-f", "raw", "-c", "read -P 0x44 1M 32k", "-c", "read -P 0x55 3M 1M", nbd(nsock, "src"))
    d.ok("block-export-del", id="efl")
    d.ok("job-cancel", id="fl")
    d.wait_event("BLOCK_JOB_CANCELLED", device="fl")
    assert d.stop() == 0
    assert_qemu_clean(src)
    assert_qemu_clean(fleece)
