"""An in-process executor: does the executor's work in the caller's process with plain syscalls.

Layer: workers.  Used by the CLI for small runs and by unit tests; the worker pool implements the same
``ipc.executor.Executor`` protocol.
"""
from __future__ import annotations

import errno
import os

from ipc.executor import FileStat, HostExtent
from workers import codecs

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


def _punch_hole(fd: int, offset: int, length: int) -> bool:
    """Punch a hole with fallocate(2); False where the host cannot."""
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.fallocate
        fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        rc = fn(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
        return rc == 0
    except (OSError, AttributeError):
        return False


class InProcessExecutor:
    """Executor that runs every operation synchronously in this process."""

    def __init__(self) -> None:
        self._fds: dict[int, int] = {}
        self._next = 1

    def open(self, path: str, writable: bool, create: bool = False) -> int:
        flags = os.O_RDWR if writable else os.O_RDONLY
        if create:
            flags |= os.O_CREAT | os.O_TRUNC
        fd = os.open(path, flags | os.O_CLOEXEC, 0o644)
        h = self._next
        self._next += 1
        self._fds[h] = fd
        return h

    def close(self, handle: int) -> None:
        fd = self._fds.pop(handle, None)
        if fd is not None:
            os.close(fd)

    def close_all(self) -> None:
        for h in list(self._fds):
            self.close(h)

    def _fd(self, handle: int) -> int:
        try:
            return self._fds[handle]
        except KeyError:
            raise OSError(errno.EBADF, "Bad file descriptor") from None

    def pread(self, handle: int, offset: int, length: int) -> bytes:
        fd = self._fd(handle)
        out = os.pread(fd, length, offset)
        if len(out) < length:
            parts = [out]
            got = len(out)
            while got < length:
                chunk = os.pread(fd, length - got, offset + got)
                if not chunk:
                    break
                parts.append(chunk)
                got += len(chunk)
            out = b"".join(parts)
            if len(out) < length:
                out += bytes(length - len(out))
        return out

    def pwrite(self, handle: int, offset: int, data: bytes) -> None:
        fd = self._fd(handle)
        view = memoryview(data)
        while view:
            n = os.pwrite(fd, view, offset)
            view = view[n:]
            offset += n

    def write_zeroes(self, handle: int, offset: int, length: int, unmap: bool) -> None:
        fd = self._fd(handle)
        end = offset + length
        size = os.fstat(fd).st_size
        if unmap and end <= size and _punch_hole(fd, offset, length):
            return
        if offset >= size:
            # past EOF: extending the file reads as zeros already
            os.ftruncate(fd, end)
            return
        if end > size:
            os.ftruncate(fd, end)
            end = size
        chunk = 1 << 20
        zero = bytes(min(chunk, end - offset))
        pos = offset
        while pos < end:
            n = min(chunk, end - pos)
            self.pwrite(handle, pos, zero[:n])
            pos += n

    def discard(self, handle: int, offset: int, length: int) -> None:
        _punch_hole(self._fd(handle), offset, length)

    def truncate(self, handle: int, size: int) -> None:
        os.ftruncate(self._fd(handle), size)

    def fsync(self, handle: int) -> None:
        os.fsync(self._fd(handle))

    def stat(self, handle: int) -> FileStat:
        st = os.fstat(self._fd(handle))
        return FileStat(size=st.st_size, allocated=st.st_blocks * 512)

    def extent(self, handle: int, offset: int, length: int) -> HostExtent:
        fd = self._fd(handle)
        size = os.fstat(fd).st_size
        if offset >= size:
            return HostExtent(offset, length, data=False)
        try:
            data_at = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole up to EOF
                return HostExtent(offset, length, data=False)
            return HostExtent(offset, length, data=True)
        if data_at > offset:
            return HostExtent(offset, min(length, data_at - offset), data=False)
        hole_at = os.lseek(fd, offset, os.SEEK_HOLE)
        return HostExtent(offset, min(length, hole_at - offset), data=True)

    def compress(self, codec: str, data: bytes, limit: int) -> bytes | None:
        return codecs.compress(codec, data, limit)

    def decompress(self, codec: str, data: bytes, out_len: int) -> bytes:
        return codecs.decompress(codec, data, out_len)
