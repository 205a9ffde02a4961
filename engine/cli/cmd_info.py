"""``parablock info`` — qemu-img info: human and JSON output, ``--backing-chain``, snapshots.

JSON keys and their order are qemu-img 7.2's (ImageInfo).
"""
from __future__ import annotations

import time
from typing import Any

import click

from engine.cli.common import die, json_dumps, opened
from engine.cli.main import cli
from engine.driver import BlockDriver
from engine.image import path_combine
from engine.units import human_size


def image_info(node: BlockDriver, filename: str) -> dict[str, Any]:
    """ImageInfo for one node, keys in qemu-img's order."""
    out: dict[str, Any] = {}
    bname = node.backing_filename
    if bname and node.backing_format:
        out["backing-filename-format"] = node.backing_format
    snaps = getattr(node, "snapshots", None)
    if snaps:
        out["snapshots"] = [{
            "icount": sn.icount if sn.icount is not None else None,
            "vm-clock-nsec": sn.vm_clock_nsec % 10**9,
            "name": sn.name,
            "date-sec": sn.date_sec,
            "date-nsec": sn.date_nsec,
            "vm-clock-sec": sn.vm_clock_nsec // 10**9,
            "id": sn.id_str,
            "vm-state-size": sn.vm_state_size,
        } for sn in snaps]
        for s in out["snapshots"]:
            if s["icount"] is None:
                del s["icount"]
    out["virtual-size"] = node.size()
    out["filename"] = filename
    cs = node.cluster_size()
    if cs is not None:
        out["cluster-size"] = cs
    out["format"] = node.format_name
    out["actual-size"] = node.allocated_size()
    spec = node.info_specific()
    if spec is not None:
        out["format-specific"] = spec
    if bname:
        out["full-backing-filename"] = path_combine(filename, bname)
        out["backing-filename"] = bname
    out["dirty-flag"] = node.is_dirty()
    return out


def snapshot_table(snaps: list[dict[str, Any]]) -> list[str]:
    lines = [f"{'ID':<10}{'TAG':<17}{'VM SIZE':>8}{'DATE':>20}{'VM CLOCK':>13}{'ICOUNT':>11}"]
    for s in snaps:
        date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["date-sec"]))
        secs = s["vm-clock-sec"]
        clock = f"{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}.{s['vm-clock-nsec'] // 1000000:03d}"
        icount = str(s["icount"]) if "icount" in s else ""
        lines.append(f"{s['id']:<9} {s['name']:<16} {human_size(s['vm-state-size']):>8}{date:>20}{clock:>13}"
                     f"{icount:>11}")
    return lines


def _dump_value(key: str, value: Any, indent: int, lines: list[str]) -> None:
    pad = " " * indent
    if isinstance(value, dict):
        lines.append(f"{pad}{key}:")
        for k, v in value.items():
            _dump_value(k.replace("-", " "), v, indent + 4, lines)
    elif isinstance(value, list):
        lines.append(f"{pad}{key}:")
        for i, v in enumerate(value):
            _dump_value(f"[{i}]", v, indent + 4, lines)
    else:
        if isinstance(value, bool):
            value = "true" if value else "false"
        lines.append(f"{pad}{key}: {value}")


def human_info(info: dict[str, Any]) -> str:
    lines = [f"image: {info['filename']}", f"file format: {info['format']}",
             f"virtual size: {human_size(info['virtual-size'])} ({info['virtual-size']} bytes)",
             f"disk size: {human_size(info['actual-size'])}"]
    if "cluster-size" in info:
        lines.append(f"cluster_size: {info['cluster-size']}")
    if info.get("dirty-flag"):
        lines.append("cleanly shut down: no")
    if "backing-filename" in info:
        line = f"backing file: {info['backing-filename']}"
        if info["full-backing-filename"] != info["backing-filename"]:
            line += f" (actual path: {info['full-backing-filename']})"
        lines.append(line)
        if "backing-filename-format" in info:
            lines.append(f"backing file format: {info['backing-filename-format']}")
    if info.get("snapshots"):
        lines.append("Snapshot list:")
        lines += snapshot_table(info["snapshots"])
    if "format-specific" in info:
        lines.append("Format specific information:")
        for k, v in info["format-specific"]["data"].items():
            _dump_value(k.replace("-", " "), v, 4, lines)
    return "\n".join(lines)


def collect(filename: str, fmt: str | None, chain: bool) -> list[dict[str, Any]]:
    infos = []
    seen: set[str] = set()
    while True:
        if filename in seen:
            die(f"Backing file '{filename}' creates an infinite loop.")
        seen.add(filename)
        with opened(filename, fmt, read_only=True, backing=False) as node:
            info = image_info(node, filename)
        infos.append(info)
        if not chain or "backing-filename" not in info:
            return infos
        filename = info["full-backing-filename"]
        fmt = info.get("backing-filename-format")


@cli.command("info")
@click.option("-f", "fmt", default=None)
@click.option("--output", "output", default="human")
@click.option("--backing-chain", "chain", is_flag=True)
@click.option("-U", "--force-share", "force_share", is_flag=True)
@click.option("--image-opts", "image_opts", is_flag=True, hidden=True)
@click.argument("filename")
def info_cmd(fmt, output, chain, force_share, image_opts, filename):
    """Show information about an image (qemu-img info)."""
    if output not in ("human", "json"):
        die("--output must be used with human or json as argument.")
    infos = collect(filename, fmt, chain)
    if output == "json":
        click.echo(json_dumps(infos if chain else infos[0]))
    else:
        click.echo("\n\n".join(human_info(i) for i in infos))
