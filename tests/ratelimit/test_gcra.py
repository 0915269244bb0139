"""The pure rate-limit arithmetic: GCRA cells, learned-policy merging, one full evaluation."""

from __future__ import annotations

import random

import pytest

from proxy.model import RateWindow
from proxy.ratelimit import gcra
from proxy.ratelimit.gcra import US, GroupState, Learned, ScopeState

NOW = 1_800_000_000 * US


@pytest.mark.parametrize(
    ("window", "inc", "tau", "sig"),
    [
        (RateWindow(100, 60.0), 600_000, 60_000_000, "100/60000000/100"),
        (RateWindow(3, 1.0), 333_333, 999_999, "3/1000000/3"),  # T floored: 3 still fit at once
        (RateWindow(10, 1.0, burst=2), 100_000, 200_000, "10/1000000/2"),
        (RateWindow(5000, 0.001), 1, 5000, "5000/1000/5000"),  # T never below 1 µs
        (RateWindow(500, 1000.0), 2_000_000, 1_000_000_000, "500/1000000000/500"),  # 0.5 rps
    ],
)
def test_cell_parameters(window: RateWindow, inc: int, tau: int, sig: str) -> None:
    cell = gcra.cell_for(window)
    assert (cell.inc, cell.tau, cell.sig) == (inc, tau, sig)
    assert cell.horizon == min(round(window.window_s * US), gcra.MAX_ACTIVE_HORIZON_US)


@pytest.mark.parametrize(
    ("tat", "now_offset", "cost", "expect"),
    [
        (0, 0, 1, (NOW + 100, 0)),  # empty bucket: passes, TAT = now + T
        (NOW + 900, 0, 1, (NOW + 1000, 0)),  # last cell of the burst
        (NOW + 1000, 0, 1, (NOW + 1000, 100)),  # full: wait exactly T
        (NOW + 1000, 100, 1, (NOW + 1100, 0)),  # ...and after T it passes
        (NOW + 500, 0, 5, (NOW + 1000, 0)),  # cost 5 fills it exactly
        (NOW + 500, 0, 6, (NOW + 500, 100)),  # cost 6 does not, nothing consumed
        (NOW - 5000, 0, 1, (NOW + 100, 0)),  # an old TAT counts as now: no banked credit
    ],
)
def test_gcra_step(tat: int, now_offset: int, cost: int, expect: tuple[int, int]) -> None:
    assert gcra.gcra_step(tat, NOW + now_offset, 100, 1000, cost) == expect


@pytest.mark.parametrize(
    ("tat", "expect"),
    [
        (0, (10, NOW, 0)),  # full bucket: 10 fit, already full, no wait
        (NOW + 250, (7, NOW + 250, 0)),  # 2.5 cells used: 7 whole cells left
        (NOW + 1000, (0, NOW + 1000, 100)),
    ],
)
def test_gcra_view(tat: int, expect: tuple[int, int, int]) -> None:
    assert gcra.gcra_view(tat, NOW, 100, 1000) == expect


def test_burst_then_one_per_interval_never_more() -> None:
    cell = gcra.cell_for(RateWindow(50, 2.0))
    tat, now, admitted = 0, NOW, []
    rng = random.Random(7)
    while now < NOW + 5 * US:
        tat, wait = gcra.gcra_step(tat, now, cell.inc, cell.tau, 1)
        if wait == 0:
            admitted.append(now)
        now += rng.randrange(0, 3000)
    # Over ANY span d between two admissions, never more than burst + floor(d / T).
    for i, ti in enumerate(admitted):
        for j in range(i, len(admitted)):
            assert j - i + 1 <= 50 + (admitted[j] - ti) // cell.inc
    first = admitted[0]
    burst, tat = 0, 0
    while gcra.gcra_step(tat, NOW, cell.inc, cell.tau, 1)[1] == 0:
        tat = gcra.gcra_step(tat, NOW, cell.inc, cell.tau, 1)[0]
        burst += 1
    assert burst == 50  # the whole window at once, then nothing until T
    assert len(admitted) >= 50 + (admitted[-1] - first) // cell.inc - 1  # and work-conserving


@pytest.mark.parametrize(
    ("old", "new", "expect"),
    [
        (None, Learned(5, NOW + 10 * US), Learned(5, NOW + 10 * US)),
        # same window (|delta| < 1 s): remaining only goes down, late higher values are ignored
        (Learned(5, NOW + 10 * US), Learned(3, NOW + 10 * US + 400_000), Learned(3, NOW + 10 * US + 400_000)),
        (Learned(3, NOW + 10 * US), Learned(8, NOW + 10 * US - 900_000), Learned(3, NOW + 10 * US)),
        # a later window replaces, even with more remaining
        (
            Learned(0, NOW + 10 * US),
            Learned(99, NOW + 70 * US, 100, 60 * US),
            Learned(99, NOW + 70 * US, 100, 60 * US),
        ),
        # an earlier reset is a stale response: ignored
        (Learned(7, NOW + 70 * US), Learned(1, NOW + 10 * US), Learned(7, NOW + 70 * US)),
        # past resets are dropped, on either side
        (Learned(7, NOW + 10 * US), Learned(1, NOW - 1), Learned(7, NOW + 10 * US)),
        (Learned(0, NOW - 1), Learned(4, NOW + 2 * US), Learned(4, NOW + 2 * US)),
        (Learned(0, NOW), None, None),
        # unknown limit/window keep what was known
        (Learned(5, NOW + US, 100, 60 * US), Learned(4, NOW + US), Learned(4, NOW + US, 100, 60 * US)),
    ],
)
def test_merge_policy(old: Learned | None, new: Learned | None, expect: Learned | None) -> None:
    if new is None:  # only the "old is past" case: pruning
        st = ScopeState(policies={"p": old} if old else {})
        st.prune(NOW)
        assert st.policies == {}
        return
    assert gcra.merge_policy(old, new, NOW) == expect


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        ((5, NOW / US + 30, 100, 60.0), Learned(5, NOW + 30 * US, 100, 60 * US)),
        ((5, None, None, 60.0), Learned(5, NOW + 60 * US, -1, 60 * US)),  # window assumed to start now
        ((5, None, 100, None), None),  # no reset, no window: nothing to enforce
        ((None, NOW / US + 30, 100, 60.0), None),  # nothing to count down
        ((5, NOW / US - 1, 100, 60.0), None),  # already past
    ],
)
def test_learned_from(
    args: tuple[int | None, float | None, int | None, float | None], expect: Learned | None
) -> None:
    assert gcra.learned_from(*args, now=NOW) == expect


def test_learned_encoding_round_trips_and_rejects_garbage() -> None:
    p = Learned(3, NOW, -1, 60 * US)
    assert Learned.decode(p.encode()) == p
    assert Learned.decode("1 2 3") is None
    assert Learned.decode("a b c d") is None
    st = ScopeState.from_hash({b"b": b"5", b"p:x": p.encode().encode(), b"c:1/2/3": b"9", b"p:bad": b"zz"})
    assert (st.blocked_us, st.policies, st.tats) == (5, {"x": p}, {"c:1/2/3": 9})


def spec(
    *windows: RateWindow,
    quota: tuple[RateWindow, ...] = (),
    member: str = "t/a",
    weight: float = 1.0,
    reserve: int = 0,
) -> gcra.Spec:
    return gcra.compile_spec(windows, quota, member, weight, reserve)


def test_evaluate_is_all_or_nothing() -> None:
    s = spec(RateWindow(3, 1.0), RateWindow(4, 100.0))
    st = ScopeState()
    assert [gcra.evaluate(s, st, None, NOW, 1, True).allowed for _ in range(4)] == [True, True, True, False]
    before = dict(st.tats)
    out = gcra.evaluate(s, st, None, NOW, 1, True)
    assert not out.allowed and st.tats == before  # the 100 s window was not charged
    # one second later the 1 s window refills, but the 100 s window has one cell left
    later = NOW + US
    assert gcra.evaluate(s, st, None, later, 1, True).allowed
    denied = gcra.evaluate(s, st, None, later, 1, True)
    assert not denied.allowed and denied.wait_source == gcra.SRC_CONFIGURED
    assert denied.wait_us == 24 * US  # until the 100 s window's next cell
    assert (denied.remaining, denied.reset_us) == (0, NOW + 100 * US)


def test_evaluate_learned_reserve_blocked_and_countdown() -> None:
    s = spec(RateWindow(100, 60.0), reserve=2)
    st = ScopeState()
    gcra.apply_observation(st, 0, [("hour", Learned(4, NOW + 30 * US, 5000, 3600 * US))], NOW)
    a = gcra.evaluate(s, st, None, NOW, 1, True)
    assert a.allowed and st.policies["hour"].remaining == 3
    assert (a.remaining, a.state_source, a.next_wait_us) == (1, gcra.SRC_LEARNED, 0)
    b = gcra.evaluate(s, st, None, NOW, 1, True)
    assert b.allowed and b.next_wait_us == 30 * US and b.next_source == gcra.SRC_LEARNED
    c = gcra.evaluate(s, st, None, NOW, 1, True)  # remaining 2 == reserve: stop until the reset
    assert not c.allowed and c.wait_us == 30 * US and c.wait_source == gcra.SRC_LEARNED
    assert gcra.evaluate(s, st, None, NOW + 30 * US, 1, True).allowed  # the reset passed: dropped
    assert st.policies == {}
    gcra.apply_observation(st, NOW + 5 * US, [], NOW)
    gcra.apply_observation(st, NOW + 2 * US, [], NOW)  # blocked_until only grows
    d = gcra.evaluate(s, st, None, NOW + US, 1, True)
    assert not d.allowed and d.wait_us == 4 * US and st.blocked_us == NOW + 5 * US


def test_peek_consumes_nothing() -> None:
    s = spec(RateWindow(2, 10.0))
    st = ScopeState()
    for _ in range(5):
        assert gcra.evaluate(s, st, None, NOW, 1, False).allowed
    assert st.tats == {}


def test_fair_share_increment_and_work_conservation() -> None:
    q = (RateWindow(40, 4.0),)
    a, b = spec(quota=q, member="t/a"), spec(quota=q, member="t/b")
    group = GroupState()
    sa = ScopeState()
    # alone, a member may use the whole group budget
    assert sum(gcra.evaluate(a, sa, group, NOW, 1, True).allowed for _ in range(60)) == 40
    group2, sa2, sb2 = GroupState(), ScopeState(), ScopeState()
    assert gcra.evaluate(b, sb2, group2, NOW, 1, True).allowed  # b becomes active
    assert group2.shares(a, NOW) == [2.0]
    assert sum(gcra.evaluate(a, sa2, group2, NOW, 1, True).allowed for _ in range(60)) == 20  # half
    assert sum(gcra.evaluate(b, sb2, group2, NOW, 1, True).allowed for _ in range(60)) == 19  # not starved
    # b idle beyond the horizon: a is alone again and refills at the full group rate
    later = NOW + 4 * US + 1
    assert group2.shares(a, later) == [1.0]
    assert gcra.member_inc(100_000, 4 * US, 1.0, 1.0, 1) == 100_000
    assert gcra.member_inc(100_000, 4 * US, 3.0, 1.5, 1) == 200_000
    assert gcra.member_inc(100_000, 4 * US, 1000.0, 1.0, 1) == 4 * US  # tiny share: 1 call per window
