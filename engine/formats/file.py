"""The ``file`` protocol driver: a host file, every byte moved by the executor.

Layer: engine.  Reads past EOF return zeros (formats rely on it); block status comes from
SEEK_DATA/SEEK_HOLE through the executor.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from engine.driver import BlockDriver, Extent, Status, register
from engine.errors import ImageOpenError, os_error_text

if TYPE_CHECKING:
    from ipc.executor import Executor


@register
class FileDriver(BlockDriver):
    format_name = "file"
    is_protocol = True
    thread_safe = True

    def __init__(self, filename: str, executor: "Executor", read_only: bool, create: bool = False) -> None:
        super().__init__(filename, executor, read_only)
        try:
            self.handle = executor.open(filename, writable=not read_only, create=create)
        except IsADirectoryError:
            raise ImageOpenError(f"Could not open '{filename}': Is a directory", errno=21) from None
        except OSError as exc:
            raise ImageOpenError(f"Could not open '{filename}': {os_error_text(exc)}",
                                 errno=exc.errno) from None
        self._closed = False
        self._size: int | None = None
        self.cache_unsafe = False

    def size(self) -> int:
        if self.read_only:  # nobody writes through a read-only node: stat once
            if self._size is None:
                self._size = self.executor.stat(self.handle).size
            return self._size
        return self.executor.stat(self.handle).size

    def allocated_size(self) -> int:
        return self.executor.stat(self.handle).allocated

    def read(self, offset: int, length: int) -> bytes:
        return self.executor.pread(self.handle, offset, length)

    def write(self, offset: int, data: bytes) -> None:
        self.check_writable()
        self.executor.pwrite(self.handle, offset, data)

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        self.check_writable()
        self.executor.write_zeroes(self.handle, offset, length, unmap)

    def discard(self, offset: int, length: int) -> None:
        self.check_writable()
        self.executor.discard(self.handle, offset, length)

    def truncate(self, size: int, prealloc: str = "off", shrink: bool = True) -> None:
        self.check_writable()
        self.executor.truncate(self.handle, size)
        if prealloc == "full":
            cur = 0
            while cur < size:
                n = min(1 << 20, size - cur)
                self.executor.pwrite(self.handle, cur, bytes(n))
                cur += n

    def flush(self) -> None:
        if not self.read_only and not self.cache_unsafe:  # cache=unsafe: flushes are no-ops, as in QEMU
            self.executor.fsync(self.handle)

    def block_status(self, offset: int, length: int) -> Extent:
        size = self.size()
        if offset >= size:
            return Extent(Status.ZERO | Status.OFFSET_VALID | Status.EOF, length, offset, self)
        ext = self.executor.extent(self.handle, offset, min(length, size - offset))
        flags = (Status.DATA if ext.data else Status.ZERO) | Status.OFFSET_VALID
        if offset + ext.length >= size:
            flags |= Status.EOF
        return Extent(flags, ext.length, offset, self)

    def reopen(self, read_only: bool) -> None:
        """Switch between read-only and read-write (QEMU's bdrv_reopen): a new handle replaces the old one.
        Raises ImageOpenError (e.g. no write permission), leaving the node as it was."""
        if read_only == self.read_only:
            return
        try:
            handle = self.executor.open(self.filename, writable=not read_only)
        except OSError as exc:
            raise ImageOpenError(f"Could not reopen '{self.filename}': {os_error_text(exc)}",
                                 errno=exc.errno) from None
        old, self.handle = self.handle, handle
        self.read_only = read_only
        self._size = None
        self.executor.close(old)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.executor.close(self.handle)
