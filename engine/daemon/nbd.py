"""The daemon's NBD server and NBD block exports (qemu-storage-daemon 7.2's nbd/server.c and
block/export/export.c): nbd-server-start / -stop, block-export-add / -del, query-block-exports, the
legacy nbd-server-add / -remove, and the asyncio side of each client connection.

Layer: engine.daemon.  Imports ipc.nbd (the protocol, sans I/O), engine.block (chain block status) and
the daemon's registry.  Every READ, WRITE, TRIM and WRITE_ZEROES goes through the exported node's
``BlockNode`` pipeline, so throttling, tracked requests, dirty bitmaps and job hooks see it.

Model.  ``NbdServer`` owns the listening socket and the client tasks; ``NbdExport`` (kept in
``Daemon.exports`` by id) holds its node as the user ``export:<id>`` and follows a mirror / active-commit
pivot through ``graph.replace_listeners``.  A request that finds its node drained waits for the drain
to end and then looks the export's node up again, so a write queued across a pivot lands on the new
node.  An export being deleted leaves the name table at once; it is gone (BLOCK_EXPORT_DELETED) when
its last client has left.  A client that breaks the protocol is dropped alone, silently: no traceback
reaches the client or the log, request failures become NBD errors.

Deliberate differences from qemu-storage-daemon 7.2: no TLS, no iothreads; connections over
``max-connections`` are closed at once instead of waiting in the listen backlog; an inet address with an
empty host listens on loopback only; permission conflicts between exports and other parents are not
modelled (an export of a file node under a format node is allowed); WRITE_ZEROES with FAST_ZERO succeeds
only where block status already reads zeros (elsewhere ENOTSUP, and the client falls back to a plain
zero write), since the pipeline has no "no fallback" request flag; NBD_CMD_CACHE reads ahead only on a
copy-on-read node (QEMU's prefetch has nothing to fill otherwise).
"""
from __future__ import annotations

import asyncio
import os
import socket
from typing import TYPE_CHECKING, Any

from engine.block import block_status_above, node_status
from engine.daemon.core import ID_RE, QmpError, command
from engine.driver import Status
from engine.errors import BlockError
from ipc import nbd as P

if TYPE_CHECKING:
    from engine.bitmap import DirtyBitmap
    from engine.daemon.core import Daemon
    from engine.pipeline import BlockNode

HANDSHAKE_TIMEOUT = 10.0      # QEMU's handshake-max-seconds default
MAX_REQUESTS = 16             # requests in flight per client (QEMU's MAX_NBD_REQUESTS)
MAX_EXTENTS = 1 << 16         # descriptors per BLOCK_STATUS chunk
READ_CHUNK = 4 << 20
PREFERRED_BLOCK = 4096
BASE_ALLOCATION = "base:allocation"
ALLOCATION_DEPTH = "qemu:allocation-depth"
BITMAP_PREFIX = "qemu:dirty-bitmap:"


# ---------------------------------------------------------------------------------------------------
# block status over the chain (synchronous: run in the node's driver thread)
# ---------------------------------------------------------------------------------------------------
def _merge(out: list[list[int]], n: int, flags: int) -> None:
    if out and out[-1][1] == flags:
        out[-1][0] += n
    else:
        out.append([n, flags])


def base_extents(drv: Any, offset: int, length: int, limit: int) -> list[list[int]]:
    """base:allocation descriptors [length, HOLE|ZERO] for [offset, offset+length), at most ``limit``
    (plus merging), from the whole chain's status as QEMU's server computes it."""
    out: list[list[int]] = []
    pos, end = offset, offset + length
    while pos < end:
        st, n = block_status_above(drv, pos, end - pos)
        if n <= 0:
            n = end - pos
            st = Status.ZERO
        flags = (0 if st & Status.DATA else P.StateFlags.HOLE) | (P.StateFlags.ZERO if st & Status.ZERO else 0)
        n = min(n, end - pos)
        if len(out) >= limit and out[-1][1] != flags:
            break
        _merge(out, n, int(flags))
        pos += n
    return out


def _skip_filters(drv: Any) -> Any:
    while drv is not None and drv.is_filter and drv.file is not None:
        drv = drv.file
    return drv


def depth_extents(drv: Any, offset: int, length: int, limit: int) -> list[list[int]]:
    """qemu:allocation-depth descriptors [length, depth]: 0 unallocated, 1 the node itself, 2 its
    backing file, ... (filters looked through)."""
    out: list[list[int]] = []
    pos, end = offset, offset + length
    top = _skip_filters(drv)
    while pos < end:
        n = end - pos
        depth, layer, i = 0, top, 1
        while layer is not None:
            if pos >= layer.size():
                break
            st, pn = node_status(layer, pos, n)
            if pn <= 0:
                break
            n = min(n, pn)
            if st & Status.ALLOCATED:
                depth = i
                break
            layer = _skip_filters(layer.backing)
            i += 1
        if len(out) >= limit and out[-1][1] != depth:
            break
        _merge(out, n, depth)
        pos += n
    return out


def bitmap_extents(bm: DirtyBitmap, offset: int, length: int, limit: int) -> list[list[int]]:
    """qemu:dirty-bitmap descriptors [length, DIRTY or 0]."""
    out: list[list[int]] = []
    pos, end = offset, offset + length
    while pos < end:
        dirty = pos < bm.size and bm.is_dirty(pos)
        if dirty:
            nxt = bm.next_clean(pos, end)
        else:
            nxt = bm.next_dirty(pos, end) if pos < bm.size else -1
        stop = end if nxt < 0 else max(nxt, pos + 1)
        if len(out) >= limit and out[-1][1] != int(dirty):
            break
        _merge(out, stop - pos, P.DIRTY if dirty else 0)
        pos = stop
    return out


def _clip(ext: list[list[int]], req_one: bool) -> list[tuple[int, int]]:
    if req_one:
        ext = ext[:1]
    return [(min(n, 0xFFFFFFFF), f) for n, f in ext]


# ---------------------------------------------------------------------------------------------------
# exports
# ---------------------------------------------------------------------------------------------------
class NbdExport:
    """One block export of type nbd."""

    def __init__(self, daemon: Daemon, server: NbdServer, eid: str, node: BlockNode, name: str,
                 description: str | None, writable: bool, bitmaps: list[DirtyBitmap],
                 allocation_depth: bool) -> None:
        self.daemon = daemon
        self.server = server
        self.id = eid
        self.node = node
        self.name = name
        self.description = description
        self.writable = writable
        self.bitmaps = bitmaps
        self.allocation_depth = allocation_depth
        #: writethrough=on: every write is flushed before it is acknowledged
        self.writethrough = False
        self.clients: set[NbdClient] = set()
        self.shutting_down = False
        self.deleted = False
        self.contexts = [BASE_ALLOCATION] + ([ALLOCATION_DEPTH] if allocation_depth else []) + \
            [BITMAP_PREFIX + (bm.name or "") for bm in bitmaps]
        daemon.graph.add_user(node.name, self.key, "block device is in use by an export")

    @property
    def key(self) -> str:
        return f"export:{self.id}"

    def size(self) -> int:
        return self.node.size()

    def flags(self, structured: bool) -> int:
        f = P.TransmissionFlags
        out = f.HAS_FLAGS | f.SEND_FLUSH | f.SEND_FUA | f.SEND_CACHE
        if structured:
            out |= f.SEND_DF
        if self.writable:
            out |= f.SEND_TRIM | f.SEND_WRITE_ZEROES | f.SEND_FAST_ZERO
        else:
            out |= f.READ_ONLY
        if self.server.max_connections != 1:
            out |= f.CAN_MULTI_CONN
        return int(out)

    def on_replace(self, old: BlockNode, new: BlockNode) -> None:
        if self.node is old and not self.deleted:
            self.daemon.graph.remove_user(old.name, self.key)
            self.node = new
            self.daemon.graph.add_user(new.name, self.key, "block device is in use by an export")

    def request_shutdown(self) -> None:
        """Leave the name table; finish once no client is left."""
        self.shutting_down = True
        if self.server.names.get(self.name) is self:
            del self.server.names[self.name]
        if not self.clients:
            self.finish()

    def finish(self) -> None:
        if self.deleted:
            return
        self.deleted = True
        if self.server.names.get(self.name) is self:
            del self.server.names[self.name]
        self.daemon.graph.remove_user(self.node.name, self.key)
        for bm in self.bitmaps:
            bm.busy = False
        if self.daemon.exports.get(self.id) is self:
            del self.daemon.exports[self.id]
        self.daemon.emit("BLOCK_EXPORT_DELETED", {"id": self.id})

    async def hard_close(self) -> None:
        """mode=hard: disconnect every client, wait for them, finish."""
        self.request_shutdown()
        clients = list(self.clients)
        for c in clients:
            c.abort()
        await asyncio.gather(*(c.wait_closed() for c in clients), return_exceptions=True)
        self.finish()

    async def close(self) -> None:
        """Daemon shutdown."""
        await self.hard_close()

    def client_gone(self, client: NbdClient) -> None:
        self.clients.discard(client)
        if self.shutting_down and not self.clients:
            self.finish()


# ---------------------------------------------------------------------------------------------------
# one client connection
# ---------------------------------------------------------------------------------------------------
_WRITE_CMDS = (P.Cmd.WRITE, P.Cmd.TRIM, P.Cmd.WRITE_ZEROES)


class _Drop(Exception):
    """End this connection quietly."""


class NbdClient:
    def __init__(self, server: NbdServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.conn = P.ServerConnection()
        self.export: NbdExport | None = None
        #: (export, [(context id, context name)]) chosen by NBD_OPT_SET_META_CONTEXT
        self.meta: tuple[NbdExport | None, list[tuple[int, str]]] = (None, [])
        self.contexts: list[tuple[int, str]] = []
        self.task: asyncio.Task | None = None
        self.requests: set[asyncio.Task] = set()
        self.wlock = asyncio.Lock()
        self._done = asyncio.Event()

    # ---- plumbing ---------------------------------------------------------------------------------
    async def _send(self, *parts: bytes) -> None:
        async with self.wlock:
            self.writer.writelines(parts)
            await self.writer.drain()

    async def _fill(self) -> None:
        data = await self.reader.read(READ_CHUNK)
        if not data:
            raise _Drop("end of stream")
        self.conn.receive_data(data)

    def abort(self) -> None:
        for t in list(self.requests):
            t.cancel()
        if self.task is not None and not self.task.done():
            self.task.cancel()
        try:
            self.writer.transport.abort()
        except (OSError, RuntimeError, AttributeError):  # already closed
            pass

    async def wait_closed(self) -> None:
        await self._done.wait()

    async def run(self) -> None:
        self.task = asyncio.current_task()
        try:
            try:
                async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                    await self._handshake()
            except TimeoutError:
                raise _Drop("handshake timed out") from None
            if self.export is not None and self.conn.phase is P.Phase.TRANSMISSION:
                await self._transmission()
        except (_Drop, P.NbdError, ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass
        except Exception:  # noqa: BLE001, S110 - a bug in one connection must not reach the others or the log
            pass
        finally:
            for t in list(self.requests):
                t.cancel()
            if self.requests:
                await asyncio.gather(*self.requests, return_exceptions=True)
            try:
                self.writer.close()
            except (OSError, RuntimeError):
                pass
            if self.export is not None:
                self.export.client_gone(self)
            self.server.clients.discard(self)
            self._done.set()

    # ---- handshake --------------------------------------------------------------------------------
    async def _handshake(self) -> None:
        await self._send(self.conn.initiate())
        while self.conn.phase in (P.Phase.CLIENT_FLAGS, P.Phase.OPTIONS):
            ev = self.conn.next_event()
            if ev is P.NEED_DATA:
                await self._fill()
                continue
            await self._option(ev)

    def _find(self, name: str) -> NbdExport | None:
        exp = self.server.names.get(name)
        return None if exp is None or exp.shutting_down else exp

    async def _option(self, ev: object) -> None:
        c = self.conn
        if isinstance(ev, P.OptAbort):
            await self._send(c.abort())
            raise _Drop("client aborted")
        if isinstance(ev, P.OptExportName):
            exp = self._find(ev.name)
            if exp is None:
                raise _Drop("unknown export")  # NBD_OPT_EXPORT_NAME has no error reply
            self._attach(exp)
            await self._send(c.export_name_reply(exp.size(), exp.flags(c.structured)))
            return
        if isinstance(ev, P.OptList):
            parts = [c.reply_server(P.Opt.LIST, e.name, e.description or "")
                     for e in self.server.names.values() if not e.shutting_down]
            await self._send(*parts, c.reply_ack(P.Opt.LIST))
            return
        if isinstance(ev, P.OptInfo):
            await self._info(ev)
            return
        if isinstance(ev, P.OptStructuredReply):
            if c.structured:
                await self._send(c.reply_error(P.Opt.STRUCTURED_REPLY, P.Rep.ERR_INVALID,
                                               "structured reply already negotiated"))
            else:
                await self._send(c.reply_ack(P.Opt.STRUCTURED_REPLY))
            return
        if isinstance(ev, P.OptMetaContext):
            await self._meta(ev)
            return
        if isinstance(ev, P.OptInvalid):
            rep = P.Rep.ERR_TOO_BIG if ev.too_big else P.Rep.ERR_INVALID
            await self._send(c.reply_error(ev.opt, rep, ev.message))
            return
        if isinstance(ev, P.OptUnsupported):
            if ev.opt == P.Opt.STARTTLS:
                await self._send(c.reply_error(ev.opt, P.Rep.ERR_POLICY, "TLS not configured"))
            else:
                await self._send(c.reply_error(ev.opt, P.Rep.ERR_UNSUP, f"Unsupported option {ev.opt}"))
            return
        raise _Drop("unexpected event")

    async def _info(self, ev: P.OptInfo) -> None:
        c = self.conn
        exp = self._find(ev.name)
        if exp is None:
            await self._send(c.reply_error(ev.opt, P.Rep.ERR_UNKNOWN, f"export '{ev.name}' not present"))
            return
        parts = []
        if P.Info.NAME in ev.requests:
            parts.append(c.reply_info_name(ev.opt, exp.name))
        if P.Info.DESCRIPTION in ev.requests and exp.description:
            parts.append(c.reply_info_description(ev.opt, exp.description))
        parts.append(c.reply_info_block_size(ev.opt, 1, PREFERRED_BLOCK, P.MAX_BUFFER_SIZE))
        parts.append(c.reply_info_export(ev.opt, exp.size(), exp.flags(c.structured)))
        if ev.go:
            self._attach(exp)
            parts.append(c.go())
        else:
            parts.append(c.reply_ack(ev.opt))
        await self._send(*parts)

    async def _meta(self, ev: P.OptMetaContext) -> None:
        c = self.conn
        if not c.structured:
            await self._send(c.reply_error(ev.opt, P.Rep.ERR_INVALID,
                                           "request option when structured reply is not negotiated"))
            return
        exp = self._find(ev.export)
        if exp is None:
            await self._send(c.reply_error(ev.opt, P.Rep.ERR_UNKNOWN, f"export '{ev.export}' not present"))
            return
        chosen = P.match_meta_contexts(ev.queries, exp.contexts, listing=not ev.set)
        ids = [(exp.contexts.index(name), name) for name in chosen]
        parts = [c.reply_meta_context(ev.opt, i, name) for i, name in ids]
        if ev.set:
            self.meta = (exp, ids)
        await self._send(*parts, c.reply_ack(ev.opt))

    def _attach(self, exp: NbdExport) -> None:
        self.export = exp
        exp.clients.add(self)
        meta_exp, ids = self.meta
        self.contexts = ids if meta_exp is exp else []

    # ---- transmission -----------------------------------------------------------------------------
    async def _transmission(self) -> None:
        sem = asyncio.Semaphore(MAX_REQUESTS)
        while True:
            ev = self.conn.next_event()
            if ev is P.NEED_DATA:
                await self._fill()
                continue
            assert isinstance(ev, P.Request)
            if ev.type == P.Cmd.DISC:
                break
            await sem.acquire()
            t = asyncio.get_running_loop().create_task(self._serve(ev))
            self.requests.add(t)

            def done(task: asyncio.Task, sem: asyncio.Semaphore = sem) -> None:
                self.requests.discard(task)
                sem.release()

            t.add_done_callback(done)
        if self.requests:
            await asyncio.gather(*self.requests, return_exceptions=True)

    async def _node(self) -> BlockNode:
        """The export's node, once it is not drained (a drain may end in a pivot to another node)."""
        assert self.export is not None
        while True:
            node = self.export.node
            gate = getattr(node, "_open_gate", None)
            if not getattr(node, "_quiesce", 0) or gate is None:
                return node
            await gate.wait()

    async def _serve(self, req: P.Request) -> None:
        exp = self.export
        assert exp is not None
        c = self.conn
        try:
            bad = P.check_request(req, exp.size(), exp.writable, c.structured, len(self.contexts))
            if bad is not None:
                await self._send(c.error_reply(req.handle, *bad))
                return
            if req.type == P.Cmd.READ:
                await self._read(req)
                return
            if req.type == P.Cmd.BLOCK_STATUS:
                await self._block_status(req)
                return
            await self._command(req)
        except asyncio.CancelledError:
            raise
        except (ConnectionError, OSError) as exc:
            if isinstance(exc, ConnectionError) or self.writer.is_closing():
                self.abort()
                return
            await self._error(req, P.nbd_errno(exc.errno), exc.strerror or "I/O error")
        except BlockError as exc:
            await self._error(req, P.nbd_errno(exc.errno), exc.message)
        except Exception:  # noqa: BLE001 - our bug: an EIO for this request, no traceback anywhere
            await self._error(req, P.NBD_EIO, "internal error")

    async def _error(self, req: P.Request, err: int, msg: str) -> None:
        try:
            await self._send(self.conn.error_reply(req.handle, err, msg))
        except (ConnectionError, OSError, P.NbdError):
            self.abort()

    async def _done_reply(self, req: P.Request) -> None:
        c = self.conn
        await self._send(c.chunk_none(req.handle) if c.structured else c.simple_reply(req.handle))

    async def _command(self, req: P.Request) -> None:
        node = await self._node()
        t = req.type
        fua = bool(req.flags & P.CmdFlags.FUA)
        if t == P.Cmd.WRITE:
            await node.write(req.offset, req.data)
        elif t == P.Cmd.FLUSH:
            await node.flush()
        elif t == P.Cmd.TRIM:
            if node.discard_mode == "unmap" and req.length:
                await node.discard(req.offset, req.length)
        elif t == P.Cmd.WRITE_ZEROES:
            if req.flags & P.CmdFlags.FAST_ZERO:
                ext = await node._driver(base_extents, node.driver, req.offset, req.length, 1)
                if not (len(ext) == 1 and ext[0][1] & P.StateFlags.ZERO and ext[0][0] >= req.length):
                    await self._error(req, P.NBD_ENOTSUP, "fast zeroing is not possible")
                    return
            elif req.length:
                unmap = not req.flags & P.CmdFlags.NO_HOLE and node.discard_mode == "unmap"
                await node.write_zeroes(req.offset, req.length, unmap)
        elif t == P.Cmd.CACHE and node.copy_on_read:
            pos, end = req.offset, req.offset + req.length
            while pos < end:
                n = min(end - pos, READ_CHUNK)
                await node.read(pos, n)
                pos += n
        if (fua or self.export is not None and self.export.writethrough) and t in _WRITE_CMDS:
            await node.flush()
        await self._done_reply(req)

    async def _read(self, req: P.Request) -> None:
        c = self.conn
        node = await self._node()
        if not req.length:
            await self._done_reply(req)
            return
        if not c.structured or req.flags & P.CmdFlags.DF:
            data = await node.read(req.offset, req.length)
            if c.structured:
                await self._send(c.chunk_data(req.handle, req.offset, data, True))
            else:
                await self._send(c.simple_reply(req.handle, 0, data))
            return
        ext = await node._driver_read(req.length, base_extents, node.driver, req.offset, req.length, MAX_EXTENTS)
        # runs of (offset, length, is_hole); anything the status did not cover is read as data
        runs: list[list[Any]] = []
        pos = req.offset
        for n, flags in ext:
            hole = bool(flags & P.StateFlags.ZERO)
            if runs and runs[-1][2] == hole:
                runs[-1][1] += n
            else:
                runs.append([pos, n, hole])
            pos += n
        end = req.offset + req.length
        if pos < end:
            if runs and not runs[-1][2]:
                runs[-1][1] += end - pos
            else:
                runs.append([pos, end - pos, False])
        parts = []
        for i, (off, n, hole) in enumerate(runs):
            last = i == len(runs) - 1
            if hole:
                parts.append(c.chunk_hole(req.handle, off, n, last))
            else:
                parts.append(c.chunk_data(req.handle, off, await node.read(off, n), last))
        await self._send(*parts)

    async def _block_status(self, req: P.Request) -> None:
        c = self.conn
        exp = self.export
        assert exp is not None
        node = await self._node()
        req_one = bool(req.flags & P.CmdFlags.REQ_ONE)
        limit = 1 if req_one else MAX_EXTENTS
        parts = []
        for i, (ctx_id, name) in enumerate(self.contexts):
            if name == BASE_ALLOCATION:
                ext = await node._driver_read(req.length, base_extents, node.driver, req.offset, req.length,
                                              limit)
            elif name == ALLOCATION_DEPTH:
                ext = await node._driver(depth_extents, node.driver, req.offset, req.length, limit)
            else:
                bm = exp.bitmaps[ctx_id - len(exp.contexts) + len(exp.bitmaps)]
                ext = bitmap_extents(bm, req.offset, req.length, limit)
            parts.append(c.chunk_block_status(req.handle, ctx_id, _clip(ext, req_one),
                                              i == len(self.contexts) - 1))
        await self._send(*parts)


# ---------------------------------------------------------------------------------------------------
# the server
# ---------------------------------------------------------------------------------------------------
class NbdServer:
    def __init__(self, daemon: Daemon, max_connections: int) -> None:
        self.daemon = daemon
        self.max_connections = max_connections
        self.names: dict[str, NbdExport] = {}
        self.clients: set[NbdClient] = set()
        self.server: asyncio.AbstractServer | None = None
        self.path: str | None = None

    def attached(self) -> list[NbdClient]:
        return [c for c in self.clients if c.export is not None]

    async def listen(self, addr: dict[str, Any]) -> None:
        """Raises QmpError."""
        kind = addr.get("type")
        data = addr.get("data") or {}
        try:
            if kind == "unix":
                path = data["path"]
                if data.get("abstract"):
                    raise QmpError("Abstract unix sockets are not supported by parablock")
                if os.path.exists(path):
                    os.unlink(path)
                tmp = f"{path}.{os.getpid()}.tmp"
                if os.path.exists(tmp):
                    os.unlink(tmp)
                self.server = await asyncio.start_unix_server(self._client, path=tmp)
                os.rename(tmp, path)
                self.path = path
            elif kind == "inet":
                host = data.get("host") or "127.0.0.1"
                try:
                    port = int(data.get("port", ""))
                except ValueError:
                    raise QmpError(f"Failed to parse port '{data.get('port')}'") from None
                family = socket.AF_UNSPEC
                if data.get("ipv4") and not data.get("ipv6"):
                    family = socket.AF_INET
                elif data.get("ipv6") and not data.get("ipv4"):
                    family = socket.AF_INET6
                self.server = await asyncio.start_server(self._client, host=host, port=port, family=family,
                                                         reuse_address=True)
            else:
                raise QmpError(f"Socket address type '{kind}' is not supported by parablock")
        except OSError as exc:
            raise QmpError(f"Failed to bind socket: {exc.strerror or exc}") from None

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client = NbdClient(self, reader, writer)
        if self.max_connections and len(self.clients) >= self.max_connections:
            writer.close()
            return
        self.clients.add(client)
        await client.run()

    async def stop(self) -> None:
        """nbd-server-stop / shutdown: every NBD export closed hard, the socket removed."""
        if self.server is not None:
            self.server.close()
        for exp in [e for e in self.daemon.exports.values() if isinstance(e, NbdExport)]:
            await exp.hard_close()
        clients = list(self.clients)
        for c in clients:
            c.abort()
        if clients:
            await asyncio.wait([asyncio.ensure_future(c.wait_closed()) for c in clients], timeout=5.0)
        if self.server is not None:
            try:
                await asyncio.wait_for(self.server.wait_closed(), 1.0)
            except TimeoutError:
                pass
            self.server = None
        if self.path is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass
            self.path = None
        if getattr(self.daemon, "nbd_server", None) is self:
            self.daemon.nbd_server = None  # type: ignore[attr-defined]


def _server(d: Daemon) -> NbdServer | None:
    return getattr(d, "nbd_server", None)


def _listen_for_pivots(d: Daemon) -> None:
    g = d.graph
    listeners = getattr(g, "replace_listeners", None)
    if listeners is None:
        listeners = []
        g.replace_listeners = listeners  # type: ignore[attr-defined]
    if getattr(d, "_nbd_pivot_listener", None) is None:
        def on_replace(old: BlockNode, new: BlockNode) -> None:
            for exp in list(d.exports.values()):
                if isinstance(exp, NbdExport):
                    exp.on_replace(old, new)

        d._nbd_pivot_listener = on_replace  # type: ignore[attr-defined]
        listeners.append(on_replace)


# ---------------------------------------------------------------------------------------------------
# QMP commands
# ---------------------------------------------------------------------------------------------------
@command("nbd-server-start")
async def nbd_server_start(d: Daemon, a: dict[str, Any]) -> Any:
    """QEMU's nbd-server-start (legacy SocketAddress).  TLS is not supported."""
    if _server(d) is not None:
        raise QmpError("NBD server already running")
    if a.get("tls-creds") or a.get("tls-authz"):
        raise QmpError("TLS is not supported by parablock")
    srv = NbdServer(d, int(a.get("max-connections", 100)))
    await srv.listen(a["addr"])
    d.nbd_server = srv  # type: ignore[attr-defined]
    _listen_for_pivots(d)
    return {}


@command("nbd-server-stop")
async def nbd_server_stop(d: Daemon, a: dict[str, Any]) -> Any:
    srv = _server(d)
    if srv is None:
        raise QmpError("NBD server not running")
    await srv.stop()
    return {}


def _find_bitmap(d: Daemon, node: BlockNode, ref: Any) -> tuple[BlockNode, DirtyBitmap]:
    from engine.daemon.bitmapcmds import find

    if isinstance(ref, dict):
        bnode = d.graph.nodes.get(str(ref.get("node")))
        if bnode is None:
            raise QmpError(f"Node '{ref.get('node')}' not found")
        bm = find(bnode, ref.get("name", ""))
        if bm is None:
            raise QmpError(f"Dirty bitmap '{ref.get('name')}' not found")
        return bnode, bm
    cur: BlockNode | None = node
    while cur is not None:
        bm = find(cur, ref)
        if bm is not None:
            return cur, bm
        d_ = cur.driver
        nxt = d_.file if d_.is_filter else d_.backing
        cur = d.graph.node_of(nxt)
    raise QmpError(f"Bitmap '{ref}' is not found")


@command("block-export-add")
def block_export_add(d: Daemon, a: dict[str, Any]) -> Any:
    """QEMU's blk_exp_add + nbd_export_create, with their checks in their order."""
    eid = a["id"]
    if not ID_RE.match(eid):
        raise QmpError("Invalid block export id")
    if eid in d.exports:
        raise QmpError(f"Block export id '{eid}' is already in use")
    if a.get("type") != "nbd":
        raise QmpError(f"Block export type '{a.get('type')}' is not supported by parablock")
    node_name = a["node-name"]
    node = d.graph.nodes.get(node_name)
    if node is None:
        raise QmpError(f"Cannot find device='' nor node-name='{node_name}'")
    if "iothread" in a:
        raise QmpError("iothreads are not supported by parablock")
    writable = bool(a.get("writable", False))
    if writable and node.driver.read_only:
        raise QmpError("Cannot export read-only node as writable")
    srv = _server(d)
    if srv is None:
        raise QmpError("NBD server not running")
    name = a.get("name", node_name)
    if len(name.encode()) > P.MAX_STRING_SIZE:
        raise QmpError(f"export name '{name}' too long")
    desc = a.get("description")
    if desc is not None and len(desc.encode()) > P.MAX_STRING_SIZE:
        raise QmpError(f"description '{desc}' too long")
    if name in srv.names:
        raise QmpError(f"NBD server already has export named '{name}'")
    bitmaps: list[DirtyBitmap] = []
    try:
        for ref in a.get("bitmaps") or []:
            bnode, bm = _find_bitmap(d, node, ref)
            try:
                bm.check_usable(modify=False)
            except BlockError as exc:
                raise QmpError(exc.message) from None
            if not writable and not bnode.driver.read_only and bm.enabled:
                raise QmpError(f"Enabled bitmap '{bm.name}' incompatible with readonly export")
            bm.busy = True
            bitmaps.append(bm)
    except BaseException:
        for bm in bitmaps:
            bm.busy = False
        raise
    exp = NbdExport(d, srv, eid, node, name, desc, writable, bitmaps, bool(a.get("allocation-depth", False)))
    exp.writethrough = bool(a.get("writethrough", False))
    d.exports[eid] = exp
    srv.names[name] = exp
    _listen_for_pivots(d)
    return {}


async def _export_del(d: Daemon, eid: str, mode: str) -> None:
    exp = d.exports.get(eid)
    if exp is None:
        raise QmpError(f"Export '{eid}' is not found")
    if getattr(exp, "shutting_down", False):
        raise QmpError(f"Export '{eid}' is already shutting down")
    if mode == "safe" and exp.clients:
        raise QmpError(f"export '{eid}' still in use")
    if mode == "hard":
        await exp.hard_close()
    else:
        exp.request_shutdown()


@command("block-export-del")
async def block_export_del(d: Daemon, a: dict[str, Any]) -> Any:
    await _export_del(d, a["id"], a.get("mode", "safe"))
    return {}


@command("query-block-exports")
def query_block_exports(d: Daemon, a: dict[str, Any]) -> Any:
    return [{"node-name": e.node.name, "shutting-down": bool(e.shutting_down), "type": "nbd", "id": e.id}
            for e in reversed(list(d.exports.values()))]


@command("nbd-server-add")
def nbd_server_add(d: Daemon, a: dict[str, Any]) -> Any:
    """Deprecated: an export whose id is its name; a read-only node silently gets a read-only export."""
    if _server(d) is None:
        raise QmpError("NBD server not running")
    name = a.get("name", a["device"])
    writable = bool(a.get("writable", False))
    node = d.graph.nodes.get(a["device"])
    if node is not None and node.driver.read_only:
        writable = False
    opts: dict[str, Any] = {"type": "nbd", "id": name, "node-name": a["device"], "writable": writable,
                            "name": name}
    if "description" in a:
        opts["description"] = a["description"]
    if "bitmap" in a:
        opts["bitmaps"] = [a["bitmap"]]
    return block_export_add(d, opts)


@command("nbd-server-remove")
async def nbd_server_remove(d: Daemon, a: dict[str, Any]) -> Any:
    if _server(d) is None:
        raise QmpError("NBD server not running")
    await _export_del(d, a["name"], a.get("mode", "safe"))
    return {}

