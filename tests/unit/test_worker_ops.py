"""Worker byte ops as pure functions: zero detection and range arithmetic against naive models."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from ipc.ranges import subtract_sorted, touched_units
from workers.worker import find_nonzero_runs


def naive_runs(buf: bytes, gran: int) -> list[list[int]]:
    runs: list[list[int]] = []
    for off in range(0, len(buf), gran):
        block = buf[off:off + gran]
        if any(block):
            if runs and runs[-1][0] + runs[-1][1] == off:
                runs[-1][1] += len(block)
            else:
                runs.append([off, len(block)])
    return runs


blocks = st.lists(st.sampled_from(["zero", "data", "one"]), min_size=1, max_size=40)


@settings(max_examples=200, deadline=None)
@given(blocks, st.sampled_from([512, 4096]), st.integers(0, 4095), st.integers(0, 700))
def test_nonzero_runs_match_a_naive_scan(kinds, gran, tail, base):
    parts = []
    for k in kinds:
        if k == "zero":
            parts.append(bytes(gran))
        elif k == "one":  # a single non-zero byte somewhere in the block
            b = bytearray(gran)
            b[len(parts) * 37 % gran] = 1
            parts.append(bytes(b))
        else:
            parts.append(bytes([7]) * gran)
    data = b"".join(parts) + bytes([3]) * (tail % gran) if tail % 3 else b"".join(parts) + bytes(tail % gran)
    padded = bytes(base) + data
    assert find_nonzero_runs(padded, base, len(data), gran) == naive_runs(data, gran)


@given(st.lists(st.tuples(st.integers(0, 200), st.integers(1, 50)), max_size=8),
       st.lists(st.tuples(st.integers(0, 200), st.integers(1, 50)), max_size=8))
def test_subtract_sorted_matches_a_set_model(runs, holes):
    def norm(spans):
        covered = sorted({x for a, n in spans for x in range(a, a + n)})
        out = []
        for x in covered:
            if out and out[-1][0] + out[-1][1] == x:
                out[-1][1] += 1
            else:
                out.append([x, 1])
        return out

    r, h = norm(runs), norm(holes)
    want = {x for a, n in r for x in range(a, a + n)} - {x for a, n in h for x in range(a, a + n)}
    got = subtract_sorted(r, h)
    assert {x for a, n in got for x in range(a, a + n)} == want
    assert got == sorted(got)


def test_touched_units():
    assert touched_units([[0, 1], [4096, 1], [5000, 5000]], 0, 16384, 4096) == [0, 1, 2]
    assert touched_units([[100, 10]], 4096, 8192, 4096) == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 2), st.integers(0, 3), st.integers(0, 3), st.integers(1, 5)),
                max_size=12))
def test_coalesced_writes_write_the_same_bytes(spec):
    """Merging scatter writes that continue each other changes no byte of any file."""
    import itertools

    from ipc.ranges import coalesce_writes

    writes, host, slot = [], 0, 0
    for handle, hgap, sgap, n in spec:  # gaps of 0 on both sides make mergeable neighbours
        host, slot = host + hgap, slot + sgap
        writes.append([handle, host, slot, n])
        host, slot = host + n, slot + n

    def apply(ws):
        files: dict = {}
        for h, off, s_off, n in ws:
            for k in range(n):
                files[(h, off + k)] = s_off + k
        return files

    merged = coalesce_writes(writes)
    assert apply(merged) == apply(writes)
    assert len(merged) <= len(writes)
    assert all(not (a[0] == b[0] and a[1] + a[3] == b[1] and a[2] + a[3] == b[2])
               for a, b in itertools.pairwise(merged))


def test_consecutive_runs():
    from ipc.ranges import consecutive_runs

    assert consecutive_runs([]) == []
    assert consecutive_runs([3]) == [(3, 4)]
    assert consecutive_runs([0, 1, 2, 5, 6, 9]) == [(0, 3), (5, 7), (9, 10)]
