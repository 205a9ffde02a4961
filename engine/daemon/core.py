"""The daemon's coordinator state and its QMP commands: graph, throttle-group objects, jobs, events.

Layer: engine.  ``Daemon.execute(name, args)`` validates the arguments against the QAPI schema
(engine.qapi), runs the handler and returns the ``return`` value or raises ``QmpError`` (class + desc).
Handlers are plain functions registered with ``@command``; they run on the event loop holding the
graph's driver lock, so no job thread touches format metadata meanwhile.  Events go to every monitor
through ``emit``.
"""
from __future__ import annotations

import asyncio
import re
from typing import Any, Awaitable, Callable

from engine.daemon.graph import DaemonGraph, qdict_ordered
from engine.errors import BlockError
from engine.jobs.job import Job, JobError, JobManager
from engine.throttle import ThrottleConfig

#: QEMU's id_wellformed(): a letter, then letters, digits, '-', '.', '_'
ID_RE = re.compile(r"^[A-Za-z][A-Za-z0-9._-]*$")
VERSION = {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "parablock"}


class QmpError(Exception):
    def __init__(self, desc: str, cls: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.cls = cls


Handler = Callable[["Daemon", dict[str, Any]], Any]
COMMANDS: dict[str, tuple[Handler, bool]] = {}


def command(name: str, locked: bool = True) -> Callable[[Handler], Handler]:
    """Register a QMP command handler (sync, or async returning an awaitable)."""

    def deco(fn: Handler) -> Handler:
        COMMANDS[name] = (fn, locked)
        return fn

    return deco


class Daemon:
    def __init__(self, executor: Any) -> None:
        # registers the job, bitmap, snapshot and transaction commands
        from engine.daemon import bitmapcmds, jobcmds, nbd, txn  # noqa: F401

        self.executor = executor
        self.graph = DaemonGraph(executor)
        self.jobs = JobManager(self.emit)
        self.monitors: list[Any] = []
        self.objects: dict[str, dict[str, Any]] = {}
        self.stop_requested = asyncio.Event()
        self.exports: dict[str, Any] = {}

    # ------------------------------------------------------------------ events
    def emit(self, name: str, data: dict[str, Any]) -> None:
        from ipc.qmp import event

        ev = event(name, data)
        for mon in list(self.monitors):
            mon.send_event(ev)

    # ------------------------------------------------------------------ dispatch
    async def execute(self, name: str, args: dict[str, Any]) -> Any:
        from engine.qapi import QapiError, validate

        entry = COMMANDS.get(name)
        try:
            args = validate(name, args)
        except QapiError as exc:
            raise QmpError(exc.desc, exc.cls) from None
        if entry is None:
            raise QmpError(f"The command {name} has not been found", "CommandNotFound")
        fn, locked = entry
        try:
            if locked:
                async with self.graph.driver_lock:
                    res = fn(self, args)
                    if asyncio.iscoroutine(res):
                        res = await res
            else:
                res = fn(self, args)
                if asyncio.iscoroutine(res):
                    res = await res
        except QmpError:
            raise
        except JobError as exc:
            raise QmpError(exc.message, exc.qmp_class) from None
        except BlockError as exc:
            raise QmpError(exc.message, exc.qmp_class) from None
        except OSError as exc:
            raise QmpError(exc.strerror or str(exc)) from None
        return {} if res is None else res

    async def shutdown(self) -> None:
        """Stop the NBD server (clients disconnected, exports closed), cancel jobs, flush and close every
        node (quit, SIGTERM)."""
        nbd_server = getattr(self, "nbd_server", None)
        if nbd_server is not None:
            await nbd_server.stop()
        await self.jobs.cancel_all()
        async with self.graph.driver_lock:
            for exp in list(self.exports.values()):
                close = getattr(exp, "close", None)
                if close is not None:
                    res = close()
                    if asyncio.iscoroutine(res):
                        await res
            self.graph.close_all()

    # ------------------------------------------------------------------ objects
    def object_add(self, args: dict[str, Any]) -> None:
        qom_type = args.get("qom-type")
        oid = args.get("id")
        if qom_type != "throttle-group":
            raise QmpError(f"Invalid parameter type for 'qom-type', expected: throttle-group"
                           if qom_type is None else f"Object type '{qom_type}' is not supported by parablock")
        if not isinstance(oid, str) or not ID_RE.match(oid):
            raise QmpError("Parameter 'id' expects an identifier")
        if oid in self.objects:
            raise QmpError(f"attempt to add duplicate property '{oid}' to object (type 'container')")
        try:
            cfg = ThrottleConfig.from_options(args)
        except BlockError as exc:
            raise QmpError(exc.message) from None
        self.objects[oid] = {"qom-type": qom_type, "limits": cfg.to_limits()}
        self.graph.throttle_group(oid, cfg)

    def object_del(self, oid: str) -> None:
        if oid not in self.objects:
            raise QmpError(f"object '{oid}' not found")
        if oid in self.graph.groups and self.graph.groups[oid].group.members:
            raise QmpError(f"object '{oid}' is in use, can not be deleted")
        del self.objects[oid]
        self.graph.groups.pop(oid, None)


# ---------------------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------------------
@command("query-version", locked=False)
def _query_version(d: Daemon, a: dict[str, Any]) -> Any:
    return VERSION


@command("query-commands", locked=False)
def _query_commands(d: Daemon, a: dict[str, Any]) -> Any:
    return [{"name": n} for n in sorted(COMMANDS)] + [{"name": "qmp_capabilities"}]


@command("quit", locked=False)
def _quit(d: Daemon, a: dict[str, Any]) -> Any:
    d.stop_requested.set()
    return {}


@command("blockdev-add")
def _blockdev_add(d: Daemon, a: dict[str, Any]) -> Any:
    d.graph.blockdev_add(a)
    return {}


@command("blockdev-del")
def _blockdev_del(d: Daemon, a: dict[str, Any]) -> Any:
    d.graph.blockdev_del(a["node-name"])
    return {}


@command("blockdev-reopen")
def _blockdev_reopen(d: Daemon, a: dict[str, Any]) -> Any:
    for opts in a["options"]:
        name = opts.get("node-name")
        if name is None:
            raise QmpError("node-name not specified")
        node = d.graph.nodes.get(name)
        if node is None:
            raise QmpError(f"Failed to find node with node-name='{name}'")
        if opts.get("driver") not in (None, node.driver.format_name):
            raise QmpError(f"Cannot change the option 'driver'")
        for key in ("read-only", "detect-zeroes"):
            pass
        ro = bool(opts.get("read-only", False))
        if "detect-zeroes" in opts:
            node.detect_zeroes = opts["detect-zeroes"]
        if not ro and any(k.startswith("job:") for k in d.graph.users.get(name, {})) is False:
            pass
        d.graph.reopen(node, ro)
    return {}


@command("query-named-block-nodes")
def _query_named(d: Daemon, a: dict[str, Any]) -> Any:
    return d.graph.query_named(bool(a.get("flat", False)))


@command("query-blockstats")
def _query_blockstats(d: Daemon, a: dict[str, Any]) -> Any:
    return d.graph.query_blockstats(bool(a.get("query-nodes", False)))


@command("object-add")
def _object_add(d: Daemon, a: dict[str, Any]) -> Any:
    d.object_add(a)
    return {}


@command("object-del")
def _object_del(d: Daemon, a: dict[str, Any]) -> Any:
    d.object_del(a["id"])
    return {}


@command("qom-get")
def _qom_get(d: Daemon, a: dict[str, Any]) -> Any:
    obj = d.objects.get(a["path"])
    if obj is None:
        raise QmpError(f"Device '{a['path']}' not found", "DeviceNotFound")
    if a["property"] != "limits":
        raise QmpError(f"Property 'throttle-group.{a['property']}' not found")
    return qdict_ordered(d.graph.groups[a["path"]].group.limits())


@command("qom-set")
def _qom_set(d: Daemon, a: dict[str, Any]) -> Any:
    obj = d.objects.get(a["path"])
    if obj is None:
        raise QmpError(f"Device '{a['path']}' not found", "DeviceNotFound")
    if a["property"] != "limits":
        raise QmpError(f"Property 'throttle-group.{a['property']}' not found")
    group = d.graph.groups[a["path"]].group
    try:
        cfg = group.config.with_limits(a["value"] or {}, prefix="limits.")
    except BlockError as exc:
        raise QmpError(exc.message) from None
    obj["limits"] = cfg.to_limits()
    d.graph.throttle_group(a["path"], cfg)
    return {}


# --- jobs ------------------------------------------------------------------------------------------
@command("query-jobs", locked=False)
def _query_jobs(d: Daemon, a: dict[str, Any]) -> Any:
    return [j.info() for j in d.jobs.jobs.values()]


@command("query-block-jobs", locked=False)
def _query_block_jobs(d: Daemon, a: dict[str, Any]) -> Any:
    return [j.block_info() for j in d.jobs.jobs.values()]


def _job_verb(legacy: bool, key: str, fn: Callable[[Job, dict[str, Any]], None]) -> Handler:
    def handler(d: Daemon, a: dict[str, Any]) -> Any:
        job = d.jobs.get(a[key], legacy=legacy)
        fn(job, a)
        return {}
    return handler


def _legacy_cancel(job: Job, a: dict[str, Any]) -> None:
    force = bool(a.get("force", False))
    if job.user_paused and not force:
        raise JobError(f"The block job for device '{job.id}' is currently paused")
    job.cancel(force)


for _name, _legacy, _key, _fn in (
        ("job-pause", False, "id", lambda j, a: j.user_pause()),
        ("job-resume", False, "id", lambda j, a: j.user_resume()),
        ("job-cancel", False, "id", lambda j, a: j.cancel(True)),
        ("job-complete", False, "id", lambda j, a: j.complete()),
        ("job-finalize", False, "id", lambda j, a: j.finalize()),
        ("job-dismiss", False, "id", lambda j, a: j.dismiss()),
        ("block-job-pause", True, "device", lambda j, a: j.user_pause()),
        ("block-job-resume", True, "device", lambda j, a: j.user_resume()),
        ("block-job-cancel", True, "device", _legacy_cancel),
        ("block-job-complete", True, "device", lambda j, a: j.complete()),
        ("block-job-finalize", True, "id", lambda j, a: j.finalize()),
        ("block-job-dismiss", True, "id", lambda j, a: j.dismiss()),
        ("block-job-set-speed", True, "device", lambda j, a: j.set_speed(a["speed"]))):
    command(_name, locked=False)(_job_verb(_legacy, _key, _fn))
