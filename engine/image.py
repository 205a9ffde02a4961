"""Opening and creating images: format probing, protocol node underneath, backing chain on top.

Layer: engine.  ``open_image`` is the one way the CLI (and later the daemon) turns a filename into a
node graph: a format node over a ``file`` node, with backing nodes opened read-only and resolved the way
QEMU resolves them (relative to the overlay's directory).
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from engine.driver import BlockDriver, driver_class, probe_format
from engine.errors import ImageOpenError, os_error_text
from engine.formats.file import FileDriver

if TYPE_CHECKING:
    from ipc.executor import Executor

MAX_CHAIN_DEPTH = 64


def path_combine(base: str, name: str) -> str:
    """QEMU's path_combine: ``name`` relative to the directory of ``base`` unless it is absolute."""
    if not name or os.path.isabs(name) or "://" in name:
        return name
    slash = base.rfind("/")
    return (base[:slash + 1] if slash >= 0 else "") + name


def probe_file(filename: str, executor: "Executor") -> str:
    """The format name probing picks for ``filename``.  Raises ImageOpenError."""
    f = FileDriver(filename, executor, read_only=True)
    try:
        head = f.read(0, 2048)
    finally:
        f.close()
    return probe_format(head, filename)


def open_image(filename: str, executor: "Executor", fmt: str | None = None, read_only: bool = True,
               backing: bool = True, options: dict[str, Any] | None = None, _depth: int = 0,
               _seen: frozenset[str] = frozenset(), probe_raw: bool = True) -> BlockDriver:
    """Open ``filename`` as a format node (probing when ``fmt`` is None) with its backing chain.

    Raises ImageOpenError (missing file, unknown format, unsupported or corrupt header, a backing file
    that cannot be opened, a chain loop).
    """
    if _depth > MAX_CHAIN_DEPTH:
        raise ImageOpenError("Backing chain is too deep")
    real = os.path.realpath(filename)
    if real in _seen:
        raise ImageOpenError(f"Backing file '{filename}' creates a loop in the backing chain")
    if fmt is None:
        fmt = probe_file(filename, executor)
        if fmt == "raw" and not probe_raw:
            # the daemon's safe default: a file whose format nobody recorded is never taken for raw
            # (a raw backing file whose contents look like an image header would be misread)
            raise ImageOpenError(f"'{filename}' has no recorded format and would be probed as raw; "
                                 "give its format explicitly")
    cls = driver_class(fmt)
    if cls.is_protocol:
        node = FileDriver(filename, executor, read_only)
        return node
    node = cls(filename, executor, read_only)
    node.file = FileDriver(filename, executor, read_only)
    node.file.cache_unsafe = (options or {}).get("cache") == "unsafe"
    try:
        node.open(options or {})  # type: ignore[attr-defined]
        if backing and node.supports_backing and node.backing_filename:
            bname = path_combine(filename, node.backing_filename)
            try:
                node.backing = open_image(bname, executor, node.backing_format, read_only=True,
                                          backing=True, _depth=_depth + 1, _seen=_seen | {real},
                                          probe_raw=probe_raw)
            except ImageOpenError as exc:
                raise ImageOpenError(f"Could not open backing file: {exc.message}", errno=exc.errno) from None
    except BaseException:
        node.close()
        raise
    return node


def create_image(filename: str, fmt: str, size: int | None, executor: "Executor",
                 options: dict[str, Any]) -> None:
    """Create an image of format ``fmt``.  Raises InvalidArgument / ImageOpenError / NotSupported."""
    cls = driver_class(fmt)
    create = getattr(cls, "create", None)
    if create is None:
        raise ImageOpenError(f"Format driver '{fmt}' does not support image creation", errno=95)
    try:
        create(filename, size, executor, options)
    except OSError as exc:
        raise ImageOpenError(f"Could not create '{filename}': {os_error_text(exc)}", errno=exc.errno) from None
