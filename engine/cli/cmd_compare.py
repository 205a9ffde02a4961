"""``parablock compare`` — qemu-img compare: guest-visible content of two images through their chains.

Follows qemu-img 7.2's img_compare: walk both images by block status (``block_status_above``, io.c's
bdrv_block_status_above semantics including the EOF flag), skip ranges both sides report as zero, read and
compare the rest in chunks of at most 2 MiB, and require the longer image's tail to read as zeros.

Exit codes: 0 identical, 1 different, 2 open error, 3 block-status error, 4 read error.  Result lines and
progress go to stdout, errors to stderr.
"""
from __future__ import annotations

import sys

import click

from engine.block import block_status_above
from engine.cli.common import PROG, CliExit, cache_options, make_executor
from engine.cli.main import cli
from engine.cli.progress import QemuMeter as Progress
from engine.driver import BlockDriver, Status
from engine.errors import BlockError, os_error_text
from engine.image import open_image

IO_BUF_SIZE = 2 << 20
SECTOR = 512


# ---------------------------------------------------------------------------------------------------
# buffer helpers
# ---------------------------------------------------------------------------------------------------
def first_nonzero_sector(buf: bytes) -> int:
    """qemu-img's find_nonzero: byte index of the first 512-byte sector holding a non-zero byte, or -1."""
    stripped = len(buf) - len(buf.lstrip(b"\0"))
    if stripped == len(buf):
        return -1
    return stripped // SECTOR * SECTOR


def first_diff_sector(a: bytes, b: bytes) -> int:
    """Byte index of the first 512-byte sector where ``a`` and ``b`` differ, or -1 (compare_buffers)."""
    if a == b:
        return -1
    ma, mb = memoryview(a), memoryview(b)
    n = len(a)
    step = 65536
    for i in range(0, n, step):
        if ma[i:i + step] != mb[i:i + step]:
            for j in range(i, min(i + step, n), SECTOR):
                if ma[j:j + SECTOR] != mb[j:j + SECTOR]:
                    return j
    return -1  # pragma: no cover  (a != b guarantees a hit)


class _Fail(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _err(msg: str) -> None:
    sys.stdout.flush()
    print(f"{PROG}: {msg}", file=sys.stderr)


def _out(msg: str, quiet: bool) -> None:
    if not quiet:
        sys.stdout.write(msg + "\n")
        sys.stdout.flush()


def _read(node: BlockDriver, offset: int, length: int, filename: str) -> bytes:
    try:
        data = node.read(offset, length)
    except BlockError as exc:
        _err(f"Error while reading offset {offset} of {filename}: {exc.message}")
        raise _Fail(4) from None
    except OSError as exc:
        _err(f"Error while reading offset {offset} of {filename}: {os_error_text(exc)}")
        raise _Fail(4) from None
    if len(data) < length:
        data = bytes(data) + bytes(length - len(data))
    return bytes(data)


def _status(node: BlockDriver, offset: int, length: int, filename: str) -> tuple[Status, int]:
    try:
        return block_status_above(node, offset, length)
    except (BlockError, OSError):
        _err(f"Sector allocation test failed for {filename}")
        raise _Fail(3) from None


def _check_empty(node: BlockDriver, offset: int, length: int, filename: str, quiet: bool) -> None:
    buf = _read(node, offset, length, filename)
    idx = first_nonzero_sector(buf)
    if idx >= 0:
        _out(f"Content mismatch at offset {offset + idx}!", quiet)
        raise _Fail(1)


def compare_nodes(n1: BlockDriver, n2: BlockDriver, name1: str, name2: str, strict: bool, quiet: bool,
                  progress: Progress) -> int:
    """The body of img_compare once both images are open; returns the exit code."""
    size1, size2 = n1.size(), n2.size()
    total = min(size1, size2)
    base = max(size1, size2)
    progress.print(0, 100)
    if strict and size1 != size2:
        _out("Strict mode: Image size mismatch!", quiet)
        return 1
    offset = 0
    try:
        while offset < total:
            st1, pnum1 = _status(n1, offset, size1 - offset, name1)
            st2, pnum2 = _status(n2, offset, size2 - offset, name2)
            alloc1 = bool(st1 & Status.ALLOCATED)
            alloc2 = bool(st2 & Status.ALLOCATED)
            chunk = min(pnum1, pnum2)
            if strict and int(st1) != int(st2):
                _out(f"Strict mode: Offset {offset} block status mismatch!", quiet)
                return 1
            if st1 & Status.ZERO and st2 & Status.ZERO:
                pass
            elif alloc1 == alloc2:
                if alloc1:
                    chunk = min(chunk, IO_BUF_SIZE)
                    b1 = _read(n1, offset, chunk, name1)
                    b2 = _read(n2, offset, chunk, name2)
                    d = first_diff_sector(b1, b2)
                    if d >= 0:
                        _out(f"Content mismatch at offset {offset + d}!", quiet)
                        return 1
            else:
                chunk = min(chunk, IO_BUF_SIZE)
                if alloc1:
                    _check_empty(n1, offset, chunk, name1, quiet)
                else:
                    _check_empty(n2, offset, chunk, name2, quiet)
            offset += chunk
            progress.step(chunk, base)

        if size1 != size2:
            _out("Warning: Image size mismatch!", quiet)
            over, over_name = (n1, name1) if size1 > size2 else (n2, name2)
            while offset < base:
                st, chunk = _status(over, offset, base - offset, over_name)
                if st & Status.ALLOCATED and not st & Status.ZERO:
                    chunk = min(chunk, IO_BUF_SIZE)
                    _check_empty(over, offset, chunk, over_name, quiet)
                offset += chunk
                progress.step(chunk, base)
    except _Fail as exc:
        return exc.code
    _out("Images are identical.", quiet)
    return 0


@cli.command("compare")
@click.option("-f", "fmt1", default=None)
@click.option("-F", "fmt2", default=None)
@click.option("-T", "cache", default=None)
@click.option("-p", "progress", is_flag=True)
@click.option("-q", "quiet", is_flag=True)
@click.option("-s", "strict", is_flag=True)
@click.option("-U", "--force-share", "force_share", is_flag=True)
@click.option("--image-opts", "image_opts", is_flag=True, hidden=True)
@click.option("--object", "objects", multiple=True, hidden=True)
@click.argument("files", nargs=-1)
def compare_cmd(fmt1, fmt2, cache, progress, quiet, strict, force_share, image_opts, objects, files):
    """Check whether two images have the same content (qemu-img compare)."""
    if len(files) != 2:
        _err("Expecting two image file names")
        print(f"Try '{PROG} --help' for more information", file=sys.stderr)
        raise CliExit(1)
    if image_opts:
        _err("--image-opts is not supported")
        raise CliExit(1)
    name1, name2 = files
    prog = Progress(progress and not quiet)
    code = _run(name1, name2, fmt1, fmt2, cache, strict, quiet, prog)
    prog.end()
    raise CliExit(code)


def _run(name1: str, name2: str, fmt1, fmt2, cache, strict: bool, quiet: bool, prog: Progress) -> int:
    try:
        opts = cache_options(cache)
    except BlockError:
        _err(f"Invalid source cache option: {cache}")
        return 2
    ex = make_executor()
    nodes: list[BlockDriver] = []
    try:
        for name, fmt in ((name1, fmt1), (name2, fmt2)):
            try:
                nodes.append(open_image(name, ex, fmt=fmt, read_only=True, backing=True, options=opts))
            except BlockError as exc:
                _err(f"Could not open '{name}': {exc.message}")
                return 2
            except OSError as exc:
                _err(f"Could not open '{name}': {os_error_text(exc)}")
                return 2
        return compare_nodes(nodes[0], nodes[1], name1, name2, strict, quiet, prog)
    finally:
        for n in reversed(nodes):
            try:
                n.close()
            except (BlockError, OSError):
                pass
