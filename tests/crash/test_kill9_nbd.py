"""SIGKILL the daemon while a client writes through its NBD export: every write the client saw
acknowledged by a flush (or sent with FUA) before the kill is in the image afterwards, and the image
passes qemu-img check with leaks at most (issue 5 item 5)."""
from __future__ import annotations

import random
import subprocess
import time

import pytest

from tests.crash.conftest import (MiB, assert_all_exit, assert_recoverable, descendants, reads_ok, sigkill)
from tests.daemon.conftest import start_daemon
from tests.util import needs_qemu, qemu_img, qemu_io

pytestmark = [needs_qemu, pytest.mark.timeout(120)]


@pytest.mark.parametrize("seed", [5, 6])
def test_daemon_killed_during_nbd_writes_keeps_acknowledged_data(tmp_path, seed):
    rnd = random.Random(seed)
    img = tmp_path / "d.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", str(img), "32M")
    nsock = tmp_path / "nbd.sock"
    d = start_daemon(tmp_path, "--blockdev", f"driver=qcow2,node-name=d,file.driver=file,file.filename={img}",
                     "--nbd-server", f"addr.type=unix,addr.path={nsock}",
                     "--export", "type=nbd,id=e,node-name=d,name=d,writable=on", workers=2)
    uri = f"nbd+unix:///d?socket={nsock}"
    kids = descendants(d.proc.pid)
    acked = []
    try:
        # acknowledged writes: each qemu-io run ends with a flush that returned (or writes with FUA)
        for i in range(6):
            off = i * 2 * MiB
            pat = 0x10 + i
            args = ["-c", f"write -P {pat:#x} {off} 256k"] + \
                (["-c", "flush"] if i % 2 else [])
            if i % 2 == 0:
                args = ["-c", f"write -f -P {pat:#x} {off} 256k"]  # -f: FUA
            qemu_io("-f", "raw", *args, uri)
            acked.append((pat, off, 256 << 10))
        # a writer that never stops, killed with the daemon at a seeded moment
        cmds = []
        for _ in range(400):
            cmds += ["-c", f"write -P 0x77 {rnd.randrange(13 * MiB, 31 * MiB) // 4096 * 4096} 64k"]
        writer = subprocess.Popen(["qemu-io", "-f", "raw", *cmds, uri], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        time.sleep(0.2 + rnd.random() * 0.6)
        sigkill(d.proc.pid)
        d.proc.wait(10)
        writer.wait(30)
    finally:
        d.proc.stdout.close()
        d.proc.stderr.close()
    assert_all_exit(kids, what="daemon processes after SIGKILL")
    assert_recoverable(img)
    reads_ok(img, *acked)
