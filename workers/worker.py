"""A worker process: executes byte operations on its own file descriptors and the shared-memory slots.

Layer: workers (imports ``ipc`` and ``workers``; never ``engine``).  The loop is: receive a msgpack
request, run the op, send the reply.  File ops reuse the in-process executor's implementations on this
process's own fds; data travels through slots, small results inline.  Errors go back as records
(ipc.wire.error_record); the worker itself only dies when the pipe closes or it is told to exit.
"""
from __future__ import annotations

import os
import threading
import time

from ipc import wire
from ipc.ranges import consecutive_runs, subtract_sorted, touched_units
from ipc.shm import SlotView
from workers import codecs
from workers.inproc import InProcessExecutor

_ZEROS: dict[int, bytes] = {}
_ZERO_FILL = memoryview(bytes(4 << 20))  # calloc'd: maps the shared zero page, costs no memory until read
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3


def tune_malloc() -> None:
    """Keep freed heap memory instead of handing it back to the kernel at every free.

    Each compressed cluster allocates and frees a deflate state and its buffers; with glibc's defaults
    the top of the heap can be trimmed after each one and faulted in again by the next.  When that
    happens (it depends on the heap's layout) it costs ~30 page faults per cluster: measured 121k faults
    and 0.24 s of system time per 128 MiB compressed (of 0.9 s), against 8.8k faults and 0.02 s with a
    fixed mmap threshold and a 16 MiB top pad.  The pad is address space: only pages actually used cost
    memory.  Best effort: other C libraries are left alone."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, 4 << 20)
        libc.mallopt(_M_TOP_PAD, 16 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)
    except (OSError, AttributeError):
        pass


def _zero_fill(view: memoryview, start: int, n: int) -> None:
    """view[start:start+n] = zeros, without allocating n bytes for every call."""
    while n > 0:
        m = min(n, len(_ZERO_FILL))
        view[start:start + m] = _ZERO_FILL[:m]
        start += m
        n -= m


def _zeros(n: int) -> bytes:
    z = _ZEROS.get(n)
    if z is None:
        z = _ZEROS[n] = bytes(n)
    return z


def _block_heads(buf, base: int, full: int, gran: int) -> list[int] | None:
    """The first 8 bytes of every ``gran``-sized block of ``buf[base:base+full]``, as integers (one C-level
    strided copy: ~15 us per 4 MiB); None where the buffer cannot be viewed that way."""
    if gran % 8:
        return None
    try:
        with memoryview(buf) as mv, mv[base:base + full] as part, part.cast("B").cast("Q") as words, \
                words[::gran // 8] as heads:
            return heads.tolist()
    except (TypeError, ValueError):
        return None


def find_nonzero_runs(buf, base: int, length: int, gran: int) -> list[list[int]]:
    """[[offset, length], ...] (relative to ``base``) of the ``gran``-sized blocks of ``buf[base:base+length]``
    that are not all zero.  ``buf`` must slice to bytes (an mmap or bytes): memoryview comparison goes
    item by item and is 30x slower.

    A block can only be all zero if its first 8 bytes are: those are read for all blocks at once and only
    the blocks that start with a zero word are compared in full (data blocks cost nothing each; the
    earlier whole-range ``find`` of a zero block scanned at ~8 GiB/s, 12% of a worker's CPU)."""
    zero = _zeros(gran)
    full = length // gran * gran
    heads = _block_heads(buf, base, full, gran) if full else None
    if full and (0 not in heads if heads is not None else buf.find(zero, base, base + full) < 0):
        # no zero block: the common case, decided in C
        tail = length - full
        if tail and buf[base + full:base + length] == _zeros(tail):
            return [[0, full]]
        return [[0, length]]
    runs: list[list[int]] = []
    pos = 0
    while pos < length:
        n = gran if pos + gran <= length else length - pos
        if n == gran and heads is not None:
            nonzero = heads[pos // gran] != 0 or buf[base + pos:base + pos + n] != zero
        else:
            nonzero = buf[base + pos:base + pos + n] != (zero if n == gran else _zeros(n))
        if nonzero:
            if runs and runs[-1][0] + runs[-1][1] == pos:
                runs[-1][1] += n
            else:
                runs.append([pos, n])
        pos += n
    return runs


class Worker:
    def __init__(self, slots: SlotView) -> None:
        self.slots = slots
        self.ex = InProcessExecutor()
        self.handles: dict[int, int] = {}  # coordinator handle -> local handle
        self.open_errors: dict[int, OSError] = {}  # handle -> why this worker could not open it
        self.malloc_tuned = False
        #: one writer at a time: buffered writes to a file serialise on its inode lock anyway, and a
        #: second writer thread would spin on it (rwsem_spin_on_owner) instead of reading meanwhile
        self.write_lock = threading.Lock()

    def h(self, handle: int) -> int:
        try:
            return self.handles[handle]
        except KeyError:
            err = self.open_errors.get(handle)
            if err is not None:  # opens are not waited for: their failure shows on the file's first use
                raise OSError(err.errno, f"worker {os.getpid()} could not open the file of handle {handle}: "
                                         f"{err.strerror or err}") from None
            raise OSError(9, f"worker {os.getpid()} has no file for handle {handle}") from None

    def read_into(self, handle: int, offset: int, view: memoryview) -> None:
        """pread straight into shared memory; the part past EOF reads as zeros."""
        fd = self.ex._fd(self.h(handle))
        got = 0
        n = len(view)
        while got < n:
            r = os.preadv(fd, [view[got:]], offset + got)
            if r <= 0:
                _zero_fill(view, got, n - got)
                return
            got += r

    def copy(self, slot: int, pieces: list, length: int, gran: int, plan: list) -> list:
        """One trip for a window: gather the pieces, then for each plan item ``[handle, host, slot_offset,
        n, unit]`` find the non-zero runs of its range (minus what the source called zero) and write them
        exactly (unit 0) or every ``unit`` they touch in full.  Only planned ranges are scanned and only
        the pieces they need are gathered.  Returns the runs, relative to the window."""
        view = self.slots.slot(slot)
        spans = sorted((p[2], p[2] + p[3]) for p in plan)
        for piece in pieces:
            p_lo, p_hi = piece[4], piece[4] + piece[3]
            if any(a < p_hi and p_lo < b for a, b in spans):
                _gather_piece(self, view, piece)
        base = slot * self.slots.slot_size
        zeros = [[p[4], p[3]] for p in pieces if p[0] == "zero"]
        all_runs: list = []
        writes: list = []  # (local handle, host offset, slot range): written together under the lock
        for h, host, s_off, n, unit in plan:
            if gran:
                # detection blocks stay aligned to the window (the image), whatever the plan range
                lo = s_off // gran * gran
                hi = min(-(-(s_off + n) // gran) * gran, length)
                runs = [[lo + r, m] for r, m in find_nonzero_runs(self.slots.map, base + lo, hi - lo, gran)]
                holes = ([[0, s_off]] if s_off else []) + zeros + [[s_off + n, length]]
                runs = subtract_sorted(runs, sorted(holes))
            else:
                runs = [[s_off, n]]
            all_runs.extend(runs)
            fd_h = self.h(h)
            if unit == 0:
                writes.extend((fd_h, host + r - s_off, view[r:r + m]) for r, m in runs)
                continue
            for u0, u_end in consecutive_runs(touched_units(runs, s_off, s_off + n, unit)):
                lo = s_off + u0 * unit
                hi = min(s_off + u_end * unit, s_off + n)
                writes.append((fd_h, host + lo - s_off, view[lo:hi]))
        with self.write_lock:
            for fd_h, off, data in writes:
                self.ex.pwrite(fd_h, off, data)
        all_runs.sort()
        return all_runs

    def gather(self, slot: int, pieces: list, length: int, gran: int, compress: list | None):
        """Assemble ``length`` bytes in ``slot`` from data, zero and compressed pieces, then either find
        the non-zero ``gran`` runs or compress cluster by cluster.

        With ``compress = [codec, cluster_size, out_offset]`` returns one item per cluster: -2 all zeros,
        -1 did not compress (raw bytes stay in place), else ``[slot_offset, length]`` of the compressed
        stream written from ``out_offset`` on."""
        view = self.slots.slot(slot)
        for piece in pieces:
            _gather_piece(self, view, piece)
        base = slot * self.slots.slot_size
        mm = self.slots.map
        if compress is not None:
            if not self.malloc_tuned:  # only compression churns the heap; ctypes costs ~3 ms to import
                tune_malloc()
                self.malloc_tuned = True
            codec, cs, out = compress
            result: list = []
            for c_off in range(0, length, cs):
                n = min(cs, length - c_off)
                data = mm[base + c_off:base + c_off + n]
                if data == _zeros(n):
                    result.append(-2)
                    continue
                if n < cs:
                    data += bytes(cs - n)
                comp = codecs.compress(codec, data, cs)
                if comp is None:
                    result.append(-1)
                    continue
                view[out:out + len(comp)] = comp
                result.append([out, len(comp)])
                out += len(comp)
            return result
        if gran:
            return find_nonzero_runs(mm, base, length, gran)
        return None

    def run(self, op: str, a: list):
        ex = self.ex
        if op == "pread":
            h, off, length, slot = a
            if slot is None:
                return ex.pread(self.h(h), off, length)
            self.read_into(h, off, self.slots.slot(slot)[:length])
            return length
        if op == "pwrite":
            h, off, data, slot, length = a
            if slot is not None:
                data = self.slots.slot(slot)[:length]
            ex.pwrite(self.h(h), off, data)
            return None
        if op == "gather":
            return self.gather(*a)
        if op == "copy":
            return self.copy(*a)
        if op == "gather_digest":  # verify: assemble a window in a slot and hash it here
            import hashlib

            slot, pieces, length = a
            self.gather(slot, pieces, length, 0, None)
            return hashlib.blake2b(self.slots.slot(slot)[:length], digest_size=32).digest()
        if op == "scatter":
            slot, writes = a
            view = self.slots.slot(slot)
            with self.write_lock:
                for h, off, s_off, n in writes:
                    ex.pwrite(self.h(h), off, view[s_off:s_off + n])
            return None
        if op == "write_zeroes":
            h, off, length, unmap = a
            return ex.write_zeroes(self.h(h), off, length, unmap)
        if op == "discard":
            return ex.discard(self.h(a[0]), a[1], a[2])
        if op == "truncate":
            return ex.truncate(self.h(a[0]), a[1])
        if op == "fsync":
            return ex.fsync(self.h(a[0]))
        if op == "stat":
            st = ex.stat(self.h(a[0]))
            return [st.size, st.allocated]
        if op == "extent":
            e = ex.extent(self.h(a[0]), a[1], a[2])
            return [e.offset, e.length, e.data]
        if op == "compress":
            codec, data, slot, length, limit = a
            if slot is not None:
                data = bytes(self.slots.slot(slot)[:length])
            return codecs.compress(codec, data, limit)
        if op == "decompress":
            codec, data, out_len = a
            return codecs.decompress(codec, data, out_len)
        if op == "zero_detect":
            slot, length, gran = a
            return find_nonzero_runs(self.slots.map, slot * self.slots.slot_size, length, gran)
        if op == "digest":
            import hashlib  # digest is rare: keep it out of every CLI start-up

            h, off, length = a
            d = hashlib.sha256()
            pos = off
            while pos < off + length:
                n = min(4 << 20, off + length - pos)
                d.update(ex.pread(self.h(h), pos, n))
                pos += n
            return d.hexdigest()
        if op == "open":
            handle, path, writable = a
            if handle not in self.handles:  # re-sent opens after a handshake race are harmless
                try:
                    self.handles[handle] = ex.open(path, writable)
                except OSError as exc:
                    self.open_errors[handle] = exc
                    raise
                self.open_errors.pop(handle, None)
            return None
        if op == "close":
            self.open_errors.pop(a[0], None)
            local = self.handles.pop(a[0], None)
            if local is not None:
                ex.close(local)
            return None
        if op == "sleep":
            time.sleep(a[0])
            return None
        if op == "pid":
            return os.getpid()
        raise ValueError(f"unknown worker op '{op}'")


def _gather_piece(w: "Worker", view: memoryview, piece: list) -> None:
    kind, h, off, n, s_off = piece[:5]
    if kind == "zero":
        _zero_fill(view, s_off, n)
    elif kind == "keep":  # the coordinator filled it in already
        pass
    elif kind == "data":
        w.read_into(h, off, view[s_off:s_off + n])
    elif kind == "comp":
        clen, codec, cs, skip = piece[5:9]
        data = codecs.decompress(codec, w.ex.pread(w.h(h), off, clen), cs)
        view[s_off:s_off + n] = data[skip:skip + n]
    else:
        raise ValueError(f"unknown gather piece kind '{kind}'")


def _die_with_parent() -> None:
    """A worker must not outlive the process that started it (a coordinator killed with SIGKILL, or the
    fork server that exits with it): ask the kernel for SIGKILL when the parent goes (PR_SET_PDEATHSIG)."""
    try:
        import ctypes
        import signal as _signal

        parent = os.getppid()
        ctypes.CDLL(None, use_errno=True).prctl(1, int(_signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the request took effect
            os._exit(1)
    except (OSError, AttributeError):
        pass


#: ops that may run concurrently on the worker's threads: they touch only their own slot and write
#: through ``Worker.write_lock``; every other op waits for them to finish and runs alone, in order
THREADED_OPS = frozenset({"copy", "gather", "scatter"})
#: threads per worker for THREADED_OPS: with two, one window's reads and zero scan run while another
#: window's writes do, as qemu-img's thread pool overlaps them
WORKER_THREADS = 2


def _threaded(op: str, args: list) -> bool:
    """Whether a request may run on a worker thread.  A compressing gather is CPU work that holds the
    GIL for part of each cluster: it stays on the loop, and compression scales with worker processes."""
    return op in THREADED_OPS and not (op == "gather" and len(args) > 4 and args[4] is not None)


def worker_main(conn, owner_pid: int, fd: int, nslots: int, slot_size: int) -> None:
    """Entry point of a spawned worker process."""
    _die_with_parent()
    try:
        slots = SlotView(owner_pid, fd, nslots, slot_size)
    except OSError:  # the pool closed (its segment is gone) before this worker came up: just go
        conn.close()
        os._exit(1)
    w = Worker(slots)
    send_lock = threading.Lock()
    idle = threading.Condition()
    busy = [0]  # THREADED_OPS running or queued

    def reply(msg: list) -> None:
        with send_lock:
            conn.send_bytes(wire.encode(msg))

    def execute(rid: int, op: str, args: list) -> list:
        try:
            return [rid, True, w.run(op, args)]
        except Exception as exc:  # every failure goes back as a record
            return [rid, False, wire.error_record(exc)]

    def threaded(rid: int, op: str, args: list) -> None:
        try:
            msg = execute(rid, op, args)
            try:
                reply(msg)
            except (OSError, ValueError):  # the pipe closed: the coordinator is gone
                pass
        finally:
            with idle:
                busy[0] -= 1
                idle.notify_all()

    def drain() -> None:
        with idle:
            while busy[0]:
                idle.wait()

    pool = None
    conn.send_bytes(wire.encode(["hello", wire.PROTOCOL_VERSION, os.getpid()]))
    try:
        while True:
            try:
                frame = conn.recv_bytes()
            except (EOFError, OSError):
                return
            rid, op, args = wire.decode(frame)
            if WORKER_THREADS > 1 and _threaded(op, args):
                if pool is None:
                    from concurrent.futures import ThreadPoolExecutor

                    pool = ThreadPoolExecutor(WORKER_THREADS, thread_name_prefix="parablock-io")
                with idle:
                    busy[0] += 1
                pool.submit(threaded, rid, op, args)
                continue
            drain()
            if op == "exit":
                reply([rid, True, None])
                return
            reply(execute(rid, op, args))
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
        w.ex.close_all()
        slots.close()
        conn.close()
