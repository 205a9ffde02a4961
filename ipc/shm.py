"""Shared-memory slots: one ``memfd`` segment per pool, cut into fixed-size slots handed out by lease.

Layer: ipc (stdlib).  Why memfd and not ``multiprocessing.shared_memory``: nothing to unlink, no resource
tracker to unlink it behind our back, and the memory is freed when the last fd closes, even after a crash.
Workers attach by reopening ``/proc/<owner pid>/fd/<fd>`` (see ``attach``).

Invariants: a slot is leased to at most one request at a time; ``release`` of a slot not leased raises.
"""
from __future__ import annotations

import mmap
import os
import threading


class SlotPool:
    """The coordinator's side: owns the segment and the leases."""

    def __init__(self, nslots: int, slot_size: int) -> None:
        self.nslots = nslots
        self.slot_size = slot_size
        self.fd = os.memfd_create("parablock-slots", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, nslots * slot_size)
        self.map = mmap.mmap(self.fd, nslots * slot_size)
        self.view = memoryview(self.map)
        self._free = list(range(nslots - 1, -1, -1))
        self._leased: set[int] = set()
        self._cond = threading.Condition()
        self.owner_pid = os.getpid()

    def lease(self, timeout: float | None = None) -> int:
        """Take a free slot, waiting up to ``timeout`` seconds.  Raises TimeoutError."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._free, timeout):
                raise TimeoutError("no shared-memory slot became free in time")
            i = self._free.pop()
            self._leased.add(i)
            return i

    def release(self, i: int) -> None:
        with self._cond:
            if i not in self._leased:
                raise ValueError(f"slot {i} is not leased")
            self._leased.remove(i)
            self._free.append(i)
            self._cond.notify()

    def slot(self, i: int) -> memoryview:
        return self.view[i * self.slot_size:(i + 1) * self.slot_size]

    @property
    def leased(self) -> int:
        return len(self._leased)

    def close(self) -> None:
        if self.fd < 0:
            return
        self.view.release()
        self.map.close()
        os.close(self.fd)
        self.fd = -1


class SlotView:
    """A worker's side: the same segment, mapped from the owner's fd."""

    def __init__(self, owner_pid: int, fd: int, nslots: int, slot_size: int) -> None:
        self.slot_size = slot_size
        own = os.open(f"/proc/{owner_pid}/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
        try:
            self.map = mmap.mmap(own, nslots * slot_size)
        finally:
            os.close(own)
        self.view = memoryview(self.map)

    def slot(self, i: int) -> memoryview:
        return self.view[i * self.slot_size:(i + 1) * self.slot_size]

    def close(self) -> None:
        self.view.release()
        self.map.close()
