"""``parablock demo`` — the README's first command: build a small qcow2 backing chain on the embedded
default and show ``info --backing-chain``, ``map`` and ``check`` on it.

Everything here goes through the same code paths as the individual commands.
"""
from __future__ import annotations

import os
import tempfile

import click

from engine.cli.common import make_executor
from engine.cli.main import cli, main
from engine.image import create_image, open_image

MiB = 1 << 20


def build_chain(directory: str, size: int = 16 * MiB) -> str:
    """base.raw <- mid.qcow2 <- top.qcow2 with a few patterned writes in each layer; returns top's path."""
    ex = make_executor()
    base = os.path.join(directory, "base.raw")
    mid = os.path.join(directory, "mid.qcow2")
    top = os.path.join(directory, "top.qcow2")
    create_image(base, "raw", size, ex, {})
    create_image(mid, "qcow2", size, ex, {"backing_file": "base.raw", "backing_fmt": "raw"})
    create_image(top, "qcow2", size, ex, {"backing_file": "mid.qcow2", "backing_fmt": "qcow2",
                                          "cluster_size": 65536})
    node = open_image(base, ex, fmt="raw", read_only=False)
    node.write(0, b"\x11" * (2 * MiB))
    node.close()
    node = open_image(mid, ex, fmt="qcow2", read_only=False)
    node.write(1 * MiB, b"\x22" * (512 * 1024))
    node.write_zeroes(4 * MiB, MiB)
    node.discard(6 * MiB, MiB)
    node.close()
    node = open_image(top, ex, fmt="qcow2", read_only=False)
    node.write(4096, b"\x33" * 8192)
    node.write(8 * MiB, os.urandom(MiB))
    node.close()
    return top


@cli.command("demo")
@click.argument("directory", required=False)
def demo_cmd(directory):
    """Build a small backing chain and show info --backing-chain, map and check on it."""
    tmp = None
    if directory is None:
        tmp = tempfile.TemporaryDirectory(prefix="parablock-demo-")
        directory = tmp.name
    os.makedirs(directory, exist_ok=True)
    try:
        top = build_chain(directory)
        for title, args in (("info --backing-chain", ["info", "--backing-chain", top]),
                            ("map", ["map", top]),
                            ("map --output=json", ["map", "--output=json", top]),
                            ("check", ["check", top])):
            click.echo(f"=== parablock {title} ===")
            rc = main(args)
            if rc:
                raise click.ClickException(f"'{title}' failed with exit code {rc}")
            click.echo("")
    finally:
        if tmp is not None:
            tmp.cleanup()
