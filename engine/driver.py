"""The BlockDriver protocol, block-status flags and the driver registry with format probing.

Layer: engine.  A node is a driver instance: a protocol node (``file``) moves bytes through the executor;
a format node (``raw``, ``qcow2``) maps guest offsets onto its ``file`` child and may have a ``backing``
child.  The control half (open, create, info, check, snapshots) and the I/O half (read, write,
write_zeroes, discard, flush, block_status) live on the same class, as in QEMU's BlockDriver.

Invariants: ``read`` returns exactly the bytes asked for; requests never extend past ``size()`` (the
caller checks); block_status reports at least one byte.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from engine.errors import ImageOpenError, NotSupported, ReadOnlyError

if TYPE_CHECKING:
    from ipc.executor import Executor


class Status(int):
    """QEMU's BDRV_BLOCK_* flags: plain ints (block status runs once per extent of every copy, and
    enum.Flag arithmetic cost more than the rest of the walk together); ``Status(0)`` is "nothing"."""

    __slots__ = ()

    DATA = 0x01
    ZERO = 0x02
    OFFSET_VALID = 0x04
    RAW = 0x08
    ALLOCATED = 0x10
    EOF = 0x20
    RECURSE = 0x40


@dataclass(frozen=True, slots=True)
class Extent:
    """Block status of ``length`` bytes: flags, host offset (when OFFSET_VALID) and the node it is in."""

    status: Status
    length: int
    offset: int = 0
    node: "BlockDriver | None" = None


class BlockDriver:
    """Base class of every driver.  Subclasses set ``format_name`` and override what they support."""

    format_name: ClassVar[str] = ""
    is_protocol: ClassVar[bool] = False
    supports_backing: ClassVar[bool] = False
    #: passes every request to its one child (``file``); block status and chain walks look through it
    is_filter: ClassVar[bool] = False
    #: requests may run concurrently from several threads (no metadata state of its own)
    thread_safe: ClassVar[bool] = False
    #: small reads and block status of this driver never block for long (no sleeps, no waits on other
    #: threads, data read with a plain pread): the daemon may run them on its event loop instead of
    #: paying a helper-thread round trip per request (``BlockNode.read``, the NBD server)
    inline_reads: ClassVar[bool] = False
    #: False where QEMU's driver has no block status (vhdx): ``map`` then shows what qemu-img shows,
    #: while convert still uses the real extents
    qemu_block_status: ClassVar[bool] = True

    def __init__(self, filename: str, executor: "Executor", read_only: bool) -> None:
        self.filename = filename
        self.executor = executor
        self.read_only = read_only
        self.file: BlockDriver | None = None
        self.backing: BlockDriver | None = None
        self.node_name = ""
        #: a node of the daemon's graph: its parents do not close it (the graph does)
        self.in_graph = False

    # --- probing and creation -------------------------------------------------------------------
    @classmethod
    def probe(cls, head: bytes, filename: str) -> int:
        """Score 0..100 for how likely ``head`` (the first bytes of the file) is this format."""
        return 0

    def open(self, options: dict[str, Any]) -> None:
        """Read the format's metadata from ``self.file``.  Raises ImageOpenError."""

    # --- I/O --------------------------------------------------------------------------------------
    def size(self) -> int:
        raise NotImplementedError

    def read(self, offset: int, length: int) -> bytes:
        raise NotImplementedError

    def write(self, offset: int, data: bytes) -> None:
        raise NotSupported(f"Driver '{self.format_name}' does not support writes")

    def write_compressed(self, offset: int, data: bytes) -> None:
        raise NotSupported("Compression is not supported for this drive")

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        self.write(offset, bytes(length))

    def discard(self, offset: int, length: int) -> None:
        """Discard is advisory: drivers that cannot discard do nothing."""

    def flush(self) -> None:
        if self.file is not None:
            self.file.flush()

    def block_status(self, offset: int, length: int) -> Extent:
        """The driver's own view of [offset, offset+length): what io.c's callers refine further."""
        return Extent(Status.DATA | Status.OFFSET_VALID, length, offset, self)

    def truncate(self, size: int, prealloc: str = "off", shrink: bool = False) -> None:
        raise NotSupported(f"Image format '{self.format_name}' does not support resizing")

    def close(self) -> None:
        for child in (self.backing, self.file):
            if child is not None and not child.in_graph:
                child.close()
        self.backing = None
        self.file = None

    def debug_event(self, name: str) -> None:
        """QEMU's BLKDBG_EVENT: a format announces a point of interest on its file child; only the
        blkdebug filter acts on it."""

    # --- control ----------------------------------------------------------------------------------
    def info_specific(self) -> dict[str, Any] | None:
        return None

    def cluster_size(self) -> int | None:
        return None

    def allocated_size(self) -> int:
        return self.file.allocated_size() if self.file is not None else 0

    def check_writable(self) -> None:
        if self.read_only:
            raise ReadOnlyError("Block node is read-only")

    @property
    def backing_filename(self) -> str | None:
        return None

    @property
    def backing_format(self) -> str | None:
        return None

    def is_dirty(self) -> bool:
        return False


def leftover_create_options(opts: dict[str, Any], size: int | None) -> None:
    """The end of a driver's ``create`` option parsing, with qemu-img's errors: ``opts`` holds what the
    driver did not take (``cache`` is the command's, not the format's), and a size is required."""
    from engine.errors import InvalidArgument

    opts.pop("cache", None)
    if opts:
        raise InvalidArgument(f"Invalid parameter '{next(iter(opts))}'")
    if size is None:
        raise InvalidArgument("Image creation needs a size parameter")


def read_mapped(file: BlockDriver, host_of: Any, offset: int, length: int) -> bytes:
    """Read [offset, offset+length) of a format whose blocks map to host offsets: ``host_of(pos)`` gives
    (host offset, or None for a block that reads as zeros, and the bytes left in that block)."""
    out = bytearray(length)
    pos = 0
    while pos < length:
        host, left = host_of(offset + pos)
        n = min(left, length - pos)
        if host is not None:
            out[pos:pos + n] = file.read(host, n)
        pos += n
    return bytes(out)


_REGISTRY: dict[str, type[BlockDriver]] = {}


def register(cls: type[BlockDriver]) -> type[BlockDriver]:
    _REGISTRY[cls.format_name] = cls
    return cls


def driver_class(name: str) -> type[BlockDriver]:
    if name not in _REGISTRY:
        from engine.formats import load

        load(name)
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ImageOpenError(f"Unknown driver '{name}'") from None


def format_names() -> list[str]:
    from engine.formats import load_all

    load_all()

    return sorted(n for n, c in _REGISTRY.items() if not c.is_protocol)


def probe_format(head: bytes, filename: str) -> str:
    """Pick the format whose probe scores highest; raw (score 1) when nothing else claims the file."""
    from engine.formats import load_all

    load_all()
    best, best_score = "raw", 0
    for name, cls in sorted(_REGISTRY.items()):  # a fixed order, whatever was loaded first
        if cls.is_protocol:
            continue
        score = cls.probe(head, filename)
        if score > best_score:
            best, best_score = name, score
    return best
