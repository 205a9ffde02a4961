"""The batch progress display: on a terminal an overall bar and one bar per running item (lines reused
as items end); elsewhere periodic status lines and one line per finished item."""
from __future__ import annotations

import io

from engine.batch.progress import BatchProgress


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_bars_reuse_lines():
    out = _Tty()
    p = BatchProgress({"a": 100, "b": 100, "c": 100}, True, stream=out)
    p.update("a", 10, 100)
    p.update("b", 20, 100)
    assert sorted(bar.pos for bar in p.bars.values()) in ([1, 2], [-2, -1])
    p.item_finished({"name": "a", "status": "done"})
    p.update("c", 5, 100)  # takes the line "a" left
    assert sorted(abs(bar.pos) for bar in p.bars.values()) == [1, 2]
    p.item_finished({"name": "b", "status": "failed", "error": "boom"})
    p.item_finished({"name": "c", "status": "skipped"})
    p.close()
    text = out.getvalue()
    assert "batch 3/3 items" in text and "b: failed: boom" in text and "a: done" in text


def test_plain_status_lines():
    out = io.StringIO()
    p = BatchProgress({"a": 1 << 20, "b": 1 << 20}, True, interval=0.0, stream=out)
    p.update("a", 512 << 10, 1 << 20)
    p.item_finished({"name": "a", "status": "done"})
    p.item_finished({"name": "b", "status": "skipped"})
    p.close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("batch: 0/2 items, 512.0 KiB of 2.0 MiB") and "running: a 50%" in lines[0]
    assert "a: done" in lines and "b: skipped" in lines
    assert lines[-1].startswith("batch: 2/2 items, 2.0 MiB of 2.0 MiB")


def test_disabled_prints_nothing():
    out = _Tty()
    p = BatchProgress({"a": 1}, False, stream=out)
    p.update("a", 1, 1)
    p.item_finished({"name": "a", "status": "done"})
    p.close()
    assert out.getvalue() == ""
