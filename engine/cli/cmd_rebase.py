"""``parablock rebase`` — qemu-img rebase: change the backing file, safely (copying every range whose
content would change) or with ``-u`` (rewriting only the name and format)."""
from __future__ import annotations

import click

from engine.block import is_allocated_above
from engine.cli.common import die, make_executor, opened
from engine.cli.main import cli
from engine.cli.progress import ByteProgress
from engine.driver import BlockDriver
from engine.errors import BlockError
from engine.image import open_image, path_combine

CHUNK = 1 << 20


def _read_or_zero(node: BlockDriver | None, offset: int, length: int) -> bytes:
    if node is None:
        return bytes(length)
    size = node.size()
    if offset >= size:
        return bytes(length)
    n = min(length, size - offset)
    data = node.read(offset, n)
    return data + bytes(length - n)


def safe_rebase(top: BlockDriver, new_backing: BlockDriver | None, progress=None) -> None:
    """Copy into ``top`` every 512-byte sector not allocated in it whose content differs between the
    old backing chain and ``new_backing``."""
    old = top.backing
    size = top.size()
    pos = 0
    while pos < size:
        allocated, n = is_allocated_above(top, top.backing, pos, min(CHUNK, size - pos))
        if allocated:
            pos += n
            continue
        a = _read_or_zero(old, pos, n)
        b = _read_or_zero(new_backing, pos, n)
        if a != b:
            s = 0
            while s < n:
                e = s
                while e < n and a[e:e + 512] != b[e:e + 512]:
                    e += 512
                if e > s:
                    top.write(pos + s, a[s:min(e, n)])
                    s = e
                else:
                    s += 512
        pos += n
        if progress:
            progress(pos, size)


@cli.command("rebase")
@click.option("-f", "fmt", default=None)
@click.option("-t", "cache", default=None)
@click.option("-T", "src_cache", default=None)
@click.option("-p", "progress", is_flag=True)
@click.option("-u", "unsafe", is_flag=True)
@click.option("-U", "--force-share", "force_share", is_flag=True)
@click.option("-q", "quiet", is_flag=True)
@click.option("-b", "backing", default=None)
@click.option("-F", "backing_fmt", default=None)
@click.option("--image-opts", "image_opts", is_flag=True, hidden=True)
@click.argument("filename")
def rebase_cmd(fmt, cache, src_cache, progress, unsafe, force_share, quiet, backing, backing_fmt, image_opts,
               filename):
    """Change the backing file of an image (qemu-img rebase)."""
    if backing is None:
        die("Expecting one image file name")
    ex = make_executor()
    with opened(filename, fmt, read_only=False, backing=not unsafe, cache=cache, executor=ex) as node:
        if not hasattr(node, "set_backing"):
            die(f"Could not change the backing file to '{backing}': Operation not supported")
        if not unsafe:
            new_node = None
            if backing:
                try:
                    new_node = open_image(path_combine(filename, backing), ex, fmt=backing_fmt, read_only=True)
                except BlockError as exc:
                    die(f"Could not open new backing file '{backing}': {exc.message}")
            try:
                bar = ByteProgress(node.size(), progress and not quiet, "rebase")
                safe_rebase(node, new_node, bar)
                bar.close()
            finally:
                if new_node is not None:
                    new_node.close()
        if backing and not backing_fmt:
            die("Could not change the backing file to '%s': backing format must be specified" % backing)
        try:
            node.set_backing(backing or None, backing_fmt)  # type: ignore[attr-defined]
        except BlockError as exc:
            die(f"Could not change the backing file to '{backing}': {exc.message}")
