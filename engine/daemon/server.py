"""QMP monitors: one asyncio unix-socket server per ``--monitor``, any number of clients each.

Layer: engine.  A client gets the greeting at once, must negotiate with ``qmp_capabilities``, then sends
commands; a client's commands run one at a time in order (as QEMU's monitor dispatcher does), replies
carry the request's ``id``, and events go to every negotiated client.  A client sending garbage gets
error replies; a client that disconnects is dropped without disturbing the others.
"""
from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING, Any

from ipc.qmp import ParseError, QmpStreamParser, RequestError, encode, error_reply, parse_request, reply

if TYPE_CHECKING:
    from engine.daemon.core import Daemon

#: bytes a slow client may leave unread before it is dropped (events would otherwise pile up)
MAX_PENDING_OUTPUT = 16 << 20


class Monitor:
    def __init__(self, daemon: "Daemon", reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.daemon = daemon
        self.reader = reader
        self.writer = writer
        self.negotiated = False
        self.closed = False

    def _send(self, obj: Any) -> None:
        if self.closed:
            return
        transport = self.writer.transport
        if transport.get_write_buffer_size() > MAX_PENDING_OUTPUT:
            self.close()
            return
        try:
            self.writer.write(encode(obj))
        except (ConnectionError, RuntimeError):
            self.close()

    def send_event(self, ev: dict[str, Any]) -> None:
        if self.negotiated:
            self._send(ev)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                self.writer.close()
            except Exception:
                pass

    async def serve(self) -> None:
        from engine.daemon.core import VERSION

        self._send({"QMP": {"version": VERSION, "capabilities": ["oob"]}})
        parser = QmpStreamParser()
        try:
            while not self.closed:
                data = await self.reader.read(65536)
                items = parser.feed(data) if data else parser.eof()
                for item in items:
                    await self.handle(item)
                    await self.writer.drain()
                if not data:
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.close()

    async def handle(self, item: Any) -> None:
        if isinstance(item, ParseError):
            self._send(error_reply("GenericError", item.desc))
            return
        try:
            req = parse_request(item)
        except RequestError as exc:
            self._send(error_reply("GenericError", exc.desc, exc.id, exc.has_id))
            return
        if req.oob:
            self._send(error_reply("GenericError", f"The command {req.execute} does not support OOB",
                                   req.id, req.has_id))
            return
        if not self.negotiated:
            if req.execute != "qmp_capabilities":
                self._send(error_reply("CommandNotFound",
                                       "Expecting capabilities negotiation with 'qmp_capabilities'",
                                       req.id, req.has_id))
                return
            for key in req.arguments:
                if key != "enable":
                    self._send(error_reply("GenericError", f"Parameter '{key}' is unexpected", req.id,
                                           req.has_id))
                    return
            enable = req.arguments.get("enable", [])
            if not isinstance(enable, list):
                self._send(error_reply("GenericError", "Invalid parameter type for 'enable', expected: array",
                                       req.id, req.has_id))
                return
            for cap in enable:
                if cap != "oob":
                    self._send(error_reply("GenericError", f"Parameter 'null' does not accept value '{cap}'",
                                           req.id, req.has_id))
                    return
            self.negotiated = True
            self._send(reply({}, req))
            return
        if req.execute == "qmp_capabilities":
            self._send(error_reply("CommandNotFound", "Capabilities negotiation is already complete, command "
                                   "ignored", req.id, req.has_id))
            return
        from engine.daemon.core import QmpError

        try:
            result = await self.daemon.execute(req.execute, req.arguments)
        except QmpError as exc:
            self._send(error_reply(exc.cls, exc.desc, req.id, req.has_id))
            return
        except Exception as exc:  # a bug must not take the daemon down: report it to this client
            import traceback

            if os.environ.get("PARABLOCK_DEBUG"):
                traceback.print_exc()
            self._send(error_reply("GenericError", f"internal error: {type(exc).__name__}: {exc}",
                                   req.id, req.has_id))
            return
        self._send(reply(result, req))


class MonitorServer:
    """A listening unix socket for one ``--monitor chardev=ID``."""

    def __init__(self, daemon: "Daemon", path: str) -> None:
        self.daemon = daemon
        self.path = path
        self.server: asyncio.AbstractServer | None = None
        self.clients: set[asyncio.Task] = set()

    async def start(self) -> None:
        """Listen on ``path``.  The socket is made under a temporary name, set to mode 0600 (only its
        owner may drive the daemon) and renamed into place, so a client that sees the path can connect."""
        if os.path.exists(self.path):
            os.unlink(self.path)
        tmp = f"{self.path}.{os.getpid()}.tmp"
        if os.path.exists(tmp):
            os.unlink(tmp)
        self.server = await asyncio.start_unix_server(self._client, path=tmp)
        os.chmod(tmp, 0o600)
        os.rename(tmp, self.path)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        mon = Monitor(self.daemon, reader, writer)
        self.daemon.monitors.append(mon)
        task = asyncio.current_task()
        if task is not None:
            self.clients.add(task)
        try:
            await mon.serve()
        except asyncio.CancelledError:
            pass
        finally:
            if mon in self.daemon.monitors:
                self.daemon.monitors.remove(mon)
            if task is not None:
                self.clients.discard(task)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            try:
                await asyncio.wait_for(self.server.wait_closed(), 1.0)
            except asyncio.TimeoutError:
                pass
        for mon in list(self.daemon.monitors):
            mon.close()
        tasks = [t for t in self.clients if not t.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)
        try:
            os.unlink(self.path)
        except OSError:
            pass
