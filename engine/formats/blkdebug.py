"""The ``blkdebug`` filter: fault injection as QEMU's block/blkdebug.c defines it.

Layer: engine.  It sits between a format and its file (``file: {driver: blkdebug, image: {...}}``).
Formats announce points of interest with ``BlockDriver.debug_event(name)`` on their file child (QEMU's
BLKDBG_EVENT: ``write_aio``, ``l2_update``, ``refblock_update``, ``cluster_alloc``, ``flush_to_disk``, ...)
and blkdebug itself announces ``pwritev``/``pwritev_zero``/``flush_to_disk`` for requests reaching it.

Rules, as in QEMU:
* ``set-state {event, state?, new_state}``: when ``event`` fires while the state is ``state`` (any if
  absent), the state becomes ``new_state`` (states start at 1).
* ``inject-error {event, state?, iotype?, errno=EIO, sector=-1, once=false, immediately=false}``: when
  ``event`` fires in a matching state the rule becomes active; from then on the next request of a
  matching type (read, write, write-zeroes, discard, flush, block-status; default read+write+flush...
  see IOTYPES) that overlaps ``sector`` (any when -1) fails with ``errno``.  ``once`` removes the rule
  after it has failed a request.  ``immediately`` only changes when QEMU delivers the error; a
  synchronous engine delivers it at once either way.
Event ``none`` never fires, so a rule with it stays inactive.
"""
from __future__ import annotations

import errno as _errno
import os
import threading
from dataclasses import dataclass, field
from typing import Any

from engine.driver import BlockDriver, Extent, Status
from engine.errors import InvalidArgument

#: BlkdebugIOType; QEMU's default mask when ``iotype`` is absent is read|write|write-zeroes|discard|flush
IOTYPES = ("read", "write", "write-zeroes", "discard", "flush", "block-status")
DEFAULT_IOTYPES = frozenset({"read", "write", "write-zeroes", "discard", "flush"})


@dataclass
class Rule:
    event: str
    state: int = 0                 # 0: any state
    iotypes: frozenset = DEFAULT_IOTYPES
    errno: int = _errno.EIO
    sector: int = -1
    once: bool = False
    new_state: int | None = None   # set-state rules
    active: bool = field(default=False)


class BlkdebugDriver(BlockDriver):
    format_name = "blkdebug"
    is_filter = True

    def __init__(self, child: BlockDriver, options: dict[str, Any]) -> None:
        super().__init__(child.filename, child.executor, child.read_only)
        self.file = child
        self.state = 1
        self.lock = threading.Lock()
        self.errors: list[Rule] = []
        self.set_states: list[Rule] = []
        for r in options.get("inject-error") or []:
            it = r.get("iotype")
            self.errors.append(Rule(event=r["event"], state=r.get("state", 0),
                                    iotypes=frozenset([it]) if it else DEFAULT_IOTYPES,
                                    errno=r.get("errno", _errno.EIO), sector=r.get("sector", -1),
                                    once=bool(r.get("once", False))))
        for r in options.get("set-state") or []:
            self.set_states.append(Rule(event=r["event"], state=r.get("state", 0), new_state=r["new_state"]))
        align = options.get("align", 0)
        if align and align & (align - 1):
            raise InvalidArgument("Cannot meet constraints with align 3" if align == 3 else
                                  f"Cannot meet constraints with align {align}")

    @property
    def thread_safe(self) -> bool:  # type: ignore[override]
        f = self.file
        return f is not None and f.thread_safe

    # ------------------------------------------------------------------ rules
    def debug_event(self, name: str) -> None:
        """BLKDBG_EVENT on this node: activate inject-error rules, then apply set-state rules."""
        with self.lock:
            for rule in self.errors:
                if rule.event == name and rule.state in (0, self.state):
                    rule.active = True
            new = None
            for rule in self.set_states:
                if rule.event == name and rule.state in (0, self.state):
                    new = rule.new_state
            if new is not None:
                self.state = new

    def _check(self, iotype: str, offset: int, length: int) -> None:
        with self.lock:
            for rule in self.errors:
                if not rule.active or iotype not in rule.iotypes:
                    continue
                if rule.sector >= 0:
                    lo = rule.sector * 512
                    if not (offset < lo + 512 and lo < offset + max(length, 1)):
                        continue
                if rule.once:
                    self.errors.remove(rule)
                raise OSError(rule.errno, os.strerror(rule.errno))

    def _child(self) -> BlockDriver:
        assert self.file is not None
        return self.file

    # ------------------------------------------------------------------ I/O
    def size(self) -> int:
        return self._child().size()

    def read(self, offset: int, length: int) -> bytes:
        self._check("read", offset, length)
        return self._child().read(offset, length)

    def write(self, offset: int, data: bytes) -> None:
        self.check_writable()
        self.debug_event("pwritev")
        self._check("write", offset, len(data))
        self._child().write(offset, data)
        self.debug_event("pwritev_done")

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        self.check_writable()
        self.debug_event("pwritev_zero")
        self._check("write-zeroes", offset, length)
        self._child().write_zeroes(offset, length, unmap)

    def discard(self, offset: int, length: int) -> None:
        self._check("discard", offset, length)
        self._child().discard(offset, length)

    def flush(self) -> None:
        self.debug_event("flush_to_disk")
        self._check("flush", 0, 0)
        self._child().flush()

    def block_status(self, offset: int, length: int) -> Extent:
        self._check("block-status", offset, length)
        return Extent(Status.RAW | Status.OFFSET_VALID, length, offset, self._child())

    def truncate(self, size: int, prealloc: str = "off", shrink: bool = False) -> None:
        self._child().truncate(size, prealloc, shrink)

    def allocated_size(self) -> int:
        return self._child().allocated_size()

    def reopen(self, read_only: bool) -> None:
        child = self._child()
        if hasattr(child, "reopen"):
            child.reopen(read_only)
        self.read_only = read_only
