"""Byte-range arithmetic shared by the coordinator's plans and the workers' ops.

Layer: ipc (stdlib only, pure).  Runs are ``[offset, length]`` pairs.
"""
from __future__ import annotations


def subtract_sorted(runs: list, holes: list) -> list[list[int]]:
    """Sorted, disjoint runs minus sorted, disjoint holes, in one pass."""
    out: list[list[int]] = []
    j = 0
    for r, n in runs:
        a, b = r, r + n
        while j < len(holes) and holes[j][0] + holes[j][1] <= a:
            j += 1
        k = j
        while a < b and k < len(holes) and holes[k][0] < b:
            h, hn = holes[k]
            if h > a:
                out.append([a, h - a])
            a = max(a, h + hn)
            k += 1
        if a < b:
            out.append([a, b - a])
    return out


def touched_units(runs: list, start: int, end: int, unit: int) -> list[int]:
    """Indexes (relative to ``start``, in ``unit``s) of the units of [start, end) that some run touches."""
    out: list[int] = []
    for r, n in runs:
        a, b = max(r, start), min(r + n, end)
        if b <= a:
            continue
        first, last = (a - start) // unit, (b - 1 - start) // unit
        if out and out[-1] >= first:
            first = out[-1] + 1
        out.extend(range(first, last + 1))
    return out


def consecutive_runs(items: list[int]) -> list[tuple[int, int]]:
    """Sorted, distinct integers as ``(first, end)`` runs of consecutive values (``end`` exclusive)."""
    out: list[tuple[int, int]] = []
    for x in items:
        if out and out[-1][1] == x:
            out[-1] = (out[-1][0], x + 1)
        else:
            out.append((x, x + 1))
    return out


def coalesce_writes(writes: list) -> list:
    """Scatter writes ``[handle, host, slot_offset, n]`` with each one that continues the previous one on
    both sides (same handle, next host byte, next slot byte) merged into it: one pwrite instead of many
    (packed compressed clusters are laid out back to back in the slot and in the file)."""
    out: list = []
    for w in writes:
        if out:
            last = out[-1]
            if last[0] == w[0] and last[1] + last[3] == w[1] and last[2] + last[3] == w[2]:
                last[3] += w[3]
                continue
        out.append(list(w))
    return out
