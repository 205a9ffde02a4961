"""Image conversion on the worker pool (qemu-img convert's engine).

Layer: engine (imports ``ipc`` only; the pool arrives as a ``Mover``).  The coordinator walks the sources'
block status, plans target windows and host offsets (qcow2 allocation is metadata and stays here), and
workers move the bytes: a ``gather`` reads source extents into a shared-memory slot (decompressing
compressed source clusters, zero-filling holes) and reports its non-zero runs or compresses it cluster by
cluster; a ``scatter`` writes slot ranges to target host offsets.  Data crosses the coordinator only on
the fallback path (a target cluster that is already allocated, e.g. with ``-n``).

Ordering: target L2 entries are linked only after the scatter that filled their clusters completed (data
before metadata); without ``out_of_order`` windows are committed in guest order, so the target's host
layout follows the guest's as with qemu-img.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from engine.block import block_status, chain, chain_block_status, is_allocated_above
from engine.driver import BlockDriver, Status
from engine.errors import InvalidArgument
from engine.formats.file import FileDriver
from ipc.ranges import coalesce_writes, consecutive_runs, subtract_sorted, touched_units

MiB = 1 << 20


class Mover(Protocol):
    """What convert needs from the worker pool (``workers.pool.WorkerPool`` provides it)."""

    slot_size: int
    slots: Any

    def submit(self, op: str, args: list, timeout: float | None = ...) -> Any: ...


@dataclass
class ConvertOptions:
    compress: bool = False
    sparse: int = 4096  # -S: zero-detection granularity in bytes; 0 = write everything
    target_has_backing: bool = False  # -B: copy only what the sources' top layers hold
    base: BlockDriver | None = None  # commit: copy only what is allocated above this node
    target_zero_init: bool = True
    max_inflight: int = 8  # -m
    out_of_order: bool = False  # -W
    rate: int = 0  # -r: bytes per second of data copied (0 = unlimited), QEMU's slice-based rate limit
    chunk: int = 4 * MiB
    #: incremental backup: copy only these sorted (offset, length) ranges of the sources (the dirty
    #: clusters of a bitmap); the rest is left to the target's backing file
    only: list[tuple[int, int]] | None = None


@dataclass
class ConvertStats:
    total: int = 0
    done: int = 0
    data_bytes: int = 0
    zero_bytes: int = 0
    skipped_bytes: int = 0
    fallback_bytes: int = 0


@dataclass
class _Piece:
    kind: str  # data | zero | comp | read (the coordinator reads it through the driver) | skip
    offset: int  # target guest offset
    length: int
    handle: int = 0
    host: int = 0
    comp: tuple | None = None  # (clen, codec, cs, skip)


@dataclass
class _Window:
    start: int
    length: int
    pieces: list[_Piece] = field(default_factory=list)

    @property
    def has_data(self) -> bool:
        return any(p.kind in ("data", "comp", "read") for p in self.pieces)


class SourcePlanner:
    """What the sources hold for a range of the concatenated sources, as pieces a worker can gather: file
    extents it reads itself, compressed clusters it decompresses, zeros and (with a base or
    ``top_only``) skips."""

    def __init__(self, sources: list[BlockDriver], base: BlockDriver | None = None,
                 top_only: bool = False) -> None:
        self.sources = sources
        self.base = base
        self.top_only = top_only

    def pieces(self, start: int, length: int, full: bool = False) -> list[_Piece]:
        """Pieces of range [start, start+length); ``full`` reads through the whole chain even with
        ``top_only`` or a base."""
        out: list[_Piece] = []
        base = 0
        for src in self.sources:
            size = src.size()
            lo, hi = max(start, base), min(start + length, base + size)
            pos = lo
            while pos < hi:
                off = pos - base
                n = hi - pos
                if self.base is not None and not full:
                    allocated, m = is_allocated_above(src, self.base, off, n)
                    if not allocated:
                        out.append(_Piece("skip", pos, m))
                        pos += m
                        continue
                    n = m
                if self.top_only and not full:
                    ext = block_status(src, off, n)
                    depth = 0
                    if not ext.status & (Status.ZERO | Status.DATA):
                        out.append(_Piece("skip", pos, ext.length))
                        pos += ext.length
                        continue
                else:
                    ext, depth = chain_block_status(src, off, n)
                n = ext.length
                st = ext.status
                if st & Status.ZERO and not (st & Status.DATA and not st & Status.ZERO):
                    out.append(_Piece("zero", pos, n))
                elif st & Status.OFFSET_VALID and isinstance(ext.node, FileDriver):
                    out.append(_Piece("data", pos, n, ext.node.handle, ext.offset))
                elif st & Status.DATA:
                    out.extend(self._compressed_pieces(chain(src)[depth], pos, off, n))
                else:
                    out.append(_Piece("zero", pos, n))
                pos += n
            base += size
        return out

    def _compressed_pieces(self, layer: BlockDriver, pos: int, off: int, n: int) -> list[_Piece]:
        getter = getattr(layer, "compressed_source", None)
        if getter is None:
            # data only the format driver can produce (e.g. streamOptimized vmdk grains): the
            # coordinator reads it into the slot before the worker gathers the rest
            return [_Piece("read", pos, n, comp=(layer, off))]
        out = []
        cs = layer.cluster_size() or 65536
        end = off + n
        while off < end:
            m = min(cs - off % cs, end - off)
            handle, coff, clen, codec, ccs = getter(off)
            out.append(_Piece("comp", pos, m, handle, coff, (clen, codec, ccs, off % cs)))
            off += m
            pos += m
        return out


def fill_read_pieces(pieces: list[_Piece], start: int, view: memoryview) -> None:
    """Put the data of the ``read`` pieces (read through their format driver) into a window's slot."""
    for p in pieces:
        if p.kind == "read":
            layer, off = p.comp  # type: ignore[misc]
            rel = p.offset - start
            view[rel:rel + p.length] = layer.read(off, p.length)


def wire_pieces(pieces: list[_Piece], start: int) -> list[list]:
    """Pieces as the workers' ``gather`` takes them, relative to a window starting at ``start``."""
    out = []
    for p in pieces:
        rel = p.offset - start
        if p.kind == "data":
            out.append(["data", p.handle, p.host, p.length, rel])
        elif p.kind == "comp":
            clen, codec, ccs, skip = p.comp  # type: ignore[misc]
            out.append(["comp", p.handle, p.host, p.length, rel, clen, codec, ccs, skip])
        elif p.kind == "read":
            out.append(["keep", 0, 0, p.length, rel])
        else:
            out.append(["zero", 0, 0, p.length, rel])
    return out


class Converter:
    def __init__(self, sources: list[BlockDriver], target: BlockDriver, mover: Mover, opts: ConvertOptions,
                 progress: Callable[[int, int], None] | None = None) -> None:
        self.sources = sources
        self.target = target
        self.mover = mover
        self.opts = opts
        self.progress = progress
        self.total = sum(s.size() for s in sources)
        self.stats = ConvertStats(total=self.total)
        self.planner = SourcePlanner(sources, opts.base, opts.target_has_backing)
        self.qcow2 = target.format_name == "qcow2"
        # any other format but raw (vmdk, vdi, vpc, vhdx, qed) allocates in its own write path: data goes
        # to it whole target blocks at a time, in guest order, through the coordinator
        self.generic = target.format_name not in ("raw", "qcow2")
        if self.qcow2:
            self.tcs = target.cluster_size() or 65536
        elif self.generic:
            # a window must fit one slot: a block bigger than that (vhdx's 8 MiB) is written in parts
            self.tcs = max(512, min(target.cluster_size() or 65536, 16 * MiB, mover.slot_size))
        else:
            self.tcs = 512
        if opts.compress and not self.qcow2:
            raise InvalidArgument("Compression not supported for this file format")
        tfile = target.file
        if not isinstance(tfile, FileDriver):
            raise InvalidArgument("convert target must sit on a file")
        self.thandle = tfile.handle
        self.align = self.tcs if (self.qcow2 or self.generic) else max(4096, opts.sparse or 4096)
        if self.generic:
            opts.out_of_order = False  # streamOptimized vmdk appends grains: keep guest order
        chunk = opts.chunk
        if opts.compress:
            chunk = max(self.tcs, min(chunk, mover.slot_size // 2) // self.tcs * self.tcs)
        self.chunk = max(self.align, min(chunk, mover.slot_size) // self.align * self.align)
        self._limiter = None
        if opts.rate:
            from engine.throttle import RateLimiter  # only -r pays for importing the throttle module

            self._limiter = RateLimiter(opts.rate)
        if self._limiter is not None:  # small windows keep the limit smooth at low rates
            self.chunk = max(self.align, min(self.chunk, max(opts.rate // 10, 1) // self.align * self.align))

    # --- source side --------------------------------------------------------------------------------
    def _source_pieces(self, start: int, length: int, full: bool = False) -> list[_Piece]:
        return self.planner.pieces(start, length, full)

    def _resolve_partial_skips(self, start: int, pieces: list[_Piece]) -> list[_Piece]:
        """With -B, a target cluster that gets data must also get the backing's bytes for the rest of it:
        re-read those parts through the source's whole chain (the target's backing has the same bytes)."""
        cs = self.tcs
        busy = {c for p in pieces if p.kind != "skip"
                for c in range(p.offset // cs, (p.offset + p.length - 1) // cs + 1)}
        out: list[_Piece] = []
        for p in pieces:
            if p.kind != "skip":
                out.append(p)
                continue
            pos, end = p.offset, p.offset + p.length
            while pos < end:
                c = pos // cs
                n = min((c + 1) * cs, end) - pos
                if c in busy:
                    out.extend(self._source_pieces(pos, n, full=True))
                elif out and out[-1].kind == "skip" and out[-1].offset + out[-1].length == pos:
                    out[-1].length += n
                else:
                    out.append(_Piece("skip", pos, n))
                pos += n
        return out

    def _windows(self):
        pos = 0
        while pos < self.total:
            n = min(self.chunk, self.total - pos)
            pieces = self._source_pieces(pos, n)
            if self.opts.only is not None:
                pieces = _restrict(pieces, self.opts.only)
            if (self.opts.target_has_backing or self.opts.base is not None
                    or self.opts.only is not None) and (self.qcow2 or self.generic):
                pieces = self._resolve_partial_skips(pos, pieces)
            yield _Window(pos, n, pieces)
            pos += n

    # --- the pipeline -----------------------------------------------------------------------------------
    def run(self) -> ConvertStats:
        inflight: deque = deque()
        writing: deque = deque()
        # every window in flight holds a slot until it is reaped, and reaping happens on this thread:
        # never wait for more windows than there are slots, and keep one free for the fallback path's
        # large writes (PoolExecutor.pwrite leases one), else ``-m 16 --workers 1`` waits forever
        nslots = getattr(self.mover.slots, "nslots", None)
        limit = max(1, self.opts.max_inflight if nslots is None else min(self.opts.max_inflight, nslots - 1))
        try:
            for win in self._windows():
                if not win.has_data and self.opts.sparse:
                    if self.generic and not self.opts.target_zero_init:
                        while inflight or writing:  # zeroes allocate too: keep the target's guest order
                            self._reap(inflight, writing)
                    self._no_data_window(win)
                    self._advance(win.length)
                else:
                    self._rate_limit(win.length)
                    inflight.append(self._submit_gather(win))
                while len(inflight) + len(writing) >= limit:
                    self._reap(inflight, writing)
            while inflight or writing:
                self._reap(inflight, writing)
        except BaseException:
            for item in list(inflight) + list(writing):
                self._abandon(item)
            raise
        self.target.flush()
        return self.stats

    def _rate_limit(self, nbytes: int) -> None:
        """Account ``nbytes`` with the -r limiter and sleep as long as it says (ratelimit.h)."""
        if self._limiter is None:
            return
        delay = self._limiter.calculate_delay(nbytes, time.monotonic_ns())
        if delay > 0:
            time.sleep(delay / 1e9)

    def _advance(self, n: int) -> None:
        self.stats.done += n
        if self.progress:
            self.progress(self.stats.done, self.total)

    def _no_data_window(self, win: _Window) -> None:
        for p in win.pieces:
            if p.kind == "skip":
                self.stats.skipped_bytes += p.length
            elif self.opts.target_zero_init:
                self.stats.zero_bytes += p.length
            else:
                self.target.write_zeroes(p.offset, p.length, unmap=True)
                self.stats.zero_bytes += p.length

    def _fast_plan(self, win: _Window) -> tuple[list, list] | None:
        """The one-trip plan for a window, when the target can be planned before the data is seen: a
        zero-initialised raw target, or fresh (unallocated) clusters of a zero-initialised qcow2 target.
        Returns (worker write plan, allocations to link) or None."""
        if self.opts.compress or not self.opts.target_zero_init or any(p.kind == "skip" for p in win.pieces) \
                or self.generic:
            return None
        if not self.qcow2:
            if self.opts.sparse:
                plan = [[self.thandle, p.offset, p.offset - win.start, p.length, 0] for p in win.pieces
                        if p.kind in ("data", "comp", "read")]
            else:
                plan = [[self.thandle, win.start, 0, win.length, 0]]
            return plan, []
        tgt = self.target
        cs = self.tcs
        if self.opts.sparse:
            clusters = sorted({c for p in win.pieces if p.kind in ("data", "comp", "read")
                               for c in range((p.offset - win.start) // cs,
                                              (p.offset - win.start + p.length - 1) // cs + 1)})
        else:
            clusters = list(range(-(-win.length // cs)))
        groups = [(c0, end - c0) for c0, end in consecutive_runs(clusters)]
        vc0 = win.start >> tgt.cbits  # type: ignore[attr-defined]
        if not all(tgt.is_unallocated_run(vc0 + c0, n) for c0, n in groups):  # type: ignore[attr-defined]
            return None
        plan, allocs = [], []
        for c0, n in groups:
            host = tgt.alloc_data_run(vc0 + c0, n)  # type: ignore[attr-defined]
            nbytes = min(n * cs, win.length - c0 * cs)
            plan.append([self.thandle, host, c0 * cs, nbytes, cs])
            allocs.append((c0, n, host))
        return plan, allocs

    def _finish_fast(self, win: _Window, allocs: list, runs: list) -> None:
        """After a one-trip copy: link the clusters the worker wrote, give back the ones that were zero."""
        tgt = self.target
        cs = self.tcs
        self.stats.data_bytes += sum(n for _, n in runs)
        if not self.qcow2:
            return
        vc0 = win.start >> tgt.cbits  # type: ignore[attr-defined]
        for c0, n, host in allocs:
            written = set(touched_units(runs, c0 * cs, (c0 + n) * cs, cs))
            k = 0
            while k < n:
                if k not in written:
                    tgt.release_unlinked(host + k * cs)  # type: ignore[attr-defined]
                    k += 1
                    continue
                m = k
                while m + 1 < n and m + 1 in written:
                    m += 1
                count = m - k + 1
                tgt.link_data_run(vc0 + c0 + k, host + k * cs, count,  # type: ignore[attr-defined]
                                  self._subcluster_bitmaps(runs, c0 + k, count))
                k = m + 1

    def _submit_gather(self, win: _Window):
        slot = self.mover.slots.lease()
        wire = wire_pieces(win.pieces, win.start)
        compress = None
        gran = self.opts.sparse
        try:
            fill_read_pieces(win.pieces, win.start, self.mover.slots.slot(slot))
            fast = self._fast_plan(win)
        except BaseException:
            self.mover.slots.release(slot)
            raise
        if fast is not None:
            plan, allocs = fast
            fut = self.mover.submit("copy", [slot, wire, win.length, gran, plan])
            return ("copy", win, slot, fut, allocs)
        if self.opts.compress:
            compress = [self.target.codec, self.tcs, self.mover.slot_size // 2]  # type: ignore[attr-defined]
        fut = self.mover.submit("gather", [slot, wire, win.length, gran, compress])
        return ("gather", win, slot, fut, None)

    def _reap(self, inflight: deque, writing: deque) -> None:
        # completed writes first: they free slots and link metadata
        if writing and (writing[0][3].done() or not inflight):
            _kind, win, slot, fut, links = writing.popleft()
            fut.result()
            for link in links:
                link()
            self.mover.slots.release(slot)
            self._advance(win.length)
            return
        item = inflight[0]
        if self.opts.out_of_order:
            for cand in inflight:
                if cand[3].done():
                    item = cand
                    break
        inflight.remove(item)
        kind, win, slot, fut, allocs = item
        try:
            result = fut.result()
        except BaseException:
            self.mover.slots.release(slot)
            raise
        if kind == "copy":
            self.mover.slots.release(slot)
            self._finish_fast(win, allocs, result)
            self._advance(win.length)
            return
        writes, links = self._plan_writes(win, slot, result)
        if writes:
            wfut = self.mover.submit("scatter", [slot, coalesce_writes(writes)])
            writing.append(("scatter", win, slot, wfut, links))
        else:
            for link in links:
                link()
            self.mover.slots.release(slot)
            self._advance(win.length)

    def _abandon(self, item) -> None:
        fut, slot = item[3], item[2]
        try:
            fut.result(60)
        except BaseException:
            pass
        self.mover.slots.release(slot)

    # --- target side --------------------------------------------------------------------------------------
    def _zero_target(self, off: int, n: int) -> None:
        if n <= 0:
            return
        self.stats.zero_bytes += n
        if not self.opts.target_zero_init:
            self.target.write_zeroes(off, n, unmap=True)

    def _plan_writes(self, win: _Window, slot: int, result) -> tuple[list, list]:
        """Decide what goes where for one gathered window: (scatter writes, metadata links)."""
        skip = [(p.offset - win.start, p.length) for p in win.pieces if p.kind == "skip"]
        if self.opts.compress:
            return self._plan_compressed(win, slot, result, skip)
        if result is None:  # no zero detection: everything is data
            runs = [[0, win.length]]
        else:  # as qemu-img, what the sources report as zero is never written (only the target's
            # granularity rounds it up): matters for raw and extended-L2 targets
            zeros = [(p.offset - win.start, p.length) for p in win.pieces if p.kind == "zero"]
            runs = subtract_sorted(result, zeros) if zeros else result
        if skip:
            runs = _subtract(runs, skip)
            self.stats.skipped_bytes += sum(n for _, n in skip)
        if self.generic:
            return self._write_generic(win, slot, runs, skip), []
        if not self.qcow2:
            writes = [[self.thandle, win.start + r, r, n] for r, n in runs]
            self.stats.data_bytes += sum(n for _, n in runs)
            covered = _subtract([[0, win.length]], [(r, n) for r, n in runs] + skip)
            for r, n in covered:
                self._zero_target(win.start + r, n)
            return writes, []
        return self._plan_qcow2(win, slot, runs, skip)

    def _plan_qcow2(self, win: _Window, slot: int, runs: list, skip: list) -> tuple[list, list]:
        cs = self.tcs
        tgt = self.target
        data_clusters = sorted({c for r, n in runs for c in range(r // cs, (r + n - 1) // cs + 1)})
        skip_clusters = {c for r, n in skip for c in range(r // cs, (r + n - 1) // cs + 1)
                         if r <= c * cs and (c + 1) * cs <= r + n}
        writes: list = []
        links: list = []
        nclusters = -(-win.length // cs)
        for c in range(nclusters):
            if c in data_clusters or c in skip_clusters:
                continue
            self._zero_target(win.start + c * cs, min(cs, win.length - c * cs))
        # group consecutive data clusters into runs that are allocated (and written) together
        for c0, c_end in consecutive_runs(data_clusters):
            count = c_end - c0
            vc = (win.start >> tgt.cbits) + c0  # type: ignore[attr-defined]
            nbytes = min(count * cs, win.length - c0 * cs)
            if tgt.is_unallocated_run(vc, count):  # type: ignore[attr-defined]
                host = tgt.alloc_data_run(vc, count)  # type: ignore[attr-defined]
                writes.append([self.thandle, host, c0 * cs, nbytes])
                bitmaps = self._subcluster_bitmaps(runs, c0, count)
                links.append(lambda vc=vc, host=host, count=count, bm=bitmaps:
                             tgt.link_data_run(vc, host, count, bm))  # type: ignore[attr-defined]
                self.stats.data_bytes += nbytes
            elif (host := tgt.host_run(vc, count)) is not None:  # type: ignore[attr-defined]
                # ours alone: overwrite in place; a zero-initialised target (preallocation=metadata,
                # --target-is-zero) needs only the non-zero runs, as with qemu-img the rest stays a hole
                lo, hi = c0 * cs, c0 * cs + nbytes
                parts = ([(max(r, lo), min(r + n, hi)) for r, n in runs] if self.opts.target_zero_init
                         else [(lo, hi)])
                for a, b in parts:
                    if b > a:
                        writes.append([self.thandle, host + a - lo, a, b - a])
                        self.stats.data_bytes += b - a
            else:  # shared, compressed or partly allocated (e.g. -n, commit): through the coordinator
                data = bytes(self.mover.slots.slot(slot)[c0 * cs:c0 * cs + nbytes])
                tgt.write(win.start + c0 * cs, data)
                self.stats.fallback_bytes += nbytes
        return writes, links

    def _write_generic(self, win: _Window, slot: int, runs: list, skip: list) -> list:
        """A format that allocates in its own write path: every target block the data runs touch is
        written whole (the slot holds zeros between runs), the others are left to zero-init or zeroed."""
        cs = self.tcs
        view = self.mover.slots.slot(slot)
        if getattr(self.target, "preallocated", False) and self.opts.target_zero_init:
            # a fixed VHD or static VDI: nothing to allocate, and a fresh one reads as zeros, so only
            # the non-zero runs are written (the output stays as sparse as qemu-img's)
            for r, n in runs:
                self.target.write(win.start + r, bytes(view[r:r + n]))
                self.stats.fallback_bytes += n
                self.stats.data_bytes += n
            return []
        data_clusters = sorted({c for r, n in runs for c in range(r // cs, (r + n - 1) // cs + 1)})
        skip_clusters = {c for r, n in skip for c in range(r // cs, (r + n - 1) // cs + 1)
                         if r <= c * cs and (c + 1) * cs <= r + n}
        nclusters = -(-win.length // cs)
        data = set(data_clusters)
        c = 0
        while c < nclusters:  # in guest order: the target allocates its blocks in the order they come
            if c in skip_clusters:
                c += 1
                continue
            if c not in data:
                self._zero_target(win.start + c * cs, min(cs, win.length - c * cs))
                c += 1
                continue
            j = c
            while j + 1 < nclusters and j + 1 in data:
                j += 1
            lo, hi = c * cs, min((j + 1) * cs, win.length)
            self.target.write(win.start + lo, bytes(view[lo:hi]))
            self.stats.fallback_bytes += hi - lo
            self.stats.data_bytes += hi - lo
            c = j + 1
        return []

    def _subcluster_bitmaps(self, runs: list, c0: int, count: int) -> list[int] | None:
        """With an extended-L2 target and no backing file, as qemu-img: only the subclusters that the
        non-zero runs touch are allocated, the others stay unallocated (and read as zeroes)."""
        tgt = self.target
        if not getattr(tgt, "ext_l2", False) or self.opts.target_has_backing or tgt.backing_filename:
            return None
        cs = self.tcs
        sc = cs // 32
        lo, hi = c0 * cs, (c0 + count) * cs
        bitmaps = [0] * count
        for r, n in runs:
            a, b = max(r, lo), min(r + n, hi)
            for s in range(a // sc, (b - 1) // sc + 1) if b > a else ():
                bitmaps[s // 32 - c0] |= 1 << (s % 32)
        return bitmaps

    def _plan_compressed(self, win: _Window, slot: int, result: list, skip: list) -> tuple[list, list]:
        cs = self.tcs
        tgt = self.target
        writes: list = []
        links: list = []
        skip_clusters = {c for r, n in skip for c in range(r // cs, (r + n - 1) // cs + 1)
                         if r <= c * cs and (c + 1) * cs <= r + n}
        for c, item in enumerate(result):
            vc = (win.start >> tgt.cbits) + c  # type: ignore[attr-defined]
            n = min(cs, win.length - c * cs)
            if c in skip_clusters:
                self.stats.skipped_bytes += n
                continue
            if item == -2:
                self._zero_target(win.start + c * cs, n)
                continue
            if not tgt.is_unallocated_run(vc, 1):  # type: ignore[attr-defined]
                data = bytes(self.mover.slots.slot(slot)[c * cs:c * cs + n])
                tgt.write(win.start + c * cs, data)
                self.stats.fallback_bytes += n
                continue
            if item == -1:
                host = tgt.alloc_data_run(vc, 1)  # type: ignore[attr-defined]
                writes.append([self.thandle, host, c * cs, n])
                links.append(lambda vc=vc, host=host: tgt.link_data_run(vc, host, 1))  # type: ignore[attr-defined]
            else:
                s_off, clen = item
                coff = tgt.alloc_compressed(clen)  # type: ignore[attr-defined]
                writes.append([self.thandle, coff, s_off, clen])
                links.append(lambda vc=vc, coff=coff, clen=clen: tgt.link_compressed(vc, coff, clen))  # type: ignore[attr-defined]
            self.stats.data_bytes += n
        return writes, links


def _restrict(pieces: list[_Piece], ranges: list[tuple[int, int]]) -> list[_Piece]:
    """The pieces cut to ``ranges`` (sorted, disjoint); what lies outside becomes ``skip``."""
    out: list[_Piece] = []

    def add(p: _Piece, a: int, b: int, keep: bool) -> None:
        if b <= a:
            return
        if not keep:
            if out and out[-1].kind == "skip" and out[-1].offset + out[-1].length == a:
                out[-1].length += b - a
            else:
                out.append(_Piece("skip", a, b - a))
            return
        delta = a - p.offset
        if p.kind == "comp":
            clen, codec, ccs, skip = p.comp  # type: ignore[misc]
            out.append(_Piece("comp", a, b - a, p.handle, p.host, (clen, codec, ccs, skip + delta)))
        elif p.kind == "read":
            layer, off = p.comp  # type: ignore[misc]
            out.append(_Piece("read", a, b - a, comp=(layer, off + delta)))
        elif p.kind == "data":
            out.append(_Piece("data", a, b - a, p.handle, p.host + delta))
        else:
            out.append(_Piece(p.kind, a, b - a))

    import bisect

    starts = [r[0] for r in ranges]
    for p in pieces:
        pos, end = p.offset, p.offset + p.length
        i = max(0, bisect.bisect_right(starts, pos) - 1)
        while pos < end:
            while i < len(ranges) and ranges[i][0] + ranges[i][1] <= pos:
                i += 1
            if i == len(ranges) or ranges[i][0] >= end:
                add(p, pos, end, False)
                break
            lo, hi = ranges[i]
            hi += lo
            if lo > pos:
                add(p, pos, lo, False)
                pos = lo
            nxt = min(hi, end)
            add(p, pos, nxt, p.kind != "skip")
            pos = nxt
    return out


def _subtract(runs: list, holes: list) -> list[list[int]]:
    """Runs [[off, len]] minus holes [(off, len)]."""
    out = []
    for r, n in runs:
        segs = [(r, r + n)]
        for h, hn in holes:
            nxt = []
            for a, b in segs:
                if hn <= 0 or h + hn <= a or h >= b:
                    nxt.append((a, b))
                    continue
                if a < h:
                    nxt.append((a, h))
                if h + hn < b:
                    nxt.append((h + hn, b))
            segs = nxt
        out.extend([a, b - a] for a, b in segs if b > a)
    return out
