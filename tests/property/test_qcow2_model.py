"""A hypothesis state machine: qcow2 reads and writes over a backing chain against a bytearray model.

The machine builds a small backing image (raw or qcow2, pre-filled with a pattern) and a qcow2 overlay
with random geometry (cluster size 512/4k/64k, v2/v3, sometimes extended L2, sometimes refcount widths 1
or 64, zlib or zstd), then runs writes, zero writes, compressed writes, discards, reads, flushes,
snapshots and reopens on both the parablock node and the model.  After every step the node is flushed and
the pure checker (``engine.formats.qcow2_check.check_qcow2``) must find no corruption, leak or check error.
At teardown ``qemu-img check`` and ``qemu-img compare`` against the model judge the final image too.

Model rules (QEMU's):
- a zero write reads zeros (v2 with a backing file allocates a zero-filled cluster);
- a discard drops whole clusters only (plus a short last cluster at EOF); the guest then reads zeros in
  v3, and in v2 without a backing file; in v2 *with* a backing file the entry becomes 0 and the backing
  file's data shows through;
- a compressed write must be cluster-aligned and is refused (EIO) over a cluster that has a host offset;
- reads past the backing file's end are zeros.
"""
from __future__ import annotations

import os
import random
import shutil
import tempfile

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from engine.errors import BlockError
from engine.formats import qcow2_layout as L
from tests.util import QEMU_IMG, QEMU_IO, open_node, qemu_check, qemu_compare

KiB = 1024

try:  # the pure checker; fall back to qemu-img at teardown while it does not exist
    from engine.formats.qcow2_check import check_qcow2
except ImportError:  # pragma: no cover
    check_qcow2 = None

HAVE_QEMU = bool(QEMU_IMG and QEMU_IO)


def _executor():
    from workers.inproc import InProcessExecutor

    return InProcessExecutor()


def _pattern(seed: int, n: int, kind: str) -> bytes:
    rnd = random.Random(seed)
    if kind == "const":
        return bytes([rnd.randint(1, 255)]) * n
    if kind == "random":
        return rnd.randbytes(n)
    # runs: compressible but not constant
    out = bytearray()
    while len(out) < n:
        out += bytes([rnd.randint(0, 255)]) * rnd.randint(1, 700)
    return bytes(out[:n])


def _open_rw(path: str):
    """A read-write node with cache=unsafe: no fsync per metadata step (this test never crashes)."""
    from engine.image import open_image

    return open_image(path, _executor(), fmt="qcow2", read_only=False, options={"cache": "unsafe"})


def _file_reader(path: str):
    fd = os.open(path, os.O_RDONLY)

    def read(off: int, n: int) -> bytes:
        data = os.pread(fd, n, off)
        return data + bytes(n - len(data))

    return fd, read


class Qcow2Model(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.node = None
        self.dir: str | None = None

    # ------------------------------------------------------------------------------------------------
    # setup
    # ------------------------------------------------------------------------------------------------
    @initialize(data=st.data())
    def setup(self, data):
        from engine.image import create_image

        cs = data.draw(st.sampled_from([512, 4 * KiB, 64 * KiB]), label="cluster_size")
        version = data.draw(st.sampled_from([2, 3]), label="version")
        ext_l2 = version == 3 and cs >= 16 * KiB and data.draw(st.booleans(), label="extended_l2")
        rbits = 16
        if version == 3:
            rbits = data.draw(st.sampled_from([16, 16, 1, 64]), label="refcount_bits")
        ctype = "zlib"
        if version == 3:
            ctype = data.draw(st.sampled_from(["zlib", "zstd"]), label="compression_type")
        backing_kind = data.draw(st.sampled_from(["none", "raw", "qcow2"]), label="backing")
        nclusters = data.draw(st.integers(3, 10), label="nclusters")
        tail = data.draw(st.sampled_from([0, 512, 1536]), label="tail")
        size = nclusters * cs - (tail if tail < cs else 0)

        self.dir = tempfile.mkdtemp(prefix="pb-model-")
        self.cs, self.version, self.ext_l2, self.rbits, self.size = cs, version, ext_l2, rbits, size
        self.backing_kind = backing_kind
        base = bytes(size)
        opts = {"compat": "1.1" if version == 3 else "0.10", "cluster_size": cs, "refcount_bits": rbits,
                "compression_type": ctype}
        if ext_l2:
            opts["extended_l2"] = True
        if backing_kind != "none":
            bsize = data.draw(st.sampled_from([size, max(512, size - cs), size - size // 3 // 512 * 512]),
                              label="backing_size")
            bsize = max(512, bsize // 512 * 512)
            pat = _pattern(data.draw(st.integers(0, 1000), label="backing_seed"), bsize, "runs")
            bpath = os.path.join(self.dir, f"base.{backing_kind}")
            if backing_kind == "raw":
                with open(bpath, "wb") as f:
                    f.write(pat)
            else:
                create_image(bpath, "qcow2", bsize, _executor(), {"cluster_size": 4 * KiB})
                b = open_node(bpath, "qcow2", read_only=False)
                try:
                    b.write(0, pat)
                    b.write_zeroes(0, min(bsize, 8 * KiB))  # a zero cluster in the backing file too
                finally:
                    b.close()
                pat = bytes(min(bsize, 8 * KiB)) + pat[8 * KiB:]
            base = (pat + bytes(size))[:size]
            opts["backing_file"] = bpath
            opts["backing_fmt"] = backing_kind
        self.base = base
        self.model = bytearray(base)
        self.path = os.path.join(self.dir, "top.qcow2")
        create_image(self.path, "qcow2", size, _executor(), opts)
        self.node = _open_rw(self.path)
        self.snapshots: dict[str, bytes] = {}
        self.snap_counter = 0

    def teardown(self):
        try:
            if self.node is not None:
                self.node.close()
                self.node = None
                if HAVE_QEMU:
                    rc, chk = qemu_check(self.path)
                    assert rc == 0 and "corruptions" not in chk and "leaks" not in chk, chk
                    ref = os.path.join(self.dir, "model.raw")
                    with open(ref, "wb") as f:
                        f.write(self.model)
                    p = qemu_compare(ref, self.path, "raw", "qcow2")
                    assert p.returncode == 0, (p.stdout, p.stderr)
                elif check_qcow2 is not None:
                    self._pure_check()
        finally:
            if self.dir:
                shutil.rmtree(self.dir, ignore_errors=True)

    # ------------------------------------------------------------------------------------------------
    # helpers
    # ------------------------------------------------------------------------------------------------
    def _range(self, data, max_len: int | None = None) -> tuple[int, int]:
        size = self.size
        kind = data.draw(st.sampled_from(["any", "aligned", "tail", "subcluster"]), label="range_kind")
        cap = max_len or 3 * self.cs
        if kind == "aligned":
            c = data.draw(st.integers(0, (size - 1) // self.cs), label="cluster")
            k = data.draw(st.integers(1, 3), label="nclusters")
            off = c * self.cs
            return off, min(k * self.cs, size - off)
        if kind == "tail":
            ln = data.draw(st.integers(1, min(size, cap)), label="len")
            return size - ln, ln
        if kind == "subcluster":
            g = self.cs // 32 if self.ext_l2 else 512
            s = data.draw(st.integers(0, (size - 1) // g), label="unit")
            k = data.draw(st.integers(1, 8), label="units")
            off = s * g
            return off, min(k * g, size - off)
        off = data.draw(st.integers(0, size - 1), label="offset")
        ln = data.draw(st.integers(1, min(cap, size - off)), label="len")
        return off, ln

    def _discard_range(self, off: int, ln: int) -> tuple[int, int]:
        cs = self.cs
        start = -(-off // cs) * cs
        end = off + ln
        if end != self.size:
            end = end // cs * cs
        return start, max(start, end)

    def _pure_check(self):
        fd, read = _file_reader(self.path)
        try:
            res = check_qcow2(read, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        assert res.error is None, res.error
        assert (res.corruptions, res.leaks, res.check_errors) == (0, 0, 0), res.messages[:20]

    # ------------------------------------------------------------------------------------------------
    # rules
    # ------------------------------------------------------------------------------------------------
    @rule(data=st.data())
    def write(self, data):
        off, ln = self._range(data)
        kind = data.draw(st.sampled_from(["const", "random", "runs"]), label="data_kind")
        buf = _pattern(data.draw(st.integers(0, 2**16), label="seed"), ln, kind)
        self.node.write(off, buf)
        self.model[off:off + ln] = buf

    @rule(data=st.data(), unmap=st.booleans())
    def write_zeroes(self, data, unmap):
        off, ln = self._range(data)
        self.node.write_zeroes(off, ln, unmap=unmap)
        self.model[off:off + ln] = bytes(ln)

    @rule(data=st.data())
    def write_compressed(self, data):
        cs = self.cs
        c = data.draw(st.integers(0, (self.size - 1) // cs), label="cluster")
        k = data.draw(st.integers(1, 2), label="nclusters")
        off = c * cs
        ln = min(k * cs, self.size - off)
        kind = data.draw(st.sampled_from(["const", "random", "runs"]), label="data_kind")
        buf = _pattern(data.draw(st.integers(0, 2**16), label="seed"), ln, kind)
        # QEMU refuses (EIO) a compressed write over a cluster that has a host offset; a request of several
        # clusters is split per cluster, so the clusters before a refused one are written
        done = 0
        refused = False
        for i in range((ln + cs - 1) // cs):
            entry, _bitmap = self.node._lookup(c + i)
            if entry & L.L2E_OFFSET_MASK or entry & L.OFLAG_COMPRESSED:
                refused = True
                break
            done += min(cs, ln - i * cs)
        if refused:
            try:
                self.node.write_compressed(off, buf)
            except BlockError:
                pass
            else:
                raise AssertionError("compressed write over an allocated cluster was not refused")
        else:
            self.node.write_compressed(off, buf)
        self.model[off:off + done] = buf[:done]

    @rule(data=st.data())
    def discard(self, data):
        off, ln = self._range(data, max_len=4 * self.cs)
        self.node.discard(off, ln)
        s, e = self._discard_range(off, ln)
        if e > s:
            if self.version == 2 and self.backing_kind != "none":
                self.model[s:e] = self.base[s:e]  # entry 0: the backing file shows through
            else:
                self.model[s:e] = bytes(e - s)

    @rule(data=st.data())
    def read_compare(self, data):
        if data.draw(st.booleans(), label="full"):
            off, ln = 0, self.size
        else:
            off, ln = self._range(data)
        got = self.node.read(off, ln)
        assert got == bytes(self.model[off:off + ln]), f"read mismatch at {off}+{ln}"

    @rule()
    def flush(self):
        self.node.flush()

    @rule()
    def reopen(self):
        self.node.close()
        self.node = _open_rw(self.path)
        assert self.node.read(0, self.size) == bytes(self.model)

    @precondition(lambda self: self.node is not None and self.rbits > 1 and len(self.snapshots) < 4)
    @rule()
    def snapshot_create(self):
        self.snap_counter += 1
        name = f"s{self.snap_counter}"
        self.node.snapshot_create(name)
        self.snapshots[name] = bytes(self.model)

    @precondition(lambda self: self.node is not None and self.rbits == 1)
    @rule()
    def snapshot_create_refused(self):
        try:
            self.node.snapshot_create("nope")
        except BlockError:
            pass
        else:
            raise AssertionError("refcount_bits=1 must refuse snapshots")

    @precondition(lambda self: self.node is not None and bool(self.snapshots))
    @rule(data=st.data())
    def snapshot_apply(self, data):
        name = data.draw(st.sampled_from(sorted(self.snapshots)), label="snapshot")
        self.node.snapshot_apply(name)
        self.model = bytearray(self.snapshots[name])

    @precondition(lambda self: self.node is not None and bool(self.snapshots))
    @rule(data=st.data())
    def snapshot_delete(self, data):
        name = data.draw(st.sampled_from(sorted(self.snapshots)), label="snapshot")
        self.node.snapshot_delete(name)
        del self.snapshots[name]

    # ------------------------------------------------------------------------------------------------
    # invariant
    # ------------------------------------------------------------------------------------------------
    @invariant()
    def image_is_consistent(self):
        if self.node is None:
            return
        self.node.flush()
        if check_qcow2 is not None:
            self._pure_check()


Qcow2Model.TestCase.settings = settings(max_examples=30, stateful_step_count=25, deadline=None,
                                        suppress_health_check=[HealthCheck.too_slow,
                                                               HealthCheck.data_too_large,
                                                               HealthCheck.filter_too_much])
TestQcow2Model = Qcow2Model.TestCase
