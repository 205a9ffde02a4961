"""QMP dirty-bitmap commands (QEMU 7.2's block/monitor/bitmap-qmp-cmds.c and block/dirty-bitmap.c):
block-dirty-bitmap-add / -remove / -clear / -enable / -disable / -merge, and the ``dirty-bitmaps`` list
of query-named-block-nodes.

Layer: engine (daemon).  Imports engine.daemon.core (registry, QmpError), engine.bitmap and
engine.formats.qcow2_bitmaps (qcow2's storage constraints).

Model.  ``node.bitmaps`` is every dirty bitmap of a node, newest first (QEMU's ``bs->dirty_bitmaps``,
where creation inserts at the head); the request pipeline marks the enabled ones on guest writes.  A
qcow2 node's persistent bitmaps are also owned by its driver, which records guest writes in them by
itself, flags them in use on disk while the image is open read-write and stores them on close (the
daemon closes every node at quit / SIGTERM).  :func:`sync` merges the driver's list into
``node.bitmaps`` (bitmaps loaded from the image go to the head in directory order, as QEMU's
qcow2_load_dirty_bitmaps leaves them; bitmaps the driver no longer has, e.g. after a reopen reloaded
them, are dropped) and gives the node its ``bitmap_info`` for query-named-block-nodes.  Commands and
the query call it, so bitmaps an image already holds appear as soon as the node does.

Invariants: a bitmap loaded inconsistent (in use on disk at open) never records (QEMU's
bdrv_dirty_bitmap_set_inconsistent disables it); a persistent bitmap is changed (clear, merge) only after
the driver flagged the on-disk copy in use again; every refused command leaves every bitmap unchanged.

Deliberate differences from qemu-storage-daemon 7.2: ``block-dirty-bitmap-merge`` with an empty
``bitmaps`` list succeeds and changes nothing (qsd 7.2 aborts the process).
"""
from __future__ import annotations

import functools
from typing import Any

from engine.bitmap import DirtyBitmap
from engine.daemon.core import COMMANDS, Daemon, QmpError, command
from engine.daemon.graph import qdict_ordered
from engine.errors import BlockError
from engine.formats import qcow2_bitmaps as QB
from engine.pipeline import BlockNode

_MAX_NAME = 1023  # BDRV_BITMAP_MAX_NAME_SIZE


# ---------------------------------------------------------------------------------------------------
# the node's bitmap list
# ---------------------------------------------------------------------------------------------------
def _qcow2_driver(node: BlockNode) -> Any:
    d = node.driver
    return d if d.format_name == "qcow2" and hasattr(d, "add_persistent_bitmap") else None


def sync(node: BlockNode) -> list[DirtyBitmap]:
    """Bring ``node.bitmaps`` up to date with the image's persistent bitmaps and return it.  Never raises:
    an image whose bitmaps cannot be loaded (a read-only node loads them lazily) shows none."""
    if getattr(node, "bitmap_info", None) is None:
        node.bitmap_info = functools.partial(bitmap_info, node)  # type: ignore[attr-defined]
    drv = _qcow2_driver(node)
    if drv is None:
        return node.bitmaps
    try:
        current = drv.bitmaps()
    except BlockError:
        current = []
    seen: list[DirtyBitmap] = getattr(node, "_image_bitmaps", [])
    if len(seen) == len(current) and all(a is b for a, b in zip(seen, current)):
        return node.bitmaps
    gone = [b for b in seen if not any(b is c for c in current)]
    node.bitmaps[:] = [b for b in node.bitmaps if not any(b is g for g in gone)]
    for bm in current:
        if not any(bm is x for x in node.bitmaps):
            if bm.inconsistent:
                bm.enabled = False
            node.bitmaps.insert(0, bm)
    node._image_bitmaps = list(current)  # type: ignore[attr-defined]
    return node.bitmaps


def find(node: BlockNode, name: str) -> DirtyBitmap | None:
    """The named bitmap of ``node`` (bdrv_find_dirty_bitmap), or None.  For jobs and exports too."""
    for bm in sync(node):
        if bm.name is not None and bm.name == name:
            return bm
    return None


def bitmap_info(node: BlockNode) -> list[dict[str, Any]]:
    """BlockDirtyInfo per bitmap, newest first, keys in QEMU's QDict order (bdrv_query_dirty_bitmaps);
    anonymous (job) bitmaps have no ``name``, ``inconsistent`` appears only when true."""
    out = []
    for bm in sync(node):
        info: dict[str, Any] = {}
        if bm.name is not None:
            info["name"] = bm.name
        info.update({"count": bm.count(), "granularity": bm.granularity,
                     "recording": bool(bm.enabled and not bm.inconsistent), "busy": bool(bm.busy),
                     "persistent": bool(bm.persistent)})
        if bm.inconsistent:
            info["inconsistent"] = True
        out.append(qdict_ordered(info))
    return out


def _lookup(d: Daemon, node_name: str, name: str) -> tuple[BlockNode, DirtyBitmap]:
    """block_dirty_bitmap_lookup: "Node 'X' not found" / "Dirty bitmap 'Y' not found"."""
    node = d.graph.nodes.get(node_name)
    if node is None:
        raise QmpError(f"Node '{node_name}' not found")
    bm = find(node, name)
    if bm is None:
        raise QmpError(f"Dirty bitmap '{name}' not found")
    return node, bm


def default_granularity(node: BlockNode) -> int:
    """bdrv_get_default_bitmap_granularity: the cluster size clamped to [4 KiB, 64 KiB] when the node
    (or, for raw and filters, the node it forwards bdrv_get_info to) has one, else 64 KiB."""
    drv = node.driver
    while drv.format_name != "qcow2" and drv.file is not None and (drv.is_filter or drv.format_name == "raw"):
        drv = drv.file
    cs = drv.cluster_size() if drv.format_name == "qcow2" else None
    if not cs:
        return 65536
    return min(65536, max(4096, cs))


def _touch_persistent(node: BlockNode, bm: DirtyBitmap) -> None:
    """Before changing a persistent bitmap other than by a guest write: flag the image's copy in use."""
    drv = _qcow2_driver(node)
    if drv is not None and bm.persistent and not drv.read_only:
        drv.mark_bitmaps_in_use()


# ---------------------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------------------
@command("block-dirty-bitmap-add")
def bitmap_add(d: Daemon, a: dict[str, Any]) -> Any:
    """QEMU's block_dirty_bitmap_add, checks in its order: name, node, granularity, whether the node can
    store a persistent bitmap (qcow2's constraints, prefixed "Can't make bitmap ... persistent in ..."),
    duplicate name, name length."""
    name = a["name"]
    if not name:
        raise QmpError("Bitmap name cannot be empty")
    node = d.graph.lookup(a["node"])
    if "granularity" in a:
        gran = a["granularity"]
        if gran < 512 or gran & (gran - 1):
            raise QmpError("Granularity must be power of 2 and at least 512")
    else:
        gran = default_granularity(node)
    persistent = bool(a.get("persistent", False))
    drv = _qcow2_driver(node)
    if persistent:
        if drv is None:
            raise QmpError(f"Can't store persistent bitmaps to {node.name}: Operation not supported")
        prefix = f"Can't make bitmap '{name}' persistent in '{node.name}': "
        if drv.h.version < 3:
            raise QmpError(prefix + "Cannot store dirty bitmaps in qcow2 v2 files")
        why = QB.constraints_error(name, gran, drv.size(), drv.cluster_size())
        if why:
            raise QmpError(prefix + why)
    if find(node, name) is not None:
        raise QmpError(f"Bitmap already exists: {name}")
    if len(name.encode("utf-8")) > _MAX_NAME:
        raise QmpError(f"Bitmap name too long: {name}")
    bm = DirtyBitmap(node.size(), gran, name, enabled=not a.get("disabled", False))
    if persistent:
        if drv.read_only:
            # QEMU accepts it too, and loses it at close ("No write access")
            bm.persistent = True
        else:
            drv.add_persistent_bitmap(bm)  # the remaining limits: bitmap count, directory size
            node._image_bitmaps = drv.bitmaps()  # type: ignore[attr-defined]
    node.bitmaps.insert(0, bm)
    return {}


@command("block-dirty-bitmap-remove")
def bitmap_remove(d: Daemon, a: dict[str, Any]) -> Any:
    """Release the bitmap; a persistent one is deleted from the image too.  Busy and read-only bitmaps
    are refused, inconsistent ones may go (that is how a user gets rid of them)."""
    node, bm = _lookup(d, a["node"], a["name"])
    if bm.busy or bm.readonly:
        bm.check_usable(modify=True)
    drv = _qcow2_driver(node)
    if drv is not None and any(bm is b for b in drv.bitmaps()):
        drv.remove_persistent_bitmap(bm.name)
        node._image_bitmaps = drv.bitmaps()  # type: ignore[attr-defined]
    node.bitmaps[:] = [b for b in node.bitmaps if b is not bm]
    return {}


@command("block-dirty-bitmap-clear")
def bitmap_clear(d: Daemon, a: dict[str, Any]) -> Any:
    node, bm = _lookup(d, a["node"], a["name"])
    bm.check_usable(modify=True)
    _touch_persistent(node, bm)
    bm.clear()
    return {}


@command("block-dirty-bitmap-enable")
def bitmap_enable(d: Daemon, a: dict[str, Any]) -> Any:
    node, bm = _lookup(d, a["node"], a["name"])
    bm.check_usable(modify=False)  # BDRV_BITMAP_ALLOW_RO
    _touch_persistent(node, bm)
    bm.enabled = True
    return {}


@command("block-dirty-bitmap-disable")
def bitmap_disable(d: Daemon, a: dict[str, Any]) -> Any:
    node, bm = _lookup(d, a["node"], a["name"])
    bm.check_usable(modify=False)
    _touch_persistent(node, bm)
    bm.enabled = False
    return {}


@command("block-dirty-bitmap-merge")
def bitmap_merge(d: Daemon, a: dict[str, Any]) -> Any:
    """block_dirty_bitmap_merge: the sources are gathered into an anonymous bitmap with the target's
    granularity, then that is merged into the target, which is left unchanged on any error.  Per source,
    in order: lookup (a string names a bitmap of the target's node), the target usable for a change,
    the source usable, equal sizes."""
    node, dst = _lookup(d, a["node"], a["target"])
    anon = DirtyBitmap(dst.size, dst.granularity)
    for src_ref in a["bitmaps"]:
        if isinstance(src_ref, str):
            src = find(node, src_ref)
            if src is None:
                raise QmpError(f"Dirty bitmap '{src_ref}' not found")
        else:
            _, src = _lookup(d, src_ref["node"], src_ref["name"])
        dst.check_usable(modify=True)  # checked per source, after its lookup (qsd 7.2's order)
        src.check_usable(modify=False)
        if src.size != anon.size:
            raise QmpError(f"Bitmaps are of different sizes (destination size is {anon.size}, source size is "
                           f"{src.size}) and can't be merged")
        anon.merge_from(src)
    if not a["bitmaps"]:
        return {}
    _touch_persistent(node, dst)
    dst.merge_from(anon)
    return {}


# query-named-block-nodes shows ``dirty-bitmaps`` through ``node.bitmap_info``: make sure every node has
# it (and the image's bitmaps) before the graph builds the reply, and put the key where QEMU's QDict
# order has it (right after ``write_threshold``) if the graph appended it.
_query_named, _query_named_locked = COMMANDS["query-named-block-nodes"]


def _place_dirty_bitmaps(info: dict[str, Any]) -> dict[str, Any]:
    if "dirty-bitmaps" not in info or "write_threshold" not in info:
        return info
    out: dict[str, Any] = {}
    for k, v in info.items():
        if k != "dirty-bitmaps":
            out[k] = v
        if k == "write_threshold":
            out["dirty-bitmaps"] = info["dirty-bitmaps"]
    return out


@command("query-named-block-nodes", locked=_query_named_locked)
def _query_named_with_bitmaps(d: Daemon, a: dict[str, Any]) -> Any:
    for node in list(d.graph.nodes.values()):
        sync(node)
    return [_place_dirty_bitmaps(info) for info in _query_named(d, a)]
