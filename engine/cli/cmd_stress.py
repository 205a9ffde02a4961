"""``parablock stress`` — a verifying load generator: many concurrent clients issue random or sequential,
aligned or unaligned, overlapping reads, writes, write-zeroes, discards (and flushes) against an image
opened in process (through the engine's request pipeline, data moving in the worker pool) or against an
NBD export (several connections of our own asyncio client, ``ipc.nbd_client``).  Every byte read back is
checked against a model of the disk (semantics in ``engine/stress.py``); the run ends with a full
read-back pass.  Reports ops, IOPS, MB/s and latency percentiles per operation and the verified bytes.

Exit status: 0 when every check passed, 1 with one ``parablock: stress: mismatch at offset ...`` line for
the first mismatch (or one line for any other error).  No qemu-img counterpart (closest: qemu-io's
``aio_write -P``/``aio_read -P`` verification and qemu-img bench).

Discard semantics (QEMU-true): a discarded range reads back as "unknown" (not checked) until it is
written again, because discard is advisory in QEMU (see engine/stress.py).
"""
from __future__ import annotations

import asyncio
import json

import click

from engine.cli.common import die, start_pool
from engine.cli.main import cli
from engine.errors import BlockError
from engine.units import parse_size

MAX_MODEL = 4 << 30


class PipelineTarget:
    """An in-process image behind the request pipeline (a Graph's BlockNode)."""

    def __init__(self, node) -> None:
        self.node = node

    def size(self) -> int:
        return self.node.size()

    async def read(self, offset: int, length: int) -> bytes:
        return await self.node.read(offset, length)

    async def write(self, offset: int, data: bytes) -> None:
        await self.node.write(offset, data)

    async def write_zeroes(self, offset: int, length: int) -> None:
        await self.node.write_zeroes(offset, length, unmap=True)

    async def discard(self, offset: int, length: int) -> None:
        await self.node.discard(offset, length)

    async def flush(self) -> None:
        await self.node.flush()


class NbdTarget:
    """An NBD export over several connections; requests are spread round-robin over them."""

    def __init__(self, conns) -> None:
        from ipc import nbd as P

        self.conns = conns
        self._i = 0
        flags = conns[0].flags
        self.read_only = bool(flags & P.TransmissionFlags.READ_ONLY)
        self.can_flush = bool(flags & P.TransmissionFlags.SEND_FLUSH)
        self.can_trim = bool(flags & P.TransmissionFlags.SEND_TRIM)
        self.can_zero = bool(flags & P.TransmissionFlags.SEND_WRITE_ZEROES)
        self.max_block = min(c.max_block for c in conns)

    def _c(self):
        self._i = (self._i + 1) % len(self.conns)
        return self.conns[self._i]

    def size(self) -> int:
        return self.conns[0].size

    async def read(self, offset: int, length: int) -> bytes:
        return await self._c().read(offset, length)

    async def write(self, offset: int, data: bytes) -> None:
        await self._c().write(offset, data)

    async def write_zeroes(self, offset: int, length: int) -> None:
        if self.can_zero:
            await self._c().write_zeroes(offset, length, unmap=True)
        else:
            await self._c().write(offset, bytes(length))

    async def discard(self, offset: int, length: int) -> None:
        if self.can_trim:  # without TRIM a discard is a no-op, which the model's "unknown" covers
            await self._c().discard(offset, length)

    async def flush(self) -> None:
        if self.can_flush:
            await self._c().flush()


def _size(text: str, what: str) -> int:
    try:
        return parse_size(text)
    except BlockError:
        die(f"Invalid {what} '{text}'")


@cli.command("stress")
@click.option("-f", "fmt", default=None, help="image format (in-process mode; probed by default)")
@click.option("--nbd", "nbd_uri", default=None, metavar="URI",
              help="stress an NBD export: nbd://HOST[:PORT]/NAME or nbd+unix:///NAME?socket=PATH")
@click.option("--connections", type=int, default=None, help="NBD connections (default min(4, CLIENTS))")
@click.option("-c", "count", type=int, default=None, help="total operations (default 1000 without -t)")
@click.option("-t", "seconds", type=float, default=None, help="run for at most SECONDS")
@click.option("-j", "clients", type=int, default=8, show_default=True, help="concurrent clients")
@click.option("--pattern", type=click.Choice(["random", "sequential"]), default="random", show_default=True)
@click.option("--mix", default="read=50,write=30,zero=10,discard=10", show_default=True,
              help="operation weights: read, write, zero, discard, flush")
@click.option("--size-min", default="512", show_default=True, help="smallest request (unaligned allowed)")
@click.option("--size-max", default="64k", show_default=True, help="largest request")
@click.option("--align", default="1", show_default=True, help="align offsets and sizes to this")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--output", type=click.Choice(["human", "json"]), default="human", show_default=True)
@click.option("--workers", type=int, default=None, help="worker processes (in-process mode)")
@click.option("--tolerate-errors", is_flag=True,
              help="count I/O errors the target reports (e.g. injected faults) and go on; failed writes "
                   "make their range unknown")
@click.option("--inject-corruption", is_flag=True, hidden=True,
              help="self-test: change one verified byte behind the model's back before the final pass")
@click.argument("image", required=False)
def stress_cmd(fmt, nbd_uri, connections, count, seconds, clients, pattern, mix, size_min, size_max, align,
               seed, output, workers, tolerate_errors, inject_corruption, image):
    """Verify an image or NBD export under concurrent random I/O."""
    from engine.stress import StressConfig, StressError, parse_mix

    if (image is None) == (nbd_uri is None):
        die("stress needs exactly one of IMAGE or --nbd URI")
    try:
        cfg = StressConfig(count=count, seconds=seconds, clients=clients, pattern=pattern, mix=parse_mix(mix),
                           size_min=_size(size_min, "--size-min"), size_max=_size(size_max, "--size-max"),
                           align=_size(align, "--align"), seed=seed, inject_corruption=inject_corruption,
                           tolerate_errors=tolerate_errors)
    except StressError as exc:
        die(str(exc))
    if nbd_uri is not None:
        report = _run_nbd(nbd_uri, connections or min(4, max(1, clients)), cfg)
    else:
        report = _run_image(image, fmt, workers, cfg)
    from engine.stress import report_human, report_json

    if output == "json":
        click.echo(json.dumps(report_json(report), indent=2))
    else:
        click.echo(report_human(report))
    if report.mismatch is not None:
        die(f"stress: {report.mismatch.line()}")


def _writes(cfg) -> bool:
    return any(cfg.mix.get(k) for k in ("write", "zero", "discard"))


def _check_size(size: int) -> None:
    if size > MAX_MODEL:
        die(f"stress: the target has {size} bytes; the in-memory model holds at most {MAX_MODEL}")


def _run_image(image: str, fmt: str | None, workers: int | None, cfg):
    from engine.image import open_image
    from engine.pipeline import Graph
    from engine.stress import StressError, run_stress

    pool, ex = start_pool(workers, compress=False, max_inflight=max(4, cfg.clients))
    try:
        try:
            driver = open_image(image, ex, fmt=fmt, read_only=not _writes(cfg))
        except BlockError as exc:
            die(f"Could not open '{image}': {exc.message}")
        _check_size(driver.size())

        async def go():
            node = Graph().add(driver, "stress")
            try:
                return await run_stress(PipelineTarget(node), cfg)
            finally:
                if _writes(cfg):
                    await node.flush()

        try:
            return asyncio.run(go())
        except StressError as exc:
            die(f"stress: {exc}")
        except BlockError as exc:
            die(f"stress: I/O error on '{image}': {exc.message}")
        finally:
            driver.close()
    finally:
        ex.close_all()
        pool.close()


def _run_nbd(uri: str, nconn: int, cfg):
    from engine.stress import StressError, run_stress
    from ipc.nbd_client import NbdClient, NbdClientError, parse_nbd_uri

    if nconn < 1:
        die("--connections must be at least 1")

    async def go():
        addr = parse_nbd_uri(uri)
        conns = []
        try:
            for _ in range(nconn):
                conns.append(await NbdClient.connect(addr))
            target = NbdTarget(conns)
            _check_size(target.size())
            if target.read_only and _writes(cfg):
                raise StressError("the export is read-only; use --mix read=100 or a writable export")
            if cfg.size_max > target.max_block:
                raise StressError(f"--size-max exceeds the export's maximum request of {target.max_block} bytes")
            return await run_stress(target, cfg)
        finally:
            for c in conns:
                await c.close()

    try:
        return asyncio.run(go())
    except StressError as exc:
        die(f"stress: {exc}")
    except NbdClientError as exc:
        die(f"stress: {uri}: {exc.message}")
