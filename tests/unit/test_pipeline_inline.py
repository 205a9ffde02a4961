"""Small reads skip the helper thread only where that is safe: on file, raw and qcow2 nodes (whole
chain), up to INLINE_READ_MAX bytes; a blkdebug anywhere below (its rules can wait on other threads) or a
larger read keeps the thread.  The bytes read are the same either way."""
from __future__ import annotations

import asyncio
import threading

from engine.formats.blkdebug import BlkdebugDriver
from engine.image import create_image, open_image
from engine.pipeline import INLINE_READ_MAX, Graph
from workers.inproc import InProcessExecutor


def test_small_reads_run_on_the_loop_only_where_safe(tmp_path):
    ex = InProcessExecutor()
    base = str(tmp_path / "base.raw")
    top = str(tmp_path / "top.qcow2")
    create_image(base, "raw", 1 << 20, ex, {})
    b = open_image(base, ex, fmt="raw", read_only=False)
    b.write(0, bytes(range(256)) * 4096)
    b.close()
    create_image(top, "qcow2", 1 << 20, ex, {"backing_file": "base.raw", "backing_fmt": "raw"})
    driver = open_image(top, ex, fmt="qcow2", read_only=False)
    want = (bytes(range(256)) * 4096)[4096:4096 + INLINE_READ_MAX + 4096]

    async def run():
        graph = Graph()
        node = graph.add(driver, "top")
        loop_thread = threading.get_ident()
        threads = []
        real = driver.read

        def spy(off, n):
            threads.append(threading.get_ident())
            return real(off, n)

        driver.read = spy
        assert await node.read(4096, 4096) == want[:4096]
        assert threads[-1] == loop_thread  # qcow2 over raw over file: on the loop
        assert await node.read(4096, INLINE_READ_MAX + 4096) == want
        assert threads[-1] != loop_thread  # too big: a helper thread
        # a blkdebug below the format: every read keeps the helper thread
        driver.file = BlkdebugDriver(driver.file, {})
        assert await node.read(4096, 4096) == want[:4096]
        assert threads[-1] != loop_thread
        node.close()

    asyncio.run(run())
