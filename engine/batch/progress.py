"""The batch's one progress display: items done, bytes, rate and ETA overall, a bar per running item.

Layer: engine.batch.  On a terminal it is a stack of tqdm bars (the overall one on top, one per running
item below it, removed when the item ends); otherwise a status line on stderr every ``interval`` seconds
and one line per finished item, so logs of unattended runs show progress too.  Thread-safe: items
report from their own threads (local runs) or from the Dask progress queue.
"""
from __future__ import annotations

import sys
import threading
import time
from typing import Any


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def _eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class BatchProgress:
    def __init__(self, sizes: dict[str, int], enabled: bool, interval: float = 2.0,
                 stream: Any = None) -> None:
        """``sizes``: each item's virtual size (what counts as its bytes, whether it runs or skips)."""
        self.sizes = sizes
        nitems = self.nitems = len(sizes)
        self.total = max(1, sum(sizes.values()))
        self.enabled = enabled
        self.interval = interval
        self.stream = stream or sys.stderr
        self.lock = threading.Lock()
        self.running: dict[str, tuple[int, int]] = {}
        self.finished_bytes = 0
        self.items_done = 0
        self.t0 = time.monotonic()
        self.last_line = 0.0
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.bars: dict[str, Any] = {}
        self.main_bar = None
        if self.tty:
            from tqdm import tqdm

            self._tqdm = tqdm
            self.main_bar = tqdm(total=self.total, unit="B", unit_scale=True, unit_divisor=1024,
                                 desc=f"batch 0/{nitems} items", position=0, dynamic_ncols=True,
                                 file=self.stream)

    @property
    def done_bytes(self) -> int:
        return self.finished_bytes + sum(d for d, _ in self.running.values())

    def update(self, name: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        with self.lock:
            self.running[name] = (min(done, total), total)
            if self.tty:
                bar = self.bars.get(name)
                if bar is None:
                    used = {b.pos for b in self.bars.values()}
                    line = next(i for i in range(1, len(used) + 2) if i not in used and -i not in used)
                    bar = self.bars[name] = self._tqdm(total=max(1, total), unit="B", unit_scale=True,
                                                       unit_divisor=1024, desc=name, leave=False,
                                                       position=line, dynamic_ncols=True,
                                                       file=self.stream)
                bar.n = min(done, total)
                bar.refresh()
                self.main_bar.n = min(self.done_bytes, self.total)
                self.main_bar.refresh()
            else:
                now = time.monotonic()
                if now - self.last_line >= self.interval:
                    self.last_line = now
                    self._status_line(now)

    def _status_line(self, now: float) -> None:
        elapsed = max(now - self.t0, 1e-6)
        done = self.done_bytes
        rate = done / elapsed
        eta = (self.total - done) / rate if rate > 0 else 0
        running = ", ".join(f"{n} {100 * d // max(1, t)}%" for n, (d, t) in sorted(self.running.items()))
        self.stream.write(f"batch: {self.items_done}/{self.nitems} items, {_human(done)} of "
                          f"{_human(self.total)}, {_human(rate)}/s, ETA {_eta(eta)}"
                          + (f" | running: {running}" if running else "") + "\n")
        self.stream.flush()

    def item_finished(self, result: dict[str, Any]) -> None:
        with self.lock:
            name = result["name"]
            self.running.pop(name, None)
            self.running.pop(name + " (verify)", None)
            self.items_done += 1
            self.finished_bytes += self.sizes.get(name, 0)
            if not self.enabled:
                return
            for key in (name, name + " (verify)"):
                bar = self.bars.pop(key, None)
                if bar is not None:
                    bar.close()
            status = result["status"]
            line = f"{name}: {status}" + (f": {result['error']}" if result.get("error") else "")
            if self.tty:
                self.main_bar.set_description(f"batch {self.items_done}/{self.nitems} items")
                self.main_bar.n = min(self.done_bytes, self.total)
                self.main_bar.write(line, file=self.stream)
                self.main_bar.refresh()
            else:
                self.stream.write(line + "\n")
                self.stream.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        with self.lock:
            for bar in self.bars.values():
                bar.close()
            self.bars.clear()
            if self.main_bar is not None:
                self.main_bar.close()
            else:
                self._status_line(time.monotonic())
