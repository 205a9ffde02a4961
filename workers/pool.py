"""The worker pool: N worker processes, one shared-memory slot segment, msgpack requests.

Layer: workers (imports ``ipc``).  ``WorkerPool`` starts, supervises and stops the processes;
``PoolExecutor`` implements ``ipc.executor.Executor`` on top of it so format code runs unchanged.

Start-up: workers are plain forks of the caller while it has a single thread (the CLI: ~10 ms per
worker, no extra interpreter), else forks of multiprocess's fork server (see ``WorkerPool._context``).

Concurrency model: callers submit from any thread and get a ``concurrent.futures.Future``; one reader
thread waits on every worker pipe and process sentinel, resolves futures, and notices dead workers.  A
dead worker fails its in-flight requests with ``WorkerDied`` and is replaced (the replacement re-opens
every file the pool has open).  Each worker has at most ``max_inflight`` requests outstanding.

Ownership: the pool owns its processes, pipes and the slot segment; ``close()`` (or the context manager)
leaves no child, fd or segment behind.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from ipc import wire
from ipc.executor import FileStat, HostExtent
from ipc.shm import SlotPool
from ipc.wire import IpcError, WorkerDied

DEFAULT_SLOT_SIZE = 4 << 20
_live_pools = 0
_live_lock = threading.Lock()


def _pool_started() -> None:
    global _live_pools
    with _live_lock:
        _live_pools += 1


def _pool_stopped() -> None:
    """The last pool to stop also stops multiprocess's resource tracker, so no child outlives us."""
    global _live_pools
    with _live_lock:
        _live_pools -= 1
        if _live_pools:
            return
    if "multiprocess.forkserver" not in sys.modules:  # no pool of ours used the fork server
        return
    try:
        from multiprocess import forkserver, resource_tracker

        forkserver._forkserver._stop()
        resource_tracker._resource_tracker._stop()
    except Exception:  # best effort: older versions keep them until exit
        pass


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


@dataclass
class _Worker:
    index: int
    proc: Any
    conn: Any
    pid: int = 0
    inflight: dict[int, tuple[Future, str]] = field(default_factory=dict)
    sent_ns: dict[int, int] = field(default_factory=dict)
    latencies: list[tuple[str, int, int]] = field(default_factory=list)  # (op, bytes, ns) when recording
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    alive: bool = True
    ready: bool = False  # handshake done: the reader thread owns its pipe and requests may go to it
    reaped: bool = False
    broken: bool = False  # a send to it failed: no new requests go to it until the reader replaces it


class WorkerPool:
    """A supervised pool of worker processes."""

    def __init__(self, workers: int | None = None, nslots: int | None = None,
                 slot_size: int = DEFAULT_SLOT_SIZE, max_inflight: int = 4, start_timeout: float = 60.0,
                 wait: bool = True, start_method: str | None = None) -> None:
        """Spawn the workers.  With ``wait`` the call returns once every worker greeted us (and raises
        IpcError if one did not); without it start-up overlaps the caller's own work and the first
        ``submit`` waits for a ready worker.

        ``start_method``: "fork", "forkserver" or None (automatic, see ``_context``)."""
        if start_method not in (None, "fork", "forkserver"):
            raise ValueError(f"unknown start method '{start_method}'")
        self.nworkers = workers or default_workers()
        self.max_inflight = max_inflight
        self.slots = SlotPool(nslots or max(4, self.nworkers * max_inflight * 2), slot_size)
        self.slot_size = slot_size
        self.start_method = start_method
        self._cond = threading.Condition()
        self._next_id = 1
        self._files: dict[int, tuple[str, bool]] = {}
        self._closing = False
        #: held while a replacement is being started, so close() never misses it
        self._spawn_lock = threading.Lock()
        self._start_error: Exception | None = None
        self.replacements = 0
        self.record_latency = False  # per-worker request latencies (parablock bench)
        # until the first worker is ready, requests run in the caller's thread on a worker object of our
        # own (same ops, same slots): start-up is off the critical path of short jobs
        self.inline_until_ready = True
        self.inline_ops = 0
        self._inline = None
        self.workers: list[_Worker] = []
        self._start_timeout = start_timeout
        # wakes the reader thread when a worker becomes ready (or the pool closes): it then starts watching
        # that worker's pipe at once instead of after its wait times out
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        _pool_started()
        try:
            for i in range(self.nworkers):
                self.workers.append(self._spawn(i))
        except BaseException:
            for w in self.workers:
                self._reap(w, kill=True)
            self.slots.close()
            os.close(self._wake_r)
            os.close(self._wake_w)
            _pool_stopped()
            raise
        self._reader = threading.Thread(target=self._read_loop, name="parablock-pool-reader", daemon=True)
        self._reader.start()
        self._starters = [threading.Thread(target=self._start_worker, args=(w,), daemon=True,
                                           name=f"parablock-pool-start-{w.index}") for w in self.workers]
        for t in self._starters:
            t.start()
        if wait:
            for t in self._starters:
                t.join()
            if self._start_error is not None:
                err = self._start_error
                self.close()
                raise err

    def _start_worker(self, w: _Worker) -> None:
        try:
            self._handshake(w)
        except Exception as exc:
            with self._cond:
                self._start_error = exc if isinstance(exc, IpcError) else IpcError(str(exc))
                w.alive = False
                self._cond.notify_all()
            self._reap(w, kill=True)

    # --- processes -------------------------------------------------------------------------------
    def _context(self):
        """How to start a worker.  A plain fork of this process when that is safe: while it has a single
        thread (the CLI's case: the pool is made before any thread), so no lock held by another thread
        is inherited; the child imports nothing (workers.worker is already loaded) and only runs
        ``worker_main``.  It costs ~10 ms per worker and no extra interpreter.  Otherwise (other threads
        exist: a replacement started by the reader thread, pools made from threads) multiprocess's
        fork server: workers are forks of a clean server that preloaded workers.worker, at the price of
        starting that server and multiprocess's resource tracker (two interpreters, ~0.15-0.25 s)."""
        method = self.start_method
        if method is None:
            method = "fork" if threading.active_count() == 1 and hasattr(os, "fork") else "forkserver"
        if method == "fork":
            import multiprocessing  # stdlib: no dill import (nothing is pickled on fork)

            return multiprocessing.get_context("fork")
        import multiprocess

        ctx = multiprocess.get_context("forkserver")
        ctx.set_forkserver_preload(["workers.worker"])
        return ctx

    def _spawn(self, index: int) -> _Worker:
        from workers.worker import worker_main

        ctx = self._context()
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=worker_main, name=f"parablock-worker-{index}",
                           args=(child, os.getpid(), self.slots.fd, self.slots.nslots, self.slot_size),
                           daemon=True)
        proc.start()
        child.close()
        return _Worker(index, proc, parent)

    def _handshake(self, w: _Worker) -> None:
        """Read the greeting, then hand the worker to the reader thread with every open file re-opened."""
        if not w.conn.poll(self._start_timeout):
            raise IpcError(f"worker {w.index} did not start within {self._start_timeout:.0f} s")
        try:
            hello = wire.decode(w.conn.recv_bytes())
        except (EOFError, OSError):
            raise IpcError(f"worker {w.index} exited during start-up (exit code {w.proc.exitcode})") from None
        if not (isinstance(hello, list) and hello[:1] == ["hello"]):
            raise IpcError(f"worker {w.index} sent a bad greeting")
        if hello[1] != wire.PROTOCOL_VERSION:
            raise IpcError(f"worker {w.index} speaks protocol {hello[1]}, expected {wire.PROTOCOL_VERSION}")
        w.pid = int(hello[2])
        # holding the send lock while becoming ready: no request reaches the worker before its opens
        with w.send_lock:
            with self._cond:
                if self._closing:
                    return
                files = dict(self._files)
                w.ready = True
                frames = []
                for handle, (path, writable) in files.items():
                    rid = self._next_id
                    self._next_id += 1
                    w.inflight[rid] = (Future(), "open")
                    frames.append(wire.encode([rid, "open", [handle, path, writable]]))
                self._cond.notify_all()
            for f in frames:
                w.conn.send_bytes(f)
        self._wake_reader()

    def _wake_reader(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):  # already pending, or closed at shutdown
            pass

    def _reap(self, w: _Worker, kill: bool = False) -> None:
        """Stop and release one worker process; safe to call twice and from any thread."""
        with self._cond:
            w.alive = False
            if w.reaped:
                return
            w.reaped = True
        try:
            if kill and w.proc.is_alive():
                w.proc.kill()
            w.proc.join(5)
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join(5)
        except ValueError:  # already closed
            pass
        try:
            w.conn.close()
        except OSError:
            pass
        close = getattr(w.proc, "close", None)
        if close is not None:
            try:
                close()
            except ValueError:
                pass

    def _new_id(self) -> int:
        with self._cond:
            rid = self._next_id
            self._next_id += 1
            return rid

    # --- the reader thread -------------------------------------------------------------------------
    def _read_loop(self) -> None:
        from multiprocessing.connection import wait

        while True:
            with self._cond:
                if self._closing and not any(w.inflight for w in self.workers):
                    return
                live = [w for w in self.workers if w.alive and w.ready]
            waitables: dict[Any, tuple[str, _Worker | None]] = {self._wake_r: ("wake", None)}
            for w in live:
                waitables[w.conn] = ("conn", w)
                waitables[w.proc.sentinel] = ("dead", w)
            try:
                ready = wait(list(waitables), timeout=0.2)
            except (OSError, ValueError, TypeError):  # a pipe closed under us at shutdown: look again
                continue
            for obj in ready:
                kind, who = waitables[obj]
                if who is None:  # a worker became ready, or we are closing: recompute what to watch
                    try:
                        os.read(self._wake_r, 64)
                    except BlockingIOError:
                        pass
                    continue
                w = who
                if not w.alive:
                    continue
                if kind == "conn":
                    try:
                        frame = w.conn.recv_bytes()
                    except (EOFError, OSError, ValueError, TypeError):  # dead, or reaped by close()
                        self._worker_died(w)
                        continue
                    rid, ok, payload = wire.decode(frame)
                    with self._cond:
                        fut, _op = w.inflight.pop(rid, (None, ""))
                        sent = w.sent_ns.pop(rid, None)
                        if sent is not None:
                            w.latencies.append((_op, payload if isinstance(payload, int) else 0,
                                                time.monotonic_ns() - sent))
                        self._cond.notify_all()
                    if fut is not None:
                        if ok:
                            fut.set_result(payload)
                        else:
                            fut.set_exception(wire.rebuild_error(payload))
                elif kind == "dead":
                    self._worker_died(w)

    def _worker_died(self, w: _Worker) -> None:
        """Fail the dead worker's requests with a clear error and start a replacement."""
        with self._cond:
            if not w.alive:
                return
            w.alive = False
            lost = list(w.inflight.values())
            w.inflight.clear()
        try:
            w.proc.join(1)
            code = w.proc.exitcode
        except ValueError:  # reaped meanwhile by close()
            code = None
        for fut, op in lost:
            fut.set_exception(WorkerDied(f"worker {w.index} (pid {w.pid}) died (exit code {code}) while "
                                         f"running '{op}'"))
        self._reap(w)
        with self._spawn_lock:  # close() waits for a replacement in progress, then shuts it down too
            with self._cond:
                if self._closing:
                    self._cond.notify_all()
                    return
            try:
                new = self._spawn(w.index)
            except (OSError, ValueError) as exc:
                with self._cond:
                    self._start_error = IpcError(f"could not replace worker {w.index}: {exc}")
                    self._cond.notify_all()
                return
            with self._cond:
                self.workers[self.workers.index(w)] = new
                self.replacements += 1
            t = threading.Thread(target=self._start_worker, args=(new,), daemon=True)
            self._starters.append(t)
            t.start()

    # --- submitting ---------------------------------------------------------------------------------
    def submit(self, op: str, args: list, timeout: float | None = 60.0) -> Future:
        """Send ``op`` to the least-busy live worker, waiting while every worker is at max_inflight."""
        fut: Future = Future()
        deadline = None if timeout is None else time.monotonic() + timeout
        if self.inline_until_ready and op not in ("sleep", "pid", "exit"):
            with self._cond:
                starting = not any(w.ready for w in self.workers) and any(w.alive for w in self.workers)
            if starting:
                return self._run_inline(op, args)
        while True:
            w, rid = self._pick_worker(op, fut, deadline)
            try:
                with w.send_lock:
                    w.conn.send_bytes(wire.encode([rid, op, args]))
                return fut
            except (OSError, ValueError):
                # The worker died and the reader has not noticed yet.  The request never left, so it
                # is safe to send it to another worker; the reader replaces this one.
                with self._cond:
                    w.inflight.pop(rid, None)
                    w.sent_ns.pop(rid, None)
                    w.broken = True
                self._wake_reader()

    def _pick_worker(self, op: str, fut: Future, deadline: float | None) -> tuple[_Worker, int]:
        """Reserve a request id on the least-busy usable worker (waiting while all are busy)."""
        with self._cond:
            while True:
                if self._closing:
                    raise IpcError("worker pool is shut down")
                live = [w for w in self.workers if w.alive and w.ready and not w.broken]
                if live:
                    w = min(live, key=lambda x: len(x.inflight))
                    if len(w.inflight) < self.max_inflight:
                        break
                elif not any(x.alive and not x.broken for x in self.workers):
                    if not any(x.alive for x in self.workers):
                        raise self._start_error or IpcError("no live worker")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise IpcError("no worker became available in time (all busy or dead)")
                self._cond.wait(remaining if remaining is not None else 0.5)
            rid = self._next_id
            self._next_id += 1
            w.inflight[rid] = (fut, op)
            if self.record_latency:
                w.sent_ns[rid] = time.monotonic_ns()
            return w, rid

    def _inline_worker(self):
        if self._inline is None:
            from workers.worker import Worker

            self._inline = Worker(self.slots)
            with self._cond:
                files = dict(self._files)
            for handle, (path, writable) in files.items():
                self._inline.run("open", [handle, path, writable])
        return self._inline

    def _run_inline(self, op: str, args: list) -> Future:
        fut: Future = Future()
        try:
            fut.set_result(self._inline_worker().run(op, args))
        except Exception as exc:  # same error records as a worker would send
            fut.set_exception(wire.rebuild_error(wire.error_record(exc)))
        self.inline_ops += 1
        return fut

    def call(self, op: str, *args: Any, timeout: float | None = 300.0) -> Any:
        return self.submit(op, list(args)).result(timeout)

    def broadcast(self, op: str, *args: Any, wait: bool = True) -> None:
        """Run ``op`` on every live worker (open/close of files).  Without ``wait`` the requests are only
        sent: a worker runs its requests in order, so any later request naming the file finds it open
        (or fails with the open's own error, see ``Worker.h``); no round trip is paid per file."""
        futs = []
        with self._cond:
            candidates = [w for w in self.workers if w.alive]
        for w in candidates:
            with w.send_lock:
                with self._cond:
                    if not (w.alive and w.ready):
                        continue  # it will get the file with the others when its handshake ends
                    fut: Future = Future()
                    rid = self._next_id
                    self._next_id += 1
                    w.inflight[rid] = (fut, op)
                try:
                    w.conn.send_bytes(wire.encode([rid, op, list(args)]))
                except (OSError, ValueError):
                    continue
            futs.append(fut)
        if not wait:
            return
        for f in futs:
            try:
                f.result(60)
            except WorkerDied:
                pass  # its replacement re-opens every registered file

    def register_file(self, handle: int, path: str, writable: bool) -> None:
        with self._cond:
            self._files[handle] = (path, writable)
        if self._inline is not None:
            self._inline.run("open", [handle, path, writable])
        self.broadcast("open", handle, path, writable, wait=False)

    def unregister_file(self, handle: int) -> None:
        with self._cond:
            self._files.pop(handle, None)
        if self._inline is not None:
            self._inline.run("close", [handle])
        self.broadcast("close", handle, wait=False)

    # --- shutdown -------------------------------------------------------------------------------------
    def pids(self) -> list[int]:
        return [w.pid for w in self.workers if w.alive and w.ready]

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until every worker finished its handshake (tests, benchmarks)."""
        with self._cond:
            self._cond.wait_for(lambda: all(w.ready or not w.alive for w in self.workers), timeout)

    def rss_bytes(self) -> int:
        """Resident memory of the coordinator and every worker (for benchmarks)."""
        import psutil

        total = psutil.Process().memory_info().rss
        for pid in self.pids():
            try:
                total += psutil.Process(pid).memory_info().rss
            except psutil.Error:
                pass
        return total

    def close(self) -> None:
        with self._cond:
            if self._closing:
                return
            self._closing = True
            self._cond.notify_all()
        with self._spawn_lock:  # a replacement being started is in self.workers once this returns
            pass
        self._wake_reader()
        for w in self.workers:
            if w.alive:
                try:
                    with w.send_lock:
                        w.conn.send_bytes(wire.encode([0, "exit", []]))
                except (OSError, ValueError):
                    pass
        deadline = time.monotonic() + 10
        remaining = [w for w in self.workers if w.alive]
        for w in remaining:
            try:
                w.proc.join(max(0.1, deadline - time.monotonic()))
            except ValueError:
                pass
        for w in remaining:
            with self._cond:
                lost = list(w.inflight.values())
                w.inflight.clear()
            for fut, op in lost:
                if not fut.done():
                    fut.set_exception(IpcError(f"worker pool shut down while running '{op}'"))
            self._reap(w, kill=True)
        self._wake_reader()
        self._reader.join(5)
        if self._inline is not None:
            self._inline.ex.close_all()
            self._inline = None
        for t in getattr(self, "_starters", []):
            t.join(5)
        self.slots.close()
        if not self._reader.is_alive():
            os.close(self._wake_r)
            os.close(self._wake_w)
        _pool_stopped()

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PoolExecutor:
    """``ipc.executor.Executor`` on a WorkerPool: format code runs unchanged.

    Latency-bound small requests (metadata: headers, L1/L2 tables, refcount blocks) are served inline on
    the coordinator's own fd, since a worker round trip would cost more than the I/O (DESIGN.md); bulk
    reads and writes and all compression go to the workers.  Every file is open in the coordinator and in
    every worker under the same handle, so a plan made here can name it in a worker request."""

    INLINE = 256 << 10

    def __init__(self, pool: WorkerPool) -> None:
        from workers.inproc import InProcessExecutor

        self.pool = pool
        self.local = InProcessExecutor()

    def open(self, path: str, writable: bool, create: bool = False) -> int:
        h = self.local.open(path, writable, create)
        try:
            self.pool.register_file(h, os.path.abspath(path), writable)
        except BaseException:
            self.local.close(h)
            raise
        return h

    def close(self, handle: int) -> None:
        try:
            self.pool.unregister_file(handle)
        finally:
            self.local.close(handle)

    def pread(self, handle: int, offset: int, length: int) -> bytes:
        if length <= self.INLINE:
            return self.local.pread(handle, offset, length)
        out = bytearray(length)
        pos = 0
        while pos < length:
            n = min(self.pool.slot_size, length - pos)
            slot = self.pool.slots.lease()
            try:
                self.pool.call("pread", handle, offset + pos, n, slot)
                out[pos:pos + n] = self.pool.slots.slot(slot)[:n]
            finally:
                self.pool.slots.release(slot)
            pos += n
        return bytes(out)

    def pwrite(self, handle: int, offset: int, data: bytes) -> None:
        length = len(data)
        if length <= self.INLINE:
            self.local.pwrite(handle, offset, data)
            return
        pos = 0
        view = memoryview(data)
        while pos < length:
            n = min(self.pool.slot_size, length - pos)
            slot = self.pool.slots.lease()
            try:
                self.pool.slots.slot(slot)[:n] = view[pos:pos + n]
                self.pool.call("pwrite", handle, offset + pos, None, slot, n)
            finally:
                self.pool.slots.release(slot)
            pos += n

    def write_zeroes(self, handle: int, offset: int, length: int, unmap: bool) -> None:
        if length <= self.INLINE:
            self.local.write_zeroes(handle, offset, length, unmap)
        else:
            self.pool.call("write_zeroes", handle, offset, length, unmap)

    def discard(self, handle: int, offset: int, length: int) -> None:
        self.local.discard(handle, offset, length)

    def truncate(self, handle: int, size: int) -> None:
        self.local.truncate(handle, size)

    def fsync(self, handle: int) -> None:
        self.local.fsync(handle)

    def stat(self, handle: int) -> FileStat:
        return self.local.stat(handle)

    def extent(self, handle: int, offset: int, length: int) -> HostExtent:
        return self.local.extent(handle, offset, length)

    def compress(self, codec: str, data: bytes, limit: int) -> bytes | None:
        return self.pool.call("compress", codec, bytes(data), None, len(data), limit)

    def decompress(self, codec: str, data: bytes, out_len: int) -> bytes:
        return self.pool.call("decompress", codec, bytes(data), out_len)

    def close_all(self) -> None:
        for h in list(self.local._fds):
            self.close(h)
