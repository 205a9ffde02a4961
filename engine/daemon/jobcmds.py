"""QMP commands that start block jobs: argument resolution in QEMU 7.2's order, with its error texts.

Layer: engine.  Each handler resolves nodes, checks everything that can fail *before* a job exists (so a
refused command leaves no job, no event and no changed byte), then creates and starts the job.
"""
from __future__ import annotations

import os
from typing import Any

from engine.daemon.core import Daemon, QmpError, command
from engine.errors import DeviceNotFound
from engine.image import path_combine
from engine.jobs.commit import CommitJob, StreamJob
from engine.jobs.backup import BackupJob
from engine.jobs.mirror import ActiveCommitJob, MirrorJob
from engine.pipeline import BlockNode


def _has_writer(d: Daemon, node: BlockNode) -> bool:
    """Whether a parent other than the chain holds WRITE on ``node``: a writable export of it."""
    for key in d.graph.users.get(node.name, {}):
        if key.startswith("export:"):
            exp = d.exports.get(key[len("export:"):])
            if exp is not None and getattr(exp, "writable", False):
                return True
    return False


def _job_opts(a: dict[str, Any]) -> dict[str, Any]:
    speed = a.get("speed", 0)
    if speed < 0:
        raise QmpError("Parameter 'speed' expects a non-negative value")
    return {"speed": speed, "auto_finalize": a.get("auto-finalize", True),
            "auto_dismiss": a.get("auto-dismiss", True), "txn": DEFER_START[-1] if DEFER_START else None}


def _node_lookup(d: Daemon, name: str) -> BlockNode:
    node = d.graph.nodes.get(name)
    if node is None:
        raise QmpError(f"Cannot find device='' nor node-name='{name}'")
    return node


def find_backing_image(d: Daemon, top: BlockNode, name: str) -> BlockNode | None:
    """bdrv_find_backing_image: the node below ``top`` whose overlay records ``name`` as its backing
    file, either verbatim or resolving to the same file."""
    chain = d.graph.chain(top)
    for upper, lower in zip(chain, chain[1:]):
        recorded = upper.driver.backing_filename
        if recorded is not None and recorded == name:
            return lower
        want = os.path.realpath(path_combine(upper.driver.filename, name))
        if os.path.realpath(lower.driver.filename) == want:
            return lower
    return None


def _check_busy(d: Daemon, node: BlockNode) -> None:
    for key, text in d.graph.users.get(node.name, {}).items():
        if key.startswith("job:"):
            raise QmpError(f"Node '{node.name}' is busy: {text}")


def _filter_name(d: Daemon, a: dict[str, Any]) -> None:
    name = a.get("filter-node-name")
    if name is not None:
        try:
            d.graph._name_ok(name)
        except Exception as exc:
            raise QmpError(str(exc)) from None


#: ``transaction`` pushes its job transaction (or None) here: jobs are then set up but started only
#: when every action of the transaction has been prepared
DEFER_START: list[Any] = []


def _launch(d: Daemon, job: Any) -> None:
    try:
        job.setup()
    except BaseException:
        job.clean()
        if job in job.txn.jobs:
            job.txn.jobs.remove(job)
        raise
    d.jobs.add(job)
    if not DEFER_START:
        job.start()


@command("block-commit")
def block_commit(d: Daemon, a: dict[str, Any]) -> Any:
    g = d.graph
    device = a["device"]
    node = g.nodes.get(device)
    if node is None:
        raise QmpError(f"Device '{device}' not found", "DeviceNotFound")
    try:
        bs = g.root(device)
    except DeviceNotFound:
        raise QmpError(f"Device '{device}' not found", "DeviceNotFound") from None
    chain = g.chain(bs)
    top = bs
    if "top-node" in a and "top" in a:
        raise QmpError("'top-node' and 'top' are mutually exclusive")
    if "top-node" in a:
        top = _node_lookup(d, a["top-node"])
        if top not in chain:
            raise QmpError(f"'{a['top-node']}' is not in this backing file chain")
    elif a.get("top"):
        if bs.driver.filename != a["top"]:
            found = find_backing_image(d, bs, a["top"])
            if found is None:
                raise QmpError(f"Top image file {a['top']} not found")
            top = found
    top_chain = g.chain(top)
    if "base-node" in a and "base" in a:
        raise QmpError("'base-node' and 'base' are mutually exclusive")
    if "base-node" in a:
        base = _node_lookup(d, a["base-node"])
        if base not in top_chain:
            raise QmpError(f"'{a['base-node']}' is not in this backing file chain")
    elif a.get("base"):
        found = find_backing_image(d, top, a["base"])
        if found is None:
            raise QmpError(f"Can't find '{a['base']}' in the backing chain")
        base = found
    else:
        base = top_chain[-1]
    if top is base:
        raise QmpError("cannot commit an image into itself")
    for n in top_chain[:top_chain.index(base) + 1]:
        _check_busy(d, n)
    writer = top is not bs and _has_writer(d, top)
    if top is bs or writer:
        # active commit: top is the active layer, or something writes to it (a writable export)
        if "backing-file" in a:
            if writer:
                raise QmpError("'backing-file' specified, but 'top' has a writer on it")
            raise QmpError("'backing-file' specified, but 'top' is the active layer")
        opts = _job_opts(a)
        job_id = d.jobs.check_new_id(a.get("job-id", ""))
        _filter_name(d, a)
        inter = top_chain[1:top_chain.index(base)]
        policy = a.get("on-error", "report")
        job = ActiveCommitJob(d.jobs, job_id, g, source=top, target=base, sync="top",
                              granularity=_default_granularity(base), on_source_error=policy,
                              on_target_error=policy, base=base, intermediates=inter, **opts)
        _launch(d, job)
        return {}
    overlay = chain[chain.index(top) - 1]
    _check_busy(d, overlay)
    opts = _job_opts(a)
    job_id = d.jobs.check_new_id(a.get("job-id", ""))
    _filter_name(d, a)
    inter = top_chain[1:top_chain.index(base)]
    job = CommitJob(d.jobs, job_id, g, top=top, base=base, overlay=overlay, intermediates=inter,
                    backing_file=a.get("backing-file"), on_error=a.get("on-error", "report"), **opts)
    _launch(d, job)
    return {}


@command("block-stream")
def block_stream(d: Daemon, a: dict[str, Any]) -> Any:
    g = d.graph
    if "base" in a and "base-node" in a:
        raise QmpError("'base' and 'base-node' cannot be specified at the same time")
    if "base" in a and "bottom" in a:
        raise QmpError("'base' and 'bottom' cannot be specified at the same time")
    if "bottom" in a and "base-node" in a:
        raise QmpError("'bottom' and 'base-node' cannot be specified at the same time")
    dev = g.lookup(a["device"])
    chain = g.chain(dev)
    base: BlockNode | None = None
    if "base" in a:
        base = find_backing_image(d, dev, a["base"])
        if base is None:
            raise QmpError(f"Can't find '{a['base']}' in the backing chain")
    elif "base-node" in a:
        base = g.lookup(a["base-node"])
        if base not in chain[1:]:
            raise QmpError(f"Node '{a['base-node']}' is not a backing image of '{a['device']}'")
    elif "bottom" in a:
        bottom = g.lookup(a["bottom"])
        if bottom not in chain[1:]:
            raise QmpError(f"Node '{a['bottom']}' is not a backing image of '{a['device']}'")
        i = chain.index(bottom)
        base = chain[i + 1] if i + 1 < len(chain) else None
    if base is None and "backing-file" in a:
        raise QmpError("backing file specified, but streaming the entire chain")
    end = chain.index(base) if base is not None else len(chain)
    inter = chain[1:end]
    for n in [dev, *inter]:
        _check_busy(d, n)
    opts = _job_opts(a)
    job_id = d.jobs.check_new_id(a.get("job-id", ""))
    _filter_name(d, a)
    job = StreamJob(d.jobs, job_id, g, device=dev, base=base, intermediates=inter,
                    backing_file=a.get("backing-file"), on_error=a.get("on-error", "report"), **opts)
    _launch(d, job)
    return {}


def _default_granularity(target: BlockNode) -> int:
    """bdrv_get_default_bitmap_granularity: the target's cluster size clamped to [4 KiB, 64 KiB]."""
    cs = target.driver.cluster_size() if hasattr(target.driver, "cluster_size") else None
    if not cs:
        return 65536
    return min(max(cs, 4096), 65536)


def _root_any(d: Daemon, name: str) -> BlockNode:
    """qmp_get_root_bs: any node by name that has no parents."""
    node = d.graph.nodes.get(name)
    if node is None:
        raise QmpError(f"Cannot find device='{name}' nor node-name='{name}'")
    if not d.graph.is_root(node):
        raise QmpError("Need a root block node")
    return node


def _mirror_common(d: Daemon, a: dict[str, Any], source: BlockNode, target: BlockNode,
                   set_backing: Any = None, zero_target: bool = True) -> Any:
    g = d.graph
    sync = a["sync"]
    if sync in ("incremental", "bitmap"):
        raise QmpError(f"Sync mode '{sync}' not supported")
    gran = a.get("granularity", 0)
    if gran and (gran < 512 or gran > 64 << 20):
        raise QmpError("Parameter 'granularity' expects a value in range [512B, 64MB]")
    if gran & (gran - 1):
        raise QmpError("Parameter 'granularity' expects a power of 2")
    buf_size = a.get("buf-size", 0)
    if buf_size < 0:
        raise QmpError("Invalid parameter 'buf-size'")
    if source is target:
        raise QmpError("Can't mirror node into itself")
    replaces = None
    if "replaces" in a:
        replaces = g.nodes.get(a["replaces"])
        if replaces is None:
            raise QmpError(f"Failed to find node with node-name='{a['replaces']}'")
    for parent, role in g.parents(target):
        if role == "backing":
            raise QmpError(f"Node '{target.name}' is busy: node is used as backing hd of '{parent.name}'")
        raise QmpError(f"Block device {target.name} is in use")
    _check_busy(d, target)
    opts = _job_opts(a)
    job_id = d.jobs.check_new_id(a.get("job-id", ""))
    if source.driver.backing is None and sync == "top":
        sync = "full"
    job = MirrorJob(d.jobs, job_id, g, source=source, target=target, sync=sync,
                    granularity=gran or _default_granularity(target), buf_size=buf_size,
                    on_source_error=a.get("on-source-error", "report"),
                    on_target_error=a.get("on-target-error", "report"), replaces=replaces,
                    copy_mode=a.get("copy-mode", "background"), set_backing=set_backing,
                    zero_target=zero_target, **opts)
    _launch(d, job)
    return {}


@command("blockdev-mirror")
def blockdev_mirror(d: Daemon, a: dict[str, Any]) -> Any:
    source = _root_any(d, a["device"])
    target = d.graph.lookup(a["target"])
    _filter_name(d, a)
    return _mirror_common(d, a, source, target)


@command("drive-mirror")
def drive_mirror(d: Daemon, a: dict[str, Any]) -> Any:
    """drive-mirror: create (mode absolute-paths) or open (mode existing) the target file, then mirror."""
    from engine.image import create_image

    source = _root_any(d, a["device"])
    sync = a["sync"]
    mode = a.get("mode", "absolute-paths")
    path = a["target"]
    fmt = a.get("format")
    if sync in ("incremental", "bitmap"):
        raise QmpError(f"Sync mode '{sync}' not supported")
    src_drv = source.driver
    backing_drv = src_drv.backing if sync == "top" else None
    if mode == "existing":
        if not os.path.exists(path):
            raise QmpError(f"Could not open '{path}': No such file or directory")
    else:
        fmt = fmt or src_drv.format_name
        opts: dict[str, Any] = {}
        if backing_drv is not None and fmt == "qcow2":
            opts = {"backing_file": os.path.abspath(backing_drv.filename), "backing_fmt": backing_drv.format_name}
        create_image(path, fmt, source.size(), d.executor, opts)
    spec: dict[str, Any] = {"driver": fmt or "qcow2", "file": {"driver": "file", "filename": path}}
    if fmt is None:
        from engine.image import probe_file

        spec["driver"] = probe_file(path, d.executor)
    if spec["driver"] == "qcow2":
        spec["backing"] = None
    if "node-name" in a:
        spec["node-name"] = a["node-name"]
    created: list[BlockNode] = []
    target = d.graph._add(spec, False, created)
    try:
        # a new image reads as zeros: only an existing target needs zeroing (QEMU's zero_target)
        return _mirror_common(d, a, source, target, set_backing=backing_drv,
                              zero_target=sync == "full" and mode == "existing")
    except BaseException:
        for n in reversed(created):
            d.graph._drop(n)
        raise


def _backup_cluster_size(target: BlockNode) -> int:
    """backup_calculate_cluster_size: at least 64 KiB, or the target's cluster size if larger."""
    cs = target.driver.cluster_size() or 0
    return max(65536, cs)


def _find_bitmap(node: BlockNode, name: str) -> Any:
    from engine.daemon import bitmapcmds

    return bitmapcmds.find(node, name)


def _backup_common(d: Daemon, a: dict[str, Any], source: BlockNode, target: BlockNode,
                   owned_target: bool = False) -> Any:
    sync = a["sync"]
    has_bitmap = "bitmap" in a
    mode = a.get("bitmap-mode")
    if sync in ("bitmap", "incremental") and not has_bitmap:
        raise QmpError(f"must provide a valid bitmap name for '{sync}' sync mode")
    if sync == "incremental":
        if mode is not None and mode != "on-success":
            raise QmpError("Bitmap sync mode must be 'on-success' when using sync mode 'incremental'")
        sync, mode = "bitmap", "on-success"
    bitmap = None
    if has_bitmap:
        bitmap = _find_bitmap(source, a["bitmap"])
        if bitmap is None:
            raise QmpError(f"Bitmap '{a['bitmap']}' could not be found")
        if mode is None:
            raise QmpError("Bitmap sync mode must be given when providing a bitmap")
        if getattr(bitmap, "busy", False):
            raise QmpError(f"Bitmap '{a['bitmap']}' is currently in use by another operation and cannot be used")
        if getattr(bitmap, "inconsistent", False):
            raise QmpError(f"Bitmap '{a['bitmap']}' is inconsistent and cannot be used")
        if sync == "none":
            raise QmpError("sync mode 'none' does not produce meaningful bitmap outputs")
        if mode == "never" and sync != "bitmap":
            raise QmpError(f"Bitmap sync mode 'never' has no meaningful effect when combined with sync mode "
                           f"'{sync}'")
    elif mode is not None:
        raise QmpError("Cannot specify bitmap sync mode without a bitmap")
    if source is target:
        raise QmpError("Source and target cannot be the same")
    if source.size() != target.size():
        raise QmpError("Source and target image have different sizes")
    if a.get("compress") and not hasattr(target.driver, "write_compressed") or \
            a.get("compress") and target.driver.format_name != "qcow2":
        raise QmpError("Compression is not supported for this drive ")
    _check_busy(d, source)
    _check_busy(d, target)
    opts = _job_opts(a)
    job_id = d.jobs.check_new_id(a.get("job-id", ""))
    _filter_name(d, a)
    job = BackupJob(d.jobs, job_id, d.graph, source=source, target=target, sync=sync,
                    cluster_size=_backup_cluster_size(target), bitmap=bitmap, bitmap_mode=mode,
                    compress=bool(a.get("compress", False)), on_source_error=a.get("on-source-error", "report"),
                    on_target_error=a.get("on-target-error", "report"), owned_target=owned_target, **opts)
    _launch(d, job)
    return {}


@command("blockdev-backup")
def blockdev_backup(d: Daemon, a: dict[str, Any]) -> Any:
    source = d.graph.lookup(a["device"])
    target = d.graph.lookup(a["target"])
    return _backup_common(d, a, source, target)


@command("drive-backup")
def drive_backup(d: Daemon, a: dict[str, Any]) -> Any:
    """drive-backup: create (mode absolute-paths) or open (existing) the target file, then back up."""
    from engine.image import create_image, probe_file

    source = d.graph.lookup(a["device"])
    path = a["target"]
    fmt = a.get("format")
    mode = a.get("mode", "absolute-paths")
    src_drv = source.driver
    if mode == "existing":
        if not os.path.exists(path):
            raise QmpError(f"Could not open '{path}': No such file or directory")
        fmt = fmt or probe_file(path, d.executor)
    else:
        fmt = fmt or src_drv.format_name
        opts: dict[str, Any] = {}
        backing = src_drv.backing
        if a["sync"] == "top" and backing is not None and fmt == "qcow2":
            opts = {"backing_file": os.path.abspath(backing.filename), "backing_fmt": backing.format_name}
        create_image(path, fmt, source.size(), d.executor, opts)
    spec: dict[str, Any] = {"driver": fmt, "file": {"driver": "file", "filename": path}}
    if fmt == "qcow2":
        spec["backing"] = None
    created: list[BlockNode] = []
    target = d.graph._add(spec, False, created)
    try:
        return _backup_common(d, a, source, target, owned_target=True)
    except BaseException:
        for n in reversed(created):
            d.graph._drop(n)
        raise
