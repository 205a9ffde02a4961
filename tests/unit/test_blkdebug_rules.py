"""blkdebug's rule semantics on a plain file, without a daemon: sector ranges, iotypes, once, states."""
from __future__ import annotations

import errno

import pytest

from engine.formats.blkdebug import BlkdebugDriver
from engine.formats.file import FileDriver
from workers.inproc import InProcessExecutor


@pytest.fixture
def dbg(tmp_path):
    path = tmp_path / "f.raw"
    path.write_bytes(bytes(1 << 20))
    ex = InProcessExecutor()
    made = []

    def make(rules: dict) -> BlkdebugDriver:
        d = BlkdebugDriver(FileDriver(str(path), ex, read_only=False), rules)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


def test_sector_range_and_iotype(dbg):
    d = dbg({"inject-error": [{"event": "pwritev", "sector": 8, "iotype": "write", "errno": errno.ENOSPC}]})
    d.write(0, b"a" * 4096)            # sectors 0-7: armed by this write's own event, but no overlap
    with pytest.raises(OSError) as ei:
        d.write(4096, b"b" * 512)       # sector 8
    assert ei.value.errno == errno.ENOSPC
    d.write(8192, b"c" * 512)           # sector 16: still fine
    assert d.read(4096, 512) == bytes(512)  # reads are not in the rule's iotype
    with pytest.raises(OSError):
        d.write(0, b"d" * 8192)         # overlaps sector 8 again: not once, so it keeps failing


def test_once_and_states(dbg):
    d = dbg({"set-state": [{"event": "flush_to_disk", "state": 1, "new_state": 2}],
             "inject-error": [{"event": "pwritev", "state": 2, "errno": errno.EIO, "once": True}]})
    d.write(0, b"x" * 512)              # state 1: the rule is not armed
    d.flush()                           # -> state 2
    assert d.state == 2
    with pytest.raises(OSError) as ei:
        d.write(512, b"y" * 512)
    assert ei.value.errno == errno.EIO
    d.write(512, b"y" * 512)            # once: gone after failing one request
    assert d.read(0, 1024) == b"x" * 512 + b"y" * 512


def test_event_none_never_fires(dbg):
    d = dbg({"inject-error": [{"event": "none", "errno": errno.EIO}]})
    d.write(0, b"z" * 512)
    d.flush()
    assert d.read(0, 512) == b"z" * 512
