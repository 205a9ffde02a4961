"""The refblock-slice search for free cluster runs gives the same answers as the driver's cluster-by-cluster
scan (the first run of n clusters with refcount 0 at or after the hint, and the first free cluster as the
new hint), for every byte-wide refcount width, missing refblocks and zero bytes straddling two entries."""
from __future__ import annotations

import random

import pytest

from engine.formats import qcow2_layout as L
from engine.formats.qcow2 import Qcow2Driver


class _Refcounts:
    """Just what the search reads: refblocks, the refcount table, widths and the hint."""

    _find_free_run_bytes = Qcow2Driver._find_free_run_bytes
    _find_free_run_scan = Qcow2Driver._find_free_run_scan
    _get_rc = Qcow2Driver._get_rc

    def __init__(self, rorder: int, epb: int, blocks: list[bytearray | None], hint: int) -> None:
        self.rorder, self.epb, self.free_hint = rorder, epb, hint
        self.rt = [(i + 1) * 4096 if b is not None else 0 for i, b in enumerate(blocks)]
        self.blocks = {(i + 1) * 4096: b for i, b in enumerate(blocks) if b is not None}

    def _refblock(self, off: int) -> bytearray:
        return self.blocks[off]


@pytest.mark.parametrize("rorder", [3, 4, 5, 6])
@pytest.mark.parametrize("seed", range(40))
def test_matches_cluster_by_cluster_scan(rorder, seed):
    rng = random.Random(seed * 10 + rorder)
    width = 1 << (rorder - 3)
    epb = rng.choice([16, 64, 256])
    blocks: list[bytearray | None] = []
    for _ in range(rng.randint(1, 6)):
        if rng.random() < 0.15:
            blocks.append(None)
            continue
        blk = bytearray(epb * width)
        density = rng.random()
        for i in range(epb):
            if rng.random() < density:
                # values whose bytes hold zeros (0x0100...) make zero runs that straddle entries
                v = rng.choice([1, 2, 1 << 8, (1 << (8 * width)) - 1, 1 << (8 * width - 8)])
                L.set_refcount(blk, i, min(v, (1 << (8 * width)) - 1), rorder)
        blocks.append(blk)
    nclusters = len(blocks) * epb
    for _ in range(20):
        hint = rng.randrange(0, nclusters + 1)
        n = rng.choice([1, 2, 3, epb // 2, epb, epb + 5, 2 * epb + 1])
        ref = _Refcounts(rorder, epb, blocks, hint)  # the cluster-by-cluster scan narrow widths use
        want_start = ref._find_free_run_scan(n)
        r = _Refcounts(rorder, epb, blocks, hint)
        assert r._find_free_run_bytes(n) == want_start
        assert r.free_hint == ref.free_hint
