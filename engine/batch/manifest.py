"""The batch manifest: many conversions and backups in one TOML or JSON file.

Layer: engine.batch.  Schema (docs/BATCH.md has the full description and an example ships in
``examples/batch.toml``)::

    [defaults]                 # optional: any item key, applied to every item that does not set it
    format = "qcow2"

    [[item]]                   # one per conversion or backup ("items" in JSON: a list of tables)
    name = "web01"             # unique; defaults to the target's file name
    kind = "convert"           # convert | backup
    source = "vm/web01.vmdk"   # paths are relative to the manifest's directory
    source_format = "vmdk"     # optional: probed when absent (raw is never guessed for a backup)
    target = "out/web01.qcow2"
    format = "qcow2"           # target format: raw qcow2 vmdk vpc vhdx vdi qed
    compress = false           # qcow2 compressed clusters (convert -c)
    options = { cluster_size = "64k" }   # creation options (convert -o)
    backing = "base.qcow2"     # the target's backing file (convert -B); relative to the target. An
                               # item whose backing file is another item's target runs after it
    backing_format = "qcow2"
    rate = "100M"              # bytes per second (convert -r)
    sparse = "4k"              # zero detection granularity (convert -S); "0" writes everything
    verify = false             # compare content digests of source and target afterwards
    host = "10.0.0.5"          # Dask: run on the worker(s) of this host or address
    # backups only
    sync = "full"              # full | incremental
    bitmap = "nightly"         # incremental: the source's persistent dirty bitmap (qcow2)
    bitmap_mode = "never"      # never | on-success (clear the bitmap in the source after the copy)

Validation collects every problem of the file and reports them together with the item they belong to.
"""
from __future__ import annotations

import json
import os
import tomllib
from dataclasses import asdict, dataclass, field
from typing import Any

from engine.errors import InvalidArgument
from engine.units import parse_size

KINDS = ("convert", "backup")
TARGET_FORMATS = ("raw", "qcow2", "vmdk", "vpc", "vhdx", "vdi", "qed")
_KEYS = {"name", "kind", "source", "source_format", "target", "format", "compress", "options", "backing",
         "backing_format", "rate", "sparse", "verify", "host", "sync", "bitmap", "bitmap_mode"}


@dataclass
class Item:
    name: str
    kind: str
    source: str  # absolute
    target: str  # absolute
    format: str = "qcow2"
    source_format: str | None = None
    compress: bool = False
    options: dict[str, str] = field(default_factory=dict)
    backing: str | None = None  # as written into the target (relative to it, or absolute)
    backing_format: str | None = None
    rate: int = 0
    sparse: int = 4096
    verify: bool = False
    host: str | None = None
    sync: str = "full"
    bitmap: str | None = None
    bitmap_mode: str = "never"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Item":
        return cls(**d)

    def spec_key(self) -> str:
        """What decides whether a previous run's result still answers this item."""
        d = self.to_dict()
        for k in ("verify", "host", "rate", "name"):
            d.pop(k)
        return json.dumps(d, sort_keys=True)


@dataclass
class Manifest:
    path: str
    items: list[Item]

    def dependencies(self) -> dict[str, set[str]]:
        """Item name -> the items that must finish first: those whose target is its backing file."""
        by_target = {i.target: i.name for i in self.items}
        deps: dict[str, set[str]] = {}
        for i in self.items:
            deps[i.name] = set()
            if i.backing:
                b = os.path.normpath(os.path.join(os.path.dirname(i.target), i.backing))
                if b in by_target:
                    deps[i.name].add(by_target[b])
        return deps


def _text(v: Any) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    return str(v)


def load(path: str) -> Manifest:
    """Read and validate a manifest.  Raises InvalidArgument naming every problem found."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise InvalidArgument(f"Could not read manifest '{path}': {exc.strerror}") from None
    as_json = path.endswith(".json") or (not path.endswith(".toml") and raw.lstrip()[:1] == b"{")
    if as_json:
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidArgument(f"{path}: not valid JSON: {exc}") from None
    else:
        try:
            doc = tomllib.loads(raw.decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            try:  # a JSON list of items, named without .json
                doc = json.loads(raw)
            except ValueError:
                raise InvalidArgument(f"{path}: not valid TOML: {exc}") from None
    if isinstance(doc, list):
        doc = {"item": doc}
    if not isinstance(doc, dict):
        raise InvalidArgument(f"{path}: the manifest must be a table with a list of items")
    unknown = set(doc) - {"defaults", "item", "items"}
    if unknown:
        raise InvalidArgument(f"{path}: unknown top-level key(s): {', '.join(sorted(unknown))}")
    defaults = doc.get("defaults", {})
    entries = doc.get("item", doc.get("items", []))
    if not isinstance(defaults, dict) or not isinstance(entries, list):
        raise InvalidArgument(f"{path}: 'defaults' must be a table and 'item' a list of tables")
    base_dir = os.path.dirname(os.path.abspath(path))
    errors: list[str] = []
    items: list[Item] = []
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            errors.append(f"item {i + 1}: not a table")
            continue
        merged = {**defaults, **entry}
        label = f"item {i + 1}" + (f" ({merged['name']})" if isinstance(merged.get("name"), str) else "")
        item, problems = _item(merged, base_dir)
        errors.extend(f"{label}: {p}" for p in problems)
        if item is not None:
            if item.name in seen:
                errors.append(f"{label}: the name '{item.name}' is used twice")
            seen.add(item.name)
            items.append(item)
    targets: dict[str, str] = {}
    for item in items:
        if item.target in targets:
            errors.append(f"items {targets[item.target]} and {item.name} write the same target {item.target}")
        targets[item.target] = item.name
    if not entries and not errors:
        errors.append("no items")
    if not errors:
        m = Manifest(os.path.abspath(path), items)
        deps = m.dependencies()
        state: dict[str, int] = {}

        def visit(n: str) -> bool:  # False on a cycle
            if state.get(n) == 1:
                return False
            if state.get(n) == 2:
                return True
            state[n] = 1
            ok = all(visit(d) for d in deps[n])
            state[n] = 2
            return ok

        for n in deps:
            if not visit(n):
                errors.append(f"item {n}: its backing file depends on itself through other items")
                break
    if errors:
        raise InvalidArgument(f"{path}: invalid manifest:\n  " + "\n  ".join(errors))
    return Manifest(os.path.abspath(path), items)


def _item(d: dict[str, Any], base_dir: str) -> tuple[Item | None, list[str]]:
    problems = [f"unknown key '{k}'" for k in sorted(set(d) - _KEYS)]
    for k in ("source", "target"):
        if not isinstance(d.get(k), str) or not d[k]:
            problems.append(f"'{k}' (a path) is required")
    if problems:
        return None, problems
    kind = d.get("kind", "convert")
    if kind not in KINDS:
        problems.append(f"kind must be one of {', '.join(KINDS)}, not '{kind}'")
    fmt = d.get("format", "qcow2")
    if fmt not in TARGET_FORMATS:
        problems.append(f"format must be one of {', '.join(TARGET_FORMATS)}, not '{fmt}'")
    src = os.path.join(base_dir, os.path.expanduser(d["source"]))
    tgt = os.path.join(base_dir, os.path.expanduser(d["target"]))
    name = d.get("name", os.path.basename(tgt))
    opts = d.get("options", {})
    if not isinstance(opts, dict):
        problems.append("'options' must be a table of creation options")
        opts = {}
    rate = 0
    if d.get("rate") not in (None, 0, "0"):
        try:
            rate = parse_size(str(d["rate"]))
        except InvalidArgument:
            problems.append(f"rate '{d['rate']}' is not a size (bytes per second, e.g. 100M)")
    sparse = 4096
    if "sparse" in d:
        try:
            sparse = parse_size(str(d["sparse"]), default_suffix="")
        except InvalidArgument:
            problems.append(f"sparse '{d['sparse']}' is not a size")
        if sparse % 512 or sparse > 16 << 20:
            problems.append("sparse must be a multiple of 512 up to 16M (0 writes everything)")
    compress = d.get("compress", False)
    if not isinstance(compress, bool):
        problems.append("'compress' must be true or false")
    elif compress and fmt != "qcow2":
        problems.append("compression needs format qcow2")
    sync = d.get("sync", "full")
    bitmap = d.get("bitmap")
    mode = d.get("bitmap_mode", "never")
    if kind == "backup":
        if sync not in ("full", "incremental"):
            problems.append(f"sync must be full or incremental, not '{sync}'")
        if sync == "incremental":
            if not bitmap:
                problems.append("an incremental backup needs 'bitmap'")
            if not d.get("backing"):
                problems.append("an incremental backup needs 'backing' (the previous backup)")
            if fmt != "qcow2":
                problems.append("an incremental backup is written as qcow2 over its backing file")
        if mode not in ("never", "on-success"):
            problems.append(f"bitmap_mode must be never or on-success, not '{mode}'")
    elif bitmap or "sync" in d or "bitmap_mode" in d:
        problems.append("'sync', 'bitmap' and 'bitmap_mode' belong to backups (kind = \"backup\")")
    if d.get("backing") and fmt not in ("qcow2", "qed"):
        problems.append(f"a backing file needs format qcow2 or qed, not '{fmt}'")
    if d.get("backing") and not d.get("backing_format"):
        problems.append("'backing' needs 'backing_format'")
    for k in ("verify",):
        if not isinstance(d.get(k, False), bool):
            problems.append(f"'{k}' must be true or false")
    if os.path.abspath(src) == os.path.abspath(tgt):
        problems.append("source and target are the same file")
    if problems:
        return None, problems
    return Item(name=str(name), kind=kind, source=src, target=tgt, format=fmt,
                source_format=d.get("source_format"), compress=compress,
                options={str(k): _text(v) for k, v in opts.items()}, backing=d.get("backing"),
                backing_format=d.get("backing_format"), rate=rate, sparse=sparse,
                verify=bool(d.get("verify", False)), host=d.get("host"), sync=sync, bitmap=bitmap,
                bitmap_mode=mode), []
