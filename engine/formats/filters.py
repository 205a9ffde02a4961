"""Filter drivers: nodes that pass every request to their one child (``file``), adding a behaviour in the
request pipeline in front of them (``throttle``: its BlockNode carries the throttle group) or in the
graph (the job filters ``commit_top`` / ``mirror_top``).

Layer: engine.  Block status, allocation and chain walks look through filters (engine.block).
"""
from __future__ import annotations

from engine.driver import BlockDriver, Extent, Status


class FilterDriver(BlockDriver):
    format_name = "filter"
    is_filter = True

    def __init__(self, child: BlockDriver, name: str, read_only: bool | None = None) -> None:
        super().__init__(child.filename, child.executor, child.read_only if read_only is None else read_only)
        self.file = child
        self.format_name = name  # type: ignore[misc]

    @property
    def thread_safe(self) -> bool:  # type: ignore[override]
        f = self.file
        return f is not None and f.thread_safe and (f.backing is None or f.backing.thread_safe)

    def _child(self) -> BlockDriver:
        assert self.file is not None
        return self.file

    def size(self) -> int:
        return self._child().size()

    def read(self, offset: int, length: int) -> bytes:
        return self._child().read(offset, length)

    def write(self, offset: int, data: bytes) -> None:
        self.check_writable()
        self._child().write(offset, data)

    def write_compressed(self, offset: int, data: bytes) -> None:
        self._child().write_compressed(offset, data)

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        self.check_writable()
        self._child().write_zeroes(offset, length, unmap)

    def discard(self, offset: int, length: int) -> None:
        self._child().discard(offset, length)

    def flush(self) -> None:
        self._child().flush()

    def block_status(self, offset: int, length: int) -> Extent:
        return Extent(Status.RAW | Status.OFFSET_VALID, length, offset, self._child())

    def truncate(self, size: int, prealloc: str = "off", shrink: bool = False) -> None:
        self._child().truncate(size, prealloc, shrink)

    def allocated_size(self) -> int:
        return self._child().allocated_size()

    def cluster_size(self) -> int | None:
        return self._child().cluster_size()
