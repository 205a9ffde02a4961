"""``parablock commit`` — qemu-img commit on the worker pool: copy everything allocated above the base
into the base, then (unless ``-d`` or ``-b``) empty the top image.

``-r`` limits the bytes copied per second with QEMU's slice-based rate limiter.
"""
from __future__ import annotations

import click

from engine.block import chain
from engine.cli.common import die, parse_rate, start_pool
from engine.cli.main import cli
from engine.cli.progress import ByteProgress
from engine.convert import ConvertOptions, Converter
from engine.errors import BlockError
from engine.image import open_image


@cli.command("commit")
@click.option("-f", "fmt", default=None)
@click.option("-t", "cache", default=None)
@click.option("-b", "base_name", default=None)
@click.option("-r", "rate", default=None)
@click.option("-d", "keep_top", is_flag=True)
@click.option("-p", "progress", is_flag=True)
@click.option("-q", "quiet", is_flag=True)
@click.option("--workers", "workers", type=int, default=None,
              help="worker processes (default: CPUs - 1, at least 1)")
@click.argument("filename")
def commit_cmd(fmt, cache, base_name, rate, keep_top, progress, quiet, workers, filename):
    """Commit an image's changes into its backing file (qemu-img commit)."""
    rate_bps = parse_rate(rate)
    pool, ex = start_pool(workers, compress=False)
    top = None
    new_base = None
    bar = None
    try:
        try:
            top = open_image(filename, ex, fmt=fmt, read_only=False)
        except BlockError as exc:
            die(f"Could not open '{filename}': {exc.message}")
        layers = chain(top)
        if len(layers) < 2:
            die("Image does not have a backing file")
        if base_name is None:
            parent, old_base = layers[0], layers[1]
        else:
            import os

            want = os.path.realpath(base_name)
            found = [i for i, n in enumerate(layers[1:], 1) if os.path.realpath(n.filename) == want]
            if not found:
                die(f"Did not find '{base_name}' in the backing chain of '{filename}'")
            parent, old_base = layers[found[0] - 1], layers[found[0]]
            keep_top = True
        try:
            new_base = open_image(old_base.filename, ex, fmt=old_base.format_name, read_only=False)
        except BlockError as exc:
            die(f"Could not reopen '{old_base.filename}' read-write: {exc.message}")
        parent.backing = new_base
        old_base.close()
        if new_base.size() < top.size():
            new_base.truncate(top.size())
        bar = ByteProgress(top.size(), progress and not quiet, "commit")
        opts = ConvertOptions(base=new_base, target_zero_init=False, max_inflight=max(8, 2 * pool.nworkers),
                              rate=rate_bps)
        try:
            Converter([top], new_base, pool, opts, progress=bar).run()
            new_base.flush()
            if not keep_top:
                make_empty = getattr(top, "make_empty", None)
                if make_empty is None:
                    die(f"Image format '{top.format_name}' cannot be emptied after the commit")
                make_empty()
        except BlockError as exc:
            die(exc.message)
    finally:
        if bar is not None:
            bar.close()
        if top is not None:
            top.close()
        ex.close_all()
        pool.close()
    if not quiet:
        click.echo("Image committed.")
