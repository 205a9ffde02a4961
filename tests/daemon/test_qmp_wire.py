"""The QMP wire as qemu-storage-daemon 7.2 speaks it: greeting, negotiation, envelope errors, ids,
``\\r\\n`` line ends, several clients, events — over a raw socket and with the real qemu.qmp clients."""
from __future__ import annotations

import asyncio
import json
import os
import socket
import stat

import pytest
from qemu.qmp import QMPClient
from qemu.qmp.qmp_client import ExecuteError

from tests.daemon.conftest import start_daemon


class Raw:
    def __init__(self, path) -> None:
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(10)
        self.s.connect(str(path))
        self.buf = b""

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.s.recv(65536)
            assert chunk, "connection closed"
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def msg(self) -> dict:
        return json.loads(self.line())

    def send(self, data: bytes) -> None:
        self.s.sendall(data)

    def close(self) -> None:
        self.s.close()


@pytest.fixture
def daemon(tmp_path):
    d = start_daemon(tmp_path)
    yield d
    assert d.stop() == 0


def test_greeting_negotiation_and_errors(daemon):
    c = Raw(daemon.sock)
    greeting = c.msg()
    assert greeting["QMP"]["capabilities"] == ["oob"]
    assert set(greeting["QMP"]["version"]["qemu"]) == {"micro", "minor", "major"}
    c.send(b'{"execute": "query-version"}')
    assert c.msg() == {"error": {"class": "CommandNotFound",
                                 "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}
    c.send(b'{"execute": "qmp_capabilities", "arguments": {"enable": ["foo"]}}')
    assert c.msg()["error"]["desc"] == "Parameter 'null' does not accept value 'foo'"
    c.send(b'{"execute": "qmp_capabilities", "id": 7}')
    assert c.msg() == {"return": {}, "id": 7}
    c.send(b'{"execute": "qmp_capabilities"}')
    assert c.msg()["error"] == {"class": "CommandNotFound",
                                "desc": "Capabilities negotiation is already complete, command ignored"}
    # envelope errors, each answered in order; two requests on one line, no newline needed
    cases = [
        (b"[1]", "QMP input must be a JSON object"),
        (b"{}", "QMP input lacks member 'execute'"),
        (b'{"execute": 1}', "QMP input member 'execute' must be a string"),
        (b'{"foo": 1}', "QMP input member 'foo' is unexpected"),
        (b'{"execute": "x", "arguments": []}', "QMP input member 'arguments' must be an object"),
        (b'{"execute": "nope"}', "The command nope has not been found"),
        (b'{"execute": "block-commit", "arguments": {"device": "x", "speed": "fast"}}',
         "Invalid parameter type for 'speed', expected: integer"),
        (b'{"execute": "block-commit", "arguments": {"bottom": "x", "device": "d"}}',
         "Parameter 'bottom' is unexpected"),
        (b'{"execute": "block-commit", "arguments": {}}', "Parameter 'device' is missing"),
    ]
    c.send(b"".join(req for req, _ in cases))
    for _, desc in cases:
        assert c.msg()["error"]["desc"] == desc
    c.send(b"not json\n")
    assert c.msg()["error"]["desc"] == "JSON parse error, invalid keyword 'not'"
    assert c.msg()["error"]["desc"] == "JSON parse error, invalid keyword 'json'"
    # the id is echoed verbatim, whatever JSON it is; the raw reply line ends in \r\n
    c.send(b'{"execute": "query-version", "id": {"a": [1, 2]}}')
    raw = c.line()
    assert json.loads(raw)["id"] == {"a": [1, 2]}
    assert b"\n" not in raw and c.buf == b""
    c.close()


def test_socket_mode_and_many_clients(daemon):
    assert stat.S_IMODE(os.stat(daemon.sock).st_mode) == 0o600
    clients = [Raw(daemon.sock) for _ in range(5)]
    for i, c in enumerate(clients):
        c.msg()
        c.send(b'{"execute": "qmp_capabilities"}')
        assert c.msg() == {"return": {}}
    for i, c in enumerate(clients):
        c.send(json.dumps({"execute": "query-jobs", "id": i}).encode())
    for i, c in enumerate(clients):
        assert c.msg() == {"return": [], "id": i}
    clients[0].close()  # one client going away does not disturb the others
    clients[1].send(b'{"execute": "query-version"}')
    assert "return" in clients[1].msg()
    for c in clients[1:]:
        c.close()


def test_events_reach_every_client(daemon, tmp_path):
    from tests.util import qemu_img

    qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "b.qcow2"), "1M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", str(tmp_path / "t.qcow2"))
    other = Raw(daemon.sock)
    other.msg()
    other.send(b'{"execute": "qmp_capabilities"}')
    other.msg()
    daemon.ok("blockdev-add", **{"driver": "qcow2", "node-name": "t",
                                  "file": {"driver": "file", "filename": str(tmp_path / "t.qcow2")}})
    daemon.ok("block-stream", **{"job-id": "s", "device": "t"})
    daemon.wait_job_gone("s")
    seen = []
    while "null" not in seen:
        m = other.msg()
        assert set(m["timestamp"]) == {"seconds", "microseconds"}
        if m["event"] == "JOB_STATUS_CHANGE":
            seen.append(m["data"]["status"])
    assert seen == ["created", "running", "waiting", "pending", "concluded", "null"]
    other.close()


def test_async_qemu_qmp_client(tmp_path):
    """The asyncio QMPClient from PyPI qemu.qmp, as management software uses it."""
    d = start_daemon(tmp_path)
    d.qmp.close()

    async def main() -> None:
        qmp = QMPClient("test")
        await qmp.connect(str(d.sock))
        try:
            ver = await qmp.execute("query-version")
            assert ver["qemu"]["major"] == 7
            names = {c["name"] for c in await qmp.execute("query-commands")}
            assert {"block-commit", "block-stream", "blockdev-add", "query-jobs", "quit"} <= names
            with pytest.raises(ExecuteError) as ei:
                await qmp.execute("blockdev-del", {"node-name": "nope"})
            assert ei.value.error_class == "GenericError"
            assert str(ei.value) == "Failed to find node with node-name='nope'"
            assert await qmp.execute("quit") == {}
        finally:
            try:
                await qmp.disconnect()
            except EOFError:  # the daemon hung up after quit: qemu-storage-daemon does the same
                pass

    asyncio.run(main())
    assert d.proc.wait(timeout=30) == 0
    d.proc.stdout.close()
    d.proc.stderr.close()
