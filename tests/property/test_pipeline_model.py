"""The request pipeline against a dict-of-bytes model, with random concurrent unaligned requests.

Concurrent writes in one batch touch pairwise disjoint bytes but may share aligned blocks: without
serialising read-modify-write (tracked requests) one of two writes into the same block would be lost.
"""
from __future__ import annotations

import asyncio

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.image import create_image, open_image
from engine.pipeline import Graph
from workers.inproc import InProcessExecutor

SIZE = 256 * 1024


def _disjoint(ops):
    taken = []
    out = []
    for kind, off, n, byte in ops:
        n = min(n, SIZE - off)
        if n <= 0:
            continue
        if any(off < b and a < off + n for a, b in taken):
            continue
        taken.append((off, off + n))
        out.append((kind, off, n, byte))
    return out


op = st.tuples(st.sampled_from(["write", "write", "zero", "read"]), st.integers(0, SIZE - 1),
               st.integers(1, 20000), st.integers(0, 255))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fmt=st.sampled_from(["raw", "qcow2"]), align=st.sampled_from([1, 512, 4096]),
       batches=st.lists(st.lists(op, min_size=1, max_size=8), min_size=1, max_size=5))
def test_concurrent_unaligned_requests_match_model(tmp_path_factory, fmt, align, batches):
    d = tmp_path_factory.mktemp("pipe")
    path = str(d / f"img.{fmt}")
    ex = InProcessExecutor()
    create_image(path, fmt, SIZE, ex, {"cluster_size": 4096} if fmt == "qcow2" else {})
    driver = open_image(path, ex, fmt=fmt, read_only=False)
    model = bytearray(SIZE)

    async def run() -> None:
        graph = Graph()
        node = graph.add(driver, "n0", request_alignment=align)
        counts = {"write": 0, "zero": 0, "read": 0}
        for batch in batches:
            batch = _disjoint(batch)
            expected_reads = {}
            tasks = []
            for kind, off, n, byte in batch:
                if kind == "write":
                    tasks.append(node.write(off, bytes([byte]) * n))
                    model[off:off + n] = bytes([byte]) * n
                elif kind == "zero":
                    tasks.append(node.write_zeroes(off, n, unmap=byte % 2 == 0))
                    model[off:off + n] = bytes(n)
                else:
                    expected_reads[len(tasks)] = bytes(model[off:off + n])
                    tasks.append(node.read(off, n))
            for kind, *_ in batch:
                counts[kind] += 1
            counts["read"] += 1  # the full read below
            results = await asyncio.gather(*tasks)
            for i, want in expected_reads.items():
                # a read of bytes no concurrent request writes sees the state before the batch
                assert results[i] == want
            assert await node.read(0, SIZE) == bytes(model)
        assert (node.stats.write.ops, node.stats.zero.ops, node.stats.read.ops) == \
            (counts["write"], counts["zero"], counts["read"])
        node.close()

    asyncio.run(run())


def test_tracked_serialisation_prevents_lost_rmw_updates(tmp_path):
    """Many unaligned writes into the same 4 KiB block at once: every one survives."""
    ex = InProcessExecutor()
    path = str(tmp_path / "d.raw")
    create_image(path, "raw", 65536, ex, {})
    driver = open_image(path, ex, fmt="raw", read_only=False)

    async def run():
        graph = Graph()
        node = graph.add(driver, "n", request_alignment=4096)
        await asyncio.gather(*(node.write(i * 64 + 5, bytes([i + 1]) * 50) for i in range(60)))
        data = await node.read(0, 4096)
        for i in range(60):
            assert data[i * 64 + 5:i * 64 + 55] == bytes([i + 1]) * 50
        node.close()

    asyncio.run(run())


def test_detect_zeroes_unmap_and_copy_on_read(tmp_path):
    ex = InProcessExecutor()
    base = str(tmp_path / "base.raw")
    top = str(tmp_path / "top.qcow2")
    create_image(base, "raw", 1 << 20, ex, {})
    b = open_image(base, ex, fmt="raw", read_only=False)
    b.write(0, b"\x07" * (1 << 20))
    b.close()
    create_image(top, "qcow2", 1 << 20, ex, {"backing_file": "base.raw", "backing_fmt": "raw"})
    driver = open_image(top, ex, fmt="qcow2", read_only=False)

    async def run():
        graph = Graph()
        node = graph.add(driver, "top", detect_zeroes="unmap", copy_on_read=True)
        assert await node.read(65536, 4096) == b"\x07" * 4096
        # copy-on-read: the range is now allocated in the top image itself
        st = await node.block_status(65536, 4096)
        assert st.status & 0x01  # DATA, local
        await node.write(0, bytes(65536))  # detect-zeroes=unmap turns it into a zero cluster
        st = await node.block_status(0, 65536)
        assert st.status & 0x02 and not st.status & 0x01
        assert await node.read(0, 65536) == bytes(65536)
        assert node.stats.read.ops == 2 and node.stats.write.ops == 1
        node.close()

    asyncio.run(run())
