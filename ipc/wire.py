"""The wire codec between the coordinator and its workers: msgpack frames with a version handshake.

Layer: ipc (stdlib + msgpack).  A request is ``[id, op, args]``; a reply is ``[id, ok, payload]`` where
``payload`` is the result when ``ok`` and an error record ``[kind, errno, message]`` otherwise.  Errors are
rebuilt from an allowlist (``rebuild_error``), never unpickled.  The first frame a worker sends is
``["hello", PROTOCOL_VERSION, pid]``; the pool refuses a worker speaking another version.
"""
from __future__ import annotations

import errno as _errno
from typing import Any

import msgpack

PROTOCOL_VERSION = 1

_packer = msgpack.Packer(use_bin_type=True)


def encode(obj: Any) -> bytes:
    return _packer.pack(obj)


def decode(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, use_list=True)


class IpcError(Exception):
    """Root of the ipc layer's errors (a failed handshake, a dead worker, a broken frame)."""

    errno = _errno.EIO

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        if errno is not None:
            self.errno = errno


class WorkerDied(IpcError):
    """The worker running a request exited before replying."""


def error_record(exc: BaseException) -> list[Any]:
    """Turn an exception raised in a worker into a record that crosses the pipe."""
    if isinstance(exc, OSError):
        return ["OSError", exc.errno or _errno.EIO, exc.strerror or str(exc)]
    if isinstance(exc, ValueError):
        return ["ValueError", _errno.EINVAL, str(exc)]
    return ["IpcError", _errno.EIO, f"{type(exc).__name__}: {exc}"]


def rebuild_error(record: list[Any]) -> Exception:
    """The inverse of ``error_record``: only known kinds come back as themselves."""
    kind, err, message = record[0], int(record[1]), str(record[2])
    if kind == "OSError":
        return OSError(err, message)
    if kind == "ValueError":
        return ValueError(message)
    return IpcError(message, err)
