"""``parablock amend`` — qemu-img amend for qcow2: compat (0.10 <-> 1.1) and lazy_refcounts."""
from __future__ import annotations

import click

from engine.cli.common import die, opened, parse_o
from engine.cli.main import cli
from engine.errors import BlockError


@cli.command("amend")
@click.option("-f", "fmt", default=None)
@click.option("-o", "options", multiple=True)
@click.option("-t", "cache", default=None)
@click.option("-p", "progress", is_flag=True)
@click.option("-q", "quiet", is_flag=True)
@click.option("--force", "force", is_flag=True)
@click.option("--image-opts", "image_opts", is_flag=True, hidden=True)
@click.argument("filename")
def amend_cmd(fmt, options, cache, progress, quiet, force, image_opts, filename):
    """Amend the format-specific options of an image (qemu-img amend)."""
    if not options:
        die("Must specify options (-o)")
    try:
        opts = parse_o(options)
    except BlockError as exc:
        die(exc.message)
    with opened(filename, fmt, read_only=False, backing=False, cache=cache) as node:
        if node.format_name != "qcow2":
            die(f"Format driver '{node.format_name}' does not support option amendment")
        try:
            node.amend(opts)  # type: ignore[attr-defined]
        except BlockError as exc:
            die(f"Error while amending options: {exc.message}")
