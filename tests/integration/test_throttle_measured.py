"""Throttle limits measured on real I/O over a few seconds: within 10% of the configured rate."""
from __future__ import annotations

import asyncio
import time

import pytest

from engine.image import create_image, open_image
from engine.pipeline import Graph
from engine.throttle import ThrottleConfig
from workers.inproc import InProcessExecutor


def _node(tmp_path, graph, name, **kw):
    ex = InProcessExecutor()
    path = str(tmp_path / f"{name}.raw")
    create_image(path, "raw", 16 << 20, ex, {})
    return graph.add(open_image(path, ex, fmt="raw", read_only=False), name, **kw)


async def _hammer(node, kind, size, seconds, depth=4):
    done = 0
    stop = time.monotonic() + seconds

    async def client(i):
        nonlocal done
        off = i * size
        while time.monotonic() < stop:
            if kind == "read":
                await node.read(off % (8 << 20), size)
            else:
                await node.write(off % (8 << 20), b"x" * size)
            done += 1
            off += depth * size

    t0 = time.monotonic()
    await asyncio.gather(*(client(i) for i in range(depth)))
    return done, time.monotonic() - t0


@pytest.mark.parametrize("limits,kind,size,rate_of", [
    ({"bps-read": 2 << 20}, "read", 64 << 10, lambda ops, sz: ops * sz),
    ({"bps-write": 1 << 20}, "write", 32 << 10, lambda ops, sz: ops * sz),
    ({"iops-total": 200}, "read", 4096, lambda ops, sz: ops),
])
def test_single_node_limit(tmp_path, limits, kind, size, rate_of):
    cfg = ThrottleConfig.from_options(limits)
    limit = next(iter(limits.values()))

    async def run():
        graph = Graph()
        node = _node(tmp_path, graph, "n", throttle=cfg)
        ops, elapsed = await _hammer(node, kind, size, 3.0)
        node.close()
        return rate_of(ops, size) / elapsed

    measured = asyncio.run(run())
    assert abs(measured - limit) / limit < 0.10, (measured, limit)


def test_group_shares_one_budget(tmp_path):
    cfg = ThrottleConfig.from_options({"bps-total": 2 << 20})

    async def run():
        graph = Graph()
        a = _node(tmp_path, graph, "a", throttle_group="g", throttle=cfg)
        b = _node(tmp_path, graph, "b", throttle_group="g")
        (na, ta), (nb, tb) = await asyncio.gather(_hammer(a, "read", 64 << 10, 3.0),
                                                  _hammer(b, "read", 64 << 10, 3.0))
        a.close()
        b.close()
        return na * 65536 / ta, nb * 65536 / tb

    ra, rb = asyncio.run(run())
    total = ra + rb
    assert abs(total - (2 << 20)) / (2 << 20) < 0.10, (ra, rb)
    assert min(ra, rb) / max(ra, rb) > 0.8  # round-robin: neither member starves
