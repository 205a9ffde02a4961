"""The daemon's live node graph: blockdev-add / blockdev-del / reopen, parents and users, and the query
shapes (query-named-block-nodes, query-blockstats), as qemu-storage-daemon 7.2 has them.

Layer: engine.  Nodes are pipeline ``BlockNode``s around drivers; a driver's ``file`` and ``backing``
point at other graph nodes' drivers (``in_graph`` drivers are never closed by a parent, the graph closes
them).  Nodes added by blockdev-add at top level are *owned by the monitor*; inline children and chains
opened from image headers are implicit (``#blockN``) and go away with their last parent.
"""
from __future__ import annotations

import json
import random
import re
from typing import TYPE_CHECKING, Any

from engine.driver import BlockDriver, driver_class, format_names
from engine.errors import BlockError, DeviceNotFound, ImageOpenError, InvalidArgument
from engine.formats.file import FileDriver, perms_for
from engine.formats.filters import FilterDriver
from engine.formats.null import NULL_DEFAULT_SIZE, NullDriver
from engine.image import open_image, path_combine
from engine.pipeline import BlockNode, Graph

if TYPE_CHECKING:
    from ipc.executor import Executor

NODE_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9._-]*$")
#: options QEMU's null driver counts as "strong" (they force a json: pseudo-filename); latency-ns is not
NULL_STRONG_OPTS = ("size", "read-zeroes")
DEFAULT_CACHE = {"no-flush": False, "direct": False, "writeback": True}


def _qdict_hash(key: str) -> int:
    """The bucket of ``key`` in a QEMU QDict (tdb_hash modulo QDICT_BUCKET_MAX = 512)."""
    v = (0x238F13AF * len(key)) & 0xFFFFFFFF
    for i, c in enumerate(key.encode()):
        v = (v + (c << (i * 5 % 24))) & 0xFFFFFFFF
    return ((1103515243 * v + 12345) & 0xFFFFFFFF) % 512


def qdict_ordered(obj: Any) -> Any:
    """``obj`` with every dict's keys in the order QEMU iterates a QDict (bucket order), so that
    ``json.dumps`` prints QEMU's json:{...} pseudo-filenames byte for byte."""
    if isinstance(obj, dict):
        return {k: qdict_ordered(obj[k]) for k in sorted(obj, key=_qdict_hash)}
    return obj


class DaemonGraph(Graph):
    def __init__(self, executor: "Executor") -> None:
        super().__init__()
        self.executor = executor
        #: node name -> {user key: busy text} for jobs and exports holding the node
        self.users: dict[str, dict[str, str]] = {}
        self.order: list[str] = []

    def add(self, driver: BlockDriver, node_name: str | None = None, **kw: Any) -> BlockNode:
        """As ``Graph.add``, but implicit names are QEMU's id_generate(): ``#block<counter><random:02>``."""
        if node_name is None:
            node_name = f"#block{self._auto}{random.randrange(100):02d}"
            self._auto += 1
        return super().add(driver, node_name, **kw)

    # ------------------------------------------------------------------ lookups
    def lookup(self, name: Any) -> BlockNode:
        node = self.nodes.get(name) if isinstance(name, str) else None
        if node is None:
            raise BlockError(f"Cannot find device='{name}' nor node-name='{name}'")
        return node

    def node_of(self, driver: BlockDriver | None) -> BlockNode | None:
        if driver is None:
            return None
        node = self.nodes.get(driver.node_name)
        return node if node is not None and node.driver is driver else None

    def parents(self, node: BlockNode) -> list[tuple[BlockNode, str]]:
        out = []
        for n in self.nodes.values():
            if n.driver.file is node.driver:
                out.append((n, "file"))
            if n.driver.backing is node.driver:
                out.append((n, "backing"))
        return out

    def is_root(self, node: BlockNode) -> bool:
        """bdrv_is_root_node: no parent that is a node.  BlockBackends (exports, a job's target) do not
        count; a job on the node does, since QEMU puts its filter node above it."""
        return not self.parents(node) and not any(k.startswith("job:") for k in self.users.get(node.name, {}))

    def root(self, name: Any) -> BlockNode:
        """A job's ``device``: a node without parents.  DeviceNotFound / "Need a root block node"."""
        node = self.nodes.get(name) if isinstance(name, str) else None
        if node is None:
            raise DeviceNotFound(f"Cannot find device='{name}' nor node-name='{name}'")
        if not self.is_root(node):
            raise BlockError("Need a root block node")
        return node

    def chain(self, node: BlockNode) -> list[BlockNode]:
        """``node`` and the graph nodes of its backing chain, top first (filters looked through)."""
        out = []
        cur: BlockNode | None = node
        while cur is not None:
            out.append(cur)
            d = cur.driver
            while d.is_filter and d.file is not None:
                d = d.file
            cur = self.node_of(d.backing)
        return out

    def add_user(self, name: str, key: str, text: str) -> None:
        self.users.setdefault(name, {})[key] = text

    def remove_user(self, name: str, key: str) -> None:
        self.users.get(name, {}).pop(key, None)

    # ------------------------------------------------------------------ blockdev-add
    def _name_ok(self, name: str) -> None:
        if len(name) > 31:
            raise InvalidArgument("Node name too long")
        if not NODE_NAME_RE.match(name):
            raise InvalidArgument(f"Invalid node-name: '{name}'")
        if name in self.nodes:
            raise InvalidArgument(f"Duplicate nodes with node-name='{name}'")

    def _ref(self, ref: Any, parent: dict[str, Any], created: list[BlockNode]) -> BlockNode:
        """A child reference: an existing node's name, or inline options, which inherit read-only and
        cache.direct/no-flush from ``parent`` (QEMU's bdrv_inherited_options / bdrv_backing_options)."""
        if isinstance(ref, str):
            return self.lookup(ref)
        opts = dict(ref)
        opts.setdefault("read-only", bool(parent.get("read-only", False)))
        pcache = parent.get("cache") or {}
        if pcache:
            opts["cache"] = {**{k: v for k, v in pcache.items() if k in ("direct", "no-flush")},
                             **(opts.get("cache") or {})}
        return self._add(opts, False, created)

    def blockdev_add(self, opts: dict[str, Any]) -> BlockNode:
        """Create the node (and its inline children) described by BlockdevOptions ``opts``.  On any error
        nothing stays behind.  Raises BlockError with QEMU's texts."""
        created: list[BlockNode] = []
        try:
            return self._add(opts, True, created)
        except BaseException:
            for n in reversed(created):
                if self.nodes.get(n.name) is n:  # not already freed with its parent
                    self._drop(n)
            raise

    def _add(self, opts: dict[str, Any], top: bool, created: list[BlockNode]) -> BlockNode:
        name = opts.get("node-name")
        if name is None and top:
            raise InvalidArgument("'node-name' must be specified for the root node")
        if name is not None:
            self._name_ok(name)
        ro = bool(opts.get("read-only", False))
        discard = opts.get("discard", "ignore")
        dz = opts.get("detect-zeroes", "off")
        if dz == "unmap" and discard != "unmap":
            raise InvalidArgument("setting detect-zeroes to unmap is not allowed without setting discard "
                                  "operation to unmap")
        if opts.get("force-share") and not ro:
            raise InvalidArgument("force-share=on can only be used with read-only images")
        drv = opts.get("driver")
        throttle_group = None
        ex = self.executor
        strong: dict[str, Any] = {}
        if drv == "file":
            d: BlockDriver = FileDriver(opts["filename"], ex, ro)
            # QEMU locks a file for the permissions its parents take: none until a format node uses it
            d.locking = opts.get("locking", "auto") != "off"
        elif drv in ("null-co", "null-aio"):
            d = NullDriver(f"{drv}://", ex, ro, size=opts.get("size", NULL_DEFAULT_SIZE),
                           read_zeroes=bool(opts.get("read-zeroes", False)),
                           latency_ns=opts.get("latency-ns", 0), name=drv)
            strong = {k: opts[k] for k in NULL_STRONG_OPTS if k in opts}
        elif drv in format_names():
            child = self._ref(opts["file"], opts, created)
            d = driver_class(drv)(child.driver.filename, ex, ro)
            d.file = child.driver
            if isinstance(child.driver, FileDriver) and getattr(child.driver, "locking", False):
                try:
                    child.driver.lock(*perms_for(ro, bool(opts.get("force-share"))))
                except BlockError:
                    d.file = None
                    d.close()
                    raise
            if drv == "raw" and (opts.get("offset") or "size" in opts):
                d.close()
                raise InvalidArgument("raw: 'offset' and 'size' are not supported yet")
            try:
                d.open({})
            except BaseException:
                d.file = None
                d.close()
                raise
            if drv == "qcow2":
                # QEMU names the node (bdrv_open_common) before it opens the backing chain, so the
                # chain's nodes are newer than their overlay; blockdev_add drops it all on failure
                node = self._register(d, name, top, opts, dz, None, created, {})
                self._attach_backing(d, opts, created)
                return node
        elif drv == "throttle":
            throttle_group = opts.get("throttle-group")
            if throttle_group not in self.groups:
                raise InvalidArgument(f"Throttle group '{throttle_group}' does not exist")
            child = self._ref(opts["file"], opts, created)
            d = FilterDriver(child.driver, "throttle", ro)
            strong = {"throttle-group": throttle_group}
        elif drv == "blkdebug":
            from engine.formats.blkdebug import BlkdebugDriver

            child = self._ref(opts["image"], opts, created)
            d = BlkdebugDriver(child.driver, opts)
            d.read_only = ro
        else:
            raise InvalidArgument(f"Driver '{drv}' is not supported by parablock yet")
        return self._register(d, name, top, opts, dz, throttle_group, created, strong)

    def _register(self, d: BlockDriver, name: str | None, top: bool, opts: dict[str, Any], dz: str,
                  throttle_group: str | None, created: list[BlockNode], strong: dict[str, Any]) -> BlockNode:
        d.in_graph = True
        try:
            node = self.add(d, name, detect_zeroes=dz, throttle_group=throttle_group)
        except BaseException:
            d.backing = None
            d.file = None
            d.close()
            raise
        node.owned = top
        node.discard_mode = opts.get("discard", "ignore")
        node.strong_opts = strong
        cache = opts.get("cache") or {}
        node.cache = {"no-flush": bool(cache.get("no-flush", False)),
                      "direct": bool(cache.get("direct", False)), "writeback": True}
        self.order.append(node.name)
        created.append(node)
        return node

    def _attach_backing(self, d: BlockDriver, opts: dict[str, Any], created: list[BlockNode]) -> None:
        if "backing" in opts:
            ref = opts["backing"]
            if ref is None or ref == "":  # "backing=" on the command line is a deprecated spelling of null
                return
            try:
                d.backing = self._ref(ref, {**opts, "read-only": True}, created).driver
            except BlockError as exc:
                raise BlockError(f"Could not open backing file: {exc.message}") from None
            node = self.node_of(d)
            if node is not None:  # bs->backing_file follows the node until a job rewrites the header
                node.attached_header = d.backing_filename
            return
        if not d.backing_filename:
            return
        path = path_combine(d.filename, d.backing_filename)
        try:
            chain = open_image(path, self.executor, d.backing_format, read_only=True, probe_raw=False)
        except ImageOpenError as exc:
            raise ImageOpenError(f"Could not open backing file: {exc.message}", errno=exc.errno) from None
        try:  # the chain's files are locked as QEMU locks backing files: read, and no writer shared
            cur0: BlockDriver | None = chain
            while cur0 is not None:
                if isinstance(cur0.file, FileDriver) and opts.get("locking", "auto") != "off":
                    cur0.file.lock(*perms_for(True, bool(opts.get("force-share"))))
                cur0 = cur0.backing
        except BlockError as exc:
            chain.close()
            raise BlockError(f"Could not open backing file: {exc.message}") from None
        d.backing = chain
        # register the chain as implicit nodes in QEMU's opening order: top down, file before format;
        # backing nodes inherit cache.direct/no-flush (bdrv_backing_options)
        cache = opts.get("cache") or {}
        cur: BlockDriver | None = chain
        while cur is not None:
            for x in (cur.file, cur):
                if x is None:
                    continue
                x.in_graph = True
                n = self.add(x, None)
                n.owned = False
                n.discard_mode = "ignore"
                n.strong_opts = {}
                n.cache = {"no-flush": bool(cache.get("no-flush", False)),
                           "direct": bool(cache.get("direct", False)), "writeback": True}
                self.order.append(n.name)
                created.append(n)
            cur = cur.backing

    # ------------------------------------------------------------------ blockdev-del
    def blockdev_del(self, name: str) -> None:
        node = self.nodes.get(name)
        if node is None:
            raise BlockError(f"Failed to find node with node-name='{name}'")
        users = self.users.get(name, {})
        exports = [t for k, t in users.items() if k.startswith(("export:", "blk:"))]
        if exports:
            raise BlockError(f"Node {name} is in use")
        if not getattr(node, "owned", False):
            raise BlockError(f"Node {name} is not owned by the monitor")
        for parent, role in self.parents(node):
            if role == "backing":
                raise BlockError(f"Node '{name}' is busy: node is used as backing hd of '{parent.name}'")
        jobs = [t for k, t in users.items() if k.startswith("job:")]
        if jobs:
            raise BlockError(f"Node '{name}' is busy: {jobs[0]}")
        if self.parents(node) or users:
            raise BlockError(f"Block device {name} is in use")
        self._drop(node)

    def _drop(self, node: BlockNode) -> None:
        """Close ``node`` and free its implicit children that nothing else uses."""
        d = node.driver
        kids = [self.node_of(d.file), self.node_of(d.backing)]
        kept_file = d.file if isinstance(d.file, FileDriver) and kids[0] is not None and kids[0].owned else None
        try:
            node.close()
            if kept_file is not None:
                kept_file.unlock()  # the file node stays, without a user: its locks go
        finally:
            if node.name in self.order:
                self.order.remove(node.name)
            self.users.pop(node.name, None)
        for k in kids:
            if k is not None and k.name in self.nodes and not getattr(k, "owned", False) \
                    and not self.parents(k) and not self.users.get(k.name):
                self._drop(k)

    def close_all(self) -> None:
        """Shutdown: flush and close every node, parents before children."""
        while self.nodes:
            progressed = False
            for node in list(self.nodes.values()):
                if node.name in self.nodes and not self.parents(node):
                    try:
                        node.close()
                    except BlockError:
                        pass
                    if node.name in self.order:
                        self.order.remove(node.name)
                    progressed = True
            if not progressed:  # a cycle cannot happen, but never spin
                for node in list(self.nodes.values()):
                    node.close()

    # ------------------------------------------------------------------ reopen
    def reopen(self, node: BlockNode, read_only: bool) -> None:
        """Switch a format node (and its file child) between read-only and read-write."""
        d = node.driver
        if d.read_only == read_only:
            return
        f = d.file
        if d.is_protocol:
            d.reopen(read_only)
            return
        if read_only:
            d.flush()
        if f is not None and hasattr(f, "reopen") and f.read_only != read_only:
            f.reopen(read_only)
        backing = d.backing
        d.read_only = read_only
        if hasattr(d, "h"):  # formats with metadata re-read it in the new mode
            try:
                d.open({})
            except BaseException:
                d.read_only = not read_only
                if f is not None and hasattr(f, "reopen"):
                    f.reopen(not read_only)
                d.open({})
                raise
        d.backing = backing

    # ------------------------------------------------------------------ queries
    # QEMU's bdrv_refresh_filename: a node shows its "exact" filename when its options can be told by
    # one, else json:{full open options} (strong runtime options, children, an overridden backing)
    def _backing_overridden(self, node: BlockNode) -> bool:
        d = node.driver
        if d.format_name != "qcow2":
            return False
        header = d.backing_filename or ""
        below = self.node_of(d.backing)
        if below is None:
            return bool(header)
        return self.filename_of(below) not in (header, path_combine(d.filename, header))

    def _exact_filename(self, node: BlockNode) -> str | None:
        d = node.driver
        if getattr(node, "strong_opts", None) or self._backing_overridden(node):
            return None
        if d.format_name == "file":
            return d.filename
        if d.format_name in ("null-co", "null-aio"):
            return f"{d.format_name}://"
        child = self.node_of(d.file)
        return self._exact_filename(child) if child is not None else d.filename

    def _full_options(self, node: BlockNode) -> dict[str, Any]:
        d = node.driver
        out: dict[str, Any] = {"driver": d.format_name, **getattr(node, "strong_opts", {})}
        if d.format_name == "file":
            out["filename"] = d.filename
        child = self.node_of(d.file)
        if child is not None:
            out["file"] = self._full_options(child)
        if self._backing_overridden(node):
            below = self.node_of(d.backing)
            out["backing"] = None if below is None else self._full_options(below)
        return out

    def filename_of(self, node: BlockNode) -> str:
        """The node's filename as QEMU reports it (``file``, ``image.filename``)."""
        exact = self._exact_filename(node)
        if exact is not None:
            return exact
        return "json:" + json.dumps(qdict_ordered(self._full_options(node)))

    def _filtered_or_cow(self, node: BlockNode) -> BlockNode | None:
        """bdrv_filter_or_cow_bs: a filter's file child, a format node's backing node."""
        d = node.driver
        return self.node_of(d.file if d.is_filter else d.backing)

    def _image_info(self, node: BlockNode) -> dict[str, Any]:
        from engine.cli.cmd_info import image_info

        d = node.driver
        img = image_info(d, self.filename_of(node))
        if d.is_filter or d.is_protocol:
            img.pop("format-specific", None)
        img["virtual-size"] = -(-img["virtual-size"] // 512) * 512  # bdrv_getlength counts sectors
        leaf = d  # raw and filters forward bdrv_get_info to their file child
        while leaf.format_name != "qcow2" and leaf.file is not None:
            leaf = leaf.file
        if leaf.format_name in ("null-co", "null-aio"):  # no bdrv_get_info: no dirty-flag
            img.pop("dirty-flag", None)
        return img

    def device_info(self, node: BlockNode, flat: bool) -> dict[str, Any]:
        """BlockDeviceInfo as bdrv_block_device_info builds it (keys in QEMU's QDict order)."""
        d = node.driver
        img = self._image_info(node)
        depth = 0
        if not flat:
            cur, below = img, self._filtered_or_cow(node)
            while below is not None:
                sub = self._image_info(below)
                cur["backing-image"] = sub
                depth += 1
                cur, below = sub, self._filtered_or_cow(below)
        out: dict[str, Any] = {
            "iops_rd": 0, "detect_zeroes": node.detect_zeroes, "image": img, "iops_wr": 0,
            "ro": d.read_only, "node-name": node.name,
            "backing_file_depth": depth, "drv": d.format_name, "iops": 0,
            "bps_wr": 0, "write_threshold": 0}
        below = self.node_of(d.backing)
        if below is not None and self._backing_overridden(node) \
                and getattr(node, "attached_header", None) == d.backing_filename:
            out["backing_file"] = self.filename_of(below)  # explicit backing: bs->backing_file follows it
        elif d.backing is not None and d.backing_filename:
            out["backing_file"] = d.backing_filename
        out.update({"encrypted": False, "bps": 0, "bps_rd": 0,
                    "cache": dict(getattr(node, "cache", DEFAULT_CACHE)),
                    "file": self.filename_of(node)})
        bitmaps = getattr(node, "bitmap_info", None)
        if callable(bitmaps):
            bl = bitmaps()
            if bl:
                out["dirty-bitmaps"] = bl
        return out

    def query_named(self, flat: bool) -> list[dict[str, Any]]:
        return [self.device_info(self.nodes[n], flat) for n in reversed(self.order) if n in self.nodes]

    @staticmethod
    def _stats(node: BlockNode) -> dict[str, Any]:
        s = node.stats
        return {
            "unmap_operations": s.discard.ops, "unmap_merged": 0,
            "flush_total_time_ns": s.flush.total_time_ns, "wr_highest_offset": node.wr_highest,
            "wr_total_time_ns": s.write.total_time_ns + s.zero.total_time_ns, "failed_wr_operations": 0,
            "failed_rd_operations": 0, "wr_merged": 0, "wr_bytes": s.write.bytes + s.zero.bytes,
            "timed_stats": [], "failed_unmap_operations": 0, "failed_flush_operations": 0,
            "account_invalid": False, "rd_total_time_ns": s.read.total_time_ns,
            "invalid_unmap_operations": 0, "flush_operations": s.flush.ops,
            "wr_operations": s.write.ops + s.zero.ops, "unmap_bytes": s.discard.bytes, "rd_merged": 0,
            "rd_bytes": s.read.bytes, "unmap_total_time_ns": s.discard.total_time_ns,
            "invalid_flush_operations": 0, "account_failed": False, "rd_operations": s.read.ops,
            "invalid_wr_operations": 0, "invalid_rd_operations": 0}

    def _blockstats(self, node: BlockNode) -> dict[str, Any]:
        out: dict[str, Any] = {}
        child = self.node_of(node.driver.file)
        if child is not None:
            out["parent"] = self._blockstats(child)
        out["stats"] = self._stats(node)
        out["node-name"] = node.name
        if node.driver.format_name == "file":
            out["driver-specific"] = {"discard-bytes-ok": node.stats.discard.bytes,
                                      "discard-nb-ok": node.stats.discard.ops, "driver": "file",
                                      "discard-nb-failed": 0}
        return out

    def query_blockstats(self, query_nodes: bool) -> list[dict[str, Any]]:
        if not query_nodes:
            return []
        return [self._blockstats(self.nodes[n]) for n in self.order if n in self.nodes]
