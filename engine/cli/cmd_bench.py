"""``parablock bench`` — qemu-img bench on the engine: requests go through the request pipeline and the
data moves in the worker pool.  Prints qemu-img's two lines, then IOPS, MB/s and latency percentiles per
worker and in total.

Options are qemu-img bench's (``-c -d -f -n -o -s -S -t -w --pattern --flush-interval --no-drain``) plus
``--workers N``.  ``-n`` (native AIO) needs ``-t none`` as in qemu-img; parablock has one I/O engine, so
it is otherwise accepted and ignored.
"""
from __future__ import annotations

import asyncio
import time

import click

from engine.cli.common import die, start_pool
from engine.cli.main import cli
from engine.errors import BlockError
from engine.image import open_image
from engine.pipeline import Graph
from engine.units import parse_size


def percentiles(values: list[int]) -> dict[str, float]:
    if not values:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0}
    v = sorted(values)

    def pick(q: float) -> float:
        return v[min(len(v) - 1, int(q * len(v)))] / 1000.0

    return {"p50": pick(0.50), "p90": pick(0.90), "p99": pick(0.99), "max": v[-1] / 1000.0}


def _line(name: str, ops: int, nbytes: int, secs: float, lat: list[int]) -> str:
    p = percentiles(lat)
    return (f"{name:<10} {ops / secs if secs else 0:10.0f} IOPS {nbytes / secs / 1e6 if secs else 0:9.1f} MB/s  "
            f"latency us p50 {p['p50']:.0f} p90 {p['p90']:.0f} p99 {p['p99']:.0f} max {p['max']:.0f}")


@cli.command("bench")
@click.option("-c", "count", default="75000")
@click.option("-d", "depth", default="64")
@click.option("-f", "fmt", default=None)
@click.option("-n", "native", is_flag=True)
@click.option("-o", "offset", default="0")
@click.option("-s", "bufsize", default="4096")
@click.option("-S", "step", default=None)
@click.option("-t", "cache", default="writeback")
@click.option("-w", "write", is_flag=True)
@click.option("-q", "quiet", is_flag=True)
@click.option("-U", "--force-share", "force_share", is_flag=True)
@click.option("-i", "aio", default=None)
@click.option("--pattern", "pattern", default=None)
@click.option("--flush-interval", "flush_interval", default=None)
@click.option("--no-drain", "no_drain", is_flag=True)
@click.option("--workers", "workers", type=int, default=None, help="worker processes (default: CPUs)")
@click.argument("filename")
def bench_cmd(count, depth, fmt, native, offset, bufsize, step, cache, write, quiet, force_share, aio, pattern,
              flush_interval, no_drain, workers, filename):
    """Run a simple I/O benchmark on an image (qemu-img bench)."""
    try:
        count_n = int(count)
        depth_n = int(depth)
        off = parse_size(offset)
        size = parse_size(bufsize)
        step_n = parse_size(step) if step is not None else size
        pat = int(pattern, 0) if pattern is not None else 0
        flush_n = int(flush_interval) if flush_interval is not None else 0
    except (ValueError, BlockError):
        die("Invalid number argument")
    if count_n < 1 or depth_n < 1 or depth_n > 1 << 20 or size < 1 or size > 1 << 30:
        die("Invalid request count, depth or buffer size")
    if pat < 0 or pat > 255:
        die("Invalid pattern byte specified")
    if flush_interval is not None and not write:
        die("--flush-interval is only available in write tests")
    if flush_n and flush_n < depth_n:
        die("Flush interval can't be smaller than depth")
    if native and cache != "none":
        die(f"Could not open '{filename}': aio=native was specified, but it requires cache.direct=on, "
            "which was not specified.")

    pool, ex = start_pool(workers, max_inflight=max(4, depth_n))
    ex.INLINE = 0  # every data request goes to a worker: that is what is measured
    try:
        try:
            driver = open_image(filename, ex, fmt=fmt, read_only=not write,
                                options={"cache": cache} if cache == "unsafe" else {})
        except BlockError as exc:
            die(f"Could not open '{filename}': {exc.message}")
        image_size = driver.size()
        if not quiet:
            click.echo(f"Sending {count_n} {'write' if write else 'read'} requests, {size} bytes each, "
                       f"{depth_n} in parallel (starting at offset {off}, step size {step_n})")
        pool.wait_ready()
        pool.record_latency = True
        data = bytes([pat]) * size
        result = asyncio.run(_run(driver, count_n, depth_n, off, size, step_n, image_size, write, data,
                                  flush_n, not no_drain))
        pool.record_latency = False
        elapsed, lat_total = result
        if not quiet:
            click.echo(f"Run completed in {elapsed:.3f} seconds.")
            click.echo(_line("total", count_n, count_n * size, elapsed, lat_total))
            for w in pool.workers:
                lat = [ns for op, _n, ns in w.latencies if op in ("pread", "pwrite")]
                click.echo(_line(f"worker {w.index}", len(lat), len(lat) * size, elapsed, lat))
        driver.close()
    finally:
        ex.close_all()
        pool.close()


async def _run(driver, count, depth, offset, size, step, image_size, write, data, flush_every, drain):
    graph = Graph()
    node = graph.add(driver, "bench")
    next_off = offset
    issued = 0
    lat: list[int] = []
    since_flush = 0

    def take() -> int:
        nonlocal next_off
        o = next_off
        next_off += step
        next_off = 0 if image_size <= size else next_off % (image_size - size)
        return o

    async def one(o: int) -> None:
        t0 = time.monotonic_ns()
        if write:
            await node.write(o, data)
        else:
            await node.read(o, size)
        lat.append(time.monotonic_ns() - t0)

    t0 = time.perf_counter()
    pending: set[asyncio.Task] = set()
    while issued < count or pending:
        while issued < count and len(pending) < depth:
            pending.add(asyncio.create_task(one(take())))
            issued += 1
            since_flush += 1
            if flush_every and since_flush >= flush_every:
                if drain:
                    await asyncio.gather(*pending)
                    pending.clear()
                await node.flush()
                since_flush = 0
        if pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                t.result()
    elapsed = time.perf_counter() - t0
    graph.nodes.pop("bench", None)
    return elapsed, lat
