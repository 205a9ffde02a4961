"""A small asyncio NBD client: fixed newstyle handshake with NBD_OPT_GO, then pipelined transmission
requests with simple replies (READ, WRITE, TRIM, WRITE_ZEROES, FLUSH, DISC).

Layer: ipc (stdlib only).  The byte layouts come from ``ipc.nbd``; ``parse_nbd_uri`` and the request and
option encoders are pure, ``NbdClient`` is the thin asyncio wrapper.  Invariants: every request has a
unique handle and at most one reply; when the connection ends (EOF, a protocol error or ``close``)
every pending request fails with ``NbdClientError``; every socket read has a timeout.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno as _errno
import os
import struct
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

from ipc import nbd as P

DEFAULT_PORT = 10809
_OPT_REPLY = struct.Struct(">QIII")          # magic, option, reply type, length

_NBD_ERRNAMES = {P.NBD_EPERM: "Operation not permitted", P.NBD_EIO: "Input/output error",
                 P.NBD_ENOMEM: "Cannot allocate memory", P.NBD_EINVAL: "Invalid argument",
                 P.NBD_ENOSPC: "No space left on device", P.NBD_EOVERFLOW: "Value too large",
                 P.NBD_ENOTSUP: "Operation not supported", P.NBD_ESHUTDOWN: "Server is shutting down"}


class NbdClientError(P.NbdError):
    """A failed connection, negotiation or request.  ``errno`` is the NBD error of a failed request
    (0 for connection and negotiation failures)."""

    def __init__(self, message: str, errno: int = 0) -> None:
        super().__init__(message)
        self.message = message
        self.errno = errno


@dataclass(frozen=True, slots=True)
class NbdAddress:
    """Where an export lives: a unix socket path or a TCP host and port, and the export name."""

    name: str
    path: str | None = None
    host: str | None = None
    port: int = DEFAULT_PORT


def parse_nbd_uri(uri: str) -> NbdAddress:
    """``nbd://host[:port]/name`` or ``nbd+unix:///name?socket=PATH``.  Raises NbdClientError."""
    u = urlsplit(uri)
    name = unquote(u.path.removeprefix("/"))
    if u.scheme == "nbd+unix":
        sock = parse_qs(u.query).get("socket")
        if not sock or not sock[0]:
            raise NbdClientError(f"NBD URI '{uri}' lacks '?socket=PATH'")
        if u.netloc:
            raise NbdClientError(f"NBD URI '{uri}': a unix socket URI has no host")
        return NbdAddress(name, path=sock[0])
    if u.scheme == "nbd":
        try:
            port = u.port or DEFAULT_PORT
        except ValueError:
            raise NbdClientError(f"NBD URI '{uri}' has an invalid port") from None
        if not u.hostname:
            raise NbdClientError(f"NBD URI '{uri}' lacks a host")
        return NbdAddress(name, host=u.hostname, port=port)
    raise NbdClientError(f"unsupported NBD URI '{uri}' (use nbd://HOST[:PORT]/NAME or "
                         "nbd+unix:///NAME?socket=PATH)")


def encode_option(opt: int, payload: bytes = b"") -> bytes:
    return P.OPTION_HEADER.pack(P.IHAVEOPT, opt, len(payload)) + payload


def encode_go(name: str, infos: tuple[int, ...] = (P.Info.BLOCK_SIZE,)) -> bytes:
    raw = name.encode()
    payload = struct.pack(">I", len(raw)) + raw + struct.pack(">H", len(infos))
    payload += b"".join(struct.pack(">H", i) for i in infos)
    return encode_option(P.Opt.GO, payload)


def encode_request(cmd: int, handle: int, offset: int, length: int, flags: int = 0) -> bytes:
    return P.REQUEST_HEADER.pack(P.REQUEST_MAGIC, flags, cmd, handle, offset, length)


class NbdClient:
    """One connection to one export.  Use ``await NbdClient.connect(addr)``; requests may be issued
    concurrently from many tasks."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float) -> None:
        self._r = reader
        self._w = writer
        self.timeout = timeout
        self.size = 0
        self.flags = 0
        self.min_block = 1
        self.max_block = P.MAX_BUFFER_SIZE
        self._next = 1
        self._pending: dict[int, tuple[asyncio.Future, int]] = {}
        self._reader: asyncio.Task | None = None
        self._dead: NbdClientError | None = None

    # --- connection ----------------------------------------------------------------------------------
    @classmethod
    async def connect(cls, addr: NbdAddress, timeout: float = 30.0) -> NbdClient:
        """Connect and negotiate.  Raises NbdClientError (also for OSError of the connect)."""
        try:
            if addr.path is not None:
                coro = asyncio.open_unix_connection(addr.path, limit=P.MAX_BUFFER_SIZE + 64)
            else:
                coro = asyncio.open_connection(addr.host, addr.port, limit=P.MAX_BUFFER_SIZE + 64)
            reader, writer = await asyncio.wait_for(coro, timeout)
        except (TimeoutError, OSError) as exc:
            where = addr.path if addr.path is not None else f"{addr.host}:{addr.port}"
            text = os.strerror(exc.errno) if isinstance(exc, OSError) and exc.errno else "timed out"
            raise NbdClientError(f"Failed to connect to '{where}': {text}") from None
        self = cls(reader, writer, timeout)
        try:
            await self._handshake(addr.name)
        except BaseException:
            writer.close()
            raise
        self._reader = asyncio.create_task(self._read_replies())
        return self

    async def _recv(self, n: int) -> bytes:
        try:
            return await asyncio.wait_for(self._r.readexactly(n), self.timeout)
        except asyncio.IncompleteReadError:
            raise NbdClientError("server closed the connection") from None
        except TimeoutError:
            raise NbdClientError(f"no answer from the server within {self.timeout:g} s") from None
        except OSError as exc:
            raise NbdClientError(f"connection failed: {os.strerror(exc.errno or _errno.EIO)}") from None

    async def _handshake(self, name: str) -> None:
        magic, opt_magic, hflags = struct.unpack(">QQH", await self._recv(18))
        if magic != P.NBDMAGIC or opt_magic != P.IHAVEOPT:
            raise NbdClientError("not an NBD server (or not fixed newstyle)")
        cflags = P.ClientFlags.FIXED_NEWSTYLE
        if hflags & P.HandshakeFlags.NO_ZEROES:
            cflags |= P.ClientFlags.NO_ZEROES
        self._w.write(struct.pack(">I", cflags) + encode_go(name))
        while True:
            magic, opt, rep, length = _OPT_REPLY.unpack(await self._recv(_OPT_REPLY.size))
            if magic != P.OPTION_REPLY_MAGIC or opt != P.Opt.GO:
                raise NbdClientError("bad option reply from the server")
            if length > P.MAX_OPTION_LENGTH:
                raise NbdClientError("option reply too long")
            data = await self._recv(length)
            if rep == P.Rep.ACK:
                return
            if rep == P.Rep.INFO and len(data) >= 2:
                (kind,) = struct.unpack_from(">H", data)
                if kind == P.Info.EXPORT and len(data) == 12:
                    self.size, self.flags = struct.unpack_from(">QH", data, 2)
                elif kind == P.Info.BLOCK_SIZE and len(data) == 14:
                    self.min_block, _pref, self.max_block = struct.unpack_from(">III", data, 2)
                continue
            if rep & (1 << 31):
                text = data.decode("utf-8", "replace")
                if not text:
                    text = f"export '{name}' not present" if rep == P.Rep.ERR_UNKNOWN else f"error {rep - (1 << 31)}"
                raise NbdClientError(f"server refused export '{name}': {text}")
            # other replies (e.g. unknown info types) are skipped

    async def close(self) -> None:
        """Send NBD_CMD_DISC and close; pending requests fail."""
        if self._dead is None:
            try:
                self._w.write(encode_request(P.Cmd.DISC, 0, 0, 0))
                await asyncio.wait_for(self._w.drain(), self.timeout)
            except (TimeoutError, OSError):
                pass
        self._fail(NbdClientError("connection closed"))
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        self._w.close()
        try:
            await asyncio.wait_for(self._w.wait_closed(), self.timeout)
        except (TimeoutError, OSError):
            pass

    def _fail(self, exc: NbdClientError) -> None:
        if self._dead is None:
            self._dead = exc
        for fut, _n in self._pending.values():
            if not fut.done():
                fut.set_exception(self._dead)
        self._pending.clear()

    async def _read_replies(self) -> None:
        try:
            while True:
                magic, err, handle = P.SIMPLE_REPLY.unpack(await self._r.readexactly(P.SIMPLE_REPLY.size))
                if magic != P.SIMPLE_REPLY_MAGIC:
                    raise NbdClientError("bad reply magic from the server")
                entry = self._pending.pop(handle, None)
                if entry is None:
                    raise NbdClientError(f"reply for unknown handle {handle}")
                fut, read_len = entry
                data = await self._r.readexactly(read_len) if read_len and not err else b""
                if fut.done():
                    continue
                if err:
                    fut.set_exception(NbdClientError(_NBD_ERRNAMES.get(err, f"NBD error {err}"), err))
                else:
                    fut.set_result(data)
        except asyncio.IncompleteReadError:
            self._fail(NbdClientError("server closed the connection"))
        except NbdClientError as exc:
            self._fail(exc)
        except OSError as exc:
            self._fail(NbdClientError(f"connection failed: {os.strerror(exc.errno or _errno.EIO)}"))

    # --- requests ------------------------------------------------------------------------------------
    async def _request(self, cmd: int, offset: int, length: int, payload: bytes = b"", flags: int = 0) -> bytes:
        if self._dead is not None:
            raise self._dead
        handle = self._next
        self._next += 1
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._pending[handle] = (fut, length if cmd == P.Cmd.READ else 0)
        self._w.write(encode_request(cmd, handle, offset, length, flags) + payload)
        try:
            await asyncio.wait_for(self._w.drain(), self.timeout)
        except (TimeoutError, OSError):
            self._fail(NbdClientError("connection failed while sending"))
        try:
            return await asyncio.wait_for(asyncio.shield(fut), self.timeout)
        except TimeoutError:
            raise NbdClientError(f"no reply within {self.timeout:g} s") from None

    async def read(self, offset: int, length: int) -> bytes:
        return await self._request(P.Cmd.READ, offset, length)

    async def write(self, offset: int, data: bytes) -> None:
        await self._request(P.Cmd.WRITE, offset, len(data), data)

    async def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        await self._request(P.Cmd.WRITE_ZEROES, offset, length, flags=0 if unmap else P.CmdFlags.NO_HOLE)

    async def discard(self, offset: int, length: int) -> None:
        await self._request(P.Cmd.TRIM, offset, length)

    async def flush(self) -> None:
        await self._request(P.Cmd.FLUSH, 0, 0)
