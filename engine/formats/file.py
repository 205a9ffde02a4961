"""The ``file`` protocol driver: a host file, every byte moved by the executor.

Layer: engine.  Reads past EOF return zeros (formats rely on it); block status comes from
SEEK_DATA/SEEK_HOLE through the executor.
"""
from __future__ import annotations

import fcntl
import os
import struct
from typing import TYPE_CHECKING

from engine.driver import BlockDriver, Extent, Status, register
from engine.errors import BlockError, ImageOpenError, os_error_text

if TYPE_CHECKING:
    from ipc.executor import Executor


# QEMU's image locking (block/file-posix.c): open-file-description locks on single bytes.  A node holding
# permission bit i read-locks byte 100+i; a node not sharing permission i read-locks byte 200+i.  Before
# taking them, a conflict is any lock another description holds on 200+i for a permission we want, or on
# 100+i for a permission we do not share.  qemu-img, qemu-io and qemu-storage-daemon honour the same bytes.
PERM_CONSISTENT_READ, PERM_WRITE, PERM_WRITE_UNCHANGED, PERM_RESIZE = 1, 2, 4, 8
PERM_ALL = 15
_PERM_NAMES = ("consistent read", "write", "write unchanged", "resize")
_LOCK_PERM_BASE, _LOCK_SHARED_BASE = 100, 200
_FLOCK = "hhqqi4x"


def _lock_byte(fd: int, cmd: int, ltype: int, offset: int) -> int:
    res = fcntl.fcntl(fd, cmd, struct.pack(_FLOCK, ltype, os.SEEK_SET, offset, 1, 0))
    return struct.unpack(_FLOCK, res)[0]


def perms_for(read_only: bool, force_share: bool = False) -> tuple[int, int]:
    """(permissions taken, permissions shared) of a file under a format node, as QEMU derives them."""
    if read_only:
        return PERM_CONSISTENT_READ, PERM_ALL if force_share else PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED
    return PERM_ALL, PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED


@register
class FileDriver(BlockDriver):
    format_name = "file"
    inline_reads = True
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
        self._locks: tuple[int, int] | None = None
        self.locking = False

    def size(self) -> int:
        if self.read_only:  # nobody writes through a read-only node: stat once
            if self._size is None:
                self._size = self.executor.stat(self.handle).size
            return self._size
        return self.executor.stat(self.handle).size

    def allocated_size(self) -> int:
        return self.executor.stat(self.handle).allocated

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or offset + length > (1 << 63) - 1:  # a corrupt table pointing nowhere
            raise BlockError(f"Invalid read offset {offset:#x}", errno=22)
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

    def _raw_fd(self) -> int:
        local = getattr(self.executor, "local", self.executor)
        return local._fd(self.handle)

    def _unlock(self, handle: int) -> None:
        local = getattr(self.executor, "local", self.executor)
        fd = local._fd(handle)
        for i in range(len(_PERM_NAMES)):
            for base in (_LOCK_PERM_BASE, _LOCK_SHARED_BASE):
                _lock_byte(fd, fcntl.F_OFD_SETLK, fcntl.F_UNLCK, base + i)
        self._locks = None

    def unlock(self) -> None:
        if self._locks is not None and not self._closed:
            self._unlock(self.handle)

    def lock(self, perm: int, shared: int) -> None:
        """Take QEMU's image locks for ``perm``/``shared`` on this file (locking=on/auto).  Raises
        BlockError("Failed to get \"write\" lock") and the like when another process holds a conflicting
        lock; nothing is locked then."""
        fd = self._raw_fd()
        for i, name in enumerate(_PERM_NAMES):
            bit = 1 << i
            if perm & bit and _lock_byte(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, _LOCK_SHARED_BASE + i) \
                    != fcntl.F_UNLCK:
                raise BlockError(f'Failed to get "{name}" lock')
        for i, name in enumerate(_PERM_NAMES):
            bit = 1 << i
            if not shared & bit and _lock_byte(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, _LOCK_PERM_BASE + i) \
                    != fcntl.F_UNLCK:
                raise BlockError(f'Failed to get shared "{name}" lock')
        for i in range(len(_PERM_NAMES)):
            bit = 1 << i
            for base, held in ((_LOCK_PERM_BASE, perm & bit), (_LOCK_SHARED_BASE, not shared & bit)):
                _lock_byte(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK if held else fcntl.F_UNLCK, base + i)
        self._locks = (perm, shared)

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
        if self._locks is not None:
            old_locks = self._locks
            self._unlock(old)  # our own old locks must not count as another user's
            try:
                self.lock(*perms_for(read_only))
            except BlockError:
                self.handle = old
                self.read_only = not read_only
                self.executor.close(handle)
                self.lock(*old_locks)
                raise
        self.executor.close(old)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.executor.close(self.handle)
