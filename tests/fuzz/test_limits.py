"""Connection limits: 200 QMP clients at once are all served (or refused cleanly) and the first client is
unaffected; NBD clients beyond ``max-connections`` are refused at once while the admitted ones keep
working, and a slot freed by a disconnect is reusable."""
from __future__ import annotations

import json
import socket

import pytest

from ipc import nbd as P
from tests.daemon.conftest import MiB, start_daemon
from tests.fuzz.daemon_util import Qmp, RawClient, assert_alive
from tests.util import needs_qemu, qemu_img


@pytest.fixture
def daemon(tmp_path):
    qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "a.qcow2"), "4M")
    d = start_daemon(tmp_path, "--blockdev", "driver=qcow2,node-name=a,file.driver=file,file.filename=a.qcow2")
    yield d
    assert d.stop() == 0
    err = d.proc.stderr.read().decode() if d.proc.stderr else ""
    assert "Traceback" not in err, err


@needs_qemu
def test_200_qmp_connections(daemon):
    first = Qmp(daemon.sock)
    socks = []
    for _ in range(200):
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(daemon.sock))  # blocking: waits for room in the listen backlog (asyncio's is 100)
        s.settimeout(20)
        socks.append(s)
    served = refused = 0
    for i, s in enumerate(socks):
        f = s.makefile("rb")
        try:
            greeting = json.loads(f.readline())
            assert "QMP" in greeting
            s.sendall(b'{"execute": "qmp_capabilities"}{"execute": "query-version", "id": %d}' % i)
            assert json.loads(f.readline()) == {"return": {}}
            assert json.loads(f.readline())["id"] == i
            served += 1
        except (ConnectionError, json.JSONDecodeError):
            refused += 1  # a clean refusal is a closed connection
        f.close()
    assert served + refused == 200 and served > 0
    assert_alive(daemon, first)
    for s in socks:
        s.close()
    assert_alive(daemon, first)
    first.close()


@needs_qemu
def test_nbd_connections_beyond_max_connections(daemon, tmp_path):
    sock = tmp_path / "nbd.sock"
    daemon.ok("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}}, **{"max-connections": 4})
    daemon.ok("block-export-add", type="nbd", id="e", **{"node-name": "a"}, writable=True)
    admitted = [RawClient(sock) for _ in range(4)]
    for c in admitted:
        assert c.handshake("a") == 4 * MiB
    for _ in range(20):  # refused at once, not left in the backlog
        extra = RawClient(sock)
        assert extra.closed_by_server()
        extra.close()
    for h, c in enumerate(admitted):
        c.request(P.Cmd.WRITE, h * 4096, 4096, bytes([h + 1]) * 4096, handle=h)
        assert c.reply_chunks()[-1][1] == P.Chunk.NONE
        c.request(P.Cmd.READ, h * 4096, 4096, handle=100 + h)
        (_, typ, payload), = c.reply_chunks()
        assert typ == P.Chunk.OFFSET_DATA and payload[8:] == bytes([h + 1]) * 4096
    admitted[0].request(P.Cmd.DISC)
    assert admitted[0].closed_by_server()
    admitted[0].close()
    again = None
    for _ in range(100):  # the freed slot becomes usable once the server has noticed the disconnect
        again = RawClient(sock)
        try:
            again.handshake("a")
            break
        except (AssertionError, EOFError, ConnectionError):
            again.close()
            again = None
            __import__("time").sleep(0.05)
    assert again is not None, "a slot freed by a disconnect never became usable"
    again.request(P.Cmd.READ, 4096, 4096, handle=7)
    assert again.reply_chunks()[-1][0] & P.ReplyFlags.DONE
    for c in (again, *admitted[1:]):
        c.close()
    assert daemon.ok("query-version")
