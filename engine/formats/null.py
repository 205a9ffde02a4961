"""The ``null-co`` / ``null-aio`` drivers: a node of a given size that discards writes (QEMU's block/null.c).

Layer: engine.  Reads return zeros (QEMU leaves the buffer untouched unless ``read-zeroes`` is set; zeros
are the safe reading of "undefined").  ``latency-ns`` delays every request.  Used by tests and benchmarks
as a sink or source that costs no I/O.
"""
from __future__ import annotations

import time

from engine.driver import BlockDriver, Extent, Status

NULL_DEFAULT_SIZE = 1 << 30


class NullDriver(BlockDriver):
    format_name = "null-co"
    is_protocol = True
    thread_safe = True

    def __init__(self, filename: str, executor, read_only: bool, size: int = NULL_DEFAULT_SIZE,
                 read_zeroes: bool = False, latency_ns: int = 0, name: str = "null-co") -> None:
        super().__init__(filename, executor, read_only)
        self._size = size
        self.read_zeroes = read_zeroes
        self.latency_ns = latency_ns
        self.format_name = name  # type: ignore[misc]

    def _delay(self) -> None:
        if self.latency_ns:
            time.sleep(self.latency_ns / 1e9)

    def size(self) -> int:
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        self._delay()
        return bytes(length)

    def write(self, offset: int, data: bytes) -> None:
        self.check_writable()
        self._delay()

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        self.check_writable()
        self._delay()

    def flush(self) -> None:
        self._delay()

    def block_status(self, offset: int, length: int) -> Extent:
        st = Status.OFFSET_VALID | (Status.ZERO if self.read_zeroes else Status.DATA)
        return Extent(st, length, offset, self)

    def allocated_size(self) -> int:
        return 0

    def truncate(self, size: int, prealloc: str = "off", shrink: bool = False) -> None:
        self._size = size
