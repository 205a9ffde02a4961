"""The worker pool with real worker processes: concurrent I/O byte for byte, qcow2 on the pool, a worker
killed mid-request, version handshake, clean shutdown (the autouse fixture checks for leaks)."""
from __future__ import annotations

import os
import random
import threading
import time

import pytest

from engine.image import create_image, open_image
from ipc import wire
from ipc.wire import IpcError, WorkerDied
from workers.pool import PoolExecutor, WorkerPool


@pytest.fixture(params=["fork", "forkserver"])
def pool(request):
    p = WorkerPool(2, max_inflight=3, start_method=request.param)
    yield p
    p.close()


def test_concurrent_random_io_byte_for_byte(pool, tmp_path):
    path = tmp_path / "disk.raw"
    size = 8 << 20
    path.write_bytes(bytes(size))
    ex = PoolExecutor(pool)
    h = ex.open(str(path), writable=True)
    model = bytearray(size)
    lock = threading.Lock()
    errors = []

    def client(seed: int) -> None:
        rng = random.Random(seed)
        region = seed * (size // 4)
        try:
            for _ in range(60):
                off = region + rng.randrange(0, size // 4 - 300_000)
                n = rng.choice([1, 511, 4096, 70_000, 300_000])
                if rng.random() < 0.6:
                    data = rng.randbytes(n)
                    ex.pwrite(h, off, data)
                    with lock:
                        model[off:off + n] = data
                else:
                    got = ex.pread(h, off, n)
                    with lock:
                        want = bytes(model[off:off + n])
                    assert got == want
        except Exception as exc:  # collected and re-raised in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    ex.close(h)
    assert path.read_bytes() == bytes(model)
    assert pool.slots.leased == 0


def test_qcow2_on_the_pool_matches_a_model(pool, tmp_path):
    ex = PoolExecutor(pool)
    path = str(tmp_path / "d.qcow2")
    size = 4 << 20
    create_image(path, "qcow2", size, ex, {"cluster_size": 4096})
    node = open_image(path, ex, read_only=False)
    model = bytearray(size)
    rng = random.Random(7)
    for _ in range(80):
        off = rng.randrange(0, size - 200_000)
        n = rng.randrange(1, 200_000)
        op = rng.random()
        if op < 0.6:
            data = rng.randbytes(n)
            node.write(off, data)
            model[off:off + n] = data
        elif op < 0.8:
            node.write_zeroes(off, n, unmap=rng.random() < 0.5)
            model[off:off + n] = bytes(n)
        else:
            assert node.read(off, n) == bytes(model[off:off + n])
    node.close()
    node = open_image(path, ex)
    assert node.read(0, size) == bytes(model)
    node.close()


def test_worker_killed_mid_request(pool, tmp_path):
    before = set(pool.pids())
    fut = pool.submit("sleep", [30])
    time.sleep(0.3)
    victim = None
    for w in pool.workers:
        if w.inflight:
            victim = w.pid
    assert victim is not None
    os.kill(victim, 9)
    with pytest.raises(WorkerDied, match=rf"pid {victim}\) died \(exit code -9\) while running 'sleep'"):
        fut.result(20)
    deadline = time.monotonic() + 30
    while pool.replacements < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pool.replacements == 1
    pool.wait_ready()
    assert len(pool.pids()) == 2 and victim not in pool.pids() and set(pool.pids()) != before
    # the pool still works, and the replacement re-opened the pool's files
    path = tmp_path / "f.raw"
    path.write_bytes(b"abc" * 1000)
    ex = PoolExecutor(pool)
    h = ex.open(str(path), writable=False)
    for _ in range(6):
        assert ex.pread(h, 3, 6) == b"abcabc"
    ex.close(h)


def test_worker_errors_come_back_as_errors(pool, tmp_path):
    ex = PoolExecutor(pool)
    with pytest.raises(OSError):
        ex.open(str(tmp_path / "missing"), writable=False)
    with pytest.raises(OSError) as info:
        pool.call("pread", 12345, 0, 1, None)
    assert info.value.errno == 9
    with pytest.raises(ValueError, match="unknown worker op"):
        pool.call("no-such-op")


def test_version_mismatch_is_refused(monkeypatch):
    # forkserver: the workers are forks of a fresh interpreter, which speaks the real version
    monkeypatch.setattr(wire, "PROTOCOL_VERSION", 999)
    with pytest.raises(IpcError, match="speaks protocol 1, expected 999"):
        WorkerPool(1, start_method="forkserver")


def test_version_mismatch_is_refused_forked(monkeypatch):
    # fork: the worker is a copy of this process, so change what its greeting says
    import types

    import workers.worker

    fake = types.SimpleNamespace(PROTOCOL_VERSION=999, encode=wire.encode, decode=wire.decode,
                                 error_record=wire.error_record)
    monkeypatch.setattr(workers.worker, "wire", fake)
    with pytest.raises(IpcError, match="speaks protocol 999, expected 1"):
        WorkerPool(1, start_method="fork")


def test_automatic_start_method_and_unknown_one():
    """A pool made while the process has one thread (the CLI's case) forks its workers; a worker started
    while other threads run (a replacement started by the reader thread, pools made beside other
    threads, xdist's own threads) comes from the fork server."""
    single = threading.active_count() == 1
    p = WorkerPool(1)
    try:
        module = type(p.workers[0].proc).__module__
        assert module.startswith("multiprocessing." if single else "multiprocess."), module
        assert p._context().get_start_method() == "forkserver"  # the pool's own threads run now
        assert p.call("pid") == p.pids()[0]
    finally:
        p.close()
    with pytest.raises(ValueError, match="unknown start method"):
        WorkerPool(1, start_method="spawn")


def test_bounded_inflight_and_slots(pool, tmp_path):
    futs = [pool.submit("sleep", [0.2]) for _ in range(6)]
    with pool._cond:
        assert all(len(w.inflight) <= pool.max_inflight for w in pool.workers)
    for f in futs:
        f.result(30)
    slots = [pool.slots.lease() for _ in range(pool.slots.nslots)]
    with pytest.raises(TimeoutError):
        pool.slots.lease(timeout=0.1)
    for s in slots:
        pool.slots.release(s)


def test_ordered_requests_wait_for_threaded_ones(tmp_path):
    """A worker runs copy/scatter/gather requests on two threads, and every other request waits for
    them: a pread sent right behind a scatter of the same range, without waiting for it, reads the
    scattered bytes."""
    path = tmp_path / "disk.raw"
    path.write_bytes(bytes(4 << 20))
    p = WorkerPool(1, max_inflight=4)
    ex = PoolExecutor(p)
    h = ex.open(str(path), writable=True)
    try:
        p.call("pid")  # the worker is up: nothing runs inline from here on
        for rnd in range(20):
            data = random.Random(rnd).randbytes(1 << 20)
            slot = p.slots.lease()
            p.slots.slot(slot)[:len(data)] = data
            scatter = p.submit("scatter", [slot, [[h, rnd * 4096, 0, len(data)]]])
            read = p.submit("pread", [h, rnd * 4096, len(data), None])  # not waiting for the scatter
            assert read.result(30) == data
            assert scatter.done()  # the pread ran only after it
            p.slots.release(slot)
    finally:
        ex.close(h)
        p.close()
