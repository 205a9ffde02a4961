"""The qcow2 format driver: reads every variant qemu-img 7.2 creates (but encryption and external data
files) and writes with QEMU's metadata rules and crash-safe ordering.

Layer: engine.  Metadata lives here, in the coordinator: L1 in memory, L2 tables and refcount blocks in
write-back caches, data bytes moved by the executor through the ``file`` child.

Crash-safety invariants (what a crash at any point leaves is clean or leaks only):
- data is written before the L2 entry that points at it (``_flush_metadata`` fsyncs the file first);
- refcount increments reach the disk before the L2/L1 entries that use the clusters (non-lazy mode);
- L2 tables reach the disk before the L1 entries that point at them;
- refcount decrements (``_pending_free``) are applied only after the L2/L1 tables that dropped the
  reference are on disk, so a freed cluster is never reused while a stale reference to it survives;
- the header is rewritten only after every structure it points at is on disk, and old structures are
  freed after it.
With lazy refcounts the dirty bit is set (and flushed) before the first metadata write and refcount
blocks are written only on close; a crash then leaves a dirty image that the next read-write open
repairs, as QEMU does.

Persistent dirty bitmaps (block/qcow2-bitmap.c): a read-write open loads them and flags them in use on
disk (directory rewritten in place with autoclear bit 0 dropped meanwhile), so a crash leaves them
inconsistent; every guest-visible change is recorded in the recording bitmaps before it reaches the disk
(``_note_write``); ``store_bitmaps`` (run by ``close``) writes data, tables and a new directory to fresh
clusters, makes them and their refcounts durable, switches the header, and only then frees the old ones.
"""
from __future__ import annotations

import errno
import re
import struct
import time
from collections import OrderedDict
from dataclasses import replace
from typing import Any

from engine.bitmap import DirtyBitmap
from engine.driver import BlockDriver, Extent, Status, leftover_create_options, register
from engine.errors import (BlockError, CorruptImage, ImageOpenError, InvalidArgument, NotSupported,
                           OutOfBounds)
from engine.formats import qcow2_bitmaps as QB
from engine.formats import qcow2_layout as L
from engine.formats.qcow2_layout import SubclusterType as T
from engine.units import round_up

_NONZERO = re.compile(rb"[^\x00]")

_MAX_BITMAP_MEMORY = 2 << 30  # all bitmaps of one node together (QEMU caps one at 512 MiB, not their sum)
_CACHE_BYTES = 32 << 20  # per cache (L2 tables, refcount blocks); bounded in bytes, whatever the cluster size


def _div_up(a: int, b: int) -> int:
    return -(-a // b)


@register
class Qcow2Driver(BlockDriver):
    format_name = "qcow2"
    inline_reads = True
    supports_backing = True

    @classmethod
    def probe(cls, head: bytes, filename: str) -> int:
        if len(head) >= 8 and struct.unpack_from(">II", head, 0) in ((L.QCOW_MAGIC, 2), (L.QCOW_MAGIC, 3)):
            return 100
        return 0

    # ------------------------------------------------------------------------------------------------
    # open / close
    # ------------------------------------------------------------------------------------------------
    def open(self, options: dict[str, Any]) -> None:
        """Parse the header and load the L1 and refcount tables.

        Raises ImageOpenError for a bad or unsupported image and for a writable open of a corrupt one.
        """
        assert self.file is not None
        self.cache_unsafe = options.get("cache") == "unsafe"
        fsize = self.file.size()
        head = self.file.read(0, 4096)
        try:
            cbits = struct.unpack_from(">I", head, 20)[0]
        except struct.error:
            raise ImageOpenError("Image is not in qcow2 format") from None
        if L.MIN_CLUSTER_BITS <= cbits <= L.MAX_CLUSTER_BITS and (1 << cbits) > len(head):
            head = self.file.read(0, 1 << cbits)
        self.h = L.parse_header(head)
        h = self.h
        if h.incompatible_features & L.Incompat.CORRUPT and not self.read_only:
            raise ImageOpenError("qcow2: Image is corrupt; cannot be opened read/write", errno=errno.EACCES)
        self._setup_geometry()
        if h.refcount_table_offset >= fsize:
            raise ImageOpenError("Could not read refcount table: Invalid argument")
        if h.nb_snapshots > 65536:
            raise ImageOpenError("Too many snapshots")
        self.l1 = L.unpack_u64_table(self.file.read(h.l1_table_offset, h.l1_size * 8)) if h.l1_size else []
        self._load_refcount_table()
        self.snapshots = self._load_snapshots()
        self.l2_cache: OrderedDict[int, bytearray] = OrderedDict()
        self.l2_dirty: set[int] = set()
        self.rb_cache: OrderedDict[int, bytearray] = OrderedDict()
        self.rb_dirty: set[int] = set()
        self.l1_dirty: set[int] = set()
        self.rt_dirty: set[int] = set()
        self._pending_free: list[tuple[int, int]] = []
        self.free_hint = 0
        self.free_byte_offset = 0
        self._alloc_end = _div_up(fsize, self.cs)
        self._dirty_marked = False
        self._meta_prealloc: bool | None = None
        self._zcache: tuple[int, bytes] | None = None
        self.bitmap_warnings: list[str] = []
        if not self.read_only and h.incompatible_features & L.Incompat.DIRTY:
            self._repair_dirty()
            h = self.h
        self._load_bitmap_directory()
        if not self.read_only:
            changed = False
            unknown_auto = h.autoclear_features & ~int(L.KNOWN_AUTOCLEAR)
            if unknown_auto:
                h.autoclear_features &= int(L.KNOWN_AUTOCLEAR)
                changed = True
            if self._bm_ignored:
                # bitmaps a program without bitmap support may have invalidated: QEMU drops the extension
                # (their clusters leak until ``check -r leaks``)
                h.bitmaps_ext = None
                changed = True
            if changed:
                self._write_header()
                self._sync()
            try:
                self._bitmaps = self._load_bitmaps()
            except CorruptImage as exc:
                raise ImageOpenError(exc.message) from None
            self._bm_mark_in_use()
        self._open_done = True

    def _setup_geometry(self) -> None:
        h = self.h
        self.cbits = h.cluster_bits
        self.cs = 1 << self.cbits
        self.ext_l2 = h.extended_l2
        self.esz = 16 if self.ext_l2 else 8
        self.l2_entries = self.cs // self.esz
        self.sc_size = self.cs // L.SUBCLUSTERS if self.ext_l2 else self.cs
        self.rorder = h.refcount_order
        self.rmax = (1 << (1 << self.rorder)) - 1
        self.epb = L.refcounts_per_block(self.cbits, self.rorder)
        self.codec = h.compression
        self.cache_limit = max(16, _CACHE_BYTES // self.cs)

    def _load_refcount_table(self) -> None:
        h = self.h
        raw = self.file.read(h.refcount_table_offset, h.refcount_table_clusters * self.cs)
        self.rt = [e & L.REFT_OFFSET_MASK for e in L.unpack_u64_table(raw)]

    def _load_snapshots(self) -> list[L.Snapshot]:
        h = self.h
        self.snapshots_size = 0
        if not h.nb_snapshots:
            return []
        # the table is at most 64 KiB per 256 entries in practice; read generously, bounded by the file
        size = min(max(self.file.size() - h.snapshots_offset, 0), h.nb_snapshots * (40 + 1024 + 2048 + 8))
        buf = self.file.read(h.snapshots_offset, size)
        try:
            snaps, self.snapshots_size = L.parse_snapshots(buf, h.nb_snapshots, h.version)
            return snaps
        except CorruptImage as exc:
            raise ImageOpenError(f"Could not read snapshots: {exc.message}") from None

    def _repair_dirty(self) -> None:
        """A dirty image (lazy refcounts and a crash) opened read-write: rebuild refcounts, as QEMU does.

        The checker's findings are kept in ``repair_messages`` (qemu-io prints them)."""
        from engine.formats.qcow2_check import FIX_ERRORS, FIX_LEAKS, check_qcow2

        assert self.file is not None
        f = self.file
        res = check_qcow2(f.read, f.size(), FIX_LEAKS | FIX_ERRORS, write=f.write, truncate=f.truncate,
                          flush=f.flush)
        self.repair_messages = list(res.messages)
        if res.corruptions or res.check_errors:
            raise ImageOpenError("qcow2: Could not repair dirty image")
        head = f.read(0, self.cs)
        self.h = L.parse_header(head)
        self._setup_geometry()
        self.l1 = L.unpack_u64_table(f.read(self.h.l1_table_offset, self.h.l1_size * 8)) if self.h.l1_size else []
        self._load_refcount_table()

    def close(self) -> None:
        if getattr(self, "_open_done", False) and not self.read_only and self.file is not None:
            try:
                self.flush()
                try:
                    self.store_bitmaps()
                except BlockError as exc:
                    # as QEMU: the close goes on; the bitmaps stay flagged in use (inconsistent) on disk
                    self.bitmap_warnings.append(f"Lost persistent bitmaps during inactivation of node "
                                                f"'{self._node_label()}': {exc.message}")
                if self.h.incompatible_features & L.Incompat.DIRTY:
                    self._write_refcounts()
                    self._sync()
                    self.h.incompatible_features &= ~int(L.Incompat.DIRTY)
                    self._write_header()
                    self._sync()
            finally:
                self._open_done = False
        super().close()

    # ------------------------------------------------------------------------------------------------
    # basic properties
    # ------------------------------------------------------------------------------------------------
    def size(self) -> int:
        return self.h.size

    def cluster_size(self) -> int | None:
        return self.cs

    @property
    def backing_filename(self) -> str | None:
        return self.h.backing_file

    @property
    def backing_format(self) -> str | None:
        return self.h.backing_format

    def is_dirty(self) -> bool:
        return bool(self.h.incompatible_features & L.Incompat.DIRTY)

    def info_specific(self) -> dict[str, Any]:
        h = self.h
        data: dict[str, Any] = {"compat": "1.1" if h.version >= 3 else "0.10",
                                "compression-type": h.compression}
        if h.version >= 3:
            data["lazy-refcounts"] = bool(h.compatible_features & L.Compat.LAZY_REFCOUNTS)
            # qemu-img 7.2 prints the keys in QDict hash order: bitmaps come right after lazy-refcounts
            bitmaps = self._bitmap_list()
            if bitmaps is not None:
                data["bitmaps"] = bitmaps
        data["refcount-bits"] = h.refcount_bits
        if h.version >= 3:
            data["corrupt"] = bool(h.incompatible_features & L.Incompat.CORRUPT)
            data["extended-l2"] = self.ext_l2
        return {"type": "qcow2", "data": data}

    def _bitmap_list(self) -> list[dict[str, Any]] | None:
        """The bitmap directory as ``qemu-img info`` lists it (None without bitmaps)."""
        if not self._bm_dir:
            return None
        return [{"flags": e.info_flags(),
                 "name": e.name.encode("utf-8", "surrogateescape").decode("utf-8", "replace"),
                 "granularity": e.granularity} for e in self._bm_dir]

    # ------------------------------------------------------------------------------------------------
    # persistent dirty bitmaps (block/qcow2-bitmap.c)
    # ------------------------------------------------------------------------------------------------
    def _read_padded(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset``; what lies past the end of the file reads as zeros."""
        assert self.file is not None
        fsize = self.file.size()
        n = max(0, min(length, fsize - offset))
        data = bytes(self.file.read(offset, n)) if n else b""
        return data + bytes(length - len(data))

    def _load_bitmap_directory(self) -> None:
        """Parse the bitmaps extension and directory, as QEMU does on open.

        Bitmaps count only with autoclear bit 0 set (v3): otherwise a program without bitmap support
        may have changed the disk, QEMU ignores them and a read-write open drops the extension
        (``_bm_ignored``).  Raises ImageOpenError with QEMU's texts for a bad extension or directory."""
        h = self.h
        self._bm_dir: list[QB.DirEntry] = []
        self._bm_ext: QB.BitmapsExt | None = None
        self._bm_ignored = False
        self._bitmaps: list[DirtyBitmap] | None = None
        self._bm_need_in_use = False
        if h.bitmaps_ext is None:
            return
        if h.version < 3 or not h.autoclear_features & L.Autoclear.BITMAPS:
            self._bm_ignored = True
            self.bitmap_warnings.append("a program lacking bitmap support modified this file, so all bitmaps "
                                        "are now considered inconsistent")
            return
        ext = QB.parse_ext(h.bitmaps_ext, self.cs)
        buf = self._read_padded(ext.directory_offset, ext.directory_size)
        try:
            self._bm_dir = QB.parse_directory(buf, ext.nb_bitmaps, self.cs, h.size)
        except CorruptImage as exc:
            raise ImageOpenError(exc.message) from None
        self._bm_ext = ext

    def _load_bitmaps(self) -> list[DirtyBitmap]:
        """The directory's bitmaps with their data (QEMU's qcow2_load_dirty_bitmaps, minus the in-use
        update).  A bitmap already in use on disk is loaded empty and inconsistent.  Raises CorruptImage
        with QEMU's texts for a bad table or a table that does not fit the disk."""
        out: list[DirtyBitmap] = []
        total = 0
        for e in self._bm_dir:
            nbytes = QB.bitmap_bytes(self.h.size, e.granularity)
            total += nbytes
            if nbytes > QB.MAX_PHYS_SIZE or total > _MAX_BITMAP_MEMORY:
                raise CorruptImage(f"Could not read bitmap '{e.name}' from image: Cannot allocate memory")
            bm = DirtyBitmap(self.h.size, e.granularity, e.name, persistent=True, enabled=e.auto)
            if e.in_use:
                bm.inconsistent = True
            else:
                self._load_bitmap_data(e, bm)
            bm.readonly = self.read_only
            out.append(bm)
        return out

    def _load_bitmap_table(self, e: QB.DirEntry) -> list[int]:
        raw = self._read_padded(e.table_offset, e.table_size * 8)
        try:
            return QB.parse_table(raw, e.table_size, self.cs)
        except CorruptImage:
            raise CorruptImage(f"Could not read bitmap_table table from image for bitmap '{e.name}': "
                               "Invalid argument") from None

    def _load_bitmap_data(self, e: QB.DirEntry, bm: DirtyBitmap) -> None:
        table = self._load_bitmap_table(e)
        cs = self.cs
        if e.table_size != _div_up(bm.serialized_size(), cs):
            raise CorruptImage(f"Could not read bitmap '{e.name}' from image: Invalid argument")
        for i, t in enumerate(table):
            off = t & QB.TABLE_OFFSET_MASK
            if off:
                bm.load_disk_bytes(self._read_padded(off, cs), i * cs)
            elif t & QB.TABLE_ALL_ONES:
                bm.fill_disk_range(i * cs, cs)

    def bitmaps(self) -> list[DirtyBitmap]:
        """The node's dirty bitmaps: the image's persistent ones (``persistent=True``, ``enabled`` from
        the auto flag, ``inconsistent`` when in use on disk at open, ``readonly`` on a read-only node)
        and those added since.  Loaded on first use for a read-only node.  Raises CorruptImage (QEMU's
        texts) when a bitmap's table or data is bad."""
        if self._bitmaps is None:
            self._bitmaps = self._load_bitmaps()
        return list(self._bitmaps)

    def find_bitmap(self, name: str) -> DirtyBitmap | None:
        for bm in self.bitmaps():
            if bm.name == name:
                return bm
        return None

    def _bm_update_in_place(self, entries: list[QB.DirEntry]) -> None:
        """QEMU's update_ext_header_and_dir_in_place: drop autoclear bit 0, rewrite the directory where it
        is, then set the bit again, each step on disk before the next (a torn directory write is then
        never trusted)."""
        assert self._bm_ext is not None
        h = self.h
        data = QB.build_directory(entries)
        if len(data) != self._bm_ext.directory_size:
            raise CorruptImage("Can't update bitmap directory: Invalid argument")
        h.autoclear_features &= ~int(L.Autoclear.BITMAPS)
        self._write_header()
        self._sync()
        self.file.write(self._bm_ext.directory_offset, data)
        self._sync()
        h.autoclear_features |= int(L.Autoclear.BITMAPS)
        self._write_header()
        self._sync()
        self._bm_dir = entries

    def _bm_mark_in_use(self) -> None:
        """Flag every consistent bitmap of the directory in use on disk (what a read-write open does)."""
        self._bm_need_in_use = False
        if self.read_only or not self._bm_dir:
            return
        entries = [replace(e, flags=e.flags | QB.FLAG_IN_USE) for e in self._bm_dir]
        if entries != self._bm_dir:
            self._bm_update_in_place(entries)

    def mark_bitmaps_in_use(self) -> None:
        """Call before changing a bitmap other than by a guest write (clear, merge) after
        ``store_bitmaps``: the on-disk copy is flagged in use again, so a crash cannot leave it stale
        but trusted.  Guest writes do this by themselves."""
        if self._bm_need_in_use:
            self._bm_mark_in_use()

    def _note_write(self, offset: int, length: int) -> None:
        """Record a guest-visible change of [offset, offset+length) in every recording bitmap (QEMU's
        bdrv_set_dirty).  Called before the change reaches the disk."""
        bms = self._bitmaps
        if not bms or length <= 0:
            return
        if self._bm_need_in_use:
            self._bm_mark_in_use()
        end = min(offset + length, self.h.size)
        if offset >= end:
            return
        for bm in bms:
            if bm.enabled and not bm.readonly and bm.size >= end:
                bm.set(offset, end - offset)

    def _node_label(self) -> str:
        return self.node_name or self.filename

    def add_persistent_bitmap(self, bm: DirtyBitmap) -> None:
        """Attach ``bm`` (its size must be the disk's) as a persistent bitmap, written to the image by
        ``store_bitmaps`` / ``close`` (QEMU: block-dirty-bitmap-add persistent=true, then
        qcow2_co_can_store_new_dirty_bitmap).  Raises ReadOnlyError on a read-only node, BlockError with
        QEMU's texts ("Bitmap already exists: NAME", v2 images, granularity, size, name, count and
        directory limits) and InvalidArgument for a nameless or wrongly sized bitmap."""
        self.check_writable()
        if not bm.name:
            raise InvalidArgument("Bitmap name cannot be empty")
        if self.find_bitmap(bm.name) is not None:
            raise BlockError(f"Bitmap already exists: {bm.name}")
        prefix = f"Can't make bitmap '{bm.name}' persistent in '{self._node_label()}': "
        if self.h.version < 3:
            raise BlockError(prefix + "Cannot store dirty bitmaps in qcow2 v2 files")
        why = QB.constraints_error(bm.name, bm.granularity, self.h.size, self.cs)
        if why:
            raise BlockError(prefix + why)
        persistent = [b for b in self.bitmaps() if b.persistent]
        if len(persistent) + 1 > QB.MAX_BITMAPS:
            raise BlockError(prefix + "Maximum number of persistent bitmaps is already reached")
        dir_size = sum(QB.entry_size(len(b.name.encode("utf-8", "surrogateescape"))) for b in persistent
                       if b.name)
        if dir_size + QB.entry_size(len(bm.name.encode("utf-8", "surrogateescape"))) > QB.MAX_DIRECTORY_SIZE:
            raise BlockError(prefix + "Not enough space in the bitmap directory")
        if bm.size != self.h.size:
            raise InvalidArgument(f"Bitmap '{bm.name}' covers {bm.size} bytes, the image {self.h.size}")
        bm.persistent = True
        assert self._bitmaps is not None
        self._bitmaps.append(bm)

    def remove_persistent_bitmap(self, name: str) -> None:
        """Drop bitmap ``name`` from the node and from the image, freeing its clusters (QEMU's
        block-dirty-bitmap-remove and qcow2_co_remove_persistent_dirty_bitmap): the new directory (or no
        extension at all) is on disk before the old directory, table and data clusters are freed.
        Raises BlockError when there is no such bitmap (errno ENOENT) or it is busy, ReadOnlyError on a
        read-only node."""
        bm = self.find_bitmap(name)
        if bm is None:
            raise BlockError(f"Dirty bitmap '{name}' not found", errno=errno.ENOENT)
        if bm.busy:
            raise BlockError(f"Bitmap '{name}' is currently in use by another operation and cannot be used")
        self.check_writable()
        assert self._bitmaps is not None
        self._bitmaps[:] = [b for b in self._bitmaps if b is not bm]  # by identity: == compares bits
        gone = [e for e in self._bm_dir if e.name == name]
        if not gone:
            return
        self.flush()
        self._bm_switch_directory([e for e in self._bm_dir if e.name != name])
        for e in gone:
            self._bm_free_table(e)
        self.flush()

    def _bm_free_table(self, e: QB.DirEntry) -> None:
        """Queue the frees of a bitmap's data clusters and table (QEMU's free_bitmap_clusters)."""
        try:
            table = self._load_bitmap_table(e)
        except CorruptImage:
            return  # QEMU gives up too: the clusters leak, which check -r leaks repairs
        for t in table:
            off = t & QB.TABLE_OFFSET_MASK
            if off:
                self._free_range(off, self.cs)
        self._free_range(e.table_offset, e.table_size * 8)

    def _bm_switch_directory(self, entries: list[QB.DirEntry]) -> None:
        """QEMU's update_ext_header_and_dir: write ``entries`` as a new directory, make every refcount
        and the directory durable, switch the header to it (or drop the extension and autoclear bit 0
        when empty), then queue the old directory's clusters for freeing."""
        h = self.h
        old = self._bm_ext
        new_ext: QB.BitmapsExt | None = None
        if entries:
            if len(entries) > QB.MAX_BITMAPS:
                raise BlockError("Failed to update bitmap extension: Invalid argument")
            data = QB.build_directory(entries)
            off = self._alloc_clusters(_div_up(len(data), self.cs))
            self.file.write(off, data)
            new_ext = QB.BitmapsExt(len(entries), len(data), off)
        self._write_refcounts()
        self._sync()
        if new_ext is not None:
            h.bitmaps_ext = QB.build_ext(new_ext)
            h.autoclear_features |= int(L.Autoclear.BITMAPS)
        else:
            h.bitmaps_ext = None
            h.autoclear_features &= ~int(L.Autoclear.BITMAPS)
        self._write_header()
        self._sync()
        self._bm_ext = new_ext
        self._bm_dir = list(entries)
        if old is not None and old.directory_size:
            self._free_range(old.directory_offset, old.directory_size)

    def store_bitmaps(self) -> None:
        """Write every persistent, consistent bitmap to the image with the in-use flag cleared (QEMU's
        qcow2_store_persistent_dirty_bitmaps).  Order: data clusters and tables (fresh clusters), their
        refcounts, the new directory, the header pointing at it, and only then the frees of the
        replaced directory, tables and data.  A crash at any point leaves the old or the new bitmaps,
        with at most leaked clusters.  Bitmaps inconsistent on disk keep their old (in-use) entry.
        No-op on a read-only node.  Raises BlockError with QEMU's texts when a bitmap breaks the
        constraints."""
        if self.read_only or self._bitmaps is None:
            return
        todo = [bm for bm in self._bitmaps if bm.persistent and not bm.inconsistent and not bm.readonly]
        if not todo:
            return
        for bm in todo:
            assert bm.name is not None
            why = QB.constraints_error(bm.name, bm.granularity, self.h.size, self.cs)
            if why:
                raise BlockError(f"Bitmap '{bm.name}' doesn't satisfy the constraints: {why}")
            if self.h.size == 0:
                raise BlockError(f"Bitmap '{bm.name}' is too big")
        self.flush()
        by_name = {e.name: e for e in self._bm_dir}
        new_entries: dict[str, QB.DirEntry] = {}
        for bm in todo:
            assert bm.name is not None
            if bm.size != self.h.size:
                bm.resize(self.h.size)
            new_entries[bm.name] = self._bm_write_one(bm)
        entries = [new_entries.pop(e.name, e) for e in self._bm_dir]
        entries += list(new_entries.values())
        dropped = [by_name[bm.name] for bm in todo if bm.name in by_name]
        self._bm_switch_directory(entries)
        for e in dropped:
            self._bm_free_table(e)
        self.flush()
        self._bm_need_in_use = True

    def _bm_write_one(self, bm: DirtyBitmap) -> QB.DirEntry:
        """Write one bitmap's non-zero data clusters and its table to fresh clusters (store_bitmap)."""
        cs = self.cs
        data = bm.to_disk_bytes()
        tsize = _div_up(len(data), cs)
        table = [0] * tsize
        coverage = cs * 8 * bm.granularity  # disk bytes one data cluster describes
        pos = bm.next_dirty(0)
        while pos >= 0:
            i = pos // coverage
            chunk = data[i * cs:(i + 1) * cs]
            host = self._alloc_clusters(1)
            self.file.write(host, chunk + bytes(cs - len(chunk)))
            table[i] = host
            nxt = (i + 1) * coverage
            pos = bm.next_dirty(nxt) if nxt < bm.size else -1
        toff = self._alloc_clusters(_div_up(tsize * 8, cs))
        self.file.write(toff, QB.build_table(table))
        assert bm.name is not None
        return QB.DirEntry(toff, tsize, QB.FLAG_AUTO if bm.enabled else 0, bm.granularity.bit_length() - 1,
                           bm.name)

    # ------------------------------------------------------------------------------------------------
    # L2 access
    # ------------------------------------------------------------------------------------------------
    def _l2_table(self, l2_off: int) -> bytearray:
        t = self.l2_cache.get(l2_off)
        if t is None:
            if l2_off % self.cs:
                raise CorruptImage(f"L2 table offset {l2_off:#x} unaligned")
            self.file.debug_event("l2_load")
            t = bytearray(self.file.read(l2_off, self.cs))
            self.l2_cache[l2_off] = t
        else:
            self.l2_cache.move_to_end(l2_off)
        return t

    def _entry(self, table: bytearray, i: int) -> tuple[int, int]:
        if self.ext_l2:
            return struct.unpack_from(">QQ", table, i * 16)
        return struct.unpack_from(">Q", table, i * 8)[0], 0

    def _set_entry(self, table: bytearray, i: int, entry: int, bitmap: int = 0) -> None:
        if self.ext_l2:
            struct.pack_into(">QQ", table, i * 16, entry, bitmap)
        else:
            struct.pack_into(">Q", table, i * 8, entry)

    def _lookup(self, vc: int) -> tuple[int, int]:
        """(L2 entry, subcluster bitmap) for guest cluster ``vc``; (0, 0) when no L2 table."""
        l1i = vc // self.l2_entries
        if l1i >= len(self.l1):
            return 0, 0
        l2_off = self.l1[l1i] & L.L1E_OFFSET_MASK
        if not l2_off:
            return 0, 0
        return self._entry(self._l2_table(l2_off), vc % self.l2_entries)

    def _segments(self, offset: int, length: int):
        """Yield (guest_offset, length, type, host_offset_or_entry) runs over [offset, offset+length).

        For COMPRESSED the last item is the raw L2 entry; for others the host byte offset (0 if none)."""
        pos = offset
        end = offset + length
        cs = self.cs
        while pos < end:
            vc = pos >> self.cbits
            in_off = pos & (cs - 1)
            n = min(cs - in_off, end - pos)
            entry, bitmap = self._lookup(vc)
            if entry & L.OFLAG_COMPRESSED:
                yield pos, n, T.COMPRESSED, entry
                pos += n
                continue
            host = entry & L.L2E_OFFSET_MASK
            if not self.ext_l2:
                t = L.cluster_type(entry, self.h.version)
                yield pos, n, t, (host + in_off if host else 0)
                pos += n
                continue
            # extended L2: walk subclusters
            sc_size = self.sc_size
            while n > 0:
                sc = in_off // sc_size
                m = min(sc_size - in_off % sc_size, n)
                t = L.subcluster_type(entry, bitmap, sc)
                if t == T.INVALID:
                    raise CorruptImage(f"Invalid subcluster bitmap for guest cluster {vc}")
                yield pos, m, t, (host + in_off if host else 0)
                pos += m
                in_off += m
                n -= m

    # ------------------------------------------------------------------------------------------------
    # read
    # ------------------------------------------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or offset + length > self.h.size:
            raise OutOfBounds(f"Read beyond end of image ({offset}+{length} > {self.h.size})")
        out = bytearray(length)
        run_start = -1  # coalesce contiguous NORMAL pieces into one pread
        run_host = 0
        run_len = 0

        def flush_run() -> None:
            nonlocal run_start, run_len
            if run_len:
                self.file.debug_event("read_aio")
                out[run_start:run_start + run_len] = self.file.read(run_host, run_len)
            run_start, run_len = -1, 0

        for pos, n, t, host in self._segments(offset, length):
            rel = pos - offset
            if t == T.NORMAL:
                if run_len and run_start + run_len == rel and run_host + run_len == host:
                    run_len += n
                else:
                    flush_run()
                    run_start, run_host, run_len = rel, host, n
                continue
            flush_run()
            if t in (T.ZERO_PLAIN, T.ZERO_ALLOC):
                continue  # already zeros
            if t == T.COMPRESSED:
                data = self._read_compressed(pos >> self.cbits, host)
                c_off = pos & (self.cs - 1)
                out[rel:rel + n] = data[c_off:c_off + n]
                continue
            # unallocated: from the backing file, zeros past its end
            if self.backing is not None:
                bsize = self.backing.size()
                if pos < bsize:
                    m = min(n, bsize - pos)
                    out[rel:rel + m] = self.backing.read(pos, m)
        flush_run()
        self._maybe_evict()
        return bytes(out)

    def _read_compressed(self, vc: int, entry: int) -> bytes:
        if self._zcache and self._zcache[0] == entry:
            return self._zcache[1]
        coff, clen = L.decode_compressed(entry, self.cbits)
        raw = self.file.read(coff, clen)
        try:
            data = self.executor.decompress(self.codec, raw, self.cs)
        except ValueError as exc:
            raise CorruptImage(f"Could not decompress cluster {vc}: {exc}") from None
        self._zcache = (entry, data)
        return data

    # ------------------------------------------------------------------------------------------------
    # block status
    # ------------------------------------------------------------------------------------------------
    def block_status(self, offset: int, length: int) -> Extent:
        first = None
        total = 0
        next_host = 0
        # limit the walk to the L2 table holding ``offset`` (as QEMU's slice)
        l2_span = self.l2_entries * self.cs
        limit = min(length, l2_span - offset % l2_span)
        l1i = offset // l2_span
        if l1i >= len(self.l1) or not self.l1[l1i] & L.L1E_OFFSET_MASK:
            return Extent(Status(0), limit, 0, self.file)  # no L2 table: the whole span is unallocated
        start = offset
        if not self.ext_l2:
            # fast path: a run of identical (unallocated, zero) or host-contiguous entries is counted by
            # comparing the integers of one L2 slice, not cluster by cluster through _segments
            cs = self.cs
            in_off = offset & (cs - 1)
            ncl = (in_off + limit + cs - 1) >> self.cbits
            table = self._l2_table(self.l1[l1i] & L.L1E_OFFSET_MASK)
            ents = struct.unpack_from(f">{ncl}Q", table, (offset >> self.cbits) % self.l2_entries * 8)
            e0 = ents[0]
            if ncl > 1 and not e0 & L.OFLAG_COMPRESSED:
                step = cs if e0 & L.L2E_OFFSET_MASK else 0
                k = 1
                while k < ncl and ents[k] == e0 + k * step:
                    k += 1
                if k > 1:
                    t0 = L.cluster_type(e0, self.h.version)
                    host0 = e0 & L.L2E_OFFSET_MASK
                    host0 = host0 + in_off if host0 else 0
                    total = min(k * cs - in_off, limit)
                    first = (t0, host0)
                    next_host = host0 + total
                    start = offset + total
        for pos, n, t, host in self._segments(start, offset + limit - start):
            if first is None:
                first = (t, host)
                total = n
                next_host = host + n
                continue
            if t != first[0]:
                break
            if t in (T.NORMAL, T.ZERO_ALLOC, T.UNALLOCATED_ALLOC) and host != next_host:
                break
            if t == T.COMPRESSED:
                break
            total += n
            next_host = host + n
        assert first is not None
        t, host = first
        st = Status(0)
        if t in (T.NORMAL, T.ZERO_ALLOC, T.UNALLOCATED_ALLOC):
            st |= Status.OFFSET_VALID
        if t in (T.ZERO_PLAIN, T.ZERO_ALLOC):
            st |= Status.ZERO
        elif t in (T.NORMAL, T.COMPRESSED):
            st |= Status.DATA
        if t == T.NORMAL and self._metadata_preallocation():
            st |= Status.RECURSE
        return Extent(st, total, host if st & Status.OFFSET_VALID else 0, self.file)

    def _metadata_preallocation(self) -> bool:
        """QEMU's qcow2_detect_metadata_preallocation: many refcounted clusters, few host blocks."""
        if self._meta_prealloc is None:
            assert self.file is not None
            flen = self.file.size()
            real_clusters = self.file.allocated_size() // self.cs
            threshold = max(real_clusters * 10 // 9, real_clusters + 2)
            nb = 0
            for ci in range(_div_up(flen, self.cs)):
                if self._get_rc(ci):
                    nb += 1
                    if nb >= threshold:
                        break
            self._meta_prealloc = nb >= threshold
        return self._meta_prealloc

    # ------------------------------------------------------------------------------------------------
    # refcounts
    # ------------------------------------------------------------------------------------------------
    def _refblock(self, off: int) -> bytearray:
        b = self.rb_cache.get(off)
        if b is None:
            if off % self.cs or off > (1 << 62):
                raise CorruptImage(f"Refblock offset {off:#x} unaligned or invalid")
            self.file.debug_event("refblock_load")
            b = bytearray(self.file.read(off, self.cs))
            self.rb_cache[off] = b
        return b

    def _get_rc(self, ci: int) -> int:
        b = ci // self.epb
        if b >= len(self.rt) or not self.rt[b]:
            return 0
        return L.get_refcount(self._refblock(self.rt[b]), ci % self.epb, self.rorder)

    def _change_rc(self, ci: int, delta: int) -> int:
        b = ci // self.epb
        if b >= len(self.rt) or not self.rt[b]:
            self._ensure_refblock(b)
        off = self.rt[b]
        blk = self._refblock(off)
        cur = L.get_refcount(blk, ci % self.epb, self.rorder)
        new = cur + delta
        if new < 0:
            raise CorruptImage(f"Refcount of cluster {ci} would drop below zero")
        if new > self.rmax:
            raise BlockError("Refcount overflow", errno=errno.EINVAL)
        L.set_refcount(blk, ci % self.epb, new, self.rorder)
        self.rb_dirty.add(off)
        if new == 0 and ci < self.free_hint:
            self.free_hint = ci
        if new == 0 and self.free_byte_offset and self.free_byte_offset // self.cs == ci:
            # the partly filled compressed cluster was freed (and may be reused for anything): start afresh
            self.free_byte_offset = 0
        return new

    def _ensure_refblock(self, b: int) -> None:
        if b >= len(self.rt):
            self.file.debug_event("reftable_grow")
            self._grow_refcount_table(b + 1)
        if self.rt[b]:
            return
        ci = b * self.epb  # the block describes itself, at the start of its own range
        off = ci * self.cs
        blk = bytearray(self.cs)
        L.set_refcount(blk, 0, 1, self.rorder)
        self.rb_cache[off] = blk
        self.rb_dirty.add(off)
        self.rt[b] = off
        self.rt_dirty.add(b)
        self._alloc_end = max(self._alloc_end, ci + 1)

    def _grow_refcount_table(self, min_entries: int) -> None:
        """Relocate the refcount table to a bigger one at the end of the image (QEMU's refcount area)."""
        cs, epb = self.cs, self.epb
        self._write_refcounts()  # everything dirty goes out with the old table first
        start = max(self._alloc_end, _div_up(self.file.size(), cs))
        want = max(min_entries, len(self.rt) * 3 // 2 + 1)
        tc = _div_up(want * 8, cs)
        nb = 0
        while True:
            end = start + nb + tc
            missing = [b for b in range(start // epb, (end - 1) // epb + 1)
                       if b >= len(self.rt) or not self.rt[b]]
            entries = max(want, (max(missing) + 1) if missing else 0, len(self.rt))
            tc2 = _div_up(entries * 8, cs)
            if len(missing) == nb and tc2 <= tc:
                break
            nb = len(missing)
            tc = max(tc, tc2)
        new_rt = self.rt + [0] * (tc * cs // 8 - len(self.rt))
        new_blocks: dict[int, bytearray] = {}
        for i, b in enumerate(missing):
            new_rt[b] = (start + i) * cs
            new_blocks[b] = bytearray(cs)
        for ci in range(start, start + nb + tc):
            b = ci // epb
            if b in new_blocks:
                L.set_refcount(new_blocks[b], ci % epb, 1, self.rorder)
            else:
                off = self.rt[b]
                blk = self._refblock(off)
                L.set_refcount(blk, ci % epb, L.get_refcount(blk, ci % epb, self.rorder) + 1, self.rorder)
                self.rb_dirty.add(off)
        for b, blk in new_blocks.items():
            self.rb_cache[new_rt[b]] = blk
            self.file.write(new_rt[b], bytes(blk))
        for off in sorted(self.rb_dirty):
            self.file.write(off, bytes(self.rb_cache[off]))
        self.rb_dirty.clear()
        table_off = (start + nb) * cs
        self.file.write(table_off, L.pack_u64_table(new_rt))
        self._sync()
        old_off, old_clusters = self.h.refcount_table_offset, self.h.refcount_table_clusters
        self.h.refcount_table_offset = table_off
        self.h.refcount_table_clusters = tc
        self.rt = new_rt
        self.rt_dirty.clear()
        self._write_header()
        self._sync()
        self._alloc_end = max(self._alloc_end, start + nb + tc)
        self._pending_free.append((old_off, old_clusters * cs))

    def _rc_run_is_zero(self, ci: int, n: int) -> bool:
        """Whether clusters [ci, ci+n) all have refcount 0, compared a refblock slice at a time (byte-wide
        refcounts only; False means "don't know" for narrower ones)."""
        if self.rorder < 3:
            return False
        width = 1 << (self.rorder - 3)
        end = ci + n
        while ci < end:
            b = ci // self.epb
            m = min(end, (b + 1) * self.epb) - ci
            if b < len(self.rt) and self.rt[b]:
                i = ci % self.epb
                if self._refblock(self.rt[b])[i * width:(i + m) * width].count(0) != m * width:
                    return False
            ci += m
        return True

    def _incref_free_run(self, ci: int, n: int) -> None:
        """Refcount 0 -> 1 for clusters [ci, ci+n) whose refblocks exist (``_change_rc(c, 1)`` for each,
        one slice assignment per refblock where refcounts are byte-wide)."""
        if self.rorder < 3:
            for c in range(ci, ci + n):
                self._change_rc(c, 1)
            return
        width = 1 << (self.rorder - 3)
        one = (1).to_bytes(width, "big")
        end = ci + n
        while ci < end:
            b = ci // self.epb
            m = min(end, (b + 1) * self.epb) - ci
            off = self.rt[b]
            i = ci % self.epb
            self._refblock(off)[i * width:(i + m) * width] = one * m
            self.rb_dirty.add(off)
            ci += m

    def _find_free_run(self, n: int) -> int:
        ci = self.free_hint
        if self._rc_run_is_zero(ci, n):  # the common case: everything past the hint is free
            return ci
        if self.rorder >= 3:
            return self._find_free_run_bytes(n)
        return self._find_free_run_scan(n)

    def _find_free_run_scan(self, n: int) -> int:
        """The first run of ``n`` clusters with refcount 0 from the hint on, one cluster at a time (the
        hint moves to the first free cluster seen)."""
        ci = self.free_hint
        run_start = ci
        run = 0
        first_free = -1
        while run < n:
            if self._get_rc(ci) == 0:
                if run == 0:
                    run_start = ci
                if first_free < 0:
                    first_free = ci
                run += 1
            else:
                run = 0
            ci += 1
        # every cluster below the first free one is in use: later scans start there (not quadratic)
        self.free_hint = first_free
        return run_start

    def _find_free_run_bytes(self, n: int) -> int:
        """``_find_free_run`` for byte-wide refcounts: each refblock is searched with C-level ``find`` for
        its zero entries and first non-zero byte, instead of one Python call per cluster (a commit into
        a base with a free cluster early on rescans every allocated cluster behind it for each run)."""
        epb = self.epb
        width = 1 << (self.rorder - 3)
        zero = bytes(width)
        ci = self.free_hint
        first_free = -1
        run_start = -1  # start of the free run being measured (it may continue across refblocks)
        while True:
            b = ci // epb
            block_end = (b + 1) * epb
            if b >= len(self.rt) or not self.rt[b]:  # no refblock: every cluster it would cover is free
                if run_start < 0:
                    run_start = ci
                if first_free < 0:
                    first_free = ci
                if block_end - run_start >= n:
                    break
                ci = block_end
                continue
            blk = self._refblock(self.rt[b])
            i = ci - b * epb
            found = False
            while i < epb:
                if run_start < 0:  # the next free entry
                    pos = blk.find(zero, i * width)
                    while pos >= 0 and pos % width:  # zero bytes straddling two entries
                        pos = blk.find(zero, pos + width - pos % width)
                    if pos < 0:
                        break
                    i = pos // width
                    run_start = b * epb + i
                    if first_free < 0:
                        first_free = run_start
                # is the rest of the run free?  Only as far as it needs to go is searched
                need = n - (b * epb + i - run_start)
                lim = min(epb, i + need)
                m = _NONZERO.search(blk, i * width, lim * width)
                if m is None:
                    found = i + need <= epb  # else free up to the block's end: it goes on in the next one
                    break
                run_start = -1
                i = m.start() // width + 1
            if found:
                break
            ci = block_end
        # every cluster below the first free one is in use: later scans start there (not quadratic)
        self.free_hint = first_free
        return run_start

    def _alloc_clusters(self, n: int) -> int:
        """Allocate ``n`` contiguous clusters (refcount 1 each, in the cache); return the host offset."""
        self.file.debug_event("cluster_alloc")
        while True:
            s = self._find_free_run(n)
            missing = [b for b in range(s // self.epb, (s + n - 1) // self.epb + 1)
                       if b >= len(self.rt) or not self.rt[b]]
            if not missing:
                break
            if n > self.epb // 2:
                # self-describing refblocks at the start of each block's range would split every run
                # longer than a block forever: put the new refblocks together in front of the run
                self._refblocks_before_run(n, len(missing))
                continue
            for b in missing:
                self._ensure_refblock(b)
        if self._rc_run_is_zero(s, n):
            self._incref_free_run(s, n)
        else:
            for ci in range(s, s + n):
                self._change_rc(ci, 1)
        if s == self.free_hint:
            self.free_hint = s + n
        self._alloc_end = max(self._alloc_end, s + n)
        self._meta_prealloc = None if self._meta_prealloc else self._meta_prealloc
        return s * self.cs

    def _refblocks_before_run(self, n: int, k: int) -> None:
        """Create the refblocks a run of ``n`` clusters needs in the free clusters just before it."""
        epb, cs = self.epb, self.cs
        while True:
            s = self._find_free_run(n + k)
            need = [b for b in range(s // epb, (s + n + k - 1) // epb + 1) if b >= len(self.rt) or not self.rt[b]]
            if need and max(need) >= len(self.rt):
                self._grow_refcount_table(max(need) + 1)
                continue
            if len(need) <= k:
                break
            k = len(need)
        for j, b in enumerate(need):
            off = (s + j) * cs
            self.rb_cache[off] = bytearray(cs)
            self.rb_dirty.add(off)
            self.rt[b] = off
            self.rt_dirty.add(b)
        for j in range(len(need)):
            self._change_rc(s + j, 1)
        self._alloc_end = max(self._alloc_end, s + len(need))

    def _alloc_bytes(self, size: int) -> int:
        """QEMU's qcow2_alloc_bytes: pack compressed data at byte granularity."""
        cs = self.cs
        off = self.free_byte_offset
        if off and self._get_rc(off // cs) >= self.rmax:
            off = 0
        free_in_cluster = cs - (off % cs) if off else 0
        if not off or free_in_cluster < size:
            new = self._alloc_clusters(1)
            # _alloc_clusters counted the new cluster once; the loop below counts each touched cluster
            self._change_rc(new // cs, -1)
            if not off or round_up(off, cs) != new:
                off = new
        start_c = off // cs
        end_c = (off + size - 1) // cs
        for ci in range(start_c, end_c + 1):
            self._change_rc(ci, 1)
        self.free_byte_offset = off + size
        if self.free_byte_offset % cs == 0:
            self.free_byte_offset = 0
        return off

    def _write_new_cluster(self, host: int, buf: bytearray) -> None:
        """Write a freshly allocated cluster's data; if that fails, give the cluster back (QEMU's
        qcow2_alloc_cluster_abort) so a failed write leaks nothing."""
        try:
            self.file.write(host, bytes(buf))
        except BaseException:
            self._free_range(host, self.cs)
            raise

    def _free_range(self, off: int, length: int) -> None:
        """Queue a refcount decrement of every cluster touched by [off, off+length)."""
        if length > 0:
            self._pending_free.append((off, length))

    def _free_entry(self, entry: int) -> None:
        if entry & L.OFLAG_COMPRESSED:
            start, end = L.compressed_host_range(entry, self.cbits)
            self._free_range(start, end - start)
        else:
            host = entry & L.L2E_OFFSET_MASK
            if host:
                self._free_range(host, self.cs)

    def _apply_frees(self) -> None:
        frees, self._pending_free = self._pending_free, []
        for off, length in frees:
            for ci in range(off // self.cs, (off + length - 1) // self.cs + 1):
                self._change_rc(ci, -1)

    # ------------------------------------------------------------------------------------------------
    # metadata write-back
    # ------------------------------------------------------------------------------------------------
    def _sync(self) -> None:
        if not self.cache_unsafe:
            self.file.flush()

    def _lazy(self) -> bool:
        return bool(self.h.compatible_features & L.Compat.LAZY_REFCOUNTS)

    def _mark_dirty(self) -> None:
        if self._lazy() and not self.h.incompatible_features & L.Incompat.DIRTY:
            self._sync()
            self.h.incompatible_features |= int(L.Incompat.DIRTY)
            self._write_header()
            self._sync()

    def _write_refcounts(self) -> None:
        for off in sorted(self.rb_dirty):
            self.file.debug_event("refblock_update")
            self.file.write(off, bytes(self.rb_cache[off]))
        self.rb_dirty.clear()
        if self.rt_dirty:
            self._sync()
            self.file.debug_event("reftable_update")
            for b in sorted(self.rt_dirty):
                self.file.write(self.h.refcount_table_offset + 8 * b, struct.pack(">Q", self.rt[b]))
            self.rt_dirty.clear()

    def _write_tables(self) -> None:
        for off in sorted(self.l2_dirty):
            self.file.debug_event("l2_update")
            self.file.write(off, bytes(self.l2_cache[off]))
        self.l2_dirty.clear()
        if self.l1_dirty:
            self._sync()
            self.file.debug_event("l1_update")
            lo, hi = min(self.l1_dirty), max(self.l1_dirty)
            self.file.write(self.h.l1_table_offset + 8 * lo, L.pack_u64_table(self.l1[lo:hi + 1]))
            self.l1_dirty.clear()

    def _flush_metadata(self) -> None:
        if not (self.l2_dirty or self.l1_dirty or self.rb_dirty or self.rt_dirty or self._pending_free):
            return
        lazy = self._lazy()
        if lazy and (self.l2_dirty or self.l1_dirty):
            self._mark_dirty()
        self._sync()  # data before the L2 entries that point at it
        if not lazy:
            self._write_refcounts()  # refcount increments before their users
            self._sync()
        self._write_tables()
        if self._pending_free:
            self._sync()
            self._apply_frees()  # decrements only once no table on disk uses the clusters
        if not lazy:
            self._write_refcounts()

    def _evict(self) -> None:
        self._flush_metadata()
        for cache, dirty in ((self.l2_cache, self.l2_dirty), (self.rb_cache, self.rb_dirty)):
            for off in list(cache):
                if len(cache) <= self.cache_limit // 2:
                    break
                if off not in dirty:
                    del cache[off]

    def flush(self) -> None:
        if self.read_only or self.file is None:
            return
        self._flush_metadata()
        self._sync()

    def _write_header(self) -> None:
        data = L.serialize_header(self.h)
        self.file.write(0, data)

    # ------------------------------------------------------------------------------------------------
    # write
    # ------------------------------------------------------------------------------------------------
    def _check_write(self, offset: int, length: int) -> None:
        self.check_writable()
        if offset < 0 or offset + length > self.h.size:
            raise OutOfBounds(f"Write beyond end of image ({offset}+{length} > {self.h.size})")

    def _l2_for_write(self, vc: int) -> tuple[bytearray, int]:
        """The active L2 table for ``vc``, allocated or copied-on-write so that it is ours alone."""
        l1i = vc // self.l2_entries
        if l1i >= len(self.l1):
            raise CorruptImage("L1 table too small for the image size")
        l1e = self.l1[l1i]
        old = l1e & L.L1E_OFFSET_MASK
        if old and l1e & L.OFLAG_COPIED:
            return self._l2_table(old), vc % self.l2_entries
        new = self._alloc_clusters(1)
        if old:
            content = bytearray(self._l2_table(old))
            self._free_range(old, self.cs)
        else:
            content = bytearray(self.cs)
        self.l2_cache[new] = content
        self.l2_dirty.add(new)
        self.l1[l1i] = new | L.OFLAG_COPIED
        self.l1_dirty.add(l1i)
        return content, vc % self.l2_entries

    def write(self, offset: int, data: bytes) -> None:
        self._check_write(offset, len(data))
        self._note_write(offset, len(data))
        pos = offset
        view = memoryview(data)
        end = offset + len(data)
        while pos < end:
            vc = pos >> self.cbits
            in_off = pos & (self.cs - 1)
            n = min(self.cs - in_off, end - pos)
            self._write_cluster(vc, in_off, view[pos - offset:pos - offset + n])
            pos += n
        self._maybe_evict()

    def _maybe_evict(self) -> None:
        """Write back and shrink the caches; only between operations, never while a table is in use."""
        if len(self.l2_cache) > self.cache_limit or len(self.rb_cache) > self.cache_limit:
            self._evict()

    def _guest_view(self, vc: int) -> bytearray:
        """The cluster's current guest-visible content (for copy-on-write of partial writes)."""
        start = vc * self.cs
        n = min(self.cs, self.h.size - start)
        buf = bytearray(self.read(start, n))
        if n < self.cs:
            buf += bytes(self.cs - n)
        return buf

    def _write_cluster(self, vc: int, in_off: int, data: memoryview) -> None:
        self.file.debug_event("write_aio")
        entry, bitmap = self._lookup(vc)
        n = len(data)
        if self.ext_l2:
            self._write_cluster_ext(vc, in_off, data, entry, bitmap)
            return
        t = L.cluster_type(entry, self.h.version)
        host = entry & L.L2E_OFFSET_MASK
        if t in (T.NORMAL, T.ZERO_ALLOC) and entry & L.OFLAG_COPIED:
            if t == T.NORMAL:
                self.file.write(host + in_off, bytes(data))
                return
            buf = bytearray(self.cs)
            buf[in_off:in_off + n] = data
            self.file.write(host, bytes(buf))
            table, i = self._l2_for_write(vc)
            self._set_entry(table, i, host | L.OFLAG_COPIED)
            self.l2_dirty.add(self._table_off(vc))
            return
        if in_off == 0 and n == self.cs:
            buf = bytearray(data)
        else:
            buf = self._guest_view(vc)
            buf[in_off:in_off + n] = data
        table, i = self._l2_for_write(vc)
        new = self._alloc_clusters(1)
        self._write_new_cluster(new, buf)
        self._set_entry(table, i, new | L.OFLAG_COPIED)
        self.l2_dirty.add(self._table_off(vc))
        if t in (T.NORMAL, T.ZERO_ALLOC, T.COMPRESSED):
            self._free_entry(entry)

    def _table_off(self, vc: int) -> int:
        return self.l1[vc // self.l2_entries] & L.L1E_OFFSET_MASK

    def _write_cluster_ext(self, vc: int, in_off: int, data: memoryview, entry: int, bitmap: int) -> None:
        scs = self.sc_size
        n = len(data)
        host = entry & L.L2E_OFFSET_MASK
        compressed = bool(entry & L.OFLAG_COMPRESSED)
        first_sc = in_off // scs
        last_sc = (in_off + n - 1) // scs
        if host and not compressed and entry & L.OFLAG_COPIED:
            # write in place; fill the untouched parts of newly allocated subclusters from the old view
            lo = first_sc * scs
            hi = (last_sc + 1) * scs
            need_view = any(not (bitmap >> sc) & 1 for sc in (first_sc, last_sc)) and (in_off != lo or in_off + n != hi)
            if need_view:
                view = self._guest_view(vc)
                view[in_off:in_off + n] = data
                self.file.write(host + lo, bytes(view[lo:hi]))
            else:
                self.file.write(host + in_off, bytes(data))
            new_bitmap = bitmap
            for sc in range(first_sc, last_sc + 1):
                new_bitmap |= 1 << sc
                new_bitmap &= ~(1 << (32 + sc))
            if new_bitmap != bitmap:
                table, i = self._l2_for_write(vc)
                self._set_entry(table, i, entry, new_bitmap)
                self.l2_dirty.add(self._table_off(vc))
            return
        # need a new host cluster: copy every subcluster the old cluster had allocated
        view = self._guest_view(vc)
        view[in_off:in_off + n] = data
        table, i = self._l2_for_write(vc)
        new = self._alloc_clusters(1)
        if compressed or (host and not entry & L.OFLAG_COPIED):
            old_alloc = 0xFFFFFFFF if compressed else bitmap & 0xFFFFFFFF
        else:
            old_alloc = 0
        new_bitmap = old_alloc
        if not compressed:
            new_bitmap |= bitmap & 0xFFFFFFFF00000000
        for sc in range(first_sc, last_sc + 1):
            new_bitmap |= 1 << sc
            new_bitmap &= ~(1 << (32 + sc))
        # zero flags of allocated subclusters are meaningless; keep the pair exclusive
        new_bitmap &= ~((new_bitmap & 0xFFFFFFFF) << 32)
        self._write_new_cluster(new, view)
        self._set_entry(table, i, new | L.OFLAG_COPIED, new_bitmap)
        self.l2_dirty.add(self._table_off(vc))
        if host or compressed:
            self._free_entry(entry)

    def write_compressed(self, offset: int, data: bytes) -> None:
        """Write whole clusters compressed (QEMU's rules: cluster-aligned; the last may be short at EOF)."""
        self._check_write(offset, len(data))
        cs = self.cs
        if offset % cs or (len(data) % cs and offset + len(data) != self.h.size):
            raise InvalidArgument("Compressed writes must be cluster aligned")
        self._note_write(offset, len(data))
        pos = 0
        while pos < len(data):
            chunk = bytes(data[pos:pos + cs])
            if len(chunk) < cs:
                chunk += bytes(cs - len(chunk))
            vc = (offset + pos) >> self.cbits
            entry, bitmap = self._lookup(vc)
            if entry & L.L2E_OFFSET_MASK or entry & L.OFLAG_COMPRESSED:
                raise BlockError("Compressed write to an allocated cluster", errno=errno.EIO)
            comp = self.executor.compress(self.codec, chunk, cs)
            if comp is None:
                self._write_cluster(vc, 0, memoryview(chunk))
            else:
                table, i = self._l2_for_write(vc)
                coff = self._alloc_bytes(len(comp))
                self.file.write(coff, comp)
                self._zcache = None  # a reused host range can give a new cluster the cached one's entry
                self._set_entry(table, i, L.encode_compressed(coff, len(comp), self.cbits), 0)
                self.l2_dirty.add(self._table_off(vc))
            pos += cs
        self._maybe_evict()

    # ------------------------------------------------------------------------------------------------
    # zero writes and discard
    # ------------------------------------------------------------------------------------------------
    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        """QEMU's write-zeroes: split at subcluster alignment; each piece is zeroed through metadata when
        the format can (qcow2_co_pwrite_zeroes), else written as a zero buffer."""
        self._check_write(offset, length)
        self._note_write(offset, length)
        gran, size = self.sc_size, self.h.size
        end = offset + length
        pieces = []
        pos = offset
        head_end = min(end, round_up(offset, gran))
        if offset % gran and head_end > offset:
            pieces.append((offset, head_end))
            pos = head_end
        tail_start = end if end == size else max(pos, end // gran * gran)
        if pos < tail_start:
            pieces.append((pos, tail_start))
        if tail_start < end:
            pieces.append((tail_start, end))
        for a, b in pieces:
            if not self._zeroize(a, b, unmap):
                chunk = 1 << 20
                for c in range(a, b, chunk):
                    self.write(c, bytes(min(chunk, b - c)))
        self._maybe_evict()

    def _zeroize(self, a: int, b: int, unmap: bool) -> bool:
        """Zero [a, b) by metadata; False when the caller must write zeros instead."""
        from engine.block import is_zero_above

        gran, size, cs = self.sc_size, self.h.size, self.cs
        head = a % gran
        tail = 0 if b == size else round_up(b, gran) - b
        if head or tail:
            if not (is_zero_above(self, a - head, head) and is_zero_above(self, b, tail)):
                return False
            a -= head
            b = min(a + gran, size)
            _, _, t, _ = next(self._segments(a, 1))
            if t not in (T.UNALLOCATED_PLAIN, T.UNALLOCATED_ALLOC, T.ZERO_PLAIN, T.ZERO_ALLOC):
                return False
        if self.h.version < 3 and self.backing is not None:
            return False
        pos = a
        while pos < b:
            vc = pos >> self.cbits
            in_off = pos & (cs - 1)
            n = min(cs - in_off, b - pos)
            if in_off == 0 and (n == cs or pos + n == size):
                self._zero_cluster(vc, unmap)
            elif not self._zero_subclusters(vc, in_off, n):
                self._write_cluster(vc, in_off, memoryview(bytes(n)))
            pos += n
        return True

    def _zero_cluster(self, vc: int, unmap: bool) -> bool:
        """Make a whole cluster read as zeros by metadata alone; False when the format cannot."""
        entry, bitmap = self._lookup(vc)
        compressed = bool(entry & L.OFLAG_COMPRESSED)
        host = entry & L.L2E_OFFSET_MASK
        if self.h.version < 3 and not self.ext_l2:
            if self.backing is not None:
                return False
            if entry == 0:
                return True
            # v2 without a backing file: discard
            table, i = self._l2_for_write(vc)
            self._set_entry(table, i, 0)
            self.l2_dirty.add(self._table_off(vc))
            self._free_entry(entry)
            return True
        allocated = compressed or bool(host)
        do_unmap = compressed or (unmap and allocated)
        new_entry = 0 if do_unmap else entry
        if self.ext_l2:
            new_bitmap = L.BITMAP_ALL_ZEROES
        else:
            new_entry |= L.OFLAG_ZERO
            new_bitmap = 0
        if new_entry == entry and new_bitmap == bitmap:
            return True
        table, i = self._l2_for_write(vc)
        self._set_entry(table, i, new_entry, new_bitmap)
        self.l2_dirty.add(self._table_off(vc))
        if do_unmap and allocated:
            self._free_entry(entry)
        return True

    def _zero_subclusters(self, vc: int, in_off: int, n: int) -> bool:
        entry, bitmap = self._lookup(vc)
        if entry & L.OFLAG_COMPRESSED:
            return False
        new_bitmap = bitmap
        for sc in range(in_off // self.sc_size, (in_off + n - 1) // self.sc_size + 1):
            new_bitmap &= ~(1 << sc)
            new_bitmap |= 1 << (32 + sc)
        if new_bitmap == bitmap:
            return True
        table, i = self._l2_for_write(vc)
        self._set_entry(table, i, entry, new_bitmap)
        self.l2_dirty.add(self._table_off(vc))
        return True

    def discard(self, offset: int, length: int) -> None:
        """QEMU's qcow2 discard: whole clusters only; the guest then reads zeros (v3, or no backing file)."""
        self._check_write(offset, length)
        self._note_write(offset, length)  # QEMU dirties the whole discarded range
        cs = self.cs
        start = round_up(offset, cs)
        end = offset + length
        if end != self.h.size:
            end = end // cs * cs
        for vc in range(start >> self.cbits, _div_up(end, cs) if end > start else start >> self.cbits):
            entry, bitmap = self._lookup(vc)
            host = entry & L.L2E_OFFSET_MASK
            compressed = bool(entry & L.OFLAG_COMPRESSED)
            allocated = compressed or bool(host)
            if self.backing is not None or allocated:
                if self.ext_l2:
                    new_entry, new_bitmap = 0, L.BITMAP_ALL_ZEROES
                elif self.h.version >= 3:
                    new_entry, new_bitmap = L.OFLAG_ZERO, 0
                else:
                    new_entry, new_bitmap = 0, 0
            else:
                continue
            if (new_entry, new_bitmap) == (entry, bitmap):
                continue
            table, i = self._l2_for_write(vc)
            self._set_entry(table, i, new_entry, new_bitmap)
            self.l2_dirty.add(self._table_off(vc))
            if allocated:
                self._free_entry(entry)
        self._maybe_evict()

    # ------------------------------------------------------------------------------------------------
    # resize
    # ------------------------------------------------------------------------------------------------
    def truncate(self, size: int, prealloc: str = "off", shrink: bool = False) -> None:
        """Grow or shrink the virtual disk (QEMU's qcow2_co_truncate, preallocation off or metadata)."""
        self.check_writable()
        if size % 512:
            raise InvalidArgument("The new size must be a multiple of 512")
        if prealloc not in ("off", "metadata"):
            raise NotSupported(f"Unsupported preallocation mode '{prealloc}'")
        old = self.h.size
        if size < old and not shrink:
            raise InvalidArgument("Use the --shrink option to perform a shrink operation.")
        for bm in self._bitmaps or []:
            if bm.persistent:
                # qcow2_truncate_bitmaps_check: every persistent bitmap must be usable to be resized
                try:
                    bm.check_usable(modify=True)
                except BlockError as exc:
                    raise NotSupported(exc.message) from None
        if size < old:
            self._shrink(size)
        else:
            self._resize_l1(self._l1_needed(size))
            self.flush()
            self.h.size = size
            self._write_header()
            self._sync()
            if prealloc == "metadata":
                self._preallocate(old, size)
        self._resize_bitmaps()

    def _resize_bitmaps(self) -> None:
        """Follow a change of the virtual size (bdrv_dirty_bitmap_truncate): new areas are clean."""
        for bm in self._bitmaps or []:
            if bm.size != self.h.size:
                bm.resize(self.h.size)

    def _l1_needed(self, size: int) -> int:
        return _div_up(size, self.cs * self.l2_entries)

    def _resize_l1(self, entries: int) -> None:
        """Grow the active L1 to ``entries`` (relocating it as QEMU does)."""
        if entries <= len(self.l1):
            return
        if entries > (32 << 20) // 8:
            raise InvalidArgument("Image size too big: L1 table would exceed 32 MiB")
        self.flush()
        new_l1 = self.l1 + [0] * (entries - len(self.l1))
        new_off = self._alloc_clusters(_div_up(entries * 8, self.cs))
        self._write_refcounts()
        self._sync()
        self.file.write(new_off, L.pack_u64_table(new_l1))
        self._sync()
        old_off, old_size = self.h.l1_table_offset, self.h.l1_size
        self.h.l1_table_offset, self.h.l1_size = new_off, entries
        self.l1 = new_l1
        self.l1_dirty.clear()
        self._write_header()
        self._sync()
        if old_size:
            self._free_range(old_off, _div_up(old_size * 8, self.cs) * self.cs)
        self.flush()

    def _shrink(self, size: int) -> None:
        cs = self.cs
        first_gone = _div_up(size, cs)
        total = _div_up(self.h.size, cs)
        for vc in range(first_gone, total):
            entry, _ = self._lookup(vc)
            if entry or _:
                table, i = self._l2_for_write(vc)
                self._set_entry(table, i, 0, 0)
                self.l2_dirty.add(self._table_off(vc))
                self._free_entry(entry)
        keep_l1 = self._l1_needed(size)
        self.flush()
        for l1i in range(keep_l1, len(self.l1)):
            l2off = self.l1[l1i] & L.L1E_OFFSET_MASK
            if l2off:
                self.l1[l1i] = 0
                self.l1_dirty.add(l1i)
                self.l2_cache.pop(l2off, None)
                self.l2_dirty.discard(l2off)
                self._free_range(l2off, cs)
        self.h.size = size
        self.flush()
        self._write_header()
        self._sync()
        self._truncate_file_to_end()

    def _truncate_file_to_end(self) -> None:
        last = 0
        nclusters = _div_up(self.file.size(), self.cs)
        for ci in range(nclusters - 1, -1, -1):
            if self._get_rc(ci):
                last = ci + 1
                break
        if last and last < nclusters:
            self.file.truncate(last * self.cs)
            self._alloc_end = last

    def _preallocate(self, start: int, end: int) -> None:
        """preallocation=metadata: allocate L2 tables and host clusters without writing data."""
        cs = self.cs
        last_host = 0
        for vc in range(start // cs if start % cs == 0 else start // cs + 1, _div_up(end, cs)):
            entry, _ = self._lookup(vc)
            if entry & L.L2E_OFFSET_MASK or entry & L.OFLAG_COMPRESSED:
                continue
            table, i = self._l2_for_write(vc)
            host = self._alloc_clusters(1)
            bitmap = L.BITMAP_ALL_ALLOC if self.ext_l2 else 0
            self._set_entry(table, i, host | L.OFLAG_COPIED, bitmap)
            self.l2_dirty.add(self._table_off(vc))
            last_host = max(last_host, host + cs)
        self.flush()
        if last_host > self.file.size():
            self.file.truncate(last_host)

    # ------------------------------------------------------------------------------------------------
    # snapshots
    # ------------------------------------------------------------------------------------------------
    def _update_l1_refcounts(self, l1: list[int], addend: int, fix_active: bool) -> None:
        """QEMU's qcow2_update_snapshot_refcount over one L1 table: add ``addend`` to every L2 and data
        cluster it reaches (once per path); with ``fix_active`` recompute COPIED flags of the active
        tables from the refcounts."""
        cs = self.cs
        for l1i, l1e in enumerate(l1):
            l2off = l1e & L.L1E_OFFSET_MASK
            if not l2off:
                continue
            table = self._l2_table(l2off)
            changed = False
            for i in range(self.l2_entries):
                entry, bitmap = self._entry(table, i)
                if not entry:
                    continue
                if entry & L.OFLAG_COMPRESSED:
                    if addend:
                        start, end = L.compressed_host_range(entry, self.cbits)
                        for ci in range(start // cs, (end - 1) // cs + 1):
                            if addend > 0:
                                self._change_rc(ci, addend)
                            else:
                                self._pending_free.append((ci * cs, cs))
                    continue
                host = entry & L.L2E_OFFSET_MASK
                if not host:
                    continue
                if addend > 0:
                    rc = self._change_rc(host // cs, addend)
                elif addend < 0:
                    rc = self._get_rc(host // cs) - 1
                    self._pending_free.append((host, cs))
                else:
                    rc = self._get_rc(host // cs)
                if fix_active:
                    new = (entry | L.OFLAG_COPIED) if rc == 1 else (entry & ~L.OFLAG_COPIED)
                    if new != entry:
                        self._set_entry(table, i, new, bitmap)
                        changed = True
            if changed:
                self.l2_dirty.add(l2off)
            if addend > 0:
                rc = self._change_rc(l2off // cs, addend)
            elif addend < 0:
                rc = self._get_rc(l2off // cs) - 1
                self._pending_free.append((l2off, cs))
            else:
                rc = self._get_rc(l2off // cs)
            if fix_active:
                new = (l1e | L.OFLAG_COPIED) if rc == 1 else (l1e & ~L.OFLAG_COPIED)
                if new != l1e:
                    l1[l1i] = new
                    self.l1_dirty.add(l1i)

    def _write_snapshot_table(self, snaps: list[L.Snapshot]) -> None:
        """Write a new snapshot table, switch the header to it, then free the old one."""
        self.flush()
        data = L.serialize_snapshots(snaps)
        new_off = self._alloc_clusters(_div_up(len(data), self.cs)) if data else 0
        self._write_refcounts()
        if data:
            self.file.write(new_off, data)
        self._sync()
        old_off = self.h.snapshots_offset
        old_len = self.snapshots_size if self.h.nb_snapshots else 0
        self.h.snapshots_offset = new_off
        self.h.nb_snapshots = len(snaps)
        self._write_header()
        self._sync()
        if old_len:
            self._free_range(old_off, _div_up(old_len, self.cs) * self.cs)
        self.snapshots = snaps
        self.snapshots_size = len(data)
        self.flush()

    def find_snapshot(self, name: str) -> L.Snapshot | None:
        for sn in self.snapshots:
            if sn.id_str == name:
                return sn
        for sn in self.snapshots:
            if sn.name == name:
                return sn
        return None

    def snapshot_create(self, name: str, now_ns: int | None = None) -> None:
        self.check_writable()
        if self.h.refcount_bits == 1:
            raise BlockError(f"Could not create snapshot '{name}': -22 (Invalid argument)", errno=errno.EINVAL)
        now_ns = time.time_ns() if now_ns is None else now_ns
        self.flush()
        if not self._snapshot_refcounts_fit(self.l1):
            # QEMU fails the same way (refcount overflow); we fail before touching the image
            raise BlockError(f"Could not create snapshot '{name}': -22 (Invalid argument)", errno=errno.EINVAL)
        ids = [int(s.id_str) for s in self.snapshots if s.id_str.isdigit()]
        new_id = str(max(ids) + 1 if ids else 1)
        l1_clusters = _div_up(len(self.l1) * 8, self.cs) if self.l1 else 0
        sn_l1_off = self._alloc_clusters(l1_clusters) if l1_clusters else 0
        self._write_refcounts()
        snap_l1 = [e & ~L.OFLAG_COPIED for e in self.l1]
        if snap_l1:
            self.file.write(sn_l1_off, L.pack_u64_table(snap_l1))
        self._update_l1_refcounts(self.l1, 1, fix_active=True)
        self.flush()
        sn = L.Snapshot(l1_table_offset=sn_l1_off, l1_size=len(self.l1), id_str=new_id, name=name,
                        date_sec=now_ns // 10**9, date_nsec=now_ns % 10**9, vm_clock_nsec=0,
                        vm_state_size=0, disk_size=self.h.size, icount=0)
        self._write_snapshot_table(self.snapshots + [sn])

    def _snapshot_refcounts_fit(self, l1: list[int]) -> bool:
        """Whether one more reference through ``l1`` keeps every refcount within refcount_bits."""
        cs = self.cs
        adds: dict[int, int] = {}
        for l1e in l1:
            l2off = l1e & L.L1E_OFFSET_MASK
            if not l2off:
                continue
            adds[l2off // cs] = adds.get(l2off // cs, 0) + 1
            table = self._l2_table(l2off)
            for i in range(self.l2_entries):
                entry, _bitmap = self._entry(table, i)
                if entry & L.OFLAG_COMPRESSED:
                    start, end = L.compressed_host_range(entry, self.cbits)
                    for ci in range(start // cs, (end - 1) // cs + 1):
                        adds[ci] = adds.get(ci, 0) + 1
                elif entry & L.L2E_OFFSET_MASK:
                    ci = (entry & L.L2E_OFFSET_MASK) // cs
                    adds[ci] = adds.get(ci, 0) + 1
        return all(self._get_rc(ci) + n <= self.rmax for ci, n in adds.items())

    def _read_snapshot_l1(self, sn: L.Snapshot) -> list[int]:
        if sn.l1_size > (32 << 20) // 8:
            raise CorruptImage("Snapshot L1 table too large")
        return L.unpack_u64_table(self.file.read(sn.l1_table_offset, sn.l1_size * 8)) if sn.l1_size else []

    def snapshot_apply(self, name: str) -> None:
        self.check_writable()
        sn = self.find_snapshot(name)
        if sn is None:
            raise BlockError("Failed to load snapshot: No such file or directory", errno=errno.ENOENT)
        self.flush()
        sn_l1 = self._read_snapshot_l1(sn)
        if not self._snapshot_refcounts_fit(sn_l1):
            # QEMU takes the snapshot's references first and fails on the overflow; fail before any change
            raise BlockError("Failed to load snapshot: Invalid argument", errno=errno.EINVAL)
        if sn.disk_size is not None and sn.disk_size != self.h.size:
            self.h.size = sn.disk_size
            self._resize_bitmaps()
        needed = max(len(sn_l1), self._l1_needed(self.h.size))
        self._resize_l1(needed)
        # take the snapshot's references first, then drop the current ones (QEMU's order)
        new_l1 = sn_l1 + [0] * (len(self.l1) - len(sn_l1))
        self._update_l1_refcounts(new_l1, 1, fix_active=False)
        self._write_refcounts()
        self._sync()
        old_l1 = self.l1
        self.l1 = [e & ~L.OFLAG_COPIED for e in new_l1]
        self.l1_dirty = set(range(len(self.l1)))
        self._write_tables()
        self._sync()
        self._write_header()
        self._sync()
        self._update_l1_refcounts(old_l1, -1, fix_active=False)
        self.flush()
        self._update_l1_refcounts(self.l1, 0, fix_active=True)
        self.flush()

    def snapshot_delete(self, name: str) -> None:
        self.check_writable()
        sn = self.find_snapshot(name)
        if sn is None:
            raise BlockError(f"Could not delete snapshot '{name}': snapshot not found", errno=errno.ENOENT)
        self.flush()
        sn_l1 = self._read_snapshot_l1(sn)
        self._write_snapshot_table([s for s in self.snapshots if s is not sn])
        self._update_l1_refcounts(sn_l1, -1, fix_active=False)
        if sn.l1_size:
            self._free_range(sn.l1_table_offset, _div_up(sn.l1_size * 8, self.cs) * self.cs)
        self.flush()
        self._update_l1_refcounts(self.l1, 0, fix_active=True)
        self.flush()

    def snapshot_l1(self, name: str) -> tuple[list[int], int]:
        sn = self.find_snapshot(name)
        if sn is None:
            raise BlockError(f"Failed to load snapshot '{name}': No such file or directory", errno=errno.ENOENT)
        return self._read_snapshot_l1(sn), (sn.disk_size if sn.disk_size is not None else self.h.size)

    def load_snapshot_readonly(self, name: str) -> None:
        """Expose snapshot ``name`` as this (read-only) node's content, as ``convert -l`` does.

        Like QEMU's qcow2_snapshot_load_tmp only the L1 table is switched: the virtual size stays the
        image's current size (guest clusters past the snapshot's L1 read as unallocated)."""
        if not self.read_only:
            raise InvalidArgument("snapshots can be loaded only read-only")
        l1, _size = self.snapshot_l1(name)
        self.l1 = l1
        self.l2_cache.clear()
        self._zcache = None

    # ------------------------------------------------------------------------------------------------
    # header edits: backing file, amend
    # ------------------------------------------------------------------------------------------------
    def set_backing(self, name: str | None, fmt: str | None) -> None:
        """Rewrite the backing file name and format in the header (``rebase``, ``commit``)."""
        self.check_writable()
        self.flush()
        old = (self.h.backing_file, self.h.backing_format)
        self.h.backing_file = name or None
        self.h.backing_format = fmt if name else None
        try:
            self._write_header()
        except BaseException:  # the header on disk was not changed: neither is the one in memory
            self.h.backing_file, self.h.backing_format = old
            raise
        self._sync()

    def amend(self, opts: dict[str, Any]) -> None:
        """``qemu-img amend``: compat (0.10 <-> 1.1) and lazy_refcounts."""
        self.check_writable()
        self.flush()
        h = self.h
        compat = opts.get("compat")
        lazy = opts.get("lazy_refcounts")
        for key in opts:
            if key in ("cluster_size", "compression_type", "extended_l2", "preallocation"):
                raise InvalidArgument("This option is only supported for image creation")
            if key in ("backing_file", "backing_fmt"):
                raise InvalidArgument("Cannot amend the backing file; use 'qemu-img rebase' instead")
            if key not in ("compat", "lazy_refcounts", "size"):
                raise InvalidArgument(f"Invalid parameter '{key}'")
        target_v = h.version
        if compat is not None:
            target_v = 2 if compat in ("0.10", "v2") else 3 if compat in ("1.1", "v3") else 0
            if not target_v:
                raise InvalidArgument(f"Invalid compatibility level: '{compat}'")
        want_lazy = bool(h.compatible_features & L.Compat.LAZY_REFCOUNTS)
        if lazy is not None:
            want_lazy = lazy
        if want_lazy and target_v < 3:
            raise InvalidArgument("Lazy refcounts only supported with compatibility level 1.1 and above")
        if target_v == 2 and h.version == 3:
            if h.refcount_order != 4:
                raise InvalidArgument("Different refcount widths than 16 bits require compatibility level 1.1 "
                                      "or above (use compat=1.1 or greater)")
            if self.ext_l2:
                raise InvalidArgument("Cannot downgrade an image with extended L2 entries")
            if h.compression_type:
                raise InvalidArgument("Cannot downgrade an image with a compression type other than zlib")
            if h.bitmaps_ext is not None or any(bm.persistent for bm in self._bitmaps or []):
                raise InvalidArgument("Cannot downgrade an image with bitmaps")
            if want_lazy != bool(h.compatible_features & L.Compat.LAZY_REFCOUNTS) or want_lazy:
                pass
            h.compatible_features &= ~int(L.Compat.LAZY_REFCOUNTS)
            self._expand_zero_clusters()
            h.version = 2
            h.header_length = 72
            h.incompatible_features = h.compatible_features = h.autoclear_features = 0
            self._write_header()
            self._sync()
            return
        if target_v == 3 and h.version == 2:
            h.version = 3
            h.header_length = 112
            h.refcount_order = 4
        if want_lazy:
            h.compatible_features |= int(L.Compat.LAZY_REFCOUNTS)
        else:
            if h.incompatible_features & L.Incompat.DIRTY:
                self._write_refcounts()
                self._sync()
                h.incompatible_features &= ~int(L.Incompat.DIRTY)
            h.compatible_features &= ~int(L.Compat.LAZY_REFCOUNTS)
        self._write_header()
        self._sync()

    def _expand_zero_clusters(self) -> None:
        """Before a v2 downgrade: zero-flag entries become unallocated (no backing file) or real zeroed
        clusters (with one), in the active and every snapshot's tables."""
        cs = self.cs
        tables = [self.l1] + [self._read_snapshot_l1(sn) for sn in self.snapshots]
        seen: set[int] = set()
        for l1 in tables:
            for l1e in l1:
                l2off = l1e & L.L1E_OFFSET_MASK
                if not l2off or l2off in seen:
                    continue
                seen.add(l2off)
                table = self._l2_table(l2off)
                changed = False
                # an L2 table shared with snapshots is reached once per L1 path: so is every new cluster
                l2_rc = max(1, self._get_rc(l2off // cs))
                for i in range(self.l2_entries):
                    entry, _ = self._entry(table, i)
                    if not entry & L.OFLAG_ZERO or entry & L.OFLAG_COMPRESSED:
                        continue
                    host = entry & L.L2E_OFFSET_MASK
                    if host and self._get_rc(host // cs) <= l2_rc:
                        # preallocated and reached only through this table: zero it in place
                        self.file.write_zeroes(host, cs, False)
                        self._set_entry(table, i, entry & ~L.OFLAG_ZERO)
                        changed = True
                        continue
                    if host:
                        # shared with another table that may read its data: drop our references
                        for _ in range(l2_rc):
                            self._free_range(host, cs)
                    if not self.h.backing_file:
                        self._set_entry(table, i, 0)
                    else:
                        new = self._alloc_clusters(1)
                        if l2_rc > 1:
                            self._change_rc(new // cs, l2_rc - 1)
                        self.file.write_zeroes(new, cs, False)
                        self._set_entry(table, i, new | L.OFLAG_COPIED if l1 is self.l1 and l2_rc == 1 else new)
                    changed = True
                if changed:
                    self.l2_dirty.add(l2off)
        self.flush()

    # ------------------------------------------------------------------------------------------------
    # creation
    # ------------------------------------------------------------------------------------------------
    @classmethod
    def create(cls, filename: str, size: int | None, executor, options: dict[str, Any]) -> None:
        """``qemu-img create -f qcow2``.  Raises InvalidArgument with qemu-img's messages."""
        from engine.formats.file import FileDriver

        opts = dict(options)
        compat = str(opts.pop("compat", "1.1"))
        if compat in ("0.10", "v2"):
            version = 2
        elif compat in ("1.1", "v3"):
            version = 3
        else:
            raise InvalidArgument(f"Invalid compatibility level: '{compat}'")
        cs = int(opts.pop("cluster_size", 65536))
        if cs < 512 or cs > 2 << 20 or cs & (cs - 1):
            raise InvalidArgument("Cluster size must be a power of two between 512 and 2048k")
        rbits = int(opts.pop("refcount_bits", 16))
        if rbits < 1 or rbits > 64 or rbits & (rbits - 1):
            raise InvalidArgument("Refcount width must be a power of two and may not exceed 64 bits")
        if version < 3 and rbits != 16:
            raise InvalidArgument("Different refcount widths than 16 bits require compatibility level 1.1 or "
                                  "above (use compat=1.1 or greater)")
        lazy = bool(opts.pop("lazy_refcounts", False))
        if lazy and version < 3:
            raise InvalidArgument("Lazy refcounts only supported with compatibility level 1.1 and above "
                                  "(use compat=1.1 or greater)")
        ctype = str(opts.pop("compression_type", "zlib"))
        if ctype not in ("zlib", "zstd"):
            raise InvalidArgument(f"Invalid parameter '{ctype}'")
        if ctype != "zlib" and version < 3:
            raise InvalidArgument("Non-zlib compression type is only supported with compatibility level 1.1 "
                                  "and above (use compat=1.1 or greater)")
        ext_l2 = bool(opts.pop("extended_l2", False))
        if ext_l2:
            if version < 3:
                raise InvalidArgument("Extended L2 entries are only supported with compatibility level 1.1 "
                                      "and above (use compat=1.1 or greater)")
            if cs < 16384:
                raise InvalidArgument("Extended L2 entries are only supported with cluster sizes of at least "
                                      "16384 bytes")
        prealloc = str(opts.pop("preallocation", "off"))
        if prealloc not in ("off", "metadata"):
            raise NotSupported(f"Unsupported preallocation mode '{prealloc}' (parablock supports off, metadata)")
        backing = opts.pop("backing_file", None)
        backing_fmt = opts.pop("backing_fmt", None)
        leftover_create_options(opts, size)
        size = round_up(size, 512)
        if size > (1 << 62):
            raise InvalidArgument("Image size is too big")
        cbits = cs.bit_length() - 1
        h = L.Qcow2Header(version=version, cluster_bits=cbits, size=0,
                          refcount_order=rbits.bit_length() - 1,
                          header_length=112 if version >= 3 else 72)
        if ctype == "zstd":
            h.compression_type = 1
            h.incompatible_features |= int(L.Incompat.COMPRESSION)
        if ext_l2:
            h.incompatible_features |= int(L.Incompat.EXTL2)
        if lazy:
            h.compatible_features |= int(L.Compat.LAZY_REFCOUNTS)
        h.backing_file = backing or None
        h.backing_format = backing_fmt if backing else None
        h.refcount_table_offset = cs
        h.refcount_table_clusters = 1
        header = L.serialize_header(h)
        order = h.refcount_order
        rt = bytearray(cs)
        struct.pack_into(">Q", rt, 0, 2 * cs)
        rb = bytearray(cs)
        for ci in range(3):
            L.set_refcount(rb, ci, 1, order)
        f = FileDriver(filename, executor, read_only=False, create=True)
        try:
            f.write(0, header)
            f.write(cs, bytes(rt))
            f.write(2 * cs, bytes(rb))
            f.truncate(3 * cs)
            f.flush()
        finally:
            f.close()
        node = cls(filename, executor, read_only=False)
        node.file = FileDriver(filename, executor, read_only=False)
        try:
            node.open({})
            node._resize_l1(node._l1_needed(size))
            node.h.size = size
            node._write_header()
            node.flush()
            if prealloc == "metadata":
                node._preallocate(0, size)
        finally:
            node.close()

    def allocated_size(self) -> int:
        return self.file.allocated_size() if self.file is not None else 0

    # ------------------------------------------------------------------------------------------------
    # bulk copy support (convert, commit): the coordinator plans host offsets here, workers move data
    # ------------------------------------------------------------------------------------------------
    def is_unallocated_run(self, vc: int, count: int) -> bool:
        """Whether guest clusters [vc, vc+count) have no host cluster and no zero flag of their own."""
        esz = 16 if self.ext_l2 else 8
        end = vc + count
        while vc < end:  # one slice comparison per L2 table: no entry and no bitmap bit means all zero
            l1i = vc // self.l2_entries
            n = min(end, (l1i + 1) * self.l2_entries) - vc
            l2_off = self.l1[l1i] & L.L1E_OFFSET_MASK if l1i < len(self.l1) else 0
            if l2_off:
                i = vc % self.l2_entries
                if self._l2_table(l2_off)[i * esz:(i + n) * esz].count(0) != n * esz:
                    return False
            vc += n
        return True

    def host_run(self, vc: int, count: int) -> int | None:
        """The host offset of guest clusters [vc, vc+count) when they are normal, fully allocated, ours
        alone (COPIED) and contiguous on the host: they can then be overwritten in place.  Else None."""
        first = None
        for i in range(count):
            entry, bitmap = self._lookup(vc + i)
            if entry & L.OFLAG_COMPRESSED or not entry & L.OFLAG_COPIED or entry & L.OFLAG_ZERO:
                return None
            if self.ext_l2 and bitmap != L.BITMAP_ALL_ALLOC:
                return None
            host = entry & L.L2E_OFFSET_MASK
            if not host:
                return None
            if first is None:
                first = host
            elif host != first + i * self.cs:
                return None
        if first is not None:
            self._note_write(vc * self.cs, count * self.cs)  # the caller overwrites these clusters in place
        return first

    def make_empty(self) -> None:
        """Drop every guest cluster (qemu-img commit empties the top image this way)."""
        self.check_writable()
        self._note_write(0, self.h.size)
        for l1i, l1e in enumerate(self.l1):
            l2off = l1e & L.L1E_OFFSET_MASK
            if not l2off:
                continue
            table = self._l2_table(l2off)
            # data clusters count one reference per L1 path, so a table shared with a snapshot loses
            # ours for each of its clusters too
            for i in range(self.l2_entries):
                entry, _ = self._entry(table, i)
                if entry & L.OFLAG_COMPRESSED or entry & L.L2E_OFFSET_MASK:
                    self._free_entry(entry)
            self.l1[l1i] = 0
            self.l1_dirty.add(l1i)
            self.l2_cache.pop(l2off, None)
            self.l2_dirty.discard(l2off)
            self._free_range(l2off, self.cs)
        self.flush()
        self._truncate_file_to_end()

    def alloc_data_run(self, vc: int, count: int) -> int:
        """Allocate ``count`` contiguous host clusters for guest clusters starting at ``vc`` (which must be
        unallocated); the L2 tables they need are made first.  Returns the host offset.  Nothing points at
        the clusters until ``link_data_run`` (call it only once their data is written)."""
        self.check_writable()
        for l1i in range(vc // self.l2_entries, (vc + count - 1) // self.l2_entries + 1):
            self._l2_for_write(l1i * self.l2_entries)
        return self._alloc_clusters(count)

    def release_unlinked(self, host: int) -> None:
        """Give back one cluster from ``alloc_data_run`` that was never linked (its data was all zero)."""
        self._change_rc(host // self.cs, -1)

    def link_data_run(self, vc: int, host: int, count: int, bitmaps: list[int] | None = None) -> None:
        """Point guest clusters [vc, vc+count) at the host clusters from ``alloc_data_run``.  With
        extended L2, ``bitmaps`` (one per cluster) may name the subclusters that got data (default all)."""
        bitmap = L.BITMAP_ALL_ALLOC if self.ext_l2 else 0
        self._note_write(vc * self.cs, count * self.cs)
        i = 0
        while i < count:  # one table lookup and one pack per L2 table
            table, idx = self._l2_for_write(vc + i)
            m = min(count - i, self.l2_entries - idx)
            entries = [(host + (i + k) * self.cs) | L.OFLAG_COPIED for k in range(m)]
            if self.ext_l2:
                bms = bitmaps[i:i + m] if bitmaps is not None else [bitmap] * m
                struct.pack_into(f">{2 * m}Q", table, idx * 16, *[x for pair in zip(entries, bms) for x in pair])
            else:
                struct.pack_into(f">{m}Q", table, idx * 8, *entries)
            self.l2_dirty.add(self._table_off(vc + i))
            i += m
        self._maybe_evict()

    def alloc_compressed(self, clen: int) -> int:
        """Host byte offset for ``clen`` bytes of compressed data (QEMU's byte-granular packing)."""
        self.check_writable()
        return self._alloc_bytes(clen)

    def link_compressed(self, vc: int, coff: int, clen: int) -> None:
        self._note_write(vc * self.cs, self.cs)
        table, idx = self._l2_for_write(vc)
        self._set_entry(table, idx, L.encode_compressed(coff, clen, self.cbits), 0)
        self.l2_dirty.add(self._table_off(vc))

    def compressed_source(self, offset: int) -> tuple[int, int, int, str, int]:
        """(file handle, host byte offset, bytes to read, codec, cluster size) of the compressed cluster
        holding guest ``offset``.  Raises CorruptImage when that cluster is not compressed."""
        entry, _ = self._lookup(offset >> self.cbits)
        if not entry & L.OFLAG_COMPRESSED:
            raise CorruptImage(f"guest offset {offset} is not in a compressed cluster")
        coff, clen = L.decode_compressed(entry, self.cbits)
        return self.file.handle, coff, clen, self.codec, self.cs  # type: ignore[union-attr]
