"""Snapshots and ``transaction``: several actions that all happen or none does.

Layer: engine.  Each action is prepared in order; a prepare either fails (then every action already
prepared is rolled back in reverse order and the command fails with that action's error) or returns an
``Undo`` whose ``commit`` makes it final.  Jobs created by backup actions start only at commit; with
``completion-mode: grouped`` they share one job transaction (they finish, or are cancelled, together).
Bitmap actions snapshot the bitmaps they touch and restore them on rollback.
"""
from __future__ import annotations

import os
from typing import Any, Callable

from engine.daemon.core import COMMANDS, Daemon, QmpError, command
from engine.errors import BlockError
from engine.image import create_image, path_combine
from engine.jobs.job import JobTxn


class Undo:
    def __init__(self, abort: Callable[[], None] | None = None, commit: Callable[[], None] | None = None) -> None:
        self._abort = abort
        self._commit = commit

    def abort(self) -> None:
        if self._abort is not None:
            self._abort()

    def commit(self) -> None:
        if self._commit is not None:
            self._commit()


# ---------------------------------------------------------------------------------------------------
# snapshots
# ---------------------------------------------------------------------------------------------------
def _internal_snapshot(d: Daemon, a: dict[str, Any]) -> Undo:
    node = d.graph.lookup(a["device"])
    drv = node.driver
    if not hasattr(drv, "snapshot_create"):
        raise QmpError(f"Block format '{drv.format_name}' used by device '{a['device']}' does not support "
                       "internal snapshots")
    if drv.read_only:
        raise QmpError(f"Device '{a['device']}' is read only")
    name = a["name"]
    if not name:
        raise QmpError("Name is empty")
    if drv.find_snapshot(name) is not None and any(sn.name == name for sn in drv.snapshots):
        raise QmpError(f"Snapshot with name '{name}' already exists on device '{a['device']}'")
    drv.snapshot_create(name)
    return Undo(abort=lambda: drv.snapshot_delete(name))


def _attach_overlay(d: Daemon, node: Any, overlay: Any) -> Undo:
    """``overlay`` backs onto ``node`` and takes its place for every parent of ``node``."""
    from engine.jobs.mirror import replace_node

    parents = d.graph.parents(node)
    overlay.driver.backing = node.driver
    replace_node(d.graph, node, overlay)

    def undo() -> None:
        for parent, role in parents:
            setattr(parent.driver, role, node.driver)
        overlay.driver.backing = None
    return Undo(abort=undo)


def _snapshot_sync(d: Daemon, a: dict[str, Any]) -> Undo:
    name = a.get("node-name") or a.get("device")
    if name is None:
        raise QmpError("Cannot find device= nor node-name=")
    node = d.graph.lookup(name)
    fmt = a.get("format", "qcow2")
    mode = a.get("mode", "absolute-paths")
    path = a["snapshot-file"]
    created_file = False
    if mode == "absolute-paths":
        if fmt != "qcow2":
            raise QmpError(f"Format '{fmt}' cannot be used for an external snapshot")
        create_image(path, fmt, node.size(), d.executor,
                     {"backing_file": node.driver.filename, "backing_fmt": node.driver.format_name})
        created_file = True
    elif not os.path.exists(path):
        raise QmpError(f"Could not open '{path}': No such file or directory")
    spec: dict[str, Any] = {"driver": fmt, "file": {"driver": "file", "filename": path}, "backing": None}
    if "snapshot-node-name" in a:
        spec["node-name"] = a["snapshot-node-name"]
    created: list[Any] = []
    overlay = d.graph._add(spec, False, created)
    overlay.owned = "snapshot-node-name" in a
    undo = _attach_overlay(d, node, overlay)

    def abort() -> None:
        undo.abort()
        for n in reversed(created):
            d.graph._drop(n)
        if created_file:
            try:
                os.unlink(path)
            except OSError:
                pass
    return Undo(abort=abort)


def _snapshot(d: Daemon, a: dict[str, Any]) -> Undo:
    node = d.graph.lookup(a["node"])
    overlay = d.graph.lookup(a["overlay"])
    if overlay.driver.backing is not None:
        raise QmpError(f"The overlay already has a backing image")
    if not getattr(overlay.driver, "supports_backing", False):
        raise QmpError(f"The overlay does not support backing images")
    if d.graph.parents(overlay):
        raise QmpError(f"The overlay is already in use")
    return _attach_overlay(d, node, overlay)


for _name, _fn in (("blockdev-snapshot-internal-sync", _internal_snapshot),
                   ("blockdev-snapshot-sync", _snapshot_sync), ("blockdev-snapshot", _snapshot)):
    def _handler(d: Daemon, a: dict[str, Any], _fn: Callable[..., Undo] = _fn) -> Any:
        _fn(d, a).commit()
        return {}
    command(_name)(_handler)


@command("blockdev-snapshot-delete-internal-sync")
def _delete_internal(d: Daemon, a: dict[str, Any]) -> Any:
    node = d.graph.lookup(a["device"])
    drv = node.driver
    key = a.get("id") or a.get("name")
    if key is None:
        raise QmpError("Name or id must be provided")
    sn = drv.find_snapshot(key) if hasattr(drv, "find_snapshot") else None
    if sn is None:
        raise QmpError(f"Snapshot with id '{a.get('id')}' and name '{a.get('name')}' does not exist on device "
                       f"'{a['device']}'")
    drv.snapshot_delete(key)
    return {"id": sn.id_str, "name": sn.name, "vm-state-size": sn.vm_state_size,
            "date-sec": sn.date_sec, "date-nsec": sn.date_nsec, "vm-clock-sec": sn.vm_clock_nsec // 10**9,
            "vm-clock-nsec": sn.vm_clock_nsec % 10**9}


# ---------------------------------------------------------------------------------------------------
# transaction
# ---------------------------------------------------------------------------------------------------
def _bitmap_state(d: Daemon, node_names: list[str]) -> Callable[[], None]:
    """Capture every bitmap of these nodes (membership, bits, flags) and return the restore function."""
    saved = []
    for name in node_names:
        node = d.graph.nodes.get(name)
        if node is None:
            continue
        bms = list(node.bitmaps)
        saved.append((node, bms, [(bm, bytes(bm._bits), bm.enabled, bm.busy) for bm in bms]))

    def restore() -> None:
        for node, bms, states in saved:
            node.bitmaps[:] = bms
            for bm, bits, enabled, busy in states:
                bm._bits[:] = bits
                bm.enabled, bm.busy = enabled, busy
    return restore


def _bitmap_action(kind: str) -> Callable[[Daemon, dict[str, Any], JobTxn | None], Undo]:
    def prepare(d: Daemon, a: dict[str, Any], txn: JobTxn | None) -> Undo:
        nodes = [a.get("node")] + [b["node"] for b in a.get("bitmaps", []) if isinstance(b, dict)]
        restore = _bitmap_state(d, [n for n in nodes if isinstance(n, str)])
        fn, _ = COMMANDS[kind]
        fn(d, a)
        undo_remove = None
        if kind == "block-dirty-bitmap-add" and a.get("persistent"):
            node = d.graph.nodes.get(a["node"])
            drv = node.driver if node is not None else None

            def undo_remove() -> None:
                try:
                    drv.remove_persistent_bitmap(a["name"])  # type: ignore[union-attr]
                except Exception:
                    pass
        def abort() -> None:
            if undo_remove is not None:
                undo_remove()
            restore()
        return Undo(abort=abort)
    return prepare


def _backup_action(kind: str) -> Callable[[Daemon, dict[str, Any], JobTxn | None], Undo]:
    def prepare(d: Daemon, a: dict[str, Any], txn: JobTxn | None) -> Undo:
        from engine.daemon import jobcmds

        before = set(d.jobs.jobs)
        jobcmds.DEFER_START.append(txn)
        try:
            (jobcmds.blockdev_backup if kind == "blockdev-backup" else jobcmds.drive_backup)(d, a)
        finally:
            jobcmds.DEFER_START.pop()
        new = [j for jid, j in d.jobs.jobs.items() if jid not in before]

        def abort() -> None:
            for j in new:
                j.clean()
                d.jobs.jobs.pop(j.id, None)
                if j in j.txn.jobs:
                    j.txn.jobs.remove(j)

        def commit() -> None:
            for j in new:
                j.start()
        return Undo(abort=abort, commit=commit)
    return prepare


def _abort_action(d: Daemon, a: dict[str, Any], txn: JobTxn | None) -> Undo:
    raise QmpError("Transaction aborted using Abort action")


def _wrap(fn: Callable[[Daemon, dict[str, Any]], Undo]) -> Callable[[Daemon, dict[str, Any], JobTxn | None], Undo]:
    return lambda d, a, txn: fn(d, a)


ACTIONS: dict[str, Callable[[Daemon, dict[str, Any], JobTxn | None], Undo]] = {
    "abort": _abort_action,
    "blockdev-backup": _backup_action("blockdev-backup"),
    "drive-backup": _backup_action("drive-backup"),
    "blockdev-snapshot-internal-sync": _wrap(_internal_snapshot),
    "blockdev-snapshot-sync": _wrap(_snapshot_sync),
    "blockdev-snapshot": _wrap(_snapshot),
    **{k: _bitmap_action(k) for k in ("block-dirty-bitmap-add", "block-dirty-bitmap-remove",
                                      "block-dirty-bitmap-clear", "block-dirty-bitmap-enable",
                                      "block-dirty-bitmap-disable", "block-dirty-bitmap-merge")},
}


@command("transaction")
def transaction(d: Daemon, a: dict[str, Any]) -> Any:
    props = a.get("properties") or {}
    grouped = props.get("completion-mode", "individual") == "grouped"
    txn = JobTxn() if grouped else None
    done: list[Undo] = []
    try:
        for action in a["actions"]:
            kind = action["type"]
            prep = ACTIONS.get(kind)
            if prep is None:
                raise QmpError(f"Action '{kind}' is not supported by parablock")
            if grouped and kind not in ("blockdev-backup", "drive-backup", "abort") \
                    and not kind.startswith("block-dirty-bitmap"):
                pass
            done.append(prep(d, dict(action.get("data") or {}), txn))
    except BaseException as exc:
        for u in reversed(done):
            try:
                u.abort()
            except Exception:
                pass
        if isinstance(exc, (QmpError, BlockError)):
            raise
        raise
    for u in done:
        u.commit()
    return {}
