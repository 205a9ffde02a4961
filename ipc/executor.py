"""The executor interface: every byte the engine reads from or writes to a host file goes through it.

Layer: ipc (stdlib only).  Format drivers never touch file descriptors; they hold *handles* that an
executor hands out and ask it to move bytes.  Today ``workers.inproc.InProcessExecutor`` does the work in
the calling process; the worker pool of the next stage implements the same protocol with shared-memory
slots, so format code does not change.

Invariants: handles are small ints owned by the executor; ``pread`` returns exactly ``length`` bytes,
zero-filled past end of file; errors are raised as ``OSError`` with a real errno.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class FileStat:
    size: int
    allocated: int  # bytes actually allocated on the host (st_blocks * 512)


@dataclass(frozen=True, slots=True)
class HostExtent:
    """A run of a host file that is either data or a hole, as SEEK_DATA/SEEK_HOLE report it."""

    offset: int
    length: int
    data: bool


class Executor(Protocol):
    def open(self, path: str, writable: bool, create: bool = False) -> int:
        """Open ``path``; return a handle.  Raises OSError."""

    def close(self, handle: int) -> None: ...

    def pread(self, handle: int, offset: int, length: int) -> bytes:
        """Read exactly ``length`` bytes; the part past EOF reads as zeros.  Raises OSError."""

    def pwrite(self, handle: int, offset: int, data: bytes) -> None:
        """Write all of ``data`` at ``offset``.  Raises OSError."""

    def write_zeroes(self, handle: int, offset: int, length: int, unmap: bool) -> None:
        """Make the range read as zeros, punching a hole when ``unmap`` allows.  Raises OSError."""

    def discard(self, handle: int, offset: int, length: int) -> None:
        """Punch a hole if the host supports it; never fails for lack of support."""

    def truncate(self, handle: int, size: int) -> None: ...

    def fsync(self, handle: int) -> None: ...

    def stat(self, handle: int) -> FileStat: ...

    def extent(self, handle: int, offset: int, length: int) -> HostExtent:
        """The data-or-hole run that starts at ``offset`` (at most ``length`` long)."""

    def compress(self, codec: str, data: bytes, limit: int) -> bytes | None:
        """Compress one cluster with ``codec`` ('zlib' raw deflate or 'zstd'); None if it would not fit
        in ``limit`` bytes."""

    def decompress(self, codec: str, data: bytes, out_len: int) -> bytes:
        """Decompress until exactly ``out_len`` bytes came out; trailing input is ignored.
        Raises ValueError on a corrupt stream."""
