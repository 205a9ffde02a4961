"""``parablock map`` — qemu-img map: the allocation of every guest range through the backing chain.

Entries, merging rules and both output shapes are qemu-img 7.2's (no ``compressed`` key: that came in 8.1).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import click

from engine.block import chain, chain_block_status
from engine.cli.common import die, opened
from engine.cli.main import cli
from engine.driver import BlockDriver, Status
from engine.errors import BlockError
from engine.units import parse_size


@dataclass
class MapEntry:
    start: int
    length: int
    depth: int
    present: bool
    zero: bool
    data: bool
    offset: int | None
    filename: str | None


def get_block_status(node: BlockDriver, offset: int, length: int) -> MapEntry:
    """One map entry for the run at ``offset`` (qemu-img's get_block_status)."""
    ext, depth = chain_block_status(node, offset, length)
    if not chain(node)[depth].qemu_block_status:
        # QEMU's driver for this format (vhdx) reports no block status: all data, no offset
        return MapEntry(offset, ext.length, depth, True, False, True, None, None)
    st = ext.status
    has_offset = bool(st & Status.OFFSET_VALID)
    return MapEntry(offset, ext.length, depth, bool(st & Status.ALLOCATED), bool(st & Status.ZERO),
                    bool(st & Status.DATA), ext.offset if has_offset else None,
                    ext.node.filename if has_offset and ext.node is not None else None)


def mergeable(a: MapEntry, b: MapEntry) -> bool:
    if (a.zero, a.data, a.depth, a.present, a.filename is None, a.offset is None) != \
            (b.zero, b.data, b.depth, b.present, b.filename is None, b.offset is None):
        return False
    if a.filename is not None and a.filename != b.filename:
        return False
    if a.offset is not None and a.offset + a.length != b.offset:
        return False
    return True


def map_entries(node: BlockDriver, start: int = 0, max_length: int | None = None):
    """Yield merged MapEntry objects over [start, start+max_length)."""
    end = node.size() if max_length is None else min(node.size(), start + max_length)
    cur: MapEntry | None = None
    pos = start
    while pos < end:
        nxt = get_block_status(node, pos, end - pos)
        pos += nxt.length
        if cur is not None and mergeable(cur, nxt):
            cur.length += nxt.length
            continue
        if cur is not None:
            yield cur
        cur = nxt
    if cur is None:
        # qemu-img dumps its (empty) current entry even when there is nothing to map
        cur = MapEntry(start, 0, 0, False, False, False, None, None)
    yield cur


def json_entry(e: MapEntry) -> str:
    s = (f'{{ "start": {e.start}, "length": {e.length}, "depth": {e.depth}, '
         f'"present": {str(e.present).lower()}, "zero": {str(e.zero).lower()}, "data": {str(e.data).lower()}')
    if e.offset is not None:
        s += f', "offset": {e.offset}'
    return s + "}"


def _hex(n: int) -> str:
    return f"{n:#x}" if n else "0"


@cli.command("map")
@click.option("-f", "fmt", default=None)
@click.option("--output", "output", default="human")
@click.option("--start-offset", "start_offset", default="0")
@click.option("--max-length", "max_length", default=None)
@click.option("-U", "--force-share", "force_share", is_flag=True)
@click.option("--image-opts", "image_opts", is_flag=True, hidden=True)
@click.argument("filename")
def map_cmd(fmt, output, start_offset, max_length, force_share, image_opts, filename):
    """Dump the allocation of an image (qemu-img map)."""
    if output not in ("human", "json"):
        die("--output must be used with human or json as argument.")
    try:
        start = parse_size(start_offset)
        maxlen = parse_size(max_length) if max_length is not None else None
    except BlockError:
        die("Invalid start offset specified! You may use k, M, G, T, P or E suffixes for ")
    try:
        with opened(filename, fmt, read_only=True) as node:
            entries = map_entries(node, start, maxlen)
            if output == "json":
                out = []
                for e in entries:
                    out.append(json_entry(e))
                click.echo("[" + ",\n".join(out) + "]")
                return
            lines = [f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File"]
            prev: MapEntry | None = None
            for e in entries:
                # the human format ignores the distinction between 0, ZERO and ZERO|DATA: merge again
                if not e.data or e.zero:
                    e = replace(e, data=False, zero=True)
                if e.data and e.offset is None:
                    click.echo("\n".join(lines))
                    die("File contains external, encrypted or compressed clusters.")
                if prev is not None and mergeable(prev, e):
                    prev.length += e.length
                    continue
                if prev is not None and prev.data and not prev.zero:
                    lines.append(f"{_hex(prev.start):<16}{_hex(prev.length):<16}{_hex(prev.offset or 0):<16}"
                                 f"{prev.filename}")
                prev = e
            if prev is not None and prev.data and not prev.zero:
                lines.append(f"{_hex(prev.start):<16}{_hex(prev.length):<16}{_hex(prev.offset or 0):<16}"
                             f"{prev.filename}")
            click.echo("\n".join(lines))
    except BlockError as exc:
        die(exc.message)
