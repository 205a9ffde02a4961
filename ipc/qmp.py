"""QMP on the wire, sans I/O: a streaming JSON splitter with QEMU's error texts, and the encoder.

Layer: ipc (stdlib only).  QEMU's monitor reads a byte stream with no framing: a request runs as soon as
its closing brace arrives, two objects on one line are two requests, and anything at the top level that
is not an object is answered with an error (one per bad token).  Replies and events are one JSON object
per line, terminated by ``\\r\\n``.

Limits (QEMU's json-streamer has the same kind): a message longer than ``max_bytes`` or nested deeper
than ``max_depth`` is dropped with an error and the parser resynchronises at the next top-level brace.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any

MAX_MESSAGE_BYTES = 64 << 20
MAX_DEPTH = 1024
_VAL_SPECIAL = re.compile(rb'[{}\[\]"]')
_STR_SPECIAL = re.compile(rb'["\\\\]')


@dataclass
class ParseError:
    """One top-level input the monitor answers with a GenericError (no ``id``)."""

    desc: str


class QmpStreamParser:
    """Feed bytes, get back the complete top-level values (dicts, or other JSON values the caller
    rejects) and ParseErrors, in input order."""

    def __init__(self, max_bytes: int = MAX_MESSAGE_BYTES, max_depth: int = MAX_DEPTH) -> None:
        self.max_bytes = max_bytes
        self.max_depth = max_depth
        self._buf = bytearray()     # the value being collected
        self._depth = 0
        self._in_str = False
        self._esc = False
        self._token = bytearray()   # a bare top-level token (keyword, number)
        self._skip = False          # dropping an oversized / too deep value until depth 0

    def feed(self, data: bytes) -> list[Any]:
        out: list[Any] = []
        i, n = 0, len(data)
        while i < n:
            if self._depth == 0 and not self._in_str:
                b = data[i]
                i += 1
                self._top(b, out)
                continue
            # inside a value: jump to the next byte that matters
            m = (_STR_SPECIAL if self._in_str else _VAL_SPECIAL).search(data, i)
            j = m.start() if m else n
            if j > i:
                self._esc = False  # an ordinary byte after a backslash inside a string
                self._take(data[i:j], out)
            if m is None:
                return out
            b = data[j]
            i = j + 1
            self._take(data[j:i], out)
            if self._in_str:
                if self._esc:
                    self._esc = False
                elif b == 0x5C:
                    self._esc = True
                elif b == 0x22:
                    self._in_str = False
                    if self._depth == 0:
                        self._finish(out)
                continue
            if b == 0x22:
                self._in_str = True
            elif b in b"{[":
                self._depth += 1
                if self._depth > self.max_depth and not self._skip:
                    self._drop(out, "JSON nesting depth limit exceeded")
            elif b in b"}]":
                self._depth -= 1
                if self._depth == 0:
                    self._finish(out)
        return out

    def _take(self, chunk: bytes, out: list[Any]) -> None:
        if self._skip or not chunk:
            return
        self._buf += chunk
        if len(self._buf) > self.max_bytes:
            self._drop(out, "JSON token size limit exceeded")

    def _drop(self, out: list[Any], desc: str) -> None:
        self._skip = True
        self._buf = bytearray()
        out.append(ParseError(desc))

    def _top(self, b: int, out: list[Any]) -> None:
        if b in b"{[":
            self._flush_token(out)
            self._buf = bytearray([b])
            self._depth = 1
            self._skip = False
        elif b == 0x22:  # a top-level string
            self._flush_token(out)
            self._in_str = True
            self._skip = False
            self._buf = bytearray([b])
        elif b in b" \t\r\n":
            self._flush_token(out)
        elif b in b"}]":
            self._flush_token(out)
            out.append(ParseError("JSON parse error, expecting value"))
        else:
            self._token.append(b)
            if len(self._token) > 1024:
                self._token.clear()
                out.append(ParseError("JSON token size limit exceeded"))

    def _finish(self, out: list[Any]) -> None:
        if self._skip:
            self._skip = False
            self._buf = bytearray()
            return
        raw = bytes(self._buf)
        self._buf = bytearray()
        try:
            out.append(json.loads(raw))
        except (ValueError, RecursionError) as exc:
            msg = exc.msg if isinstance(exc, json.JSONDecodeError) else "invalid input"
            out.append(ParseError(f"JSON parse error, {msg[:1].lower() + msg[1:]}"))

    def _flush_token(self, out: list[Any]) -> None:
        if not self._token:
            return
        text = self._token.decode("utf-8", "replace")
        self._token.clear()
        try:
            json.loads(text)
        except ValueError:
            out.append(ParseError(f"JSON parse error, invalid keyword '{text}'"))
            return
        out.append(text)  # a bare scalar: valid JSON, but not an object

    def eof(self) -> list[Any]:
        """The stream ended: a pending bare token still counts."""
        out: list[Any] = []
        self._flush_token(out)
        return out


@dataclass
class Request:
    execute: str
    arguments: dict[str, Any]
    id: Any
    has_id: bool
    oob: bool = False


class RequestError(Exception):
    """A top-level value that is not a well-formed QMP request; reply with GenericError ``desc``."""

    def __init__(self, desc: str, req_id: Any = None, has_id: bool = False) -> None:
        super().__init__(desc)
        self.desc = desc
        self.id = req_id
        self.has_id = has_id


def parse_request(value: Any) -> Request:
    """Check the request envelope the way QEMU's monitor does.  Raises RequestError."""
    if not isinstance(value, dict):
        raise RequestError("QMP input must be a JSON object")
    has_id = "id" in value
    req_id = value.get("id")
    for key in value:
        if key not in ("execute", "exec-oob", "arguments", "id", "control"):
            raise RequestError(f"QMP input member '{key}' is unexpected", req_id, has_id)
    if "execute" in value and "exec-oob" in value:
        raise RequestError("QMP input must not have both 'execute' and 'exec-oob'", req_id, has_id)
    oob = "exec-oob" in value
    name = value.get("exec-oob" if oob else "execute")
    if name is None:
        raise RequestError("QMP input lacks member 'execute'", req_id, has_id)
    if not isinstance(name, str):
        raise RequestError(f"QMP input member '{'exec-oob' if oob else 'execute'}' must be a string",
                           req_id, has_id)
    args = value.get("arguments", {})
    if not isinstance(args, dict):
        raise RequestError("QMP input member 'arguments' must be an object", req_id, has_id)
    return Request(name, args, req_id, has_id, oob)


def encode(obj: Any) -> bytes:
    """One QMP message on the wire: compact-ish JSON as QEMU prints it, then ``\\r\\n``."""
    return json.dumps(obj, separators=(", ", ": ")).encode() + b"\r\n"


def reply(value: Any, req: Request | None) -> dict[str, Any]:
    out: dict[str, Any] = {"return": value}
    if req is not None and req.has_id:
        out["id"] = req.id
    return out


def error_reply(cls: str, desc: str, req_id: Any = None, has_id: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"error": {"class": cls, "desc": desc}}
    if has_id:
        out["id"] = req_id
    return out


def event(name: str, data: dict[str, Any] | None, now: float | None = None) -> dict[str, Any]:
    t = time.time() if now is None else now
    sec = int(t)
    out: dict[str, Any] = {"timestamp": {"seconds": sec, "microseconds": int((t - sec) * 1e6)},
                           "event": name}
    if data is not None:
        out["data"] = data
    return out
