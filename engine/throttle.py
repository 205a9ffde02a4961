"""QEMU's I/O throttling, exactly, as pure arithmetic: limits, leaky buckets, throttle groups, rate limits.

Layer: ``engine`` (pure).  Imports only the standard library and :mod:`engine.errors`.  No clock, no
timers, no asyncio: every operation that depends on time takes ``now_ns`` (integer nanoseconds) and
every "wait" is a returned number or deadline; the caller owns the clock and arms its own timers.

What is mirrored, and from where (QEMU 7.2):

* :class:`ThrottleConfig` is ``ThrottleConfig`` of include/qemu/throttle.h: six buckets in
  ``BucketType`` order (bps total/read/write, iops total/read/write), each with ``avg`` (units/s),
  ``max`` (burst rate, units/s) and ``burst_length`` (seconds, default 1), plus ``op_size``
  (``iops-size``).  :meth:`ThrottleConfig.validate` is ``throttle_is_valid`` (util/throttle.c) with its
  checks in its order and its message texts.  The option parsers follow ``throttle_limits_to_config``
  (util/throttle.c, the ``limits`` QOM property) and ``throttle_group_set`` (block/throttle-groups.c,
  the unstable ``x-*`` properties).
* :class:`LeakyBucket`, :func:`throttle_leak_bucket`, :func:`throttle_compute_wait` and
  :class:`ThrottleState` follow util/throttle.c line by line, in IEEE doubles exactly as the C code
  computes them (Python floats are C doubles; ``int()`` truncates like the C cast).
* :class:`ThrottleGroup` is block/throttle-groups.c (``throttle_group_co_io_limits_intercept``,
  ``next_throttle_token``, ``throttle_group_schedule_timer``, ``schedule_next_request``, ``timer_cb``)
  turned inside out: instead of coroutines sleeping on queues and per-member QEMU timers, the group
  keeps the queues and one deadline per direction and tells the caller what may run and when to call
  back.
* :class:`RateLimiter` is include/qemu/ratelimit.h (block-job ``speed``).

Invariants:

* A request is never split; the first request after an idle period always passes (level 0 never
  exceeds the bucket size).
* Bucket levels are never negative; a bucket with ``avg == 0`` never delays anything.
* In a :class:`ThrottleGroup`, for each direction: some member has a queued request  =>  that direction
  has an armed deadline.  Requests of one member leave in FIFO order; members with queued requests are
  served round-robin, so no member starves the others.
* Everything accounted by a bucket with rate ``avg`` and size ``B`` over ``[0, t]`` is at most
  ``avg * t + B + (one request per direction that feeds the bucket)`` (see
  tests/property/test_throttle_props.py for the derivation).
"""
from __future__ import annotations

import enum
from collections import deque
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

from engine.errors import InvalidArgument

NANOSECONDS_PER_SECOND = 1_000_000_000
THROTTLE_VALUE_MAX = 1_000_000_000_000_000  # include/qemu/throttle.h
UINT_MAX = 0xFFFF_FFFF
_U64 = (1 << 64) - 1
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1

#: block-job rate-limit slice (BLOCK_JOB_SLICE_TIME in include/block/blockjob_int.h): 100 ms.
BLOCK_JOB_SLICE_TIME_NS = 100_000_000


class BucketType(enum.IntEnum):
    """QEMU's ``BucketType`` (include/qemu/throttle.h); the order matters (validation walks it)."""

    BPS_TOTAL = 0
    BPS_READ = 1
    BPS_WRITE = 2
    OPS_TOTAL = 3
    OPS_READ = 4
    OPS_WRITE = 5


# throttle_compute_wait_for(): the buckets checked for a read [0] and for a write [1].
_TO_CHECK = (
    (BucketType.BPS_TOTAL, BucketType.OPS_TOTAL, BucketType.BPS_READ, BucketType.OPS_READ),
    (BucketType.BPS_TOTAL, BucketType.OPS_TOTAL, BucketType.BPS_WRITE, BucketType.OPS_WRITE),
)
# throttle_account(): byte buckets and unit buckets fed by a read [0] / a write [1].
_SIZE_BUCKETS = ((BucketType.BPS_TOTAL, BucketType.BPS_READ), (BucketType.BPS_TOTAL, BucketType.BPS_WRITE))
_UNIT_BUCKETS = ((BucketType.OPS_TOTAL, BucketType.OPS_READ), (BucketType.OPS_TOTAL, BucketType.OPS_WRITE))

# ThrottleLimits member names (qapi/block-core.json) in QAPI / throttle-groups.c properties[] order:
# name -> (bucket, field) ; field is "avg", "max", "burst_length" or "op_size".
_LIMIT_FIELDS: dict[str, tuple[BucketType | None, str]] = {}
for _prefix, _bt in (
    ("iops-total", BucketType.OPS_TOTAL),
    ("iops-read", BucketType.OPS_READ),
    ("iops-write", BucketType.OPS_WRITE),
    ("bps-total", BucketType.BPS_TOTAL),
    ("bps-read", BucketType.BPS_READ),
    ("bps-write", BucketType.BPS_WRITE),
):
    _LIMIT_FIELDS[_prefix] = (_bt, "avg")
    _LIMIT_FIELDS[_prefix + "-max"] = (_bt, "max")
    _LIMIT_FIELDS[_prefix + "-max-length"] = (_bt, "burst_length")
_LIMIT_FIELDS["iops-size"] = (None, "op_size")
del _prefix, _bt

#: The 19 ThrottleLimits keys, in QAPI order (what ``qom-get limits`` returns).
LIMIT_NAMES: tuple[str, ...] = tuple(_LIMIT_FIELDS)

# block_set_io_throttle (BlockIOThrottle) argument names -> ThrottleLimits names (blockdev.c).
_IO_THROTTLE_REQUIRED = {
    "bps": "bps-total",
    "bps_rd": "bps-read",
    "bps_wr": "bps-write",
    "iops": "iops-total",
    "iops_rd": "iops-read",
    "iops_wr": "iops-write",
}
_IO_THROTTLE_OPTIONAL = {
    **{k + "_max": v + "-max" for k, v in _IO_THROTTLE_REQUIRED.items()},
    **{k + "_max_length": v + "-max-length" for k, v in _IO_THROTTLE_REQUIRED.items()},
    "iops_size": "iops-size",
}


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BucketLimits:
    """The configured part of one QEMU ``LeakyBucket``: ``avg`` and ``max`` in units per second,
    ``burst_length`` in seconds.  Values are QEMU's ``uint64_t`` (the parsers wrap negatives the way C
    does, so that :meth:`ThrottleConfig.validate` reports them like QEMU)."""

    avg: int = 0
    max: int = 0
    burst_length: int = 1


_NO_LIMITS = (BucketLimits(),) * len(BucketType)


def _int_value(name: str, value: Any) -> int:
    """Coerce one option value the way QEMU's QAPI input visitors do (JSON int, or keyval string).

    Raises InvalidArgument: "Invalid parameter type for 'NAME', expected: integer" (JSON value of the
    wrong type, or outside int64) or "Parameter 'NAME' expects integer" (unparsable keyval string).
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise InvalidArgument(f"Invalid parameter type for '{name}', expected: integer")
    if isinstance(value, int):
        if not _INT64_MIN <= value <= _INT64_MAX:
            raise InvalidArgument(f"Invalid parameter type for '{name}', expected: integer")
        return value
    # qemu_strtoi64(str, NULL, 0, ...): optional sign, then 0x hex, leading-0 octal or decimal.
    text = value.strip()
    sign = 1
    if text[:1] in ("+", "-"):
        sign = -1 if text[0] == "-" else 1
        text = text[1:]
    try:
        if text[:2].lower() == "0x":
            number = int(text[2:], 16)
        elif len(text) > 1 and text[0] == "0":
            number = int(text[1:], 8)
        else:
            number = int(text, 10)
        if not text.isascii() or "_" in text:
            raise ValueError(text)
    except ValueError:
        raise InvalidArgument(f"Parameter '{name}' expects integer") from None
    number *= sign
    if not _INT64_MIN <= number <= _INT64_MAX:
        raise InvalidArgument(f"Parameter '{name}' expects integer")
    return number


@dataclass(frozen=True, slots=True)
class ThrottleConfig:
    """QEMU's ``ThrottleConfig``: six :class:`BucketLimits` in :class:`BucketType` order plus
    ``op_size`` (``iops-size``; 0 = every request is one operation).  The default is "no limits"."""

    buckets: tuple[BucketLimits, ...] = _NO_LIMITS
    op_size: int = 0

    def __post_init__(self) -> None:
        if len(self.buckets) != len(BucketType):
            raise InvalidArgument(f"a throttle config has {len(BucketType)} buckets, not {len(self.buckets)}")

    # -- access -------------------------------------------------------------------------------------

    def bucket(self, which: BucketType) -> BucketLimits:
        return self.buckets[which]

    def enabled(self) -> bool:
        """``throttle_enabled``: any bucket has an average limit."""
        return any(b.avg > 0 for b in self.buckets)

    def _replace_field(self, bucket: BucketType | None, fld: str, value: int) -> ThrottleConfig:
        if bucket is None:
            return ThrottleConfig(self.buckets, value)
        old = self.buckets[bucket]
        new = BucketLimits(
            value if fld == "avg" else old.avg,
            value if fld == "max" else old.max,
            value if fld == "burst_length" else old.burst_length,
        )
        buckets = list(self.buckets)
        buckets[bucket] = new
        return ThrottleConfig(tuple(buckets), self.op_size)

    # -- validation -----------------------------------------------------------------------------------

    def validate(self) -> None:
        """``throttle_is_valid`` (util/throttle.c): the same checks, in the same order, same texts.

        Raises InvalidArgument with one of:
        "bps/iops/max total values and read/write values cannot be used at the same time",
        "iops size requires an iops value to be set",
        "bps/iops/max values must be within [0, 1000000000000000]",
        "the burst length cannot be 0", "burst length set without burst rate",
        "burst length too high for this burst rate",
        "bps_max/iops_max require corresponding bps/iops values",
        "bps_max/iops_max cannot be lower than bps/iops".
        """
        b = [BucketLimits(x.avg & _U64, x.max & _U64, x.burst_length & _U64) for x in self.buckets]
        bt = BucketType
        bps_flag = b[bt.BPS_TOTAL].avg and (b[bt.BPS_READ].avg or b[bt.BPS_WRITE].avg)
        ops_flag = b[bt.OPS_TOTAL].avg and (b[bt.OPS_READ].avg or b[bt.OPS_WRITE].avg)
        bps_max_flag = b[bt.BPS_TOTAL].max and (b[bt.BPS_READ].max or b[bt.BPS_WRITE].max)
        ops_max_flag = b[bt.OPS_TOTAL].max and (b[bt.OPS_READ].max or b[bt.OPS_WRITE].max)
        if bps_flag or ops_flag or bps_max_flag or ops_max_flag:
            raise InvalidArgument(
                "bps/iops/max total values and read/write values cannot be used at the same time"
            )
        if (self.op_size & _U64) and not (b[bt.OPS_TOTAL].avg or b[bt.OPS_READ].avg or b[bt.OPS_WRITE].avg):
            raise InvalidArgument("iops size requires an iops value to be set")
        for bkt in b:
            if bkt.avg > THROTTLE_VALUE_MAX or bkt.max > THROTTLE_VALUE_MAX:
                raise InvalidArgument(f"bps/iops/max values must be within [0, {THROTTLE_VALUE_MAX}]")
            if not bkt.burst_length:
                raise InvalidArgument("the burst length cannot be 0")
            if bkt.burst_length > 1 and not bkt.max:
                raise InvalidArgument("burst length set without burst rate")
            if bkt.max and bkt.burst_length > THROTTLE_VALUE_MAX // bkt.max:
                raise InvalidArgument("burst length too high for this burst rate")
            if bkt.max and not bkt.avg:
                raise InvalidArgument("bps_max/iops_max require corresponding bps/iops values")
            if bkt.max and bkt.max < bkt.avg:
                raise InvalidArgument("bps_max/iops_max cannot be lower than bps/iops")

    # -- wire forms -----------------------------------------------------------------------------------

    def to_limits(self) -> dict[str, int]:
        """``throttle_config_to_limits``: all 19 ThrottleLimits keys (what ``qom-get limits`` shows)."""
        out: dict[str, int] = {}
        for name, (bucket, fld) in _LIMIT_FIELDS.items():
            out[name] = self.op_size if bucket is None else getattr(self.buckets[bucket], fld)
        return out

    def with_limits(self, limits: Mapping[str, Any], prefix: str = "") -> ThrottleConfig:
        """``throttle_limits_to_config`` then ``throttle_is_valid``: merge a ThrottleLimits dict into
        this config (absent keys keep their value, as ``qom-set limits`` does) and validate the result.

        ``prefix`` only decorates names in type errors (``"limits."`` for the QOM property).
        Raises InvalidArgument: "Parameter 'limits.X' is unexpected" for an unknown key, the type errors
        of :func:`_int_value`, "bps-total-max-length value must be in the range [0, 4294967295]" (and
        the same for the other five ``*-max-length``), and every :meth:`validate` message.
        """
        cfg = self
        for name, raw in limits.items():
            if name not in _LIMIT_FIELDS:
                raise InvalidArgument(f"Parameter '{prefix}{name}' is unexpected")
            value = _int_value(prefix + name, raw)
            bucket, fld = _LIMIT_FIELDS[name]
            if fld == "burst_length" and value > UINT_MAX:  # signed compare, as in C
                raise InvalidArgument(f"{name} value must be in the range [0, {UINT_MAX}]")
            cfg = cfg._replace_field(bucket, fld, value & _U64)  # int64 -> uint64 like the C assignment
        cfg.validate()
        return cfg

    @classmethod
    def from_limits(cls, limits: Mapping[str, Any], base: ThrottleConfig | None = None) -> ThrottleConfig:
        """A validated config from a ThrottleLimits dict (``object-add ... limits: {...}``)."""
        return (base or cls()).with_limits(limits, prefix="limits.")

    @classmethod
    def from_options(cls, opts: Mapping[str, Any], base: ThrottleConfig | None = None) -> ThrottleConfig:
        """A validated config from ``throttle-group`` object options, in any of QEMU's spellings.

        Accepted keys: ``limits`` (a ThrottleLimits dict), ``limits.<name>`` (flattened, as the
        ``--object`` command line writes it), ``x-<name>`` (the unstable top-level properties),
        ``throttling.<name>`` (legacy ``-drive``) and plain ``<name>`` (``bps-total``,
        ``bps-total-max``, ``bps-total-max-length``, ..., ``iops-size``).  ``id`` and ``qom-type`` are
        ignored.  ``x-*`` values go through ``throttle_group_set`` (block/throttle-groups.c) and are
        applied first; everything else is merged through :meth:`with_limits`; the result is validated
        once, as ``throttle_group_obj_complete`` does.

        Raises InvalidArgument: "Property 'throttle-group.X' not found" for an unknown key,
        "Property values cannot be negative" and "x-…-max-length value must be in therange [0,
        4294967295]" (QEMU's text, missing space included) for ``x-*`` values, and everything
        :meth:`with_limits` raises.
        """
        cfg = base or cls()
        limits: dict[str, Any] = {}
        for key, raw in opts.items():
            if key in ("id", "qom-type"):
                continue
            if key == "limits":
                if not isinstance(raw, Mapping):
                    raise InvalidArgument("Invalid parameter type for 'limits', expected: object")
                limits.update(raw)
            elif key.startswith("x-") and key[2:] in _LIMIT_FIELDS:
                value = _int_value(key, raw)
                if value < 0:
                    raise InvalidArgument("Property values cannot be negative")
                bucket, fld = _LIMIT_FIELDS[key[2:]]
                if fld == "burst_length" and value > UINT_MAX:
                    raise InvalidArgument(f"{key} value must be in therange [0, {UINT_MAX}]")
                cfg = cfg._replace_field(bucket, fld, value)
            elif key.startswith("limits.") and key[7:] in _LIMIT_FIELDS:
                limits[key[7:]] = raw
            elif key.startswith("throttling.") and key[11:] in _LIMIT_FIELDS:
                limits[key[11:]] = raw
            elif key in _LIMIT_FIELDS:
                limits[key] = raw
            else:
                raise InvalidArgument(f"Property 'throttle-group.{key}' not found")
        return cfg.with_limits(limits, prefix="limits.")

    @classmethod
    def from_io_throttle(cls, args: Mapping[str, Any]) -> ThrottleConfig:
        """A validated config from ``block_set_io_throttle`` arguments (blockdev.c): ``bps``, ``bps_rd``,
        ``bps_wr``, ``iops``, ``iops_rd``, ``iops_wr`` required; ``*_max``, ``*_max_length`` (default 1)
        and ``iops_size`` optional; ``device``/``id``/``group`` are the caller's business.

        Raises InvalidArgument: "Parameter 'bps' is missing" (etc.), type errors, :meth:`validate`'s.
        """
        cfg = cls()
        for key, name in _IO_THROTTLE_REQUIRED.items():
            if key not in args:
                raise InvalidArgument(f"Parameter '{key}' is missing")
            bucket, fld = _LIMIT_FIELDS[name]
            cfg = cfg._replace_field(bucket, fld, _int_value(key, args[key]) & _U64)
        for key, name in _IO_THROTTLE_OPTIONAL.items():
            if key in args:
                bucket, fld = _LIMIT_FIELDS[name]
                cfg = cfg._replace_field(bucket, fld, _int_value(key, args[key]) & _U64)
        cfg.validate()
        return cfg


# --------------------------------------------------------------------------------------------------
# Leaky buckets (util/throttle.c)
# --------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class LeakyBucket:
    """QEMU's ``LeakyBucket``: configured ``avg``/``max``/``burst_length`` and the mutable levels.

    ``level`` leaks at ``avg`` units/s; its size is ``max * burst_length`` (or ``avg / 10`` when no
    burst rate is set).  ``burst_level`` (used only when ``burst_length > 1``) leaks at ``max`` units/s
    and is sized ``max / 10``: it caps the rate during a burst.
    """

    avg: int = 0
    max: int = 0
    level: float = 0.0
    burst_level: float = 0.0
    burst_length: int = 1

    def bucket_size(self) -> float:
        """Units that may be done before throttling to ``avg`` (the first branch of compute_wait)."""
        return self.avg / 10 if not self.max else float(self.max * self.burst_length)


def throttle_leak_bucket(bkt: LeakyBucket, delta_ns: int) -> None:
    """``throttle_leak_bucket``: leak ``avg * delta`` from ``level`` (and ``max * delta`` from
    ``burst_level`` when bursts last more than one second); levels never go below 0."""
    leak = (bkt.avg * float(delta_ns)) / NANOSECONDS_PER_SECOND
    bkt.level = max(bkt.level - leak, 0.0)
    if bkt.burst_length > 1:
        leak = (bkt.max * float(delta_ns)) / NANOSECONDS_PER_SECOND
        bkt.burst_level = max(bkt.burst_level - leak, 0.0)


def _do_compute_wait(limit: float, extra: float) -> int:
    """``throttle_do_compute_wait``: ``extra`` units at ``limit`` units/s, in ns, truncated."""
    wait = extra * NANOSECONDS_PER_SECOND
    wait /= limit
    return int(wait)


def throttle_compute_wait(bkt: LeakyBucket) -> int:
    """``throttle_compute_wait``: ns to wait before the next I/O on this bucket, 0 if it may go now.

    ``extra = level - bucket_size`` where ``bucket_size = max * burst_length`` (or ``avg / 10`` when
    ``max`` is 0); if positive, wait ``extra / avg`` seconds.  Otherwise, with ``burst_length > 1``,
    ``extra = burst_level - max / 10``; if positive, wait ``extra / max`` seconds.
    """
    if not bkt.avg:
        return 0
    if not bkt.max:
        bucket_size = bkt.avg / 10
        burst_bucket_size = 0.0
    else:
        bucket_size = float(bkt.max * bkt.burst_length)
        burst_bucket_size = bkt.max / 10
    extra = bkt.level - bucket_size
    if extra > 0:
        return _do_compute_wait(float(bkt.avg), extra)
    if bkt.burst_length > 1:
        extra = bkt.burst_level - burst_bucket_size
        if extra > 0:
            return _do_compute_wait(float(bkt.max), extra)
    return 0


def account_units(op_size: int, nbytes: int) -> float:
    """Operations one request of ``nbytes`` counts as (``throttle_account``): 1, or ``nbytes /
    op_size`` (a fraction, not rounded) when ``iops-size`` is set and the request is larger."""
    if op_size and nbytes > op_size:
        return nbytes / op_size
    return 1.0


class ThrottleState:
    """QEMU's ``ThrottleState``: the six live buckets and the time of the last leak.

    Usage per request (what ``throttle_group_co_io_limits_intercept`` does): ``wait =
    schedule_timer(is_write, now_ns)``; if 0 the request may run now, so ``account(is_write, nbytes)``
    it; otherwise retry at ``now_ns + wait``.
    """

    __slots__ = ("_config", "buckets", "previous_leak")

    def __init__(self, config: ThrottleConfig | None = None, now_ns: int = 0) -> None:
        self._config = ThrottleConfig()
        self.buckets: list[LeakyBucket] = []
        self.previous_leak = now_ns
        self.configure(config or ThrottleConfig(), now_ns)

    @property
    def config(self) -> ThrottleConfig:
        return self._config

    def configure(self, config: ThrottleConfig, now_ns: int) -> None:
        """``throttle_config``: install a (validated) config, zero every level, restart leaking at now.

        Raises InvalidArgument (see :meth:`ThrottleConfig.validate`).
        """
        config.validate()
        self._config = config
        self.buckets = [LeakyBucket(b.avg, b.max, 0.0, 0.0, b.burst_length) for b in config.buckets]
        self.previous_leak = now_ns

    def leak(self, now_ns: int) -> None:
        """``throttle_do_leak``: leak every bucket for the time since the last leak (never backwards)."""
        delta_ns = now_ns - self.previous_leak
        self.previous_leak = now_ns
        if delta_ns <= 0:
            return
        for bkt in self.buckets:
            throttle_leak_bucket(bkt, delta_ns)

    def compute_wait_for(self, is_write: bool) -> int:
        """``throttle_compute_wait_for``: the longest wait among total, ops-total and the direction's
        own buckets, at the current levels (no leak)."""
        return max(throttle_compute_wait(self.buckets[i]) for i in _TO_CHECK[is_write])

    def schedule_timer(self, is_write: bool, now_ns: int) -> int:
        """Leak up to ``now_ns`` and return the ns to wait before the next I/O of that direction; 0 means
        it may proceed now (``throttle_compute_timer`` / ``throttle_schedule_timer`` minus the timer)."""
        self.leak(now_ns)
        return self.compute_wait_for(is_write)

    def compute_timer(self, is_write: bool, now_ns: int) -> int | None:
        """``throttle_compute_timer``: the deadline to arm, or None when no wait is needed."""
        wait = self.schedule_timer(is_write, now_ns)
        return now_ns + wait if wait else None

    def account(self, is_write: bool, nbytes: int, now_ns: int | None = None) -> None:
        """``throttle_account``: add ``nbytes`` to the byte buckets and its operation count (see
        :func:`account_units`) to the ops buckets of total and of the direction.

        Like QEMU, accounting does not leak: the buckets were leaked by the :meth:`schedule_timer` that
        admitted the request.  Pass ``now_ns`` to leak up to it first (only different from QEMU when a
        bucket would have run dry since the last leak).
        """
        if nbytes < 0:
            raise InvalidArgument(f"cannot account a request of {nbytes} bytes")
        if now_ns is not None:
            self.leak(now_ns)
        units = account_units(self._config.op_size, nbytes)
        for i in range(2):
            bkt = self.buckets[_SIZE_BUCKETS[is_write][i]]
            bkt.level += nbytes
            if bkt.burst_length > 1:
                bkt.burst_level += nbytes
            bkt = self.buckets[_UNIT_BUCKETS[is_write][i]]
            bkt.level += units
            if bkt.burst_length > 1:
                bkt.burst_level += units


# --------------------------------------------------------------------------------------------------
# Throttle groups (block/throttle-groups.c)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Admission:
    """Answer to :meth:`ThrottleGroup.submit`.

    ``run_now``: the request was accounted and may be issued immediately.  Otherwise it is queued under
    ``token``, and the caller must call :meth:`ThrottleGroup.next_ready` at ``timer_ns`` (the group's
    earliest deadline) or later.
    """

    run_now: bool
    token: Hashable
    timer_ns: int | None


@dataclass(frozen=True, slots=True)
class Dispatch:
    """A queued request that may run now (already accounted): ``member``'s request ``token``."""

    member: str
    token: Hashable
    is_write: bool
    nbytes: int


@dataclass(frozen=True, slots=True)
class NextReady:
    """Answer to :meth:`ThrottleGroup.next_ready`: ``ready`` is a request to issue now (or None);
    ``timer_ns`` is when to call again (None: nothing is queued)."""

    ready: Dispatch | None
    timer_ns: int | None


@dataclass(slots=True)
class _Member:
    name: str
    queues: tuple[deque[tuple[Hashable, int]], deque[tuple[Hashable, int]]] = field(
        default_factory=lambda: (deque(), deque())
    )


class ThrottleGroup:
    """A throttle group: one :class:`ThrottleState` shared by its members (throttle nodes / devices).

    Per direction (read, write) the group keeps QEMU's ``tokens[dir]`` (the member whose turn it is)
    and one armed deadline (QEMU's ``any_timer_armed[dir]`` plus that member's timer).  While a deadline
    is armed every new request of that direction queues; when it expires the token member's oldest
    request runs *without* being re-checked (it was admitted when the deadline was computed), is
    accounted, and the next member in round-robin order that has queued requests gets the next deadline.

    Members are kept in QEMU's list order: ``register`` inserts at the head (``QLIST_INSERT_HEAD``), and
    the round-robin goes from a member to the next one in that list, wrapping around.

    Differences from QEMU, all invisible to throughput: a request QEMU would restart "immediately"
    (``timer_mod(now)`` or waking the current member's queue) is represented as a deadline of ``now``
    that :meth:`next_ready` hands out; a config change fires the armed deadlines at once (QEMU's
    ``throttle_group_restart_tgm``); members cannot have I/O limits disabled for draining.
    """

    __slots__ = ("name", "state", "_members", "_tokens", "_armed", "_next_token")

    def __init__(self, name: str, config: ThrottleConfig | None = None, now_ns: int = 0) -> None:
        self.name = name
        self.state = ThrottleState(config, now_ns)
        self._members: list[_Member] = []
        self._tokens: list[_Member | None] = [None, None]
        self._armed: list[tuple[_Member, int] | None] = [None, None]
        self._next_token = 0

    # -- configuration ---------------------------------------------------------------------------------

    @property
    def config(self) -> ThrottleConfig:
        return self.state.config

    def limits(self) -> dict[str, int]:
        """``qom-get <group> limits``."""
        return self.state.config.to_limits()

    def set_config(self, config: ThrottleConfig, now_ns: int) -> None:
        """``throttle_group_config``: install ``config`` (levels reset to 0) and let armed deadlines
        fire now so queued requests are re-judged under the new limits.  Raises InvalidArgument."""
        self.state.configure(config, now_ns)
        for d in (0, 1):
            armed = self._armed[d]
            if armed is not None:
                self._armed[d] = (armed[0], min(armed[1], now_ns))

    def set_limits(self, limits: Mapping[str, Any], now_ns: int) -> None:
        """``qom-set <group> limits {...}``: merge into the current limits, validate, install."""
        self.set_config(self.state.config.with_limits(limits, prefix="limits."), now_ns)

    # -- membership ------------------------------------------------------------------------------------

    @property
    def members(self) -> tuple[str, ...]:
        """Member names in round-robin (QEMU list) order."""
        return tuple(m.name for m in self._members)

    def _member(self, name: str) -> _Member:
        for m in self._members:
            if m.name == name:
                return m
        raise InvalidArgument(f"'{name}' is not a member of throttle group '{self.name}'")

    def register(self, name: str) -> None:
        """``throttle_group_register_tgm``.  Raises InvalidArgument if ``name`` is already a member."""
        if any(m.name == name for m in self._members):
            raise InvalidArgument(f"'{name}' is already a member of throttle group '{self.name}'")
        m = _Member(name)
        for d in (0, 1):
            if self._tokens[d] is None:
                self._tokens[d] = m
        self._members.insert(0, m)

    def unregister(self, name: str) -> None:
        """``throttle_group_unregister_tgm``: the member must have no queued request (drain first).

        Raises InvalidArgument if it is not a member or still has queued requests.
        """
        m = self._member(name)
        if m.queues[0] or m.queues[1]:
            raise InvalidArgument(f"throttle group member '{name}' still has queued requests")
        for d in (0, 1):
            if self._tokens[d] is m:
                nxt = self._next_member(m)
                self._tokens[d] = None if nxt is m else nxt
        self._members.remove(m)

    def queued(self, name: str | None = None) -> int:
        """Queued requests of one member (or of the whole group)."""
        members = self._members if name is None else [self._member(name)]
        return sum(len(m.queues[0]) + len(m.queues[1]) for m in members)

    # -- the round robin -------------------------------------------------------------------------------

    def _next_member(self, m: _Member) -> _Member:
        """``throttle_group_next_tgm``: the next member in list order, wrapping around."""
        i = self._members.index(m)
        return self._members[(i + 1) % len(self._members)]

    def _next_throttle_token(self, m: _Member, d: int) -> _Member:
        """``next_throttle_token``: the next member after the current token that has queued requests
        of direction ``d`` (the token itself last), or ``m`` if none has."""
        start = self._tokens[d] or m
        token = self._next_member(start)
        while token is not start and not token.queues[d]:
            token = self._next_member(token)
        if token is start and not token.queues[d]:
            token = m
        return token

    def _schedule_timer(self, m: _Member, d: int, now_ns: int) -> bool:
        """``throttle_group_schedule_timer``: must ``m``'s next request of ``d`` wait?  Arms the group's
        deadline for ``m`` (and makes it the token) when it must."""
        if self._armed[d] is not None:
            return True
        wait = self.state.schedule_timer(bool(d), now_ns)
        if wait:
            self._tokens[d] = m
            self._armed[d] = (m, now_ns + wait)
            return True
        return False

    def _schedule_next_request(self, m: _Member, d: int, now_ns: int) -> None:
        """``schedule_next_request``: after ``m`` ran a request of ``d``, pick who goes next."""
        token = self._next_throttle_token(m, d)
        if not token.queues[d]:
            return
        if not self._schedule_timer(token, d, now_ns):
            # No wait needed: QEMU gives preference to the current member's queue, else restarts the
            # token's queue at once; either way the request runs now.
            chosen = m if m.queues[d] else token
            self._armed[d] = (chosen, now_ns)
            self._tokens[d] = chosen

    def _timer_ns(self) -> int | None:
        deadlines = [a[1] for a in self._armed if a is not None]
        return min(deadlines) if deadlines else None

    # -- the request path ------------------------------------------------------------------------------

    def submit(
        self, member: str, is_write: bool, nbytes: int, now_ns: int, token: Hashable | None = None
    ) -> Admission:
        """``throttle_group_co_io_limits_intercept``: may this request run now?

        If yes it is accounted and ``run_now`` is True.  If not it is queued behind the member's other
        requests of that direction and will come out of :meth:`next_ready`.  ``token`` identifies the
        request to the caller (a fresh integer when omitted).  Raises InvalidArgument for an unknown
        member or a negative size.
        """
        if nbytes < 0:
            raise InvalidArgument(f"cannot throttle a request of {nbytes} bytes")
        m = self._member(member)
        d = int(bool(is_write))
        if token is None:
            token = self._next_token
            self._next_token += 1
        tok_member = self._next_throttle_token(m, d)
        must_wait = self._schedule_timer(tok_member, d, now_ns)
        if must_wait or m.queues[d]:
            m.queues[d].append((token, nbytes))
            return Admission(False, token, self._timer_ns())
        self.state.account(bool(d), nbytes)
        self._schedule_next_request(m, d, now_ns)
        return Admission(True, token, self._timer_ns())

    def next_ready(self, now_ns: int) -> NextReady:
        """The timer callback (``timer_cb`` + ``throttle_group_restart_queue``): if a direction's
        deadline has passed, its token member's oldest queued request runs (accounted here) and the
        next deadline is armed round-robin.  Call repeatedly until ``ready`` is None; then call again
        at ``timer_ns``."""
        while True:
            due = [
                (a[1], d) for d, a in enumerate(self._armed) if a is not None and a[1] <= now_ns
            ]
            if not due:
                return NextReady(None, self._timer_ns())
            _, d = min(due)
            armed = self._armed[d]
            assert armed is not None
            m = armed[0]
            self._armed[d] = None
            if not m.queues[d]:
                # QEMU: empty queue -> just schedule the next request.
                self._schedule_next_request(m, d, now_ns)
                continue
            token, nbytes = m.queues[d].popleft()
            self.state.account(bool(d), nbytes)
            self._schedule_next_request(m, d, now_ns)
            return NextReady(Dispatch(m.name, token, bool(d), nbytes), self._timer_ns())


# --------------------------------------------------------------------------------------------------
# Block-job rate limit (include/qemu/ratelimit.h)
# --------------------------------------------------------------------------------------------------


class RateLimiter:
    """QEMU's ``RateLimit``: a slice-based limiter for block-job ``speed`` (bytes per second).

    A job reports the bytes it processed with ``calculate_delay(n, now_ns)`` and sleeps for the
    returned delay (QEMU 7.2's ``block_job_ratelimit_sleep`` then polls with ``n = 0`` until the delay
    is 0).  Speed 0 means unlimited.
    """

    __slots__ = ("slice_start_time", "slice_end_time", "slice_quota", "slice_ns", "dispatched")

    def __init__(self, bytes_per_sec: int = 0, slice_ns: int = BLOCK_JOB_SLICE_TIME_NS) -> None:
        self.slice_start_time = 0
        self.slice_end_time = 0
        self.slice_quota = 0
        self.slice_ns = 0
        self.dispatched = 0
        self.set_speed(bytes_per_sec, slice_ns)

    def set_speed(self, bytes_per_sec: int, slice_ns: int = BLOCK_JOB_SLICE_TIME_NS) -> None:
        """``ratelimit_set_speed``: quota per slice = max(speed * slice / 1e9, 1), 0 = unlimited.

        Raises InvalidArgument for a negative speed or a non-positive slice.
        """
        if bytes_per_sec < 0:
            raise InvalidArgument("Invalid parameter 'speed'")
        if slice_ns <= 0:
            raise InvalidArgument(f"rate-limit slice must be positive, not {slice_ns} ns")
        self.slice_ns = slice_ns
        if bytes_per_sec == 0:
            self.slice_quota = 0
        else:
            self.slice_quota = int(max((float(bytes_per_sec) * slice_ns) / NANOSECONDS_PER_SECOND, 1.0))

    @property
    def enabled(self) -> bool:
        return self.slice_quota != 0

    def calculate_delay(self, n: int, now_ns: int) -> int:
        """``ratelimit_calculate_delay``: record ``n`` units; return ns until more may be sent (0: now).

        A new slice starts once the previous (possibly extended) one has ended; while dispatched stays
        below the quota there is no delay; past it, the slice is stretched to ``dispatched / quota``
        slices and the delay is the time to its end.
        """
        if not self.slice_quota:
            return 0
        if self.slice_end_time < now_ns:
            self.slice_start_time = now_ns
            self.slice_end_time = now_ns + self.slice_ns
            self.dispatched = 0
        self.dispatched += n
        if self.dispatched < self.slice_quota:
            return 0
        delay_slices = self.dispatched / self.slice_quota
        self.slice_end_time = self.slice_start_time + int(delay_slices * self.slice_ns)
        return self.slice_end_time - now_ns
