"""The in-process limiter: configured windows, learned state and the contract state it reports."""

from __future__ import annotations

import pytest

from proxy.errors import ValidationError
from proxy.model import RateWindow, parse_rate_limits
from proxy.observe.metrics import REGISTRY
from proxy.ratelimit.limiter import LimitState, LimitTarget, LocalLimiter
from proxy.ratelimit.signals.core import Observation, Policy
from proxy.services import make_limiter
from proxy.settings import Settings

T0 = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def lim(clock: Clock) -> LocalLimiter:
    return LocalLimiter(clock=clock)


def obs(*policies: Policy, blocked_until: float | None = None, status: int = 200) -> Observation:
    return Observation(status, blocked_until, tuple(policies), ("test",))


async def admitted(lim: LocalLimiter, target: LimitTarget, n: int) -> int:
    return sum([(await lim.acquire(target)).allowed for _ in range(n)])


async def test_exactly_limit_per_window(lim: LocalLimiter, clock: Clock) -> None:
    target = LimitTarget("t/c", (RateWindow(10, 60.0),))
    assert await admitted(lim, target, 30) == 10
    denied = await lim.acquire(target)
    assert not denied.allowed and denied.source == "configured"
    assert denied.retry_after_ms == 6000  # one cell: 60 s / 10
    assert denied.state == LimitState(True, 0, int(T0) + 60, 6000, "configured")
    clock.t += 5.999
    assert not (await lim.acquire(target)).allowed
    clock.t += 0.001
    assert await admitted(lim, target, 5) == 1  # smoothly refilled: one cell per 6 s
    clock.t += 60
    assert await admitted(lim, target, 30) == 10  # a full window again, never more


async def test_all_or_nothing_across_two_windows(lim: LocalLimiter, clock: Clock) -> None:
    target = LimitTarget("t/c", (RateWindow(3, 1.0), RateWindow(5, 100.0)))
    assert await admitted(lim, target, 6) == 3
    view = await lim.describe(target)
    assert [w["remaining"] for w in view["windows"]] == [0, 2]  # denied calls charged nothing
    clock.t += 1
    assert await admitted(lim, target, 6) == 2  # now the 100 s window is the one saying no
    view = await lim.describe(target)
    assert [w["remaining"] for w in view["windows"]] == [1, 0]
    assert view["state"]["is_limited"] and view["state"]["source"] == "configured"


async def test_learned_policy_merge_is_monotonic(lim: LocalLimiter, clock: Clock) -> None:
    target = LimitTarget("t/c")
    reset = T0 + 30
    await lim.observe("t/c", obs(Policy("hour", 100, 3600.0, 10, reset)))
    await lim.observe("t/c", obs(Policy("hour", 100, 3600.0, 5, reset + 0.3)))
    await lim.observe("t/c", obs(Policy("hour", 100, 3600.0, 8, reset)))  # late response: ignored
    state = await lim.peek(target)
    assert (state.remaining, state.reset_at, state.source) == (5, int(reset) + 1, "learned")
    assert await admitted(lim, target, 9) == 5  # every admitted call counts the policy down
    denied = await lim.acquire(target)
    assert not denied.allowed and denied.source == "learned"
    assert denied.retry_after_ms == pytest.approx(30_300, abs=1)
    # a stale response from an older window cannot raise it either
    await lim.observe("t/c", obs(Policy("hour", 100, 3600.0, 90, reset - 3600)))
    assert not (await lim.acquire(target)).allowed
    # a later window replaces the policy
    await lim.observe("t/c", obs(Policy("hour", 100, 3600.0, 99, reset + 3600)))
    assert (await lim.peek(target)).remaining == 99
    view = await lim.describe(target)
    assert view["learned"] == [
        {"name": "hour", "limit": 100, "window_s": 3600.0, "remaining": 99, "reset_at": reset + 3600}
    ]


async def test_blocked_until_denies_until_then(lim: LocalLimiter, clock: Clock) -> None:
    target = LimitTarget("t/c", (RateWindow(100, 1.0),))
    await lim.observe("t/c", obs(blocked_until=T0 + 2, status=429))
    await lim.observe("t/c", obs(blocked_until=T0 + 1, status=429))  # never shortens
    d = await lim.acquire(target)
    assert (d.allowed, d.retry_after_ms, d.source) == (False, 2000, "learned")
    assert (await lim.describe(target))["blocked_until"] == T0 + 2
    clock.t += 1.999
    assert not (await lim.acquire(target)).allowed
    clock.t += 0.001
    assert (await lim.acquire(target)).allowed
    assert (await lim.describe(target))["windows"][0]["remaining"] == 99  # denials charged nothing


async def test_reserve_stops_before_the_upstream_says_no(lim: LocalLimiter, clock: Clock) -> None:
    target = LimitTarget("t/c", reserve=3)
    await lim.observe("t/c", obs(Policy("min", 60, 60.0, 5, T0 + 20)))
    assert await admitted(lim, target, 5) == 2
    state = await lim.peek(target)
    assert state == LimitState(True, 0, int(T0) + 20, 20_000, "learned")
    clock.t += 20
    assert await admitted(lim, target, 5) == 5  # the reset passed: the policy is gone


async def test_peek_does_not_consume(lim: LocalLimiter) -> None:
    target = LimitTarget("t/c", (RateWindow(2, 10.0),))
    for _ in range(5):
        assert (await lim.peek(target)).remaining == 2
    assert (await lim.peek(target)).to_contract() == {
        "is_limited": False,
        "remaining": 2,
        "reset_at": int(T0),
        "retry_after_ms": None,
    }
    assert await admitted(lim, target, 5) == 2


async def test_runtara_rps_windows(lim: LocalLimiter, clock: Clock) -> None:
    windows = parse_rate_limits([{"requestsPerSecond": 5, "burstSize": 2}])
    target = LimitTarget("t/c", windows)
    assert await admitted(lim, target, 5) == 2
    assert (await lim.acquire(target)).retry_after_ms == 200
    clock.t += 0.2
    assert await admitted(lim, target, 5) == 1
    slow = LimitTarget("t/slow", parse_rate_limits({"requestsPerSecond": 0.5}))  # no burst: 500/1000 s
    assert await admitted(lim, slow, 600) == 500
    assert (await lim.acquire(slow)).retry_after_ms == 2000


async def test_unlimited_scope_and_clock_step_back(lim: LocalLimiter, clock: Clock) -> None:
    free = await lim.acquire(LimitTarget("t/free"))
    assert free.allowed and free.state == LimitState(False, None, None, None, None)
    target = LimitTarget("t/c", (RateWindow(1, 10.0),))
    assert (await lim.acquire(target)).allowed
    clock.t -= 3600  # a wall-clock step back must not refund anything
    d = await lim.acquire(target)
    assert not d.allowed and d.retry_after_ms == 10_000


async def test_reset_forgets_the_scope(lim: LocalLimiter) -> None:
    target = LimitTarget("t/c", (RateWindow(1, 10.0),))
    await lim.observe("t/c", obs(blocked_until=T0 + 60))
    assert not (await lim.acquire(target)).allowed
    await lim.reset("t/c")
    assert (await lim.acquire(target)).allowed


async def test_fair_share_in_process(lim: LocalLimiter, clock: Clock) -> None:
    q = (RateWindow(40, 4.0),)
    a = LimitTarget("t1/c", quota_key="app", quota_windows=q)
    b = LimitTarget("t2/c", quota_key="app", quota_windows=q)
    assert await admitted(lim, b, 1) == 1
    assert await admitted(lim, a, 60) == 20  # b is active: a gets half
    assert await admitted(lim, b, 60) == 19  # and b is not starved
    view = await lim.describe(a)
    assert view["quota"]["windows"][0]["share"] == 0.5
    assert view["quota"]["other_active_members"] == 1
    clock.t += 8  # b idle beyond the window: a alone uses the whole (refilled) budget
    assert await admitted(lim, a, 60) == 40


async def test_decisions_are_counted(lim: LocalLimiter) -> None:
    def n(result: str) -> float:
        labels = {"result": result, "source": "configured"}
        return REGISTRY.get_sample_value("proxy_ratelimit_decisions_total", labels) or 0.0

    before = n("allowed"), n("denied")
    assert await admitted(lim, LimitTarget("t/c", (RateWindow(2, 60.0),)), 5) == 2
    assert (n("allowed") - before[0], n("denied") - before[1]) == (2, 3)


def test_targets_are_validated() -> None:
    for bad in ({"scope": "t/{c}"}, {"scope": ""}, {"scope": "t/c", "quota_key": "{x}"}):
        with pytest.raises(ValidationError):
            LimitTarget(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        LimitTarget("t/c", weight=0)
    with pytest.raises(ValidationError):
        LimitTarget("t/c", reserve=-1)


async def test_cost_must_fit_the_burst(lim: LocalLimiter) -> None:
    target = LimitTarget("t/c", (RateWindow(10, 1.0, burst=2),))
    with pytest.raises(ValidationError):
        await lim.acquire(target, cost=3)
    with pytest.raises(ValidationError):
        await lim.acquire(target, cost=0)
    assert (await lim.acquire(target, cost=2)).allowed


def test_make_limiter_is_local_without_redis() -> None:
    assert isinstance(make_limiter(Settings()), LocalLimiter)
