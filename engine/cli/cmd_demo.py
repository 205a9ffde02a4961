"""``parablock demo`` — the README's first command: build a small qcow2 backing chain on the embedded
default and show ``info --backing-chain``, ``map`` and ``check`` on it; then make a small "estate" of
vmdk, VHD, VDI, VHDX and QED disks and convert the whole directory to qcow2 with ``batch --verify``.

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


ESTATE = [("web.vmdk", "vmdk", {}), ("db.vhd", "vpc", {}), ("vbox.vdi", "vdi", {}),
          ("hyperv.vhdx", "vhdx", {}), ("legacy.qed", "qed", {})]


def build_estate(directory: str, size: int = 8 * MiB) -> str:
    """A directory of disks in the formats people migrate from, each with a few patterned writes."""
    ex = make_executor()
    estate = os.path.join(directory, "estate")
    os.makedirs(estate, exist_ok=True)
    for i, (name, fmt, opts) in enumerate(ESTATE):
        path = os.path.join(estate, name)
        create_image(path, fmt, size, ex, dict(opts))
        node = open_image(path, ex, fmt=fmt, read_only=False)
        node.write(i * MiB, bytes([0x40 + i]) * MiB)
        node.write(size - 64 * 1024, os.urandom(64 * 1024))
        node.close()
    return estate


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
        estate = build_estate(directory)
        out = os.path.join(directory, "kvm")
        report = os.path.join(directory, "report.json")
        click.echo(f"=== parablock batch {os.path.basename(estate)}/ --target-dir kvm/ --verify -p ===")
        rc = main(["batch", estate, "--target-dir", out, "--verify", "-p", "--report", report])
        if rc:
            raise click.ClickException(f"'batch' failed with exit code {rc}")
        import json

        with open(report) as f:
            rep = json.load(f)
        for item in rep["items"]:
            click.echo(f"{item['name']:12} -> {os.path.basename(item['target']):12} {item['status']:8} "
                       f"{item['digest']}")
        click.echo("")
    finally:
        if tmp is not None:
            tmp.cleanup()
