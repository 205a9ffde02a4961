"""Running a manifest on a Dask distributed cluster (``parablock batch MANIFEST --scheduler tcp://H:P``).

Layer: engine.batch.  Each item is one Dask task.  The task starts ``python -m engine.batch.item`` as a
child process on the Dask worker's machine: that child runs parablock's engine over its own worker pool
(Dask's worker processes are daemonic and may not fork pools of their own, and a child keeps a
crashing item from taking the Dask worker down).  The child's progress lines go to a
``distributed.Queue`` the client reads for the same progress display as a local run.  An item with
``host`` runs only on the Dask workers of that host (or that exact worker address): the files are where
the manifest says they are.  Skip decisions are taken where the files are (the task gets the item's
previous state record); the client keeps the state file and writes the report.
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

from engine.batch.manifest import Manifest
from engine.batch.progress import BatchProgress
from engine.batch.runner import dependency_failure, load_state, report, save_state, state_path
from engine.errors import InvalidArgument


def remote_item(item: dict[str, Any], prior: dict[str, Any] | None, workers: int | None, verify: bool,
                queue_name: str | None) -> dict[str, Any]:
    """The Dask task: run one item in a child process and forward its progress."""
    queue = None
    if queue_name:
        from distributed import Queue

        queue = Queue(queue_name)
    req = json.dumps({"item": item, "prior": prior, "workers": workers, "verify": verify})
    proc = subprocess.Popen([sys.executable, "-m", "engine.batch.item"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    errs: list[str] = []
    t = threading.Thread(target=lambda: errs.append(proc.stderr.read()), daemon=True)  # type: ignore[union-attr]
    t.start()
    proc.stdin.write(req)
    proc.stdin.close()
    result = None
    for line in proc.stdout:
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if "progress" in msg and queue is not None:
            try:
                queue.put(msg["progress"], timeout=5)
            except Exception:  # noqa: BLE001 - progress is best effort; the copy goes on
                pass
        elif "result" in msg:
            result = msg["result"]
    rc = proc.wait()
    t.join(5)
    if result is None:
        err = "".join(errs).strip().splitlines()
        result = {"name": item["name"], "kind": item["kind"], "source": item["source"],
                  "target": item["target"], "format": item["format"], "status": "failed",
                  "error": f"the item's process ended with exit code {rc}"
                           + (f": {err[-1]}" if err else ""),
                  "bytes": 0, "data_bytes": 0, "seconds": 0.0, "digest": None, "verified": False,
                  "record": None}
    import socket

    result["host"] = socket.gethostname()
    return result


def run_dask(manifest: Manifest, scheduler: str, *, workers: int | None = None, verify: bool = False,
             state_file: str | None = None, progress: bool = False, timeout: float = 10) -> dict[str, Any]:
    try:
        from distributed import Client, Queue, as_completed
    except ImportError:
        raise InvalidArgument("--scheduler needs the 'distributed' package (pip install "
                              "'parablock[dask]')") from None
    t0 = time.time()
    spath = state_path(manifest, state_file)
    state = load_state(spath)
    try:
        client = Client(scheduler, timeout=timeout)
    except (OSError, TimeoutError) as exc:
        raise InvalidArgument(f"Could not connect to the Dask scheduler at {scheduler}: {exc}") from None
    results: dict[str, dict[str, Any]] = {}
    display = None
    stop = threading.Event()
    try:
        sizes = {i.name: 0 for i in manifest.items}  # learnt from the items' first progress lines
        display = BatchProgress(sizes, progress)
        qname = f"parablock-progress-{uuid.uuid4().hex}" if progress else None
        queue = Queue(qname, client=client) if qname else None
        known: dict[str, list] = {}
        workers_by_addr = client.scheduler_info()["workers"]
        for info in workers_by_addr.values():
            known.setdefault(info.get("host"), []).append(info)
        def finished(item: Any, res: dict[str, Any]) -> None:
            if res.get("bytes"):
                sizes[item.name] = res["bytes"]
                display.total = max(1, sum(sizes.values()))
            results[item.name] = res
            if res["status"] == "failed":
                state.pop(item.name, None)
            elif res.get("record"):
                state[item.name] = res["record"]
            save_state(spath, state)
            display.item_finished(res)

        def submit(item: Any) -> Any:
            kw: dict[str, Any] = {}
            if item.host:
                if item.host not in known and not any(item.host in w for w in workers_by_addr):
                    finished(item, _placement_failure(item, sorted(h for h in known if h)))
                    return None
                kw = {"workers": [item.host], "allow_other_workers": False}
            return client.submit(remote_item, item.to_dict(), state.get(item.name), workers, verify, qname,
                                 key=f"parablock-{item.name}-{uuid.uuid4().hex[:8]}", pure=False, **kw)

        def pump() -> None:
            while not stop.wait(0.5) and queue is not None:
                try:
                    batch = queue.get(batch=True)  # whatever arrived, without blocking the scheduler
                except Exception:  # noqa: BLE001 - the client is closing
                    return
                for name, done, total in batch:
                    if name in sizes and total:
                        sizes[name] = total
                        display.total = max(1, sum(sizes.values()))
                    display.update(name, done, total)

        pumper = threading.Thread(target=pump, daemon=True)
        pumper.start()
        deps = manifest.dependencies()
        waiting = list(manifest.items)
        running = as_completed()
        futures: dict[Any, Any] = {}
        while waiting or futures:
            for item in list(waiting):
                failed_dep = [d for d in deps[item.name] if results.get(d, {}).get("status") == "failed"]
                if failed_dep:
                    waiting.remove(item)
                    finished(item, dependency_failure(item, failed_dep[0], results[failed_dep[0]]))
                elif all(d in results for d in deps[item.name]):
                    waiting.remove(item)
                    fut = submit(item)
                    if fut is not None:
                        futures[fut] = item
                        running.add(fut)
            if not futures:
                continue
            fut = next(running)
            item = futures.pop(fut)
            try:
                res = fut.result()
            except Exception as exc:  # noqa: BLE001 - the task itself failed (e.g. its worker died)
                res = {"name": item.name, "kind": item.kind, "source": item.source, "target": item.target,
                       "format": item.format, "status": "failed", "error": f"Dask task failed: {exc}",
                       "bytes": 0, "data_bytes": 0, "seconds": 0.0, "digest": None, "verified": False,
                       "record": None}
            finished(item, res)
        stop.set()
        pumper.join(2)
    finally:
        stop.set()
        if display is not None:
            display.close()
        client.close()
    ordered = [results[i.name] for i in manifest.items if i.name in results]
    return report(manifest, ordered, t0, scheduler)


def _placement_failure(item: Any, hosts: list[str]) -> dict[str, Any]:
    return {"name": item.name, "kind": item.kind, "source": item.source, "target": item.target,
            "format": item.format, "status": "failed",
            "error": f"no Dask worker on host '{item.host}' (workers are on: {', '.join(hosts) or 'none'})",
            "bytes": 0, "data_bytes": 0, "seconds": 0.0, "digest": None, "verified": False, "record": None}
