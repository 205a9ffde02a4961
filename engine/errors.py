"""Errors of the engine layer.

One root, :class:`BlockError`, carrying an errno and a QMP error class so that QMP replies, NBD errors and
CLI exit codes follow mechanically.  Pure module: imports only the standard library.
"""
from __future__ import annotations

import errno as _errno


class BlockError(Exception):
    """Root of every error the engine raises on purpose.

    ``errno`` is the POSIX error number closest to the failure, ``qmp_class`` the QMP error class
    (``GenericError`` unless a subclass says otherwise).
    """

    errno: int = _errno.EIO
    qmp_class: str = "GenericError"

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        if errno is not None:
            self.errno = errno

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class InvalidArgument(BlockError):
    """A caller passed a bad option, size or offset."""

    errno = _errno.EINVAL


class NotSupported(BlockError):
    """The format or driver cannot do what was asked."""

    errno = _errno.ENOTSUP


class ImageOpenError(BlockError):
    """An image could not be opened: missing file, wrong format, unsupported feature."""


class CorruptImage(BlockError):
    """Image metadata is inconsistent in a way that makes the request unsafe."""

    errno = _errno.EIO


class ReadOnlyError(BlockError):
    """A write was attempted on a node opened read-only."""

    errno = _errno.EACCES


class OutOfBounds(BlockError):
    """A request lies beyond the end of the node."""

    errno = _errno.EIO


class DeviceNotFound(BlockError):
    """A node or device name does not exist."""

    errno = _errno.ENODEV
    qmp_class = "DeviceNotFound"


def os_error_text(exc: OSError) -> str:
    """qemu's rendering of an OSError: its strerror, e.g. 'No such file or directory'."""
    return exc.strerror or _errno.errorcode.get(exc.errno or 0, str(exc))
