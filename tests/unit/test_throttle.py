"""Unit tests for engine.throttle: QEMU's validation texts, exact wait arithmetic, iops-size accounting,
throttle-group round robin and the block-job rate limiter.

Expected numbers are computed by hand from util/throttle.c's formulas (doubles, truncated to ns); the
end-to-end timings are also the ones qemu-storage-daemon 7.2 was measured at through an NBD export
(shared/reference/qmp-surface.md §2.3): the model's "last request starts at" value plus that request's
own I/O time must land on the measurement.
"""
from __future__ import annotations

import pytest

from engine.errors import InvalidArgument
from engine.throttle import (
    LIMIT_NAMES,
    BucketType,
    LeakyBucket,
    RateLimiter,
    ThrottleConfig,
    ThrottleGroup,
    ThrottleState,
    account_units,
    throttle_compute_wait,
    throttle_leak_bucket,
)

S = 1_000_000_000
CONFLICT = "bps/iops/max total values and read/write values cannot be used at the same time"
TOO_HIGH = "burst length too high for this burst rate"
RANGE = "bps/iops/max values must be within [0, 1000000000000000]"


def msg_of(limits: dict) -> str:
    with pytest.raises(InvalidArgument) as ei:
        ThrottleConfig.from_limits(limits)
    return ei.value.message


# ---------------------------------------------------------------------------------------------------
# validation: throttle_is_valid / throttle_limits_to_config / throttle_group_set texts
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "limits, text",
    [
        ({"bps-total": 1, "bps-read": 1}, CONFLICT),
        ({"iops-total": 1, "iops-write": 1}, CONFLICT),
        ({"bps-total": 1, "bps-total-max": 2, "bps-read": 0, "bps-write-max": 3}, CONFLICT),
        ({"iops-size": 4096}, "iops size requires an iops value to be set"),
        ({"bps-total": -1}, RANGE),
        ({"iops-read": 1_000_000_000_000_001}, RANGE),
        ({"bps-write": 10, "bps-write-max": -5}, RANGE),
        ({"bps-total": 10, "bps-total-max-length": 0}, "the burst length cannot be 0"),
        ({"bps-total": 10, "bps-total-max-length": 2}, "burst length set without burst rate"),
        ({"bps-total": 10, "bps-total-max": 10, "bps-total-max-length": -1}, TOO_HIGH),
        ({"iops-total": 1000, "iops-total-max": 10**9, "iops-total-max-length": 10**6 + 1}, TOO_HIGH),
        ({"bps-total-max": 10}, "bps_max/iops_max require corresponding bps/iops values"),
        ({"iops-read": 10, "iops-read-max": 5}, "bps_max/iops_max cannot be lower than bps/iops"),
        ({"bps-read-max-length": 1 << 32}, "bps-read-max-length value must be in the range [0, 4294967295]"),
        ({"bogus": 1}, "Parameter 'limits.bogus' is unexpected"),
        ({"bps-total": "x"}, "Parameter 'limits.bps-total' expects integer"),
        ({"bps-total": 1.5}, "Invalid parameter type for 'limits.bps-total', expected: integer"),
    ],
)
def test_validation_messages(limits: dict, text: str) -> None:
    assert msg_of(limits) == text


def test_validation_order_conflict_before_range() -> None:
    # throttle_is_valid checks the total/rw conflict before any range check.
    assert msg_of({"bps-total": -1, "bps-read": 1}).startswith("bps/iops/max total values")


def test_valid_configs_and_limits_roundtrip() -> None:
    cfg = ThrottleConfig.from_limits(
        {"bps-total": 1000, "bps-total-max": 3000, "bps-total-max-length": 5,
         "iops-read": 10, "iops-size": "4096"}
    )
    lim = cfg.to_limits()
    assert tuple(lim) == LIMIT_NAMES and len(lim) == 19
    assert lim["bps-total"] == 1000 and lim["bps-total-max-length"] == 5 and lim["iops-size"] == 4096
    assert lim["iops-write-max-length"] == 1  # default burst length
    assert cfg.enabled() and not ThrottleConfig().enabled()
    # edge of the overflow check: max * burst_length == THROTTLE_VALUE_MAX is fine
    ThrottleConfig.from_limits(
        {"bps-total": 1, "bps-total-max": 250_000_000, "bps-total-max-length": 4_000_000}
    )
    # qom-set merges: absent keys keep their value, and the *result* is validated
    merged = cfg.with_limits({"bps-total": 2000})
    assert merged.to_limits()["bps-total-max"] == 3000 and merged.to_limits()["iops-read"] == 10
    with pytest.raises(InvalidArgument, match="cannot be used at the same time"):
        cfg.with_limits({"bps-write": 1})


def test_option_spellings() -> None:
    want = {"bps-total": 100, "iops-total": 5, "iops-total-max": 10, "iops-total-max-length": 3}
    spellings = [
        {"limits": {"bps-total": 100, "iops-total": 5, "iops-total-max": 10, "iops-total-max-length": 3}},
        {"x-bps-total": 100, "x-iops-total": 5, "x-iops-total-max": 10, "x-iops-total-max-length": 3},
        {"limits.bps-total": "100", "limits.iops-total": "5", "limits.iops-total-max": "0xa",
         "limits.iops-total-max-length": "3"},
        {"bps-total": 100, "iops-total": 5, "iops-total-max": 10, "iops-total-max-length": 3},
        {"throttling.bps-total": 100, "throttling.iops-total": 5, "throttling.iops-total-max": 10,
         "throttling.iops-total-max-length": 3, "id": "tg0", "qom-type": "throttle-group"},
    ]
    for opts in spellings:
        lim = ThrottleConfig.from_options(opts).to_limits()
        assert {k: lim[k] for k in want} == want, opts


def test_x_property_messages() -> None:
    with pytest.raises(InvalidArgument) as ei:
        ThrottleConfig.from_options({"x-bps-total": -1})
    assert ei.value.message == "Property values cannot be negative"
    with pytest.raises(InvalidArgument) as ei:
        ThrottleConfig.from_options({"x-iops-total-max-length": 1 << 32})
    # QEMU's text really lacks the space ("in the" "range" in throttle_group_set()).
    assert ei.value.message == "x-iops-total-max-length value must be in therange [0, 4294967295]"
    with pytest.raises(InvalidArgument) as ei:
        ThrottleConfig.from_options({"x-bps-total": 1, "x-bps-read": 1})
    assert ei.value.message.startswith("bps/iops/max total values")
    with pytest.raises(InvalidArgument) as ei:
        ThrottleConfig.from_options({"nope": 1})
    assert ei.value.message == "Property 'throttle-group.nope' not found"


def test_block_set_io_throttle_args() -> None:
    base = {"bps": 0, "bps_rd": 1000, "bps_wr": 0, "iops": 50, "iops_rd": 0, "iops_wr": 0}
    cfg = ThrottleConfig.from_io_throttle({**base, "iops_max": 100, "iops_max_length": 4, "iops_size": 512})
    lim = cfg.to_limits()
    assert lim["bps-read"] == 1000 and lim["iops-total-max"] == 100 and lim["iops-total-max-length"] == 4
    with pytest.raises(InvalidArgument, match="Parameter 'iops_wr' is missing"):
        ThrottleConfig.from_io_throttle({k: v for k, v in base.items() if k != "iops_wr"})
    with pytest.raises(InvalidArgument, match="cannot be lower"):
        ThrottleConfig.from_io_throttle({**base, "bps_rd_max": 10})


# ---------------------------------------------------------------------------------------------------
# exact arithmetic of util/throttle.c
# ---------------------------------------------------------------------------------------------------


def test_compute_wait_exact_values() -> None:
    # bps 512 KiB/s, no max: bucket = avg/10 = 52428.8.  After one 64 KiB write, extra = 13107.2 (in
    # doubles 13107.199999999997), wait = extra*1e9/524288 = 0.02499999999... s -> truncated 24999999 ns.
    assert throttle_compute_wait(LeakyBucket(avg=524288, level=65536.0)) == 24_999_999
    # iops 10, one 64 KiB request with iops-size 4096 = 16 ops; bucket 1.0: extra 15 -> 1.5 s exactly.
    assert throttle_compute_wait(LeakyBucket(avg=10, level=16.0)) == 1_500_000_000
    # max set, burst_length 1: bucket = max*1 = 150; extra 10 at avg 100/s -> 0.1 s.
    assert throttle_compute_wait(LeakyBucket(avg=100, max=150, burst_length=1, level=160.0)) == 100_000_000
    # burst: avg 1 MiB/s, max 2 MiB/s for 2 s; main bucket 4 MiB is far from full, but the burst bucket
    # (max/10 = 209715.2) holds 262144 -> extra 52428.8 at max rate -> 0.025 s, truncated to 24999999.
    bkt = LeakyBucket(avg=1 << 20, max=2 << 20, burst_length=2, level=262144.0, burst_level=262144.0)
    assert throttle_compute_wait(bkt) == 24_999_999
    # exactly at the bucket size: extra == 0 -> no wait (QEMU tests extra > 0)
    assert throttle_compute_wait(LeakyBucket(avg=10, level=1.0)) == 0
    # QEMU's rounding hole: main bucket over-full by less than avg*1ns -> truncated wait 0 returned from
    # the first branch, so the (very full) burst bucket is not consulted.
    bkt = LeakyBucket(avg=501, max=501, burst_length=2, level=1002.0000001, burst_level=1002.0)
    assert throttle_compute_wait(bkt) == 0
    bkt.level = 1002.0  # extra == 0 exactly: the burst bucket is checked -> (1002-50.1)/501 s
    assert throttle_compute_wait(bkt) == int((1002.0 - 501 / 10) * 1e9 / 501.0)
    # avg 0: never waits, whatever the level
    assert throttle_compute_wait(LeakyBucket(avg=0, level=1e12)) == 0


def test_leak_bucket() -> None:
    bkt = LeakyBucket(avg=1000, max=4000, burst_length=3, level=500.0, burst_level=500.0)
    throttle_leak_bucket(bkt, 100_000_000)  # 0.1 s: level -100, burst_level -400
    assert bkt.level == 400.0 and bkt.burst_level == 100.0
    throttle_leak_bucket(bkt, 10 * S)
    assert bkt.level == 0.0 and bkt.burst_level == 0.0
    one = LeakyBucket(avg=1000, max=4000, burst_length=1, level=10.0, burst_level=7.0)
    throttle_leak_bucket(one, S)
    assert one.burst_level == 7.0  # burst level only tracked when burst_length > 1


def _last_start(cfg: ThrottleConfig, reqs: list[tuple[bool, int]]) -> int:
    """Issue requests back to back on a fake clock; return when the last one was admitted."""
    st = ThrottleState(cfg, 0)
    t = 0
    for is_write, n in reqs:
        while wait := st.schedule_timer(is_write, t):
            t += wait
        st.account(is_write, n)
    return t


def test_timings_match_qemu_measurements() -> None:
    # qmp-surface.md §2.3 [obs]: 10x64 KiB reads, iops-total=10, iops-size=4096 -> 14.3 s
    cfg = ThrottleConfig.from_limits({"iops-total": 10, "iops-size": 4096})
    assert _last_start(cfg, [(False, 65536)] * 10) == 14_300_000_000  # 1.5 + 8*1.6 s
    # 30x4 KiB reads at iops-total=10 -> 2.81 s (two free ops, then one per 0.1 s)
    cfg = ThrottleConfig.from_limits({"iops-total": 10})
    assert _last_start(cfg, [(False, 4096)] * 30) == 2_800_000_000
    # 32x64 KiB reads at bps-read=1 MiB/s -> 1.86 s (0.025 + 29*0.0625)
    cfg = ThrottleConfig.from_limits({"bps-read": 1 << 20})
    assert abs(_last_start(cfg, [(False, 65536)] * 32) - 1_837_500_000) <= 2
    # same with bps-total=1 MiB/s, bps-total-max=2 MiB/s, max-length=2 -> 0.89 s (0.025 + 27*0.03125)
    cfg = ThrottleConfig.from_limits(
        {"bps-total": 1 << 20, "bps-total-max": 2 << 20, "bps-total-max-length": 2}
    )
    assert abs(_last_start(cfg, [(False, 65536)] * 32) - 868_750_000) <= 2
    # 32x64 KiB writes at bps-write=512 KiB/s -> 4.10 s (0.025 + 30*0.125, plus the last write itself)
    cfg = ThrottleConfig.from_limits({"bps-write": 524288})
    assert abs(_last_start(cfg, [(True, 65536)] * 32) - 3_775_000_000) <= 2


def test_iops_size_accounting() -> None:
    assert account_units(0, 1 << 20) == 1.0
    assert account_units(4096, 4096) == 1.0
    assert account_units(4096, 100) == 1.0
    assert account_units(4096, 6144) == 1.5  # QEMU counts a fraction, no rounding
    st = ThrottleState(ThrottleConfig.from_limits({"iops-write": 100, "iops-size": 4096, "bps-write": 10**6}))
    st.account(True, 65536)
    st.account(True, 512)
    st.account(False, 65536)  # reads feed neither write bucket
    assert st.buckets[BucketType.OPS_WRITE].level == 17.0
    assert st.buckets[BucketType.OPS_TOTAL].level == 33.0
    assert st.buckets[BucketType.BPS_WRITE].level == 65536 + 512
    assert st.buckets[BucketType.BPS_READ].level == 65536


def test_state_leak_and_reconfigure() -> None:
    st = ThrottleState(ThrottleConfig.from_limits({"bps-total": 1000}), now_ns=5 * S)
    st.account(False, 400)
    assert st.schedule_timer(False, 5 * S) == 300_000_000  # (400-100)/1000 s
    assert st.schedule_timer(True, 5 * S + 100_000_000) == 200_000_000  # total bucket blocks writes too
    st.leak(5 * S)  # going backwards in time leaks nothing
    assert st.buckets[BucketType.BPS_TOTAL].level == pytest.approx(300.0)
    assert st.compute_timer(False, 6 * S) is None
    st.configure(ThrottleConfig.from_limits({"bps-total": 10}), 6 * S)
    assert st.buckets[BucketType.BPS_TOTAL].level == 0.0  # throttle_config zeroes the levels
    with pytest.raises(InvalidArgument, match="iops size requires an iops value to be set"):
        st.configure(ThrottleConfig(op_size=4096), 6 * S)


# ---------------------------------------------------------------------------------------------------
# throttle groups
# ---------------------------------------------------------------------------------------------------


def _drain(g: ThrottleGroup, now: int, log: list, limit: int = 10_000) -> int:
    for _ in range(limit):
        r = g.next_ready(now)
        if r.ready is not None:
            log.append((now, r.ready.member, r.ready.token))
            continue
        if r.timer_ns is None:
            return now
        assert r.timer_ns > now
        now = r.timer_ns
    raise AssertionError("group did not drain")


def test_group_round_robin_exact_order() -> None:
    g = ThrottleGroup("tg0", ThrottleConfig.from_limits({"iops-total": 10}))
    for m in ("a", "b", "c"):
        g.register(m)
    assert g.members == ("c", "b", "a")  # QLIST_INSERT_HEAD
    log: list = []
    for i in range(5):
        adm = g.submit("a", False, 4096, 0, token=f"a{i}")
        if adm.run_now:
            log.append((0, "a", f"a{i}"))
    assert [tok for _, _, tok in log] == ["a0", "a1"]  # level 0 and level 1 (== bucket) both pass
    assert not g.submit("b", False, 4096, 0, token="b0").run_now
    adm = g.submit("c", False, 4096, 0, token="c0")
    assert not adm.run_now and adm.timer_ns == 100_000_000
    assert g.queued() == 5 and g.queued("a") == 3
    _drain(g, 0, log)
    # a2 was armed first; then the round robin walks the list after 'a' (wrapping to c, then b, then a).
    assert [(t, tok) for t, _, tok in log[2:]] == [
        (100_000_000, "a2"), (200_000_000, "c0"), (300_000_000, "b0"),
        (400_000_000, "a3"), (500_000_000, "a4"),
    ]
    assert g.queued() == 0


def test_group_busy_member_does_not_starve_others() -> None:
    g = ThrottleGroup("tg", ThrottleConfig.from_limits({"bps-write": 1 << 20}))
    for m in ("busy", "x", "y"):
        g.register(m)
    log: list = []
    for i in range(50):
        if g.submit("busy", True, 65536, 0, token=("busy", i)).run_now:
            log.append((0, "busy", ("busy", i)))
    g.submit("x", True, 65536, 0, token=("x", 0))
    g.submit("y", True, 65536, 0, token=("y", 0))
    _drain(g, 0, log)
    order = [m for _, m, _ in log]
    assert len(order) == 52
    # x and y are served within the first round after they queued, not after busy's 48 queued writes
    assert order.index("x") <= 5 and order.index("y") <= 5
    # per-member FIFO
    assert [tok for _, m, tok in log if m == "busy"] == [("busy", i) for i in range(50)]


def test_group_directions_are_independent_and_share_total() -> None:
    g = ThrottleGroup("tg", ThrottleConfig.from_limits({"bps-read": 1000, "bps-write": 1000}))
    g.register("n")
    assert g.submit("n", False, 5000, 0).run_now
    assert not g.submit("n", False, 10, 0).run_now
    assert g.submit("n", True, 5000, 0).run_now  # the read queue does not block writes
    g2 = ThrottleGroup("tg2", ThrottleConfig.from_limits({"bps-total": 1000}))
    g2.register("n")
    g2.register("m")
    assert g2.submit("n", False, 5000, 0).run_now
    assert not g2.submit("m", True, 10, 0).run_now  # one budget for the whole group


def test_group_membership_and_config() -> None:
    g = ThrottleGroup("tg", ThrottleConfig.from_limits({"iops-total": 1}))
    g.register("a")
    with pytest.raises(InvalidArgument):
        g.register("a")
    assert g.submit("a", True, 1, 0).run_now
    assert g.submit("a", True, 1, 0).run_now is False  # level 1 > bucket 0.1
    with pytest.raises(InvalidArgument, match="queued"):
        g.unregister("a")
    with pytest.raises(InvalidArgument):
        g.submit("zz", True, 1, 0)
    # raising the limit fires the armed deadline at once
    g.set_limits({"iops-total": 1000}, now_ns=5)
    r = g.next_ready(5)
    assert r.ready is not None and r.ready.member == "a" and r.timer_ns is None
    assert g.limits()["iops-total"] == 1000
    with pytest.raises(InvalidArgument, match="cannot be used at the same time"):
        g.set_limits({"iops-read": 5}, now_ns=6)
    g.unregister("a")
    assert g.members == ()


# ---------------------------------------------------------------------------------------------------
# RateLimiter (include/qemu/ratelimit.h)
# ---------------------------------------------------------------------------------------------------


def test_ratelimit() -> None:
    rl = RateLimiter()
    assert not rl.enabled and rl.calculate_delay(10**9, 0) == 0  # speed 0 = unlimited
    rl.set_speed(1 << 20)  # 1 MiB/s, 100 ms slices -> quota 104857 (truncated 104857.6)
    assert rl.slice_quota == 104857
    assert rl.calculate_delay(65536, 1000) == 0  # new slice [1000, 100001000)
    # 131072 dispatched: 1.25000... slices -> slice end = start + int(1.2500023842...*1e8)
    d = rl.calculate_delay(65536, 2000)
    assert d == 1000 + int((131072 / 104857) * 100_000_000) - 2000
    # before the stretched slice ends, polling with 0 keeps returning the remaining delay
    assert rl.calculate_delay(0, 50_000_000) == 1000 + int((131072 / 104857) * 100_000_000) - 50_000_000
    # after it ends a new slice starts and the counter resets
    assert rl.calculate_delay(0, 200_000_000) == 0 and rl.dispatched == 0
    rl.set_speed(1)  # quota never below 1
    assert rl.slice_quota == 1
    with pytest.raises(InvalidArgument):
        rl.set_speed(-1)
