"""``parablock job`` — run block jobs (block-commit, block-stream, drive-mirror, drive-backup) on images
without a separate daemon, for batch scripts.  Options are the QMP commands' arguments.

Layer: engine.cli (composition root).  One invocation builds an in-process ``engine.daemon.core.Daemon``
on a worker pool (``--workers``), adds each image with ``blockdev-add`` (its backing chain opened from
the headers), starts every job through ``Daemon.execute`` — the same entry point QMP clients use, so the
argument checks and error texts are QEMU's — and supervises them on one asyncio loop: events arrive
through a monitor-like sink in ``daemon.monitors``, ``-p`` bars are drawn from ``query-block-jobs``
polled every 100 ms, converging jobs (mirror, active commit) are completed when READY (or, with
``--no-complete``, finished without pivot by ``block-job-cancel``).  All images are flushed and closed
before the command returns.  Exit 0 when every job completed, 1 (one ``parablock: ...`` line per
problem) when a job could not start or failed, 130 on Ctrl-C (jobs cancelled first).

Several jobs run in parallel when several job specs are given in one invocation (click's chained
subcommands): ``parablock job commit --top mid.qcow2 a.qcow2 stream b.qcow2``.  A spec's options go
before its image(s).  If one job cannot start, none is left running.
"""
from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import click

from engine.cli.common import PROG, CliExit
from engine.cli.main import cli

POLL = 0.1
NODE_NAME_MAX = 31
ON_ERROR = click.Choice(["report", "ignore"])


@dataclass
class Spec:
    """One job of the invocation, as parsed: what to add, what to call, how to finish."""

    kind: str                      # commit | stream | mirror | backup
    command: str                   # the QMP command
    image: str
    fmt: str | None = None
    node_name: str | None = None
    job_id: str | None = None
    args: dict[str, Any] = field(default_factory=dict)   # QMP arguments but device / job-id
    files: dict[str, str] = field(default_factory=dict)  # QMP key -> file name to find in the chain
    progress: bool = False
    complete: bool = True


@dataclass
class Run:
    spec: Spec
    job_id: str
    device: str
    error: str | None = None
    ended: bool = False
    gone: bool = False
    finished_ready: bool = False
    info: dict[str, Any] = field(default_factory=dict)


class EventSink:
    """A monitor for ``Daemon.monitors``: keeps the events and wakes the supervisor."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.wake = asyncio.Event()

    def send_event(self, ev: dict[str, Any]) -> None:
        self.events.append(ev)
        self.wake.set()

    def drain(self) -> list[dict[str, Any]]:
        out, self.events = self.events, []
        self.wake.clear()
        return out


# --------------------------------------------------------------------------------------------------
# option helpers
# --------------------------------------------------------------------------------------------------
def _size(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    if value is None:
        return None
    from engine.errors import BlockError
    from engine.units import parse_size

    try:
        return parse_size(value)
    except BlockError:
        raise click.BadParameter(f"'{value}' is not a size (bytes, or with a k, M, G, T suffix)") from None


def _common(f: Callable) -> Callable:
    """Options every job spec has."""
    opts = [
        click.option("-f", "fmt", type=click.Choice(["qcow2", "raw"]), default=None,
                     help="format of the image (default: probed)"),
        click.option("--node-name", default=None, help="node name of the image (default: from its file name)"),
        click.option("--job-id", default=None, help="job id (default: the node name)"),
        click.option("--speed", default=None, callback=_size, metavar="BYTES",
                     help="speed limit in bytes per second (k, M, G suffixes)"),
        click.option("-p", "progress", is_flag=True, help="show a progress bar"),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _put(args: dict[str, Any], key: str, value: Any) -> None:
    if value is not None:
        args[key] = value


class JobGroup(click.Group):
    """Chained job specs; an option found where the next spec should start gets a clear message."""

    def resolve_command(self, ctx: click.Context, args: list[str]):  # type: ignore[override]
        if args and args[0].startswith("-") and args[0] != "--":
            raise click.UsageError(f"option '{args[0]}' after a job's image: put each job's options "
                                   "before its image(s)")
        if args and args[0] == "--":  # tolerated between specs
            args = args[1:]
            if not args:
                raise click.UsageError("missing job spec after '--'")
        return super().resolve_command(ctx, args)


@cli.group("job", cls=JobGroup, chain=True, subcommand_metavar="SPEC [SPEC]...")
@click.option("--workers", type=click.IntRange(0, 256), default=None,
              help="worker processes (default: parablock --workers, else the CPU count; 0: in-process)")
@click.option("-p", "progress", is_flag=True, help="progress bars for every job")
@click.option("-q", "quiet", is_flag=True, help="print nothing on success")
def job_group(workers: int | None, progress: bool, quiet: bool) -> None:
    """Run block jobs on images, without a daemon, and wait for them.

    Each SPEC is a job: `commit`, `stream`, `mirror` or `backup` with its options, then its image(s).
    Several SPECs in one invocation run in parallel (one worker pool, one event loop); the command
    returns when all have ended:

    \b
      parablock job -p commit --top mid.qcow2 vm1.qcow2 stream vm2.qcow2
      parablock job mirror --sync full src.qcow2 copy.qcow2

    A SPEC's options go before its image(s); a lone `--` between SPECs is allowed.  Images are opened with their backing chains (from the
    headers); node names come from the file names (`vm1.qcow2` -> `vm1`) unless --node-name is given,
    and the job id is the node name unless --job-id is given.  Converging jobs (mirror, active commit)
    are completed when ready, unless --no-complete, which finishes them without the switch
    (block-job-cancel in ready state).  Exit 0 when every job completed, 1 when one could not start
    (nothing is left running) or failed (its QEMU error text is printed), 130 on Ctrl-C.
    """


@job_group.command("commit")
@_common
@click.option("--top", default=None, metavar="IMG", help="top image to commit (default: the image: active commit)")
@click.option("--base", default=None, metavar="IMG", help="image to commit into (default: the chain's bottom)")
@click.option("--backing-file", default=None, metavar="STR",
              help="backing file string to write into the overlay of top (default: base's path "
                   "relative to the overlay's directory)")
@click.option("--on-error", type=ON_ERROR, default=None)
@click.option("--no-complete", is_flag=True, help="active commit: finish without dropping the top layer")
@click.argument("image")
def commit_spec(fmt, node_name, job_id, speed, progress, top, base, backing_file, on_error, no_complete,
                image) -> Spec:
    """block-commit: merge the chain between --top and --base into --base."""
    s = Spec("commit", "block-commit", image, fmt, node_name, job_id, progress=progress,
             complete=not no_complete)
    _put(s.args, "backing-file", backing_file)
    _put(s.args, "speed", speed)
    _put(s.args, "on-error", on_error)
    if top is not None:
        s.files["top"] = top
    if base is not None:
        s.files["base"] = base
    return s


@job_group.command("stream")
@_common
@click.option("--base", default=None, metavar="IMG", help="keep this image and below (default: stream everything)")
@click.option("--bottom", default=None, metavar="IMG", help="last image to stream (exclusive with --base)")
@click.option("--backing-file", default=None, metavar="STR",
              help="backing file string to write into the image (default: base's path relative to it)")
@click.option("--on-error", type=ON_ERROR, default=None)
@click.argument("image")
def stream_spec(fmt, node_name, job_id, speed, progress, base, bottom, backing_file, on_error, image) -> Spec:
    """block-stream: copy the data of the backing chain (above --base) into the image."""
    if base is not None and bottom is not None:
        raise click.UsageError("'base' and 'bottom' cannot be specified at the same time")
    s = Spec("stream", "block-stream", image, fmt, node_name, job_id, progress=progress)
    _put(s.args, "backing-file", backing_file)
    _put(s.args, "speed", speed)
    _put(s.args, "on-error", on_error)
    if base is not None:
        s.files["base"] = base
    if bottom is not None:
        s.files["bottom"] = bottom
    return s


@job_group.command("mirror")
@_common
@click.option("--sync", type=click.Choice(["full", "top", "none"]), required=True)
@click.option("-O", "target_fmt", type=click.Choice(["qcow2", "raw"]), default=None,
              help="target format (default: the source's; probed with --existing)")
@click.option("--existing", is_flag=True, help="the target exists already (mode=existing); else it is created")
@click.option("--target-node-name", default=None)
@click.option("--granularity", default=None, callback=_size, metavar="BYTES")
@click.option("--buf-size", default=None, callback=_size, metavar="BYTES")
@click.option("--copy-mode", type=click.Choice(["background", "write-blocking"]), default=None)
@click.option("--unmap/--no-unmap", default=None)
@click.option("--on-source-error", type=ON_ERROR, default=None)
@click.option("--on-target-error", type=ON_ERROR, default=None)
@click.option("--no-complete", is_flag=True, help="finish without the switch to the target")
@click.argument("source")
@click.argument("target")
def mirror_spec(fmt, node_name, job_id, speed, progress, sync, target_fmt, existing, target_node_name,
                granularity, buf_size, copy_mode, unmap, on_source_error, on_target_error, no_complete,
                source, target) -> Spec:
    """drive-mirror: copy SOURCE to TARGET (created unless --existing)."""
    s = Spec("mirror", "drive-mirror", source, fmt, node_name, job_id, progress=progress,
             complete=not no_complete)
    a = s.args
    a["target"] = target
    a["sync"] = sync
    a["mode"] = "existing" if existing else "absolute-paths"
    for key, value in (("format", target_fmt), ("node-name", target_node_name), ("speed", speed),
                       ("granularity", granularity), ("buf-size", buf_size), ("copy-mode", copy_mode),
                       ("unmap", unmap), ("on-source-error", on_source_error),
                       ("on-target-error", on_target_error)):
        _put(a, key, value)
    return s


@job_group.command("backup")
@_common
@click.option("--sync", type=click.Choice(["full", "top", "none", "incremental", "bitmap"]), required=True)
@click.option("--bitmap", default=None, help="dirty bitmap of the source (incremental, bitmap)")
@click.option("--bitmap-mode", type=click.Choice(["on-success", "never", "always"]), default=None)
@click.option("-O", "target_fmt", type=click.Choice(["qcow2", "raw"]), default=None,
              help="target format (default: the source's)")
@click.option("--existing", is_flag=True, help="the target exists already (mode=existing); else it is created")
@click.option("--compress", is_flag=True, default=None, help="write compressed clusters")
@click.option("--on-source-error", type=ON_ERROR, default=None)
@click.option("--on-target-error", type=ON_ERROR, default=None)
@click.argument("source")
@click.argument("target")
def backup_spec(fmt, node_name, job_id, speed, progress, sync, bitmap, bitmap_mode, target_fmt, existing,
                compress, on_source_error, on_target_error, source, target) -> Spec:
    """drive-backup: point-in-time copy of SOURCE into TARGET (created unless --existing)."""
    s = Spec("backup", "drive-backup", source, fmt, node_name, job_id, progress=progress)
    a = s.args
    a["target"] = target
    a["sync"] = sync
    a["mode"] = "existing" if existing else "absolute-paths"
    for key, value in (("bitmap", bitmap), ("bitmap-mode", bitmap_mode), ("format", target_fmt),
                       ("compress", compress), ("speed", speed), ("on-source-error", on_source_error),
                       ("on-target-error", on_target_error)):
        _put(a, key, value)
    return s


# --------------------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------------------
@job_group.result_callback()
def run_specs(specs: list[Spec], workers: int | None, progress: bool, quiet: bool) -> None:
    if progress:
        for s in specs:
            s.progress = True
    if workers == 0:
        from workers.inproc import InProcessExecutor

        pool, executor = None, InProcessExecutor()
    else:
        from engine.cli.common import start_pool

        pool, executor = start_pool(workers)
    try:
        code, messages = asyncio.run(_main(specs, executor, quiet))
    finally:
        if pool is not None:
            pool.close()
    for m in messages:
        print(f"{PROG}: {m}", file=sys.stderr)
    if code:
        raise CliExit(code)


def _probe(path: str) -> str:
    """qcow2 when the file starts with qcow2's magic, else raw (a missing file: raw, whose blockdev-add
    then reports the open error)."""
    try:
        with open(path, "rb") as f:
            return "qcow2" if f.read(4) == b"QFI\xfb" else "raw"
    except OSError:
        return "raw"


def _derive_name(path: str, taken: Callable[[str], bool]) -> str:
    stem = os.path.splitext(os.path.basename(path.rstrip("/")))[0] or "image"
    name = re.sub(r"[^A-Za-z0-9._-]", "-", stem)
    if not name[0].isalpha():
        name = "img-" + name
    name = name[:NODE_NAME_MAX]
    out, n = name, 2
    while taken(out):
        suffix = f"-{n}"
        out = name[:NODE_NAME_MAX - len(suffix)] + suffix
        n += 1
    return out


def _in_chain(daemon: Any, root: Any, path: str) -> Any:
    """The node of ``root``'s chain whose file is ``path`` (compared as real paths), or None."""
    want = os.path.realpath(path)
    for n in daemon.graph.chain(root):
        if os.path.realpath(n.driver.filename) == want:
            return n
    return None


def _default_backing_file(daemon: Any, kind: str, args: dict[str, Any]) -> None:
    """Without ``--backing-file``, QEMU writes the path the base node was opened by, which is relative
    to *our* working directory when the chain was opened through a relative path ("a/base.qcow2" into
    a/top.qcow2, where it means a/a/base.qcow2).  We give the same base relative to the overlay's own
    directory instead, which is what QEMU writes whenever the command runs in the images' directory."""
    if "backing-file" in args or kind not in ("commit", "stream"):
        return
    g = daemon.graph
    chain = g.chain(g.nodes[args["device"]])
    if kind == "commit":
        if "top" in args or "base" in args:
            return  # left to QEMU's file-name lookup
        top = g.nodes.get(args.get("top-node", args["device"]))
        if top not in chain or chain.index(top) == 0:
            return  # active commit writes no backing string; a bad top is the command's error
        overlay = chain[chain.index(top) - 1]
        below = g.chain(top)
        base = g.nodes.get(args["base-node"]) if "base-node" in args else below[-1]
    else:
        overlay = chain[0]
        if "base-node" in args:
            base = g.nodes.get(args["base-node"])
        elif "bottom" in args and g.nodes.get(args["bottom"]) in chain[1:-1]:
            base = chain[chain.index(g.nodes[args["bottom"]]) + 1]
        else:
            return  # no base (or a file-name base): nothing, or QEMU's own resolution
    if base is None or base is overlay:
        return
    fname = base.driver.filename
    if os.path.isabs(fname) or fname.startswith("json:") or ":" in fname.split("/")[0]:
        return
    args["backing-file"] = os.path.relpath(fname, os.path.dirname(overlay.driver.filename) or ".")


async def _main(specs: list[Spec], executor: Any, quiet: bool) -> tuple[int, list[str]]:
    from engine.daemon.core import Daemon, QmpError

    daemon = Daemon(executor)
    sink = EventSink()
    daemon.monitors.append(sink)
    loop = asyncio.get_running_loop()
    interrupted = asyncio.Event()

    def on_sigint() -> None:
        interrupted.set()
        sink.wake.set()

    loop.add_signal_handler(signal.SIGINT, on_sigint)
    runs: list[Run] = []
    try:
        # 1. images
        by_path: dict[str, str] = {}
        devices: list[str] = []
        for s in specs:
            real = os.path.realpath(s.image)
            if real in by_path and s.node_name in (None, by_path[real]):
                devices.append(by_path[real])
                continue
            name = s.node_name or _derive_name(s.image, lambda n: n in daemon.graph.nodes)
            fmt = s.fmt or _probe(s.image)
            try:
                await daemon.execute("blockdev-add", {"driver": fmt, "node-name": name,
                                                      "file": {"driver": "file", "filename": s.image}})
            except QmpError as exc:
                return 1, [exc.desc]
            by_path[real] = name
            devices.append(name)
        # 2. arguments (file names resolved to nodes of the image's chain where they are found; else
        #    passed on as QEMU's file-name arguments, so the error texts are the command's own)
        used_ids: set[str] = set()
        calls = []
        for s, dev in zip(specs, devices):
            jid = s.job_id
            if jid is None:
                jid, n = dev, 2
                while jid in used_ids:
                    jid = f"{dev}-{n}"
                    n += 1
            used_ids.add(jid)
            args = {"job-id": jid, "device": dev, **s.args}
            for key, path in s.files.items():
                node = _in_chain(daemon, daemon.graph.nodes[dev], path)
                if node is None:
                    args[key] = path
                elif key == "bottom":
                    args["bottom"] = node.name
                else:
                    args[f"{key}-node"] = node.name
            _default_backing_file(daemon, s.kind, args)
            calls.append((s, jid, dev, args))
        # 3. start them all, or none
        for s, jid, dev, args in calls:
            try:
                await daemon.execute(s.command, args)
            except QmpError as exc:
                for r in runs:
                    try:
                        await daemon.execute("job-cancel", {"id": r.job_id})
                    except QmpError:
                        pass
                msg = exc.desc if len(calls) == 1 else f"{s.kind} of '{s.image}': {exc.desc}"
                await _wait_gone(daemon, runs)
                return 1, [msg]
            runs.append(Run(s, jid, dev))
        # 4. supervise
        return await _supervise(daemon, sink, runs, interrupted, quiet)
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        await daemon.shutdown()


async def _wait_gone(daemon: Any, runs: list[Run], timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while any(r.job_id in daemon.jobs.jobs for r in runs):
        if asyncio.get_running_loop().time() > deadline:
            return
        await asyncio.sleep(0.02)


async def _supervise(daemon: Any, sink: EventSink, runs: list[Run], interrupted: asyncio.Event,
                     quiet: bool) -> tuple[int, list[str]]:
    from engine.cli.progress import JobBars
    from engine.daemon.core import QmpError

    by_id = {r.job_id: r for r in runs}
    shown = {r.job_id for r in runs if r.spec.progress}
    bars = JobBars(file=sys.stderr, leave=True) if shown else None
    cancel_sent = False
    notes: list[str] = []

    async def verb(name: str, args: dict[str, Any], r: Run) -> None:
        try:
            await daemon.execute(name, args)
        except QmpError as exc:
            if r.error is None:
                r.error = exc.desc
            try:
                await daemon.execute("job-cancel", {"id": r.job_id})
            except QmpError:
                pass

    try:
        while not all(r.gone for r in runs):
            for ev in sink.drain():
                name, data = ev.get("event"), ev.get("data") or {}
                r = by_id.get(str(data.get("device", data.get("id"))))
                if r is None:
                    continue
                if name == "BLOCK_JOB_READY" and not cancel_sent:
                    if r.spec.complete:
                        await verb("job-complete", {"id": r.job_id}, r)
                    else:
                        r.finished_ready = True
                        await verb("block-job-cancel", {"device": r.job_id}, r)
                elif name == "BLOCK_JOB_COMPLETED":
                    r.ended = True
                    if data.get("error"):
                        r.error = data["error"]
                    r.info = {**data, "status": "failed" if data.get("error") else "completed"}
                elif name == "BLOCK_JOB_CANCELLED":
                    r.ended = True
                    r.error = r.error or "Operation canceled"
                    r.info = {**data, "status": "cancelled"}
                elif name == "BLOCK_JOB_ERROR" and bars is not None and r.job_id in shown:
                    bars.note(f"{r.job_id}: I/O error on {data.get('operation')} "
                              f"(action {data.get('action')})")
                elif name == "JOB_STATUS_CHANGE" and data.get("status") == "null":
                    r.gone = True
                if (r.ended or r.gone) and bars is not None and r.job_id in bars.bars:
                    if r.info:
                        bars.update([r.info], prune=False)
                    bars.remove(r.job_id)
            if interrupted.is_set() and not cancel_sent:
                cancel_sent = True
                for r in runs:
                    if not r.gone and r.job_id in daemon.jobs.jobs:
                        try:
                            await daemon.execute("job-cancel", {"id": r.job_id})
                        except QmpError:
                            pass
            for r in runs:  # dismissed without our seeing it (cannot happen with auto-dismiss; be safe)
                if not r.gone and r.ended and r.job_id not in daemon.jobs.jobs:
                    r.gone = True
            if bars is not None:
                infos = [i for i in await daemon.execute("query-block-jobs", {}) if i.get("device") in shown
                         and not by_id[i["device"]].ended]
                bars.update(infos, prune=False)
            try:
                await asyncio.wait_for(sink.wake.wait(), POLL)
            except TimeoutError:
                pass
    finally:
        if bars is not None:
            bars.close()
    if interrupted.is_set() and any(r.error is not None for r in runs):
        return 130, ["interrupted"]
    failed = [r for r in runs if r.error is not None]
    for r in runs:
        if r.error is None and not quiet:
            how = " (without completion)" if r.finished_ready else ""
            click.echo(f"{r.job_id}: {r.spec.kind} completed{how}")
    for r in failed:
        notes.append(f"{r.job_id}: {r.spec.kind} failed: {r.error}" if len(runs) > 1 else
                     f"{r.spec.kind} job '{r.job_id}' failed: {r.error}")
    return (1 if failed else 0), notes
