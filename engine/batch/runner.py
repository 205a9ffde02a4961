"""Running a manifest: the plan (``--dry-run``), the state file, the local runner and the report.

Layer: engine.batch.  A local run starts ONE worker pool for the whole batch (the shared budget of
worker processes) whose shared-memory slots are the shared memory budget, and runs up to ``jobs`` items
at once on threads of this process.  Each running item may hold ``inflight`` slots plus one for
writes that go through the coordinator, so ``jobs * (inflight + 1)`` slots never exceed the budget and
no item can starve another of slots.  A failing item is recorded with its error; the others go on.

The state file (``MANIFEST.state.json`` unless told otherwise) is rewritten atomically after every item,
so an interrupted batch resumes where it stopped.
"""
from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Any

from engine.batch.item import Context, file_sig, run_item
from engine.batch.manifest import Item, Manifest
from engine.batch.progress import BatchProgress
from engine.errors import BlockError

MiB = 1 << 20
SLOT = 4 * MiB


def state_path(manifest: Manifest, explicit: str | None = None) -> str:
    return explicit or manifest.path + ".state.json"


def load_state(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            doc = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        return {}  # unreadable state only costs a re-run
    return doc.get("items", {}) if isinstance(doc, dict) else {}


def save_state(path: str, items: dict[str, Any]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"version": 1, "items": items}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def source_sizes(items: list[Item], ex: Any) -> dict[str, int]:
    """Each item's virtual size (0 when its source cannot be opened: the run reports why)."""
    from engine.image import open_image

    sizes = {}
    for item in items:
        try:
            node = open_image(item.source, ex, fmt=item.source_format, read_only=True)
        except BlockError:
            sizes[item.name] = 0
            continue
        try:
            sizes[item.name] = node.size()
        finally:
            node.close()
    return sizes


def plan(manifest: Manifest, state: dict[str, Any], verify: bool) -> list[dict[str, Any]]:
    """What a run would do, item by item, with qemu-img measure's estimates for the target."""
    from engine.cli.cmd_measure import MeasureError, qcow2_measure, raw_measure
    from engine.cli.common import make_executor
    from engine.image import open_image

    ex = make_executor()
    out = []
    try:
        for item in manifest.items:
            entry: dict[str, Any] = {"name": item.name, "kind": item.kind, "source": item.source,
                                     "target": item.target, "format": item.format, "action": "run",
                                     "error": None}
            if item.kind == "backup":
                entry["sync"] = item.sync
            prior = state.get(item.name)
            try:
                node = open_image(item.source, ex, fmt=item.source_format, read_only=True)
            except BlockError as exc:
                entry.update(action="fail", error=f"Could not open '{item.source}': {exc.message}")
                out.append(entry)
                continue
            try:
                entry["source-format"] = node.format_name
                entry["virtual-size"] = node.size()
                if prior and prior.get("spec") == item.spec_key() and \
                        prior.get("source") == file_sig(item.source) and \
                        prior.get("target") == file_sig(item.target):
                    entry["action"] = "skip" if prior.get("digest") or not (verify or item.verify) \
                        else "verify"
                from engine.batch.item import _create_opts

                opts = _create_opts(item)
                opts.pop("backing_file", None)
                opts.pop("backing_fmt", None)
                try:
                    if item.format == "qcow2":
                        entry["measure"] = qcow2_measure(opts, node)
                    elif item.format == "raw":
                        entry["measure"] = raw_measure(opts, node)
                    else:  # qemu-img measure knows only qcow2 and raw: the data is the floor
                        from engine.cli.cmd_measure import allocated_bytes

                        entry["estimate"] = {"data": allocated_bytes(node, 65536)}
                except MeasureError as exc:
                    entry.update(action="fail", error=str(exc))
            finally:
                node.close()
            out.append(entry)
    finally:
        ex.close_all()
    return out


def dependency_failure(item: Item, dep: str, dep_result: dict[str, Any]) -> dict[str, Any]:
    return {"name": item.name, "kind": item.kind, "source": item.source, "target": item.target,
            "format": item.format, "status": "failed",
            "error": f"not run: its backing file comes from item {dep}, which failed",
            "bytes": 0, "data_bytes": 0, "seconds": 0.0, "digest": None, "verified": False, "record": None}


def report(manifest: Manifest, results: list[dict[str, Any]], t0: float, where: str) -> dict[str, Any]:
    counts = {s: sum(1 for r in results if r["status"] == s) for s in ("done", "skipped", "failed")}
    copied = sum(r.get("bytes", 0) for r in results if r["status"] == "done")
    seconds = time.time() - t0
    return {"manifest": manifest.path, "where": where, "started": t0, "seconds": round(seconds, 3),
            "items": [{k: v for k, v in r.items() if k != "record"} for r in results],
            "summary": {**counts, "total": len(results), "bytes": copied,
                        "rate": round(copied / seconds) if seconds > 0 else 0}}


def run_local(manifest: Manifest, *, jobs: int | None = None, workers: int | None = None,
              memory: int = 64 * MiB, verify: bool = False, state_file: str | None = None,
              progress: bool = False) -> dict[str, Any]:
    from workers.pool import PoolExecutor, WorkerPool, default_workers

    t0 = time.time()
    spath = state_path(manifest, state_file)
    state = load_state(spath)
    nworkers = workers or default_workers()
    njobs = max(1, min(jobs or max(2, 2 * nworkers), len(manifest.items)))
    nslots = max(2 * njobs + 1, memory // SLOT)
    inflight = max(1, (nslots - 1) // njobs - 1)
    pool = WorkerPool(nworkers, nslots=nslots, slot_size=SLOT, wait=False)
    ex = PoolExecutor(pool)
    results: dict[str, dict[str, Any]] = {}
    lock = threading.Lock()
    display = None
    try:
        sizes = source_sizes(manifest.items, ex)
        display = BatchProgress(sizes, progress)
        ctx = Context(pool, ex, max_inflight=inflight, verify=verify, progress=display.update)

        def finished(res: dict[str, Any]) -> None:
            with lock:
                results[res["name"]] = res
                if res["status"] == "failed":
                    state.pop(res["name"], None)
                elif res.get("record"):
                    state[res["name"]] = res["record"]
                save_state(spath, state)
            display.item_finished(res)

        deps = manifest.dependencies()
        with ThreadPoolExecutor(njobs, thread_name_prefix="parablock-batch") as tp:
            waiting = list(manifest.items)
            pending: dict = {}
            while waiting or pending:
                for item in list(waiting):
                    failed_dep = [d for d in deps[item.name] if results.get(d, {}).get("status") == "failed"]
                    if failed_dep:
                        waiting.remove(item)
                        finished(dependency_failure(item, failed_dep[0], results[failed_dep[0]]))
                    elif all(d in results for d in deps[item.name]):
                        waiting.remove(item)
                        pending[tp.submit(run_item, item, state.get(item.name), ctx)] = item
                if not pending:
                    continue
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    pending.pop(fut)
                    finished(fut.result())
    finally:
        if display is not None:
            display.close()
        ex.close_all()
        pool.close()
    ordered = [results[i.name] for i in manifest.items if i.name in results]
    return report(manifest, ordered, t0, "local")
