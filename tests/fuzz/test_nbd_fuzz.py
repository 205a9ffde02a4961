"""NBD server fuzz against the daemon's exports: bad handshakes (wrong magic, truncated options,
oversized option lengths, unknown options, random option payloads), then random transmission requests
(unknown command types, out-of-range offsets, oversized lengths, random flags, writes to a read-only
export).  Each fuzz client gets error replies or is dropped once it half-closes; a second client keeps
working; the daemon prints no traceback; the read-only image is unchanged and the writable one passes
qemu-img check afterwards."""
from __future__ import annotations

import hashlib
import socket
import struct
import time

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ipc import nbd as P
from tests.daemon.conftest import MiB, start_daemon
from tests.fuzz.daemon_util import Qmp, RawClient, assert_alive, wait_path
from tests.util import assert_qemu_clean, needs_qemu, qemu_img

SETTINGS = {"derandomize": True, "database": None, "deadline": None,
                "suppress_health_check": [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]}
SIZE = 4 * MiB


class Env:
    def __init__(self, d, sock, watcher, good, ro_img, rw_img):
        self.d, self.sock, self.watcher, self.good = d, sock, watcher, good
        self.ro_img, self.rw_img = ro_img, rw_img
        self.handle = 1000

    def good_still_reads(self) -> None:
        self.handle += 1
        self.good.request(P.Cmd.READ, 0, 4096, handle=self.handle)
        chunks = self.good.reply_chunks()
        assert chunks[-1][0] & P.ReplyFlags.DONE, chunks
        assert all(t in (P.Chunk.OFFSET_DATA, P.Chunk.OFFSET_HOLE) for _, t, _ in chunks), chunks
        assert_alive(self.d, self.watcher)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    t = tmp_path_factory.mktemp("nbdfuzz")
    rw, ro = t / "rw.qcow2", t / "ro.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(rw), str(SIZE))
    qemu_img("create", "-q", "-f", "qcow2", str(ro), str(SIZE))
    ro_digest = hashlib.sha256(ro.read_bytes()).hexdigest()
    sock = t / "nbd.sock"
    d = start_daemon(t, "--nbd-server", f"addr.type=unix,addr.path={sock}",
                     "--blockdev", "driver=qcow2,node-name=rw,file.driver=file,file.filename=rw.qcow2",
                     "--blockdev", "driver=qcow2,node-name=ro,read-only=on,file.driver=file,file.filename=ro.qcow2",
                     "--export", "type=nbd,id=rw,node-name=rw,writable=on",
                     "--export", "type=nbd,id=ro,node-name=ro")
    wait_path(sock)
    watcher = Qmp(d.sock)
    good = RawClient(sock)
    assert good.handshake("rw") == SIZE
    e = Env(d, sock, watcher, good, ro, rw)
    yield e
    good.close()
    watcher.close()
    assert d.stop() == 0
    err = d.proc.stderr.read().decode() if d.proc.stderr else ""
    assert "Traceback" not in err and "internal error" not in err, err
    assert hashlib.sha256(ro.read_bytes()).hexdigest() == ro_digest, "read-only export changed"
    assert_qemu_clean(rw)


def _dropped_after_eof(c: RawClient, timeout: float = 15.0) -> int:
    """Half-close and read until the server closes (replies or not); it must not hang on to us.  Returns
    the number of bytes the server sent meanwhile."""
    got = 0
    try:
        c.s.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    c.s.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        while chunk := c.s.recv(1 << 16):
            got += len(chunk)
            assert time.monotonic() < deadline, "server kept the connection after EOF"
    except (ConnectionError, OSError) as exc:
        assert not isinstance(exc, socket.timeout), "server kept the connection after EOF"
    finally:
        c.close()
    return got


OPTS = [o.value for o in P.Opt] + [0, 12, 99, 0xFFFFFFFF, 1 << 31]
option = st.tuples(
    st.sampled_from([P.IHAVEOPT] * 6 + [0, P.NBDMAGIC, 0x49484156454F5055]),  # magic
    st.sampled_from(OPTS),
    st.sampled_from(["exact", "exact", "short", "huge", "max"]),  # declared length vs payload
    st.one_of(st.binary(max_size=64),
              st.sampled_from([b"", struct.pack(">I", 2) + b"rw" + struct.pack(">H", 0),
                               struct.pack(">I", 2) + b"ro" + struct.pack(">HH", 1, 3),
                               struct.pack(">I", 0xFFFFFFFF) + b"rw", struct.pack(">IH", 0, 0xFFFF),
                               struct.pack(">I", 2) + b"rw" + struct.pack(">I", 1) + struct.pack(">I", 15)
                               + b"base:allocation"])),
)


def _opt_bytes(magic, code, how, data) -> bytes:
    n = {"exact": len(data), "short": len(data) + 7, "huge": P.MAX_OPTION_LENGTH + 1, "max": 0xFFFFFFFF}[how]
    return struct.pack(">QII", magic, code, n) + data


@needs_qemu
def test_bad_handshakes(env):
    @settings(max_examples=200, **SETTINGS)
    @given(st.sampled_from([3, 3, 3, 1, 0, 0xFFFFFFFF, None]), st.lists(option, max_size=5),
           st.binary(max_size=40))
    def one(client_flags, opts, tail):
        c = RawClient(env.sock)
        try:
            assert c.recv(18) == b"NBDMAGICIHAVEOPT\x00\x03"
            data = b"" if client_flags is None else struct.pack(">I", client_flags)
            data += b"".join(_opt_bytes(*o) for o in opts) + tail
            c.s.sendall(data)
        except (ConnectionError, BrokenPipeError):
            pass
        event(f"server sent {'nothing' if not _dropped_after_eof(c) else 'replies'} before the drop")
        env.good_still_reads()

    one()


request = st.tuples(
    st.sampled_from([c.value for c in P.Cmd if c != P.Cmd.DISC] + [9, 10, 0x1F, 0xFFFF]),
    st.sampled_from([0, 1, 2, 4, 8, 16, 0x20, 0xFFFF]),
    st.one_of(st.sampled_from([0, 512, SIZE - 1, SIZE, SIZE + 1, 1 << 63, (1 << 64) - 1, (1 << 64) - 4096]),
              st.integers(0, SIZE)),
    st.sampled_from([0, 1, 511, 4096, 65536, SIZE, P.MAX_BUFFER_SIZE, P.MAX_BUFFER_SIZE + 1, 0xFFFFFFFF]),
    st.booleans(),  # send a write payload (up to 64 KiB of it)
    st.sampled_from([P.REQUEST_MAGIC] * 10 + [0]),
)


@needs_qemu
@pytest.mark.parametrize("export", ["rw", "ro"])
def test_random_requests(env, export):
    @settings(max_examples=150, **SETTINGS)
    @given(st.booleans(), st.lists(request, min_size=1, max_size=6))
    def one(structured, reqs):
        c = RawClient(env.sock)
        try:
            c.handshake(export, structured=structured)
            buf = b""
            for i, (typ, flags, off, length, payload, magic) in enumerate(reqs):
                buf += struct.pack(">IHHQQI", magic, flags, typ, i, off, length)
                if typ == P.Cmd.WRITE and payload:
                    buf += bytes([i + 1]) * min(length, 65536)
            c.s.sendall(buf)
        except (ConnectionError, BrokenPipeError):
            pass
        event(f"server sent {'nothing' if not _dropped_after_eof(c) else 'replies'} before the drop")
        env.good_still_reads()

    one()


@needs_qemu
def test_writes_to_read_only_export_are_refused(env):
    c = RawClient(env.sock)
    c.handshake("ro")
    assert c.flags & P.TransmissionFlags.READ_ONLY
    for h, (typ, length, data) in enumerate([(P.Cmd.WRITE, 4096, b"x" * 4096), (P.Cmd.WRITE_ZEROES, 4096, b""),
                                             (P.Cmd.TRIM, 4096, b"")], start=1):
        c.request(typ, 0, length, data, handle=h)
        (_flags, rtyp, payload), = c.reply_chunks()
        assert rtyp == P.Chunk.ERROR and struct.unpack(">I", payload[:4])[0] == P.NBD_EPERM, (typ, payload)
    c.request(P.Cmd.READ, 0, 4096, handle=9)
    assert c.reply_chunks()[-1][0] & P.ReplyFlags.DONE
    c.close()
    env.good_still_reads()
