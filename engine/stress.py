"""``parablock stress``'s core: a verifying model of a disk under concurrent I/O, and the load generator
that drives any target (the in-process request pipeline or an NBD export) through it.

Layer: engine (imports ``ipc`` only; the CLI composes targets).  The model (``DiskModel``) is pure.

Semantics of the model, which make verification exact and never flaky:
- ``expected`` holds what every byte must read back as; ``unknown`` is the set of bytes whose content
  the model cannot predict.  At start the whole disk is read once (no I/O in flight) as the baseline.
- A write or write-zeroes that completes sets its range in ``expected`` and makes it known, except
  where it overlapped another write-type request whose lifetime (issue to reply) overlapped its own:
  that intersection is unknown (either request may have landed last) until a later write settles it.
- A discard makes its range unknown.  QEMU-true: discard is advisory (a node's ``discard=ignore``
  drops it, raw files punch holes only at the filesystem's granularity, qcow2 drops whole clusters
  only, and v2 images or backing files show older data), so nothing is promised about its content.
- A read checks only the bytes that are known at its completion and that no write-type request
  overlapping them was in flight at any time during the read; those bytes cannot have changed since
  the read was issued, so they must equal ``expected``.  Any difference is a mismatch.
- After the clients stop, a final pass reads the whole disk and checks every known byte.
"""
from __future__ import annotations

import asyncio
import bisect
import random
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

KINDS = ("read", "write", "zero", "discard", "flush")
WRITE_KINDS = ("write", "zero", "discard")
DEFAULT_MIX = {"read": 50, "write": 30, "zero": 10, "discard": 10}
CHUNK = 1 << 20


class StressError(Exception):
    """Bad stress options."""


class Mismatch(Exception):
    """A byte read back differs from the model."""

    def __init__(self, offset: int, expected: int, got: int, where: str, count: int) -> None:
        super().__init__(offset, expected, got, where, count)
        self.offset = offset
        self.expected = expected
        self.got = got
        self.where = where
        self.count = count

    def line(self) -> str:
        return (f"mismatch at offset {self.offset} (0x{self.offset:x}): expected 0x{self.expected:02x}, "
                f"got 0x{self.got:02x} ({self.where}; {self.count} differing byte(s) in that read)")

    def record(self) -> dict[str, Any]:
        return {"offset": self.offset, "expected": self.expected, "got": self.got, "where": self.where,
                "differing": self.count}


def parse_mix(text: str) -> dict[str, int]:
    """``read=50,write=30,zero=10,discard=10`` (kinds: read, write, zero, discard, flush; missing kinds
    get 0).  Raises StressError."""
    out = {k: 0 for k in KINDS}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        k, sep, v = part.partition("=")
        k = k.strip()
        if not sep or k not in out:
            raise StressError(f"invalid --mix entry '{part}' (use KIND=WEIGHT, KIND one of {', '.join(KINDS)})")
        try:
            out[k] = int(v)
        except ValueError:
            raise StressError(f"invalid --mix weight '{v}' for {k}") from None
        if out[k] < 0:
            raise StressError(f"invalid --mix weight '{v}' for {k}")
    if not sum(out.values()):
        raise StressError("--mix has no operation with a positive weight")
    return out


class RangeSet:
    """Sorted, disjoint, non-adjacent half-open ranges [a, b)."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []

    def add(self, a: int, b: int) -> None:
        if a >= b:
            return
        i = bisect.bisect_left(self.ends, a)          # first range ending at or after a
        j = bisect.bisect_right(self.starts, b)       # ranges [i, j) touch [a, b]
        if i < j:
            a = min(a, self.starts[i])
            b = max(b, self.ends[j - 1])
        self.starts[i:j] = [a]
        self.ends[i:j] = [b]

    def remove(self, a: int, b: int) -> None:
        if a >= b:
            return
        i = bisect.bisect_right(self.ends, a)
        j = bisect.bisect_left(self.starts, b)
        if i >= j:
            return
        new_s, new_e = [], []
        if self.starts[i] < a:
            new_s.append(self.starts[i])
            new_e.append(a)
        if self.ends[j - 1] > b:
            new_s.append(b)
            new_e.append(self.ends[j - 1])
        self.starts[i:j] = new_s
        self.ends[i:j] = new_e

    def overlapping(self, a: int, b: int) -> list[tuple[int, int]]:
        i = bisect.bisect_right(self.ends, a)
        out = []
        while i < len(self.starts) and self.starts[i] < b:
            out.append((max(a, self.starts[i]), min(b, self.ends[i])))
            i += 1
        return out

    def total(self) -> int:
        return sum(e - s for s, e in zip(self.starts, self.ends))


def _minus(a: int, b: int, holes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """[a, b) minus the (possibly overlapping, unsorted) holes."""
    out = []
    pos = a
    for s, e in sorted(holes):
        if e <= pos:
            continue
        if s > pos:
            out.append((pos, min(s, b)))
        pos = max(pos, e)
        if pos >= b:
            break
    if pos < b:
        out.append((pos, b))
    return [(s, e) for s, e in out if s < e]


@dataclass
class _Inflight:
    kind: str
    a: int
    b: int
    concurrent: list[tuple[int, int]] = field(default_factory=list)


class DiskModel:
    """The expected disk (see the module docstring).  Pure; tokens tie a request's begin and end."""

    def __init__(self, baseline: bytes | bytearray) -> None:
        self.expected = bytearray(baseline)
        self.unknown = RangeSet()
        self._inflight: dict[int, _Inflight] = {}
        self._next = 0
        self.verified = 0

    def _begin(self, kind: str, a: int, b: int) -> int:
        tok = self._next
        self._next += 1
        me = _Inflight(kind, a, b)
        for other in self._inflight.values():
            if other.kind in WRITE_KINDS and other.a < b and a < other.b:
                me.concurrent.append((max(a, other.a), min(b, other.b)))
            if kind in WRITE_KINDS and other.a < b and a < other.b:
                other.concurrent.append((max(a, other.a), min(b, other.b)))
        self._inflight[tok] = me
        return tok

    def begin_read(self, offset: int, length: int) -> int:
        return self._begin("read", offset, offset + length)

    def begin_write(self, kind: str, offset: int, length: int) -> int:
        assert kind in WRITE_KINDS
        return self._begin(kind, offset, offset + length)

    def end_write(self, tok: int, data: bytes | None, ok: bool = True) -> None:
        """``data`` is the written bytes (write), None for zero and discard; ``ok`` False when the
        request failed (its range becomes unknown)."""
        me = self._inflight.pop(tok)
        a, b = me.a, me.b
        if not ok or me.kind == "discard":
            self.unknown.add(a, b)
        else:
            self.expected[a:b] = data if me.kind == "write" else bytes(b - a)  # type: ignore[assignment]
            self.unknown.remove(a, b)
        for s, e in me.concurrent:
            self.unknown.add(s, e)

    def end_read(self, tok: int, data: bytes, where: str) -> int:
        """Check a completed read; returns the bytes verified.  Raises Mismatch."""
        me = self._inflight.pop(tok)
        return self.check(me.a, data, where, me.concurrent)

    def abandon(self, tok: int) -> None:
        self._inflight.pop(tok, None)

    def check(self, offset: int, data: bytes, where: str, skip: list[tuple[int, int]] | None = None) -> int:
        b = offset + len(data)
        holes = self.unknown.overlapping(offset, b) + (skip or [])
        n = 0
        for s, e in _minus(offset, b, holes):
            got = data[s - offset:e - offset]
            exp = self.expected[s:e]
            if got != exp:
                bad = [i for i in range(e - s) if got[i] != exp[i]]
                raise Mismatch(s + bad[0], exp[bad[0]], got[bad[0]], where, len(bad))
            n += e - s
        self.verified += n
        return n

    def known_offset(self, rnd: random.Random) -> int | None:
        """A random known byte (for the corruption self-test), or None when nothing is known."""
        for _ in range(1000):
            off = rnd.randrange(len(self.expected))
            if not self.unknown.overlapping(off, off + 1):
                return off
        return None


class Target(Protocol):
    """What the load generator drives.  Every method may raise the target's own errors."""

    def size(self) -> int: ...
    async def read(self, offset: int, length: int) -> bytes: ...
    async def write(self, offset: int, data: bytes) -> None: ...
    async def write_zeroes(self, offset: int, length: int) -> None: ...
    async def discard(self, offset: int, length: int) -> None: ...
    async def flush(self) -> None: ...


@dataclass(frozen=True, slots=True)
class StressConfig:
    count: int | None = None
    seconds: float | None = None
    clients: int = 8
    pattern: str = "random"
    mix: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_MIX))
    size_min: int = 512
    size_max: int = 65536
    align: int = 1
    seed: int = 0
    inject_corruption: bool = False
    #: an I/O error the target reports (an errno, e.g. injected by blkdebug) is counted and the client goes
    #: on; the range a failed write touched becomes unknown (connection failures still end the run)
    tolerate_errors: bool = False


@dataclass
class KindStats:
    ops: int = 0
    bytes: int = 0
    errors: int = 0
    lat_ns: list[int] = field(default_factory=list)


@dataclass
class StressReport:
    config: StressConfig
    size: int
    elapsed: float = 0.0
    stats: dict[str, KindStats] = field(default_factory=lambda: {k: KindStats() for k in KINDS})
    verified_in_run: int = 0
    verified_final: int = 0
    unknown_bytes: int = 0
    mismatch: Mismatch | None = None
    corrupted_at: int | None = None

    @property
    def verified(self) -> int:
        return self.verified_in_run + self.verified_final


def percentiles(lat_ns: list[int]) -> dict[str, float]:
    """p50/p90/p99/max in microseconds."""
    if not lat_ns:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0}
    v = sorted(lat_ns)

    def pick(q: float) -> float:
        return v[min(len(v) - 1, int(q * len(v)))] / 1000.0

    return {"p50": pick(0.50), "p90": pick(0.90), "p99": pick(0.99), "max": v[-1] / 1000.0}


def validate(cfg: StressConfig, size: int) -> None:
    """Raises StressError for options that cannot work on a disk of ``size`` bytes."""
    if cfg.clients < 1:
        raise StressError("-j must be at least 1")
    if cfg.count is not None and cfg.count < 0:
        raise StressError("-c must not be negative")
    if cfg.seconds is not None and cfg.seconds <= 0:
        raise StressError("-t must be positive")
    if cfg.pattern not in ("random", "sequential"):
        raise StressError(f"invalid --pattern '{cfg.pattern}' (random or sequential)")
    if cfg.align < 1:
        raise StressError("--align must be at least 1")
    if cfg.size_min < 1 or cfg.size_max < cfg.size_min:
        raise StressError("need 1 <= --size-min <= --size-max")
    if size < 1:
        raise StressError("the target is empty")
    if max(cfg.size_min, cfg.align) > size:
        raise StressError(f"--size-min/--align exceed the target size ({size} bytes)")


async def _read_all(target: Target, size: int) -> bytearray:
    out = bytearray()
    for off in range(0, size, CHUNK):
        out += await target.read(off, min(CHUNK, size - off))
    return out


async def run_stress(target: Target, cfg: StressConfig) -> StressReport:
    """Baseline read, ``cfg.clients`` concurrent clients until ``count`` ops or ``seconds`` elapse (or
    the first mismatch), then the final verification pass.  Errors of the target propagate."""
    size = target.size()
    validate(cfg, size)
    report = StressReport(cfg, size)
    model = DiskModel(await _read_all(target, size))
    weights = [cfg.mix.get(k, 0) for k in KINDS]
    count = cfg.count if cfg.count is not None else (None if cfg.seconds else 1000)
    deadline = time.monotonic() + cfg.seconds if cfg.seconds else None
    issued = 0
    stop = asyncio.Event()
    failure: list[BaseException] = []

    def length_for(rnd: random.Random) -> int:
        n = rnd.randint(cfg.size_min, cfg.size_max)
        if cfg.align > 1:
            n = max(cfg.align, n // cfg.align * cfg.align)
        return min(n, size // cfg.align * cfg.align if cfg.align > 1 else size)

    async def client(ci: int) -> None:
        nonlocal issued
        rnd = random.Random(cfg.seed * 1_000_003 + ci)
        cursor = size * ci // cfg.clients // cfg.align * cfg.align
        while not stop.is_set():
            if count is not None and issued >= count:
                return
            if deadline is not None and time.monotonic() >= deadline:
                return
            issued += 1
            kind = rnd.choices(KINDS, weights)[0]
            length = length_for(rnd)
            if cfg.pattern == "sequential":
                if cursor + length > size:
                    cursor = 0
                offset = cursor
                cursor += length
            else:
                offset = rnd.randrange(0, size - length + 1) // cfg.align * cfg.align
            where = f"client {ci} {kind} {offset}+{length}"
            st = report.stats[kind]
            t0 = time.monotonic_ns()
            try:
                await one(kind, offset, length, rnd, st, where, t0)
            except Exception as exc:
                if cfg.tolerate_errors and getattr(exc, "errno", 0) and not isinstance(exc, Mismatch):
                    st.errors += 1
                    continue
                raise
            if kind == "flush":
                length = 0
            if kind != "read":
                st.lat_ns.append(time.monotonic_ns() - t0)
            st.ops += 1
            st.bytes += length

    async def one(kind: str, offset: int, length: int, rnd: random.Random, st: KindStats, where: str,
                  t0: int) -> None:
        """Run one operation against the target and the model.  Raises the target's errors."""
        if kind == "flush":
            await target.flush()
        elif kind == "read":
            tok = model.begin_read(offset, length)
            try:
                data = await target.read(offset, length)
            except BaseException:
                model.abandon(tok)
                raise
            st.lat_ns.append(time.monotonic_ns() - t0)
            if len(data) != length:
                raise Mismatch(offset + min(len(data), length), 0, 0, where + ": short read", 1)
            report.verified_in_run += model.end_read(tok, data, where)
        else:
            payload = rnd.randbytes(length) if kind == "write" else None
            tok = model.begin_write(kind, offset, length)
            try:
                if kind == "write":
                    assert payload is not None
                    await target.write(offset, payload)
                elif kind == "zero":
                    await target.write_zeroes(offset, length)
                else:
                    await target.discard(offset, length)
            except BaseException:
                model.end_write(tok, None, ok=False)
                raise
            model.end_write(tok, payload)

    async def guarded(ci: int) -> None:
        try:
            await client(ci)
        except Exception as exc:  # noqa: BLE001 -- any target error: the first stops every client, the rest drain
            failure.append(exc)
            stop.set()

    t0 = time.perf_counter()
    await asyncio.gather(*(guarded(i) for i in range(cfg.clients)))
    report.elapsed = time.perf_counter() - t0
    for exc in failure:
        if isinstance(exc, Mismatch):
            report.mismatch = exc
            return report
    if failure:
        raise failure[0]
    if cfg.inject_corruption:  # self-test: change one known byte behind the model's back
        off = model.known_offset(random.Random(cfg.seed))
        if off is not None:
            old = await target.read(off, 1)
            await target.write(off, bytes([old[0] ^ 0xFF]))
            report.corrupted_at = off
    async def final_read(off: int, n: int) -> bytes:
        try:
            return await target.read(off, n)
        except Exception as exc:
            if cfg.tolerate_errors and getattr(exc, "errno", 0):  # an injected error: once more
                return await target.read(off, n)
            raise

    try:
        for off in range(0, size, CHUNK):
            n = min(CHUNK, size - off)
            report.verified_final += model.check(off, await final_read(off, n), f"final pass {off}+{n}")
    except Mismatch as exc:
        report.mismatch = exc
    report.verified_in_run = model.verified - report.verified_final
    report.unknown_bytes = model.unknown.total()
    return report


def report_json(report: StressReport) -> dict[str, Any]:
    cfg = report.config
    secs = report.elapsed or 1e-9
    ops: dict[str, Any] = {}
    all_lat: list[int] = []
    tot_ops = tot_bytes = 0
    for k, st in report.stats.items():
        if not st.ops and not cfg.mix.get(k):
            continue
        ops[k] = {"ops": st.ops, "bytes": st.bytes, "iops": st.ops / secs, "mb_per_s": st.bytes / secs / 1e6,
                  "latency_us": percentiles(st.lat_ns), "errors": st.errors}
        all_lat += st.lat_ns
        tot_ops += st.ops
        tot_bytes += st.bytes
    return {
        "size": report.size, "clients": cfg.clients, "pattern": cfg.pattern, "seed": cfg.seed,
        "mix": {k: v for k, v in cfg.mix.items() if v}, "size_min": cfg.size_min, "size_max": cfg.size_max,
        "align": cfg.align, "elapsed": report.elapsed, "operations": ops,
        "total": {"ops": tot_ops, "bytes": tot_bytes, "iops": tot_ops / secs, "mb_per_s": tot_bytes / secs / 1e6,
                  "latency_us": percentiles(all_lat)},
        "verified_bytes": report.verified, "verified_in_run": report.verified_in_run,
        "verified_final": report.verified_final, "unknown_bytes": report.unknown_bytes,
        "mismatch": report.mismatch.record() if report.mismatch else None,
    }


def report_human(report: StressReport) -> str:
    j = report_json(report)
    lines = [(f"stress: {j['clients']} clients, {j['pattern']} pattern, {j['total']['ops']} ops in "
              f"{j['elapsed']:.3f} s (seed {j['seed']}, sizes {j['size_min']}..{j['size_max']}, "
              f"align {j['align']})"),
             f"{'op':<8} {'ops':>8} {'IOPS':>9} {'MB/s':>8}   latency us: {'p50':>7} {'p90':>7} {'p99':>7} {'max':>8}"]
    for name, r in [*j["operations"].items(), ("total", j["total"])]:
        p = r["latency_us"]
        lines.append(f"{name:<8} {r['ops']:>8} {r['iops']:>9.0f} {r['mb_per_s']:>8.1f}               "
                     f"{p['p50']:>7.0f} {p['p90']:>7.0f} {p['p99']:>7.0f} {p['max']:>8.0f}")
    lines.append(f"verified {j['verified_bytes']} bytes ({j['verified_in_run']} during the run, "
                 f"{j['verified_final']} in the final pass; {j['unknown_bytes']} bytes unknown after "
                 f"discards and racing writes)")
    lines.append("mismatch: " + report.mismatch.line() if report.mismatch else "no mismatch")
    return "\n".join(lines)
