"""A manifest made from a directory: ``parablock batch SRC_DIR --target-dir OUT [-O FMT]``.

Layer: engine.batch.  Every file of the directory (not its subdirectories) that is a disk image becomes
one convert item:

- a file whose format is probed (qcow2, vmdk, vhdx, vdi, qed, dynamic vpc);
- a fixed VHD (probing cannot see it: it is raw data with a ``conectix`` footer in its last 512 bytes);
- a raw image by its name (``.img``, ``.raw``).

Files that only hold another image's data are left out: the extent files a vmdk descriptor names, and
the backing files of other images (they are read through their overlays; a backing file with no overlay
in the directory is converted on its own).  Targets are ``OUT/<name>.<ext>``; two sources with the same
stem keep their own extension in the name.  The manifest can be saved (``--save-manifest``) to run it
again, edit it, or run it on Dask.
"""
from __future__ import annotations

import os
from typing import Any

from engine.batch.manifest import Item, Manifest
from engine.errors import BlockError, InvalidArgument

EXT = {"qcow2": "qcow2", "raw": "raw", "vmdk": "vmdk", "vpc": "vhd", "vhdx": "vhdx", "vdi": "vdi", "qed": "qed"}
RAW_NAMES = (".img", ".raw")


def _has_vhd_footer(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() < 512:
                return False
            f.seek(-512, os.SEEK_END)
            return f.read(8) == b"conectix"
    except OSError:
        return False


def scan(src_dir: str, target_dir: str, fmt: str, compress: bool, options: dict[str, str],
         executor: Any) -> tuple[list[dict[str, Any]], list[str]]:
    """(manifest items as dicts, notes on what was left out and why)."""
    from engine.image import open_image, probe_file

    if not os.path.isdir(src_dir):
        raise InvalidArgument(f"'{src_dir}' is not a directory")
    found: list[tuple[str, str]] = []  # (path, format)
    notes: list[str] = []
    for name in sorted(os.listdir(src_dir)):
        path = os.path.join(src_dir, name)
        if not os.path.isfile(path) or name.startswith("."):
            continue
        try:
            probed = probe_file(path, executor)
        except BlockError as exc:
            notes.append(f"{name}: skipped: {exc.message}")
            continue
        if probed == "raw":
            if _has_vhd_footer(path):
                probed = "vpc"
            elif not name.lower().endswith(RAW_NAMES):
                continue  # not an image we recognise: leave it alone, silently
        found.append((path, probed))
    # what other images read: extent files of vmdk descriptors and backing files
    used: dict[str, str] = {}
    failing: dict[str, str] = {}
    for path, probed in found:
        try:
            node = open_image(path, executor, fmt=probed, read_only=True)
        except BlockError as exc:
            failing[path] = exc.message
            continue
        try:
            for ext in getattr(node, "extents", []):
                real = os.path.realpath(ext.file.filename)
                if real != os.path.realpath(path):
                    used[real] = f"an extent of {os.path.basename(path)}"
            b = node.backing
            while b is not None:
                used.setdefault(os.path.realpath(b.filename), f"the backing file of {os.path.basename(path)}")
                b = b.backing
        finally:
            node.close()
    stems: dict[str, int] = {}
    for path, _ in found:
        stem = os.path.splitext(os.path.basename(path))[0]
        stems[stem] = stems.get(stem, 0) + 1
    items = []
    for path, probed in found:
        why = used.get(os.path.realpath(path))
        if why is not None:
            notes.append(f"{os.path.basename(path)}: left out: {why}")
            continue
        base = os.path.basename(path)
        if path in failing:  # still an item: the run reports it as failed, the others go on
            notes.append(f"{base}: will fail: {failing[path]}")
        stem = os.path.splitext(base)[0]
        tname = (stem if stems[stem] == 1 else base) + "." + EXT[fmt]
        item: dict[str, Any] = {"name": base, "source": os.path.abspath(path), "source_format": probed,
                                "target": os.path.abspath(os.path.join(target_dir, tname)), "format": fmt}
        if compress:
            item["compress"] = True
        if options:
            item["options"] = dict(options)
        items.append(item)
    return items, notes


def manifest_from_dir(src_dir: str, target_dir: str, fmt: str, compress: bool, options: dict[str, str],
                      executor: Any, state_dir: str) -> tuple[Manifest, list[dict[str, Any]], list[str]]:
    """A validated Manifest (its path names the state file, in ``state_dir``), the raw items and notes."""
    from engine.batch.manifest import _item

    items, notes = scan(src_dir, target_dir, fmt, compress, options, executor)
    if not items:
        raise InvalidArgument(f"no disk images found in '{src_dir}'")
    parsed: list[Item] = []
    for d in items:
        item, problems = _item(d, src_dir)
        if problems:
            raise InvalidArgument(f"{d['name']}: " + "; ".join(problems))
        parsed.append(item)  # type: ignore[arg-type]
    return Manifest(os.path.join(os.path.abspath(state_dir), ".parablock-batch"), parsed), items, notes
