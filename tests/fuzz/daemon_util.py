"""Shared pieces of the daemon fuzz tests: a raw QMP socket client and a liveness probe."""
from __future__ import annotations

import json
import socket
import struct
import time
from pathlib import Path

from ipc import nbd as P
from tests.daemon.conftest import Qsd


def wait_path(p: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not p.exists():
        assert time.monotonic() < deadline, f"{p} never appeared"
        time.sleep(0.02)


class RawClient:
    """A minimal NBD client over a unix socket, for what real clients never send (tests/daemon/test_nbd.py
    uses it too)."""

    def __init__(self, sock: Path) -> None:
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(10)
        self.s.connect(str(sock))
        self.flags = 0

    def recv(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            part = self.s.recv(n - len(buf))
            if not part:
                raise EOFError(f"closed after {len(buf)} of {n} bytes")
            buf += part
        return buf

    def closed_by_server(self) -> bool:
        try:
            while True:
                if not self.s.recv(65536):
                    return True
        except (ConnectionError, OSError):
            return True

    def opt(self, code: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        self.s.sendall(struct.pack(">QII", P.IHAVEOPT, code, len(data)) + data)
        out = []
        while True:
            magic, o, rep, n = struct.unpack(">QIII", self.recv(20))
            assert magic == P.OPTION_REPLY_MAGIC and o == code
            out.append((rep, self.recv(n)))
            if rep == P.Rep.ACK or rep & (1 << 31):
                return out

    def handshake(self, name: str, structured: bool = True) -> int:
        assert self.recv(18) == b"NBDMAGICIHAVEOPT\x00\x03"
        self.s.sendall(struct.pack(">I", 3))
        if structured:
            assert self.opt(P.Opt.STRUCTURED_REPLY)[-1][0] == P.Rep.ACK
        raw = name.encode()
        replies = self.opt(P.Opt.GO, struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0))
        assert replies[-1][0] == P.Rep.ACK, replies
        info = next(d for r, d in replies if r == P.Rep.INFO and d[:2] == b"\x00\x00")
        _, size, flags = struct.unpack(">HQH", info)
        self.flags = flags
        return size

    def request(self, typ: int, offset: int = 0, length: int = 0, data: bytes = b"", handle: int = 1,
                flags: int = 0) -> None:
        self.s.sendall(struct.pack(">IHHQQI", P.REQUEST_MAGIC, flags, typ, handle, offset, length) + data)

    def reply_chunks(self) -> list[tuple[int, int, bytes]]:
        """(flags, type, payload) chunks of one structured reply."""
        out = []
        while True:
            magic, flags, typ, _handle, n = struct.unpack(">IHHQI", self.recv(20))
            assert magic == P.STRUCTURED_REPLY_MAGIC
            out.append((flags, typ, self.recv(n)))
            if flags & P.ReplyFlags.DONE:
                return out

    def close(self) -> None:
        self.s.close()


class Qmp:
    """A raw QMP client: reads ``\\r\\n``-terminated JSON lines."""

    def __init__(self, path: Path, negotiate: bool = True, timeout: float = 20.0) -> None:
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(timeout)
        self.s.connect(str(path))
        self.buf = b""
        self.greeting = self.msg()
        if negotiate:
            self.send(b'{"execute": "qmp_capabilities"}')
            assert self.msg() == {"return": {}}

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.s.recv(1 << 16)
            if not chunk:
                raise EOFError("connection closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def msg(self) -> dict:
        return json.loads(self.line())

    def send(self, data: bytes) -> None:
        self.s.sendall(data)

    def reply(self, req_id) -> dict:
        """The reply carrying ``req_id`` (events skipped)."""
        while True:
            m = self.msg()
            if "event" not in m and m.get("id") == req_id:
                return m

    def drain_to_eof(self, timeout: float = 10.0) -> list[bytes]:
        """Half-close, then every line the server sends until it closes the connection."""
        self.s.shutdown(socket.SHUT_WR)
        self.s.settimeout(timeout)
        deadline = time.monotonic() + timeout
        while True:
            assert time.monotonic() < deadline, "server did not close the connection after EOF"
            try:
                chunk = self.s.recv(1 << 16)
            except ConnectionResetError:
                break
            if not chunk:
                break
            self.buf += chunk
        lines = self.buf.split(b"\r\n")
        self.buf = b""
        return [ln for ln in lines if ln]

    def close(self) -> None:
        self.s.close()


_probe_id = [0]


def assert_alive(d: Qsd, watcher: Qmp) -> None:
    """The daemon runs and an already-connected client still gets answers."""
    assert d.proc.poll() is None, f"daemon died: {d.proc.stderr.read().decode() if d.proc.stderr else ''}"
    _probe_id[0] += 1
    rid = f"probe-{_probe_id[0]}"
    watcher.send(json.dumps({"execute": "query-version", "id": rid}).encode())
    assert "return" in watcher.reply(rid)
