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
