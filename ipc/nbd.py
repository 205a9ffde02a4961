"""NBD on the wire, sans I/O: the fixed newstyle handshake, option parsing and replies, transmission
requests and (simple and structured) replies, as the NBD protocol document specifies them.

Layer: ipc (stdlib only, pure).  ``ServerConnection`` is a state machine: feed it bytes with
``receive_data``, take events with ``next_event`` (``NEED_DATA`` when it wants more bytes), and build
the bytes to send with its ``reply_*`` / ``chunk_*`` methods.  What an option *means* (which export a
name selects, which meta contexts exist) is the caller's business; the connection only knows framing,
phases and limits.

Invariants: any input yields events or ``NbdProtocolError`` (after which the caller drops the
connection), never another exception; nothing larger than ``MAX_OPTION_LENGTH`` (options, whose payload
is skipped and answered with NBD_REP_ERR_TOO_BIG) or ``MAX_BUFFER_SIZE`` (write payloads, which drop
the connection since they cannot be held) is ever buffered; a send method refused in the current phase
raises ``NbdStateError`` naming the phase and the verb.
"""
from __future__ import annotations

import errno as _errno
import struct
from dataclasses import dataclass
from enum import Enum, IntEnum, IntFlag

# ---------------------------------------------------------------------------------------------------
# constants (NBD protocol document, doc/proto.md)
# ---------------------------------------------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943          # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054          # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

#: the largest READ/WRITE QEMU accepts (NBD_MAX_BUFFER_SIZE); also the advertised maximum block size
MAX_BUFFER_SIZE = 32 << 20
#: the longest option payload we read (longer ones are skipped and refused with ERR_TOO_BIG)
MAX_OPTION_LENGTH = 64 << 10
#: NBD_MAX_STRING_SIZE: export names, descriptions, meta context names
MAX_STRING_SIZE = 4096
#: options a client may send before transmission (a bound on a looping client)
MAX_OPTIONS = 4096

REQUEST_HEADER = struct.Struct(">IHHQQI")      # magic, flags, type, handle, offset, length (28 bytes)
OPTION_HEADER = struct.Struct(">QII")          # IHAVEOPT, option, length (16 bytes)
SIMPLE_REPLY = struct.Struct(">IIQ")           # magic, error, handle (16 bytes)
CHUNK_HEADER = struct.Struct(">IHHQI")         # magic, flags, type, handle, length (20 bytes)


class HandshakeFlags(IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlags(IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class TransmissionFlags(IntFlag):
    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Opt(IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


_ERR = 1 << 31


class Rep(IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = _ERR + 1
    ERR_POLICY = _ERR + 2
    ERR_INVALID = _ERR + 3
    ERR_PLATFORM = _ERR + 4
    ERR_TLS_REQD = _ERR + 5
    ERR_UNKNOWN = _ERR + 6
    ERR_SHUTDOWN = _ERR + 7
    ERR_BLOCK_SIZE_REQD = _ERR + 8
    ERR_TOO_BIG = _ERR + 9


class Info(IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Cmd(IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


class CmdFlags(IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


class ReplyFlags(IntFlag):
    DONE = 1 << 0


class Chunk(IntEnum):
    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = (1 << 15) + 1
    ERROR_OFFSET = (1 << 15) + 2


class StateFlags(IntFlag):
    """base:allocation descriptor flags (qemu:dirty-bitmap uses bit 0 as DIRTY)."""

    HOLE = 1 << 0
    ZERO = 1 << 1


DIRTY = 1 << 0

# NBD error numbers (the protocol's own values, which happen to equal Linux's)
NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108

_ERRNO_MAP = {
    _errno.EPERM: NBD_EPERM, _errno.EACCES: NBD_EPERM, _errno.EROFS: NBD_EPERM,
    _errno.EIO: NBD_EIO, _errno.ENOMEM: NBD_ENOMEM, _errno.EINVAL: NBD_EINVAL,
    _errno.ENOSPC: NBD_ENOSPC, _errno.EDQUOT: NBD_ENOSPC, _errno.EFBIG: NBD_ENOSPC,
    _errno.EOVERFLOW: NBD_EOVERFLOW, _errno.ENOTSUP: NBD_ENOTSUP, _errno.ESHUTDOWN: NBD_ESHUTDOWN,
}  # fmt: skip


def nbd_errno(err: int | None) -> int:
    """The NBD error for a host errno (QEMU's system_errno_to_nbd_errno; unknown ones become EINVAL)."""
    if not err:
        return NBD_EIO
    return _ERRNO_MAP.get(err, NBD_EINVAL)


# ---------------------------------------------------------------------------------------------------
# errors and events
# ---------------------------------------------------------------------------------------------------
class NbdError(Exception):
    """Root of this module's errors."""


class NbdProtocolError(NbdError):
    """The peer broke the protocol; the connection must be dropped."""


class NbdStateError(NbdError):
    """A send method was called in a phase that does not allow it (a bug of the caller)."""


class Phase(Enum):
    CLIENT_FLAGS = "client-flags"
    OPTIONS = "options"
    TRANSMISSION = "transmission"
    CLOSED = "closed"


#: verb -> phases that allow it (QEMU-style "cannot accept verb" table)
VERBS: dict[str, frozenset[Phase]] = {
    "initiate": frozenset({Phase.CLIENT_FLAGS}),
    "option-reply": frozenset({Phase.OPTIONS}),
    "export-name-reply": frozenset({Phase.OPTIONS}),
    "go": frozenset({Phase.OPTIONS}),
    "abort": frozenset({Phase.OPTIONS}),
    "reply": frozenset({Phase.TRANSMISSION}),
}


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()


@dataclass(frozen=True, slots=True)
class OptExportName:
    name: str


@dataclass(frozen=True, slots=True)
class OptAbort:
    pass


@dataclass(frozen=True, slots=True)
class OptList:
    pass


@dataclass(frozen=True, slots=True)
class OptInfo:
    """NBD_OPT_INFO (``go`` False) or NBD_OPT_GO."""

    go: bool
    name: str
    requests: tuple[int, ...]

    @property
    def opt(self) -> int:
        return Opt.GO if self.go else Opt.INFO


@dataclass(frozen=True, slots=True)
class OptStructuredReply:
    pass


@dataclass(frozen=True, slots=True)
class OptMetaContext:
    """NBD_OPT_LIST_META_CONTEXT (``set`` False) or NBD_OPT_SET_META_CONTEXT."""

    set: bool
    export: str
    queries: tuple[str, ...]

    @property
    def opt(self) -> int:
        return Opt.SET_META_CONTEXT if self.set else Opt.LIST_META_CONTEXT


@dataclass(frozen=True, slots=True)
class OptUnsupported:
    """An option we do not implement (or do not know); answer NBD_REP_ERR_UNSUP."""

    opt: int


@dataclass(frozen=True, slots=True)
class OptInvalid:
    """A known option with a malformed payload; answer NBD_REP_ERR_INVALID (or ERR_TOO_BIG)."""

    opt: int
    message: str
    too_big: bool = False


@dataclass(frozen=True, slots=True)
class Request:
    flags: int
    type: int
    handle: int
    offset: int
    length: int
    data: bytes = b""


OptionEvent = (OptExportName | OptAbort | OptList | OptInfo | OptStructuredReply | OptMetaContext
               | OptUnsupported | OptInvalid)


# ---------------------------------------------------------------------------------------------------
# option payload parsing
# ---------------------------------------------------------------------------------------------------
class _Cursor:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def u16(self) -> int:
        return self._unpack(">H", 2)

    def u32(self) -> int:
        return self._unpack(">I", 4)

    def _unpack(self, fmt: str, n: int) -> int:
        if self.pos + n > len(self.data):
            raise ValueError("option payload too short")
        (v,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += n
        return int(v)

    def string(self, n: int) -> str:
        if n > MAX_STRING_SIZE:
            raise ValueError(f"string of {n} bytes is too long")
        if self.pos + n > len(self.data):
            raise ValueError("option payload too short")
        raw = self.data[self.pos:self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError("string is not valid UTF-8") from None

    def done(self) -> None:
        if self.pos != len(self.data):
            raise ValueError("trailing bytes in option payload")


def parse_option(opt: int, data: bytes) -> OptionEvent:
    """Turn one option (code and payload) into an event.  Never raises."""
    try:
        if opt == Opt.EXPORT_NAME:
            c = _Cursor(data)
            return OptExportName(c.string(len(data)))
        if opt in (Opt.ABORT, Opt.LIST, Opt.STRUCTURED_REPLY):
            if data:
                return OptInvalid(opt, "option does not take a payload")
            if opt == Opt.ABORT:
                return OptAbort()
            return OptList() if opt == Opt.LIST else OptStructuredReply()
        if opt in (Opt.INFO, Opt.GO):
            c = _Cursor(data)
            name = c.string(c.u32())
            n = c.u16()
            reqs = tuple(c.u16() for _ in range(n))
            c.done()
            return OptInfo(opt == Opt.GO, name, reqs)
        if opt in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
            c = _Cursor(data)
            export = c.string(c.u32())
            n = c.u32()
            if n > len(data):
                raise ValueError("too many queries")
            queries = tuple(c.string(c.u32()) for _ in range(n))
            c.done()
            return OptMetaContext(opt == Opt.SET_META_CONTEXT, export, queries)
    except ValueError as exc:
        return OptInvalid(opt, str(exc))
    return OptUnsupported(opt)


def match_meta_contexts(queries: tuple[str, ...] | list[str], available: list[str], listing: bool) -> list[str]:
    """The contexts of ``available`` that ``queries`` select, in ``available`` order.

    An empty query list selects everything when listing and nothing when setting.  When listing, a
    namespace prefix ("base:", "qemu:", "qemu:dirty-bitmap:") selects every context under it, as QEMU's
    server does; otherwise a query must name a context exactly."""
    if not queries:
        return list(available) if listing else []
    out = []
    for ctx in available:
        for q in queries:
            if q == ctx or (listing and q.endswith(":") and ctx.startswith(q)):
                out.append(ctx)
                break
    return out


# ---------------------------------------------------------------------------------------------------
# the connection state machine (server side)
# ---------------------------------------------------------------------------------------------------
class ServerConnection:
    """One client connection, server side.  See the module docstring."""

    def __init__(self, max_buffer: int = MAX_BUFFER_SIZE, max_option: int = MAX_OPTION_LENGTH) -> None:
        self.phase = Phase.CLIENT_FLAGS
        self.max_buffer = max_buffer
        self.max_option = max_option
        self.no_zeroes = False
        self.fixed = False
        self.structured = False
        self.options_seen = 0
        self._buf = bytearray()
        self._skip = 0                 # option payload bytes still to discard
        self._skip_opt: int | None = None
        self._initiated = False

    # ---- phases -----------------------------------------------------------------------------------
    def _verb(self, verb: str) -> None:
        if self.phase not in VERBS[verb] or (verb == "initiate" and self._initiated):
            raise NbdStateError(f"NBD connection in phase '{self.phase.value}' cannot accept verb '{verb}'")

    def initiate(self) -> bytes:
        """The server's greeting (fixed newstyle, NO_ZEROES offered)."""
        self._verb("initiate")
        self._initiated = True
        return struct.pack(">QQH", NBDMAGIC, IHAVEOPT, HandshakeFlags.FIXED_NEWSTYLE | HandshakeFlags.NO_ZEROES)

    def close(self) -> None:
        self.phase = Phase.CLOSED
        self._buf.clear()

    # ---- input ------------------------------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        if self.phase is Phase.CLOSED:
            return
        if self._skip:
            n = min(self._skip, len(data))
            self._skip -= n
            data = data[n:]
        self._buf += data

    def next_event(self) -> object:
        """The next event, or NEED_DATA.  Raises NbdProtocolError (drop the connection)."""
        if self.phase is Phase.CLOSED:
            return NEED_DATA
        if self._skip:
            return NEED_DATA
        if self._skip_opt is not None:
            opt, self._skip_opt = self._skip_opt, None
            return OptInvalid(opt, "option too long", too_big=True)
        if self.phase is Phase.CLIENT_FLAGS:
            return self._client_flags()
        if self.phase is Phase.OPTIONS:
            return self._option()
        return self._request()

    def _client_flags(self) -> object:
        if len(self._buf) < 4:
            return NEED_DATA
        (flags,) = struct.unpack_from(">I", self._buf)
        del self._buf[:4]
        if flags & ~int(ClientFlags.FIXED_NEWSTYLE | ClientFlags.NO_ZEROES):
            self._fail(f"Unknown client flags 0x{flags:x} received")
        self.fixed = bool(flags & ClientFlags.FIXED_NEWSTYLE)
        self.no_zeroes = bool(flags & ClientFlags.NO_ZEROES)
        self.phase = Phase.OPTIONS
        return self.next_event()

    def _option(self) -> object:
        if len(self._buf) < OPTION_HEADER.size:
            return NEED_DATA
        magic, opt, length = OPTION_HEADER.unpack_from(self._buf)
        if magic != IHAVEOPT:
            self._fail(f"Bad option magic 0x{magic:x}")
        self.options_seen += 1
        if self.options_seen > MAX_OPTIONS:
            self._fail("Too many options")
        if length > self.max_option:
            if opt == Opt.EXPORT_NAME or not self.fixed:
                self._fail(f"Option {opt} of {length} bytes is too long")
            del self._buf[:OPTION_HEADER.size]
            n = min(length, len(self._buf))
            del self._buf[:n]
            self._skip = length - n
            self._skip_opt = opt
            return self.next_event()
        if len(self._buf) < OPTION_HEADER.size + length:
            return NEED_DATA
        data = bytes(self._buf[OPTION_HEADER.size:OPTION_HEADER.size + length])
        del self._buf[:OPTION_HEADER.size + length]
        ev = parse_option(opt, data)
        if isinstance(ev, (OptUnsupported, OptInvalid)) and not self.fixed:
            self._fail(f"Option {opt} refused in non-fixed newstyle")
        return ev

    def _request(self) -> object:
        if len(self._buf) < REQUEST_HEADER.size:
            return NEED_DATA
        magic, flags, typ, handle, offset, length = REQUEST_HEADER.unpack_from(self._buf)
        if magic != REQUEST_MAGIC:
            self._fail(f"Bad request magic 0x{magic:x}")
        if typ == Cmd.WRITE:
            if length > self.max_buffer:
                self._fail(f"len ({length}) is larger than max len ({self.max_buffer})")
            if len(self._buf) < REQUEST_HEADER.size + length:
                return NEED_DATA
            data = bytes(self._buf[REQUEST_HEADER.size:REQUEST_HEADER.size + length])
            del self._buf[:REQUEST_HEADER.size + length]
            return Request(flags, typ, handle, offset, length, data)
        del self._buf[:REQUEST_HEADER.size]
        return Request(flags, typ, handle, offset, length)

    def _fail(self, msg: str) -> None:
        self.close()
        raise NbdProtocolError(msg)

    # ---- option replies ---------------------------------------------------------------------------
    def reply_option(self, opt: int, rep: int, data: bytes = b"") -> bytes:
        self._verb("option-reply")
        return struct.pack(">QIII", OPTION_REPLY_MAGIC, opt, rep, len(data)) + data

    def reply_error(self, opt: int, rep: int, message: str = "") -> bytes:
        """An NBD_REP_ERR_* reply; the message is for humans (clients may print it)."""
        return self.reply_option(opt, rep, message.encode()[:MAX_STRING_SIZE])

    def reply_ack(self, opt: int) -> bytes:
        out = self.reply_option(opt, Rep.ACK)
        if opt == Opt.STRUCTURED_REPLY:
            self.structured = True
        return out

    def reply_server(self, opt: int, name: str, description: str = "") -> bytes:
        """One NBD_REP_SERVER entry of NBD_OPT_LIST."""
        raw = name.encode()
        return self.reply_option(opt, Rep.SERVER, struct.pack(">I", len(raw)) + raw + description.encode())

    def reply_meta_context(self, opt: int, ctx_id: int, name: str) -> bytes:
        return self.reply_option(opt, Rep.META_CONTEXT, struct.pack(">I", ctx_id) + name.encode())

    def reply_info_export(self, opt: int, size: int, flags: int) -> bytes:
        return self.reply_option(opt, Rep.INFO, struct.pack(">HQH", Info.EXPORT, size, flags))

    def reply_info_name(self, opt: int, name: str) -> bytes:
        return self.reply_option(opt, Rep.INFO, struct.pack(">H", Info.NAME) + name.encode())

    def reply_info_description(self, opt: int, text: str) -> bytes:
        return self.reply_option(opt, Rep.INFO, struct.pack(">H", Info.DESCRIPTION) + text.encode())

    def reply_info_block_size(self, opt: int, minimum: int, preferred: int, maximum: int) -> bytes:
        return self.reply_option(opt, Rep.INFO, struct.pack(">HIII", Info.BLOCK_SIZE, minimum, preferred,
                                                            maximum))

    def go(self) -> bytes:
        """The final ACK of NBD_OPT_GO: transmission starts."""
        self._verb("go")
        out = self.reply_option(Opt.GO, Rep.ACK)
        self.phase = Phase.TRANSMISSION
        return out

    def export_name_reply(self, size: int, flags: int) -> bytes:
        """NBD_OPT_EXPORT_NAME's reply (no option header): transmission starts."""
        self._verb("export-name-reply")
        self.phase = Phase.TRANSMISSION
        return struct.pack(">QH", size, flags) + (b"" if self.no_zeroes else bytes(124))

    def abort(self) -> bytes:
        """NBD_OPT_ABORT's ACK; the connection is over afterwards."""
        self._verb("abort")
        out = self.reply_option(Opt.ABORT, Rep.ACK)
        self.close()
        return out

    # ---- transmission replies ---------------------------------------------------------------------
    def simple_reply(self, handle: int, error: int = 0, data: bytes = b"") -> bytes:
        self._verb("reply")
        return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle) + data

    def chunk(self, handle: int, typ: int, payload: bytes, done: bool) -> bytes:
        self._verb("reply")
        if not self.structured:
            raise NbdStateError("structured replies were not negotiated")
        return CHUNK_HEADER.pack(STRUCTURED_REPLY_MAGIC, ReplyFlags.DONE if done else 0, typ, handle,
                                 len(payload)) + payload

    def chunk_none(self, handle: int) -> bytes:
        return self.chunk(handle, Chunk.NONE, b"", True)

    def chunk_data(self, handle: int, offset: int, data: bytes, done: bool) -> bytes:
        return self.chunk(handle, Chunk.OFFSET_DATA, struct.pack(">Q", offset) + data, done)

    def chunk_hole(self, handle: int, offset: int, length: int, done: bool) -> bytes:
        return self.chunk(handle, Chunk.OFFSET_HOLE, struct.pack(">QI", offset, length), done)

    def chunk_block_status(self, handle: int, ctx_id: int, extents: list[tuple[int, int]], done: bool) -> bytes:
        """``extents`` are (length, flags) descriptors."""
        payload = struct.pack(">I", ctx_id) + b"".join(struct.pack(">II", n, f) for n, f in extents)
        return self.chunk(handle, Chunk.BLOCK_STATUS, payload, done)

    def chunk_error(self, handle: int, error: int, message: str = "") -> bytes:
        raw = message.encode()[:MAX_STRING_SIZE]
        return self.chunk(handle, Chunk.ERROR, struct.pack(">IH", error, len(raw)) + raw, True)

    def error_reply(self, handle: int, error: int, message: str = "") -> bytes:
        """An error as a structured ERROR chunk when negotiated, else a simple reply."""
        if self.structured:
            return self.chunk_error(handle, error, message)
        return self.simple_reply(handle, error)


# ---------------------------------------------------------------------------------------------------
# request validation (QEMU's nbd_co_receive_request checks)
# ---------------------------------------------------------------------------------------------------
_VALID_FLAGS = {
    Cmd.READ: CmdFlags.FUA | CmdFlags.DF,
    Cmd.WRITE: CmdFlags.FUA,
    Cmd.DISC: 0,
    Cmd.FLUSH: 0,
    Cmd.TRIM: CmdFlags.FUA,
    Cmd.CACHE: 0,
    Cmd.WRITE_ZEROES: CmdFlags.FUA | CmdFlags.NO_HOLE | CmdFlags.FAST_ZERO,
    Cmd.BLOCK_STATUS: CmdFlags.REQ_ONE,
}
_RANGED = {Cmd.READ, Cmd.WRITE, Cmd.TRIM, Cmd.CACHE, Cmd.WRITE_ZEROES, Cmd.BLOCK_STATUS}
_WRITES = {Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES}


def check_request(req: Request, size: int, writable: bool, structured: bool, contexts: int) -> tuple[int, str] | None:
    """None if ``req`` may run, else (NBD error, message) to answer it with."""
    if req.type not in _VALID_FLAGS:
        return NBD_EINVAL, f"unsupported command type {req.type}"
    if req.flags & ~int(_VALID_FLAGS[Cmd(req.type)]):
        return NBD_EINVAL, f"unsupported flags 0x{req.flags:x} for command {Cmd(req.type).name}"
    if req.flags & CmdFlags.DF and not structured:
        return NBD_EINVAL, "DF flag needs structured replies"
    if req.type == Cmd.READ and req.length > MAX_BUFFER_SIZE:
        return NBD_EINVAL, f"len ({req.length}) is larger than max len ({MAX_BUFFER_SIZE})"
    if req.type in _WRITES and not writable:
        return NBD_EPERM, "export is read-only"
    if req.type in _RANGED and (req.offset > size or req.length > size - req.offset):
        return NBD_EINVAL, "operation past EOF"
    if req.type == Cmd.BLOCK_STATUS:
        if not req.length:
            return NBD_EINVAL, "block status of zero length"
        if not structured or not contexts:
            return NBD_EINVAL, "no meta context negotiated"
    return None
