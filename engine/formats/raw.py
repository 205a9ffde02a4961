"""The ``raw`` format: guest offset == host offset; the virtual size is the file size rounded up to 512.

Layer: engine.  Probes with score 1, so it is chosen only when no other format claims a file.
"""
from __future__ import annotations

from engine.driver import BlockDriver, Extent, Status, register
from engine.units import round_up


@register
class RawDriver(BlockDriver):
    format_name = "raw"
    inline_reads = True
    thread_safe = True

    @classmethod
    def probe(cls, head: bytes, filename: str) -> int:
        return 1

    def size(self) -> int:
        assert self.file is not None
        return round_up(self.file.size(), 512)

    def read(self, offset: int, length: int) -> bytes:
        assert self.file is not None
        return self.file.read(offset, length)

    def write(self, offset: int, data: bytes) -> None:
        self.check_writable()
        assert self.file is not None
        self.file.write(offset, data)

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        self.check_writable()
        assert self.file is not None
        self.file.write_zeroes(offset, length, unmap)

    def discard(self, offset: int, length: int) -> None:
        self.check_writable()
        assert self.file is not None
        self.file.discard(offset, length)

    def block_status(self, offset: int, length: int) -> Extent:
        assert self.file is not None
        return Extent(Status.RAW | Status.OFFSET_VALID, length, offset, self.file)

    def truncate(self, size: int, prealloc: str = "off", shrink: bool = False) -> None:
        self.check_writable()
        assert self.file is not None
        self.file.truncate(size, prealloc)

    @classmethod
    def create(cls, filename: str, size: int, executor, options: dict) -> None:
        from engine.formats.file import FileDriver

        prealloc = options.get("preallocation", "off")
        f = FileDriver(filename, executor, read_only=False, create=True)
        try:
            f.truncate(size, prealloc)
            if prealloc == "falloc":
                f.truncate(size, "full")
        finally:
            f.close()
