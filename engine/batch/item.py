"""One batch item, start to end: skip check, copy, verify, bitmap update; and its state record.

Layer: engine.batch.  The same function runs an item in the batch process (local runs: many items on
threads sharing one worker pool) and in a Dask worker's child process (``python -m engine.batch.item``:
the item as JSON on stdin, progress lines and the result on stdout).

Order of a copy: the target is created under a temporary name next to it (``.NAME.parablock-part``) and
renamed over the target only when the copy is complete and flushed; a failure removes the partial file,
so a target either is the previous one or the complete new one.  Formats whose image is several files
(vmdk monolithicFlat and twoGbMaxExtent*: the descriptor names its extents) are written in place.

State record (kept by the runner in ``MANIFEST.state.json`` under the item's name): the item's spec, the
source's and target's (size, mtime_ns, inode), and the content digest when it was verified.  A later run
skips the item when spec, source and target are unchanged (and, with --verify, when it was verified).
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from engine.batch.manifest import Item
from engine.errors import BlockError, InvalidArgument, os_error_text

ProgressFn = Callable[[str, int, int], None]


@dataclass
class Context:
    """What items share in one process: the worker pool (and its executor) and the limits."""

    mover: Any  # workers.pool.WorkerPool
    executor: Any  # workers.pool.PoolExecutor
    max_inflight: int = 4
    verify: bool = False
    progress: ProgressFn = field(default=lambda name, done, total: None)


def _sync_dir(path: str) -> None:
    """Make a rename durable (the directory entry reaches the disk)."""
    try:
        fd = os.open(path or ".", os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def file_sig(path: str) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _in_place(item: Item) -> bool:
    sub = item.options.get("subformat", "")
    return item.format == "vmdk" and sub in ("monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat")


def _part_name(target: str) -> str:
    d, base = os.path.split(target)
    return os.path.join(d, f".{base}.parablock-part")


def _create_opts(item: Item) -> dict[str, Any]:
    from engine.cli.common import parse_o

    chunks = [f"{k}={str(v).replace(',', ',,')}" for k, v in item.options.items()]
    opts = parse_o(chunks) if chunks else {}
    if item.backing:
        opts["backing_file"] = item.backing
        opts["backing_fmt"] = item.backing_format
    return opts


def _open_source(item: Item, ex: Any, read_only: bool = True):
    from engine.image import open_image

    try:
        return open_image(item.source, ex, fmt=item.source_format, read_only=read_only,
                          probe_raw=item.kind != "backup" or item.source_format is not None)
    except BlockError as exc:
        raise BlockError(f"Could not open '{item.source}': {exc.message}") from None


def _dirty_ranges(src: Any, name: str) -> list[tuple[int, int]]:
    lister = getattr(src, "bitmaps", None)
    if lister is None:
        raise InvalidArgument(f"source format '{src.format_name}' has no persistent bitmaps; an "
                              "incremental backup needs a qcow2 source")
    for bm in lister():
        if bm.name == name:
            return list(bm.dirty_extents())
    raise InvalidArgument(f"Dirty bitmap '{name}' not found in '{src.filename}'")


def digest_of(path: str, fmt: str | None, ctx: Context, progress: Callable[[int], None] | None = None) -> str:
    from engine.digest import content_digest
    from engine.image import open_image

    node = open_image(path, ctx.executor, fmt=fmt, read_only=True)
    try:
        return content_digest(node, ctx.mover, progress, max_inflight=ctx.max_inflight)
    finally:
        node.close()


def _verify(item: Item, ctx: Context) -> str:
    """Digest source and target (through their chains); raise when they differ."""
    ctx.progress(item.name + " (verify)", 0, 1)
    want = digest_of(item.source, item.source_format, ctx)
    got = digest_of(item.target, item.format, ctx)
    if want != got:
        raise BlockError(f"verify failed: the target's content differs from the source's ({got} != {want})")
    return got


def _copy(item: Item, ctx: Context, dest: str) -> dict[str, int]:
    from engine.convert import Converter, ConvertOptions
    from engine.image import create_image, open_image

    ex = ctx.executor
    src = _open_source(item, ex)
    target = None
    try:
        total = src.size()
        only = None
        if item.kind == "backup" and item.sync == "incremental":
            only = _dirty_ranges(src, item.bitmap or "")
        try:
            create_image(dest, item.format, total, ex, _create_opts(item))
        except BlockError as exc:
            raise BlockError(f"{item.target}: error while converting {item.format}: {exc.message}") from None
        target = open_image(dest, ex, fmt=item.format, read_only=False, backing=bool(item.backing),
                            options={"cache": "unsafe"})
        incremental = only is not None
        opts = ConvertOptions(compress=item.compress, sparse=item.sparse,
                              target_has_backing=bool(item.backing) and not incremental,
                              target_zero_init=not item.backing, max_inflight=ctx.max_inflight,
                              rate=item.rate, only=only)

        def progress(done: int, _total: int) -> None:
            ctx.progress(item.name, done, total)

        stats = Converter([src], target, ctx.mover, opts, progress=progress).run()
        _durable_flush(target)
        return {"bytes": total, "data_bytes": stats.data_bytes, "zero_bytes": stats.zero_bytes,
                "skipped_bytes": stats.skipped_bytes}
    finally:
        src.close()
        if target is not None:
            target.close()


def _durable_flush(node: Any) -> None:
    """The copy ran with cache=unsafe (no flush at every metadata barrier, as qemu-img convert); before
    the target is renamed into place and recorded as done, its files reach the disk once."""
    files = [node.file] + [e.file for e in getattr(node, "extents", [])]
    for f in files:
        if f is not None:
            f.cache_unsafe = False
    node.cache_unsafe = False
    node.flush()  # a format's flush flushes its files (every extent of a vmdk)


def _clear_bitmap(item: Item, ctx: Context) -> None:
    src = _open_source(item, ctx.executor, read_only=False)
    try:
        for bm in src.bitmaps():  # type: ignore[attr-defined]
            if bm.name == item.bitmap:
                bm.clear()
    finally:
        src.close()


def run_item(item: Item, prior: dict[str, Any] | None, ctx: Context) -> dict[str, Any]:
    """Run one item; never raises for the item's own failures (they are in the result)."""
    t0 = time.monotonic()
    result: dict[str, Any] = {"name": item.name, "kind": item.kind, "source": item.source,
                              "target": item.target, "format": item.format, "status": "failed",
                              "error": None, "bytes": 0, "data_bytes": 0, "seconds": 0.0,
                              "digest": None, "verified": False, "record": None}
    want_verify = item.verify or ctx.verify
    try:
        src_sig = file_sig(item.source)
        if src_sig is None:
            raise BlockError(f"Could not open '{item.source}': No such file or directory")
        if prior and prior.get("spec") == item.spec_key() and prior.get("source") == src_sig \
                and prior.get("target") == file_sig(item.target):
            digest = prior.get("digest")
            if want_verify and not digest:
                digest = _verify(item, ctx)
            result.update(status="skipped", digest=digest, verified=bool(digest), bytes=prior.get("bytes", 0),
                          record={**prior, "digest": digest})
            return result
        dest = item.target if _in_place(item) else _part_name(item.target)
        try:
            result.update(_copy(item, ctx, dest))
            if dest != item.target:
                os.replace(dest, item.target)
                _sync_dir(os.path.dirname(item.target))
        except BaseException:
            if dest != item.target:
                try:
                    os.unlink(dest)
                except OSError:
                    pass
            raise
        digest = _verify(item, ctx) if want_verify else None
        if item.kind == "backup" and item.bitmap and item.bitmap_mode == "on-success":
            _clear_bitmap(item, ctx)
        result.update(status="done", digest=digest, verified=bool(digest),
                      record={"spec": item.spec_key(), "source": file_sig(item.source),
                              "target": file_sig(item.target), "digest": digest, "bytes": result["bytes"],
                              "finished": time.time()})
    except BlockError as exc:
        result["error"] = exc.message
    except OSError as exc:
        result["error"] = f"{item.target}: {os_error_text(exc)}"
    finally:
        result["seconds"] = round(time.monotonic() - t0, 3)
    return result


def main() -> int:
    """``python -m engine.batch.item``: run one item with its own worker pool (a Dask task's child).

    stdin: ``{"item": {...}, "prior": {...} | null, "workers": N, "verify": bool}``; stdout: one JSON
    object per line, ``{"progress": [name, done, total]}`` while it runs and ``{"result": {...}}`` last."""
    from workers.pool import PoolExecutor, WorkerPool

    req = json.load(sys.stdin)
    item = Item.from_dict(req["item"])
    last = [0.0]

    def progress(name: str, done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= 0.25 or done >= total:
            last[0] = now
            sys.stdout.write(json.dumps({"progress": [name, done, total]}) + "\n")
            sys.stdout.flush()

    pool = WorkerPool(req.get("workers") or None, wait=False)
    ex = PoolExecutor(pool)
    try:
        ctx = Context(pool, ex, verify=bool(req.get("verify")), progress=progress,
                      max_inflight=max(2, 2 * pool.nworkers))
        result = run_item(item, req.get("prior"), ctx)
    finally:
        ex.close_all()
        pool.close()
    sys.stdout.write(json.dumps({"result": result}) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
