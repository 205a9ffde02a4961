"""``parablock resize`` — qemu-img resize: absolute or relative sizes, ``--shrink``, preallocation."""
from __future__ import annotations

import click

from engine.cli.common import die, opened
from engine.cli.main import cli
from engine.errors import BlockError
from engine.units import parse_size


@cli.command("resize", context_settings={"ignore_unknown_options": True})
@click.option("-f", "fmt", default=None)
@click.option("--preallocation", "prealloc", default="off")
@click.option("--shrink", "shrink", is_flag=True)
@click.option("-q", "quiet", is_flag=True)
@click.option("--image-opts", "image_opts", is_flag=True, hidden=True)
@click.argument("filename")
@click.argument("size")
def resize_cmd(fmt, prealloc, shrink, quiet, image_opts, filename, size):
    """Change the virtual size of an image (qemu-img resize)."""
    rel = 0
    text = size
    if text[:1] in "+-":
        rel = 1 if text[0] == "+" else -1
        text = text[1:]
    try:
        n = parse_size(text)
    except BlockError:
        die("Invalid image size specified. You may use k, M, G, T, P or E suffixes for\n"
            "parablock: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.")
    if prealloc not in ("off", "metadata", "falloc", "full"):
        die(f"Invalid preallocation mode: '{prealloc}'")
    with opened(filename, fmt, read_only=False, backing=False) as node:
        cur = node.size()
        new = cur + rel * n if rel else n
        if new < 0:
            die("New image size must be positive")
        if new < cur and not shrink:
            print("parablock: Use the --shrink option to perform a shrink operation.", file=click.get_text_stream("stderr"))
            die("warning: Shrinking an image will delete all data beyond the shrunken image's end. Before "
                "performing such an operation, make sure there is no important data there.")
        try:
            node.truncate(new, prealloc, shrink=shrink)
        except BlockError as exc:
            die(exc.message)
    if not quiet:
        click.echo("Image resized.")
