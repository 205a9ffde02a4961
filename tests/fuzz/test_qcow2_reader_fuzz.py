"""Hypothesis fuzz of the qcow2 reader: small valid images made by qemu-img (v2/v3, 512 B..64 KiB
clusters, snapshots, bitmaps, compressed clusters, extended L2, a backing file) are mutated at the
offsets of their parsed metadata (header, extensions, L1/L2, refcount table/blocks, snapshot table,
bitmap directory and tables) and by random byte flips.  For each mutant, a read-only open + full read +
block-status walk, ``parablock info``, ``map`` and ``check`` must each end in a BlockError / one
``parablock:`` line with a non-zero exit, or succeed: no uncaught exception, no more than a few seconds,
no allocation beyond 512 MiB (RLIMIT_AS in the child), no changed byte in the file."""
from __future__ import annotations

import hashlib
import json
import os
import re
import select
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from tests.fuzz.qcow2_seeds import SEEDS, Field, build, fields
from tests.util import ROOT, needs_qemu

TIME_LIMIT = 6.0       # seconds per mutant for all five operations
MEMORY_MIB = 512       # address space the child may add after its imports
#: bugs found by this fuzz, each reproduced by a strict xfail test in test_qcow2_known_bugs.py; a mutant
#: that hits one of them (matched on its traceback) is tolerated here so the fuzz goes on covering the rest
KNOWN_BUGS: dict[str, str] = {}  # none left: the four found are fixed (test_qcow2_known_bugs.py)
EXAMPLES = int(os.environ.get("PARABLOCK_FUZZ_EXAMPLES", "200"))  # per seed


class Child:
    """The long-lived checker process (tests/fuzz/_reader_child.py); restarted after a kill."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("_reader_child.py")), str(MEMORY_MIB)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert json.loads(self._line(60)) == {"ready": True}

    def _line(self, timeout: float) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        r, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not r:
            raise TimeoutError
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise AssertionError(f"checker child died (rc={self.proc.wait()}): {err[-3000:]}")
        return line

    def run(self, path: Path) -> dict | None:
        """The child's results, or None when it overran TIME_LIMIT (it is then killed)."""
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(f"{path}\n")
        self.proc.stdin.flush()
        try:
            return json.loads(self._line(TIME_LIMIT))
        except TimeoutError:
            self.stop()
            return None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
                if f:
                    f.close()
            self.proc = None


@pytest.fixture(scope="module")
def child():
    c = Child()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    d = tmp_path_factory.mktemp("seeds")
    return {name: build(name, d / name) for name in SEEDS}


def _value(f: Field, old: int, kind: int, rnd: int, cs: int, fsize: int, anchors: list[int]) -> int:
    bits = 8 * f.width
    mask = (1 << bits) - 1
    choices = [
        0, 1, mask, mask >> 1, old ^ (1 << (rnd % bits)), old + 1, old - 1, old + 8, old + cs, old - cs,
        fsize, fsize + cs, fsize - 8, rnd, old | (1 << (bits - 1)), old | (1 << (bits - 2)),
        anchors[rnd % len(anchors)], 1 << (rnd % bits), old * 2, old // 2 if old else 7,
    ]
    return choices[kind % len(choices)] & mask


def mutate(data: bytearray, fs: list[Field], muts: list[tuple]) -> list[str]:
    """Apply ``muts`` in place; returns a readable description of each."""
    cs = 1 << struct.unpack_from(">I", data, 20)[0] if len(data) >= 24 else 65536
    cs = cs if 9 <= cs.bit_length() - 1 <= 21 else 65536
    anchors = [0, cs, 2 * cs, 3 * cs] + [int.from_bytes(data[f.offset:f.offset + 8], "big")
                                         for f in fs if f.width == 8 and "offset" in f.name]
    desc = []
    for m in muts:
        if m[0] == "field":
            f = fs[m[1] % len(fs)]
            old = int.from_bytes(data[f.offset:f.offset + f.width], "big")
            new = _value(f, old, m[2], m[3], cs, len(data), anchors)
            data[f.offset:f.offset + f.width] = new.to_bytes(f.width, "big")
            desc.append(f"{f.name}@{f.offset}: {old:#x} -> {new:#x}")
        else:
            _, region, pos, x = m
            # flips: mostly in the metadata clusters at the start, sometimes anywhere
            limit = min(len(data), 8 * cs) if region else len(data)
            off = pos % limit
            data[off] ^= x
            desc.append(f"flip byte {off}: ^{x:#04x}")
    return desc


mutation = st.one_of(
    st.tuples(st.just("field"), st.integers(0, 1 << 16), st.integers(0, 63), st.integers(0, (1 << 64) - 1)),
    st.tuples(st.just("flip"), st.booleans(), st.integers(0, 1 << 24), st.integers(1, 255)),
)


def _digest(d: Path) -> dict[str, str]:
    """Digests of every file in ``d``: the mutant and its backing file."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


def _bugs(res: dict) -> list[str]:
    return [f"{op}: {r['bug']}" for op, r in res.items() if "bug" in r]


@needs_qemu
@pytest.mark.parametrize("seed", SEEDS)
def test_mutated_qcow2_is_rejected_or_read_cleanly(seed, seeds, child, tmp_path):
    src = seeds[seed]
    base = bytes(src.read_bytes())
    fs = fields(base)
    # the unmutated seed must read cleanly (otherwise the fuzz would test nothing)
    work = tmp_path / src.name
    for extra in src.parent.iterdir():
        if extra != src:
            shutil.copy(extra, tmp_path / extra.name)
    work.write_bytes(base)
    res = child.run(work)
    assert res is not None and not _bugs(res) and all(r.get("rc", 0) == 0 for r in res.values()), res
    assert "ok" in res["api"], res

    @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
              phases=(Phase.explicit, Phase.generate, Phase.shrink),
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(st.lists(mutation, min_size=1, max_size=4))
    def check(muts):
        data = bytearray(base)
        desc = mutate(data, fs, muts)
        work.write_bytes(bytes(data))
        before = _digest(tmp_path)
        t0 = time.monotonic()
        res = child.run(work)
        took = time.monotonic() - t0
        repro = f"seed {seed} ({src}), mutations {desc}"
        assert res is not None, f"over {TIME_LIMIT}s: {repro}"
        new = [b for b in _bugs(res) if not any(re.search(p, b, re.DOTALL) for p in KNOWN_BUGS.values())]
        assert not new, f"{repro}\n" + "\n".join(new)
        assert _digest(tmp_path) == before, f"read-only operations changed the file: {repro}"
        assert took < TIME_LIMIT
        event(" ".join(f"{op}={'ok' if r.get('ok') or r.get('rc') == 0 else r.get('rc', 'err')}"
                       for op, r in sorted(res.items())))

    check()
