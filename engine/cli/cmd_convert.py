"""``parablock convert`` — qemu-img convert on the worker pool.

Same options and messages as qemu-img 7.2 (``-f -O -o -c -B -F -n -m -W -S -p -q -t -T -l -s
--target-is-zero``, several sources concatenated), plus ``--workers N``.  Deliberate differences:
``-C`` (copy offloading) is accepted and ignored; ``-r`` (rate) is refused until job rate limits land.
"""
from __future__ import annotations

import os

import click

from engine.cli.common import die, parse_o
from engine.cli.main import cli
from engine.convert import ConvertOptions, Converter
from engine.driver import driver_class
from engine.errors import BlockError, ImageOpenError
from engine.image import create_image, open_image, path_combine
from engine.units import parse_size


class Progress:
    """qemu-img's ``-p`` meter when not on a terminal; a tqdm bar with rate and ETA when on one."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total = max(1, total)
        self.enabled = enabled
        self.bar = None
        self.last = -1.0
        if not enabled:
            return
        import sys

        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="convert",
                            dynamic_ncols=True)
        else:
            self._print(0.0)

    def _print(self, pct: float) -> None:
        print(f"    ({pct:.2f}/100%)", end="\r", flush=True)

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            return
        pct = done * 100.0 / self.total
        if pct - self.last >= 1.0 or done >= total:
            self.last = pct
            self._print(pct)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        else:
            self._print(100.0)
            print()


@cli.command("convert", context_settings={"ignore_unknown_options": False})
@click.option("-f", "src_fmt", default=None)
@click.option("-O", "out_fmt", default="raw")
@click.option("-o", "options", multiple=True)
@click.option("-c", "compress", is_flag=True)
@click.option("-B", "backing", default=None)
@click.option("-F", "backing_fmt", default=None)
@click.option("-n", "no_create", is_flag=True)
@click.option("-m", "coroutines", default="8")
@click.option("-W", "out_of_order", is_flag=True)
@click.option("-S", "sparse", default="4k")
@click.option("-p", "progress", is_flag=True)
@click.option("-q", "quiet", is_flag=True)
@click.option("-t", "cache", default=None)
@click.option("-T", "src_cache", default=None)
@click.option("-l", "snapshot_opt", default=None)
@click.option("-s", "snapshot_id", default=None)
@click.option("-C", "copy_offload", is_flag=True)
@click.option("-r", "rate", default=None)
@click.option("-U", "--force-share", "force_share", is_flag=True)
@click.option("--target-is-zero", "target_is_zero", is_flag=True)
@click.option("--workers", "workers", type=int, default=None, help="worker processes (default: CPUs)")
@click.argument("files", nargs=-1, required=True)
def convert_cmd(src_fmt, out_fmt, options, compress, backing, backing_fmt, no_create, coroutines,
                out_of_order, sparse, progress, quiet, cache, src_cache, snapshot_opt, snapshot_id,
                copy_offload, rate, force_share, target_is_zero, workers, files):
    """Convert images to another format (qemu-img convert)."""
    if len(files) < 2:
        die("Expecting image file name")
    sources, target_name = list(files[:-1]), files[-1]
    if target_is_zero and not no_create:
        die("--target-is-zero requires use of -n flag")
    if compress and copy_offload:
        die("Cannot enable copy offloading when -c is used")
    if rate is not None:
        die("-r is not supported by parablock yet")
    try:
        sparse_bytes = parse_size(sparse, default_suffix="")
    except BlockError:
        sparse_bytes = -1
    if sparse.isdigit():
        sparse_bytes = int(sparse) * 512  # qemu-img: a bare -S number counts sectors
    if sparse_bytes < 0 or sparse_bytes % 512 or sparse_bytes > 16 << 20:
        die("Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to "
            "16777216. Select 0 to disable sparse detection (fully allocates output).")
    try:
        nco = int(coroutines)
        if nco < 1 or nco > 16:
            raise ValueError
    except ValueError:
        die("Invalid number of coroutines. Allowed number of coroutines is between 1 and 16")
    try:
        cls = driver_class(out_fmt)
    except ImageOpenError:
        die(f"Unknown file format '{out_fmt}'")
    if cls.is_protocol:
        die(f"Unknown file format '{out_fmt}'")
    if compress and out_fmt != "qcow2":
        die("Compression not supported for this file format")
    try:
        create_opts = parse_o(options)
    except BlockError as exc:
        die(exc.message)
    if backing is None and create_opts.get("backing_file"):
        backing = create_opts.pop("backing_file")
        backing_fmt = backing_fmt or create_opts.pop("backing_fmt", None)
    if backing is not None:
        if out_fmt != "qcow2":
            die(f"Backing file not supported for file format '{out_fmt}'")
        if not backing_fmt:
            die("Use of backing file requires explicit backing format")
    if backing is not None and len(sources) > 1:
        die("Backing file not supported with multiple sources")  # same restriction as qemu-img
    snapshot = snapshot_opt or snapshot_id
    if snapshot and snapshot.startswith("snapshot.") or (snapshot and "=" in snapshot):
        parts = dict(p.split("=", 1) for p in snapshot.split(",") if "=" in p)
        snapshot = parts.get("snapshot.name") or parts.get("snapshot.id")
    if snapshot and len(sources) > 1:
        die("No support for concatenating multiple snapshot")

    from workers.pool import PoolExecutor, WorkerPool

    pool = WorkerPool(workers, wait=False)
    ex = PoolExecutor(pool)
    opened = []
    target = None
    bar = None
    try:
        for name in sources:
            try:
                node = open_image(name, ex, fmt=src_fmt, read_only=True)
            except BlockError as exc:
                die(f"Could not open '{name}': {exc.message}")
            opened.append(node)
            if snapshot:
                try:
                    node.load_snapshot_readonly(snapshot)  # type: ignore[attr-defined]
                except AttributeError:
                    die("Failed to load snapshot: Operation not supported")
                except BlockError:
                    die("Failed to load snapshot: Can't find snapshot")
        total = sum(n.size() for n in opened)
        if not no_create:
            opts = dict(create_opts)
            if backing is not None:
                opts["backing_file"] = backing
                opts["backing_fmt"] = backing_fmt
                try:
                    b = open_image(path_combine(target_name, backing), ex, fmt=backing_fmt, read_only=True)
                    b.close()
                except BlockError as exc:
                    die(f"Could not open backing image: {exc.message}")
            try:
                create_image(target_name, out_fmt, total, ex, opts)
            except BlockError as exc:
                die(f"{target_name}: error while converting {out_fmt}: {exc.message}")
        try:
            target = open_image(target_name, ex, fmt=out_fmt, read_only=False, backing=backing is not None,
                                options={"cache": cache or "unsafe"})
        except BlockError as exc:
            die(f"Could not open '{target_name}': {exc.message}")
        if no_create and target.size() < total:
            die(f"Target image size is too small ({target.size()} < {total})")  # noqa: E501
        zero_init = (not no_create and backing is None) or target_is_zero
        copts = ConvertOptions(compress=compress, sparse=sparse_bytes, target_has_backing=backing is not None,
                               target_zero_init=zero_init, max_inflight=max(nco, 2 * pool.nworkers),
                               out_of_order=out_of_order)
        bar = Progress(total, progress and not quiet)
        try:
            Converter(opened, target, pool, copts, progress=bar).run()
        except BlockError as exc:
            die(f"error while converting: {exc.message}")
        except OSError as exc:
            die(f"error while converting: {os.strerror(exc.errno or 5)}")
    finally:
        if bar is not None:
            bar.close()
        for n in opened:
            n.close()
        if target is not None:
            target.close()
        ex.close_all()
        pool.close()
