"""Progress display for the CLI, in one place: qemu-img's ``-p`` meter (util/qemu-progress.c, with its
single-precision arithmetic) when output is not a terminal, a tqdm bar with rate and ETA when it is.

Layer: engine.cli.  The engine reports ``(done, total)``; only this module renders it.
"""
from __future__ import annotations

import struct
import sys
from typing import Any


def f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


class QemuMeter:
    """qemu-img's meter: prints ``    (NN.NN/100%)`` with a carriage return when it moved by ``min_skip``."""

    def __init__(self, enabled: bool, min_skip: float = 2.0) -> None:
        self.enabled = enabled
        self.min_skip = f32(min_skip)
        self.current = 0.0
        self.last_print = 0.0

    def print(self, delta: float, maximum: int = 100) -> None:
        if maximum == 0:
            current = f32(delta)
        else:
            current = f32(self.current + f32(f32(f32(delta) / 100) * maximum))
        if current > 100:
            current = 100.0
        self.current = current
        if (current > f32(self.last_print + self.min_skip) or current < f32(self.last_print - self.min_skip)
                or current == 0 or current == 100):
            self.last_print = self.current
            if self.enabled:
                sys.stdout.write("    (%3.2f/100%%)\r" % self.current)
                sys.stdout.flush()

    def step(self, chunk: int, base: int) -> None:
        self.print(f32(f32(f32(float(chunk)) / f32(float(base))) * 100), 100)

    def end(self) -> None:
        if self.enabled:
            sys.stdout.write("\n")
            sys.stdout.flush()


class ByteProgress:
    """``-p`` for long byte-counting operations (convert, commit, rebase): called with (done, total)."""

    def __init__(self, total: int, enabled: bool, desc: str, min_skip: float = 1.0) -> None:
        self.total = max(1, total)
        self.enabled = enabled
        self.done = 0
        self.bar = None
        self.meter = None
        if not enabled:
            return
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                            dynamic_ncols=True)
        else:
            self.meter = QemuMeter(True, min_skip)
            self.meter.print(0, 100)

    def __call__(self, done: int, total: int | None = None) -> None:
        if not self.enabled:
            return
        delta, self.done = done - self.done, done
        if self.bar is not None:
            self.bar.update(delta)
        elif self.meter is not None and delta:
            self.meter.step(delta, self.total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.meter is not None:
            if self.done < self.total:
                self.meter.step(self.total - self.done, self.total)
            self.meter.end()


class JobBars:
    """Live display of block jobs, one tqdm bar per job (``parablock jobs --watch``, ``parablock job -p``).

    ``update(infos)`` takes query-block-jobs entries (``device`` = job id, ``type``, ``status``,
    ``offset``, ``len``, ``speed``): a new id gets a bar (its current offset is the bar's start, so the
    rate and ETA count only what is copied while watching), a known one moves (backwards too, as a
    mirror's dirty data can), and an id no longer listed loses its bar.  ``note(text)`` prints a line
    above the bars.  Status and type are in the bar's description; a speed limit is its postfix.
    """

    def __init__(self, file=None, leave: bool = False, mininterval: float = 0.1) -> None:
        self.file = file if file is not None else sys.stderr
        self.leave = leave
        self.mininterval = mininterval
        self.bars: dict[str, Any] = {}

    @staticmethod
    def describe(info: dict) -> str:
        return f"{info.get('device', '?')} [{info.get('type', '?')} {info.get('status', '?')}]"

    def _new(self, info: dict):
        from tqdm import tqdm

        total = int(info.get("len") or 0) or None
        return tqdm(total=total, initial=int(info.get("offset") or 0), unit="B", unit_scale=True,
                    unit_divisor=1024, desc=self.describe(info), file=self.file, leave=self.leave,
                    dynamic_ncols=True, mininterval=self.mininterval)

    def update(self, infos: list[dict], prune: bool = True) -> None:
        """Show ``infos``; with ``prune``, jobs not in ``infos`` lose their bars."""
        seen = set()
        for info in infos:
            jid = str(info.get("device", "?"))
            seen.add(jid)
            bar = self.bars.get(jid)
            if bar is None:
                bar = self.bars[jid] = self._new(info)
            total = int(info.get("len") or 0) or None
            if bar.total != total:
                bar.total = total
            offset = int(info.get("offset") or 0)
            bar.set_description_str(self.describe(info), refresh=False)
            speed = int(info.get("speed") or 0)
            if speed:
                from tqdm import tqdm

                bar.set_postfix_str(f"limit {tqdm.format_sizeof(speed, 'B/s', 1024)}", refresh=False)
            else:
                bar.set_postfix_str("", refresh=False)
            if offset >= bar.n:
                bar.update(offset - bar.n)
            else:
                bar.n = offset
                bar.refresh()
        if prune:
            for jid in [j for j in self.bars if j not in seen]:
                self.remove(jid)

    def remove(self, jid: str) -> None:
        bar = self.bars.pop(jid, None)
        if bar is not None:
            bar.close()

    def note(self, text: str) -> None:
        from tqdm import tqdm

        tqdm.write(text, file=self.file)

    def close(self) -> None:
        for jid in list(self.bars):
            self.remove(jid)
