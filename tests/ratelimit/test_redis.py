"""The shared limiter against a real redis-server: exactness, round trips, TTLs, slots, fail modes,
and the Lua script agreeing with gcra.py decision for decision."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from proxy.model import RateWindow
from proxy.observe.metrics import REGISTRY
from proxy.ratelimit import gcra
from proxy.ratelimit.limiter import Decision, LimitTarget, compile_target, observation_args
from proxy.ratelimit.redis import SCRIPT, RedisLimiter, _args, _outcome, keys_for
from proxy.ratelimit.signals.core import Observation, Policy
from proxy.services import make_limiter
from proxy.settings import Settings

# Redis is up in these tests (or refuses at once, when stopped): a call that ran into its timeout
# would be answered by the fallback, which is not what they test, so the bound is generous. A
# short bound is what test_unresponsive_redis_is_bounded_and_not_hammered tests.
LIVE_TIMEOUT_S = 10.0


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
async def lim(redis_url: str) -> AsyncIterator[RedisLimiter]:
    limiter = RedisLimiter.create(redis_url, fail_mode="open", timeout_s=LIVE_TIMEOUT_S)
    yield limiter
    await limiter.close()


async def commands(raw: Redis) -> dict[str, int]:
    stats = await raw.info("commandstats")
    return {k.removeprefix("cmdstat_"): v["calls"] for k, v in stats.items()}


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    out = {k: after[k] - before.get(k, 0) for k in after}
    return {k: v for k, v in out.items() if v and k != "info"}


def errors(mode: str) -> float:
    return REGISTRY.get_sample_value("proxy_ratelimit_backend_errors_total", {"mode": mode}) or 0.0


def waits_until(d: Decision, until: float, asked: float) -> bool:
    """Whether ``d`` says to wait until ``until`` (wall clock) as reckoned at some moment between
    ``asked`` (before the call) and now: exact on any machine, however slow the call was."""
    return (until - time.time()) * 1000 - 2 <= d.retry_after_ms <= (until - asked) * 1000 + 2


def crc16(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def slot(key: str) -> int:
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    return crc16(key.encode()) % 16384


async def test_exactly_limit_of_3l_concurrent_attempts_across_replicas(
    redis_url: str, lim: RedisLimiter
) -> None:
    other = RedisLimiter.create(redis_url, fail_mode="open", timeout_s=LIVE_TIMEOUT_S)
    try:
        target = LimitTarget("t/c", (RateWindow(20, 60.0),))
        results = await asyncio.gather(*(r.acquire(target) for r in [lim, other] * 30))
        # Every answer is Redis's (none the in-process fallback's): exactly the limit is admitted.
        assert not [d for d in results if d.source == "fallback"]
        assert sum(d.allowed for d in results) == 20
        assert {d.source for d in results if not d.allowed} <= {"configured", "local-cache"}
    finally:
        await other.close()


async def test_one_evalsha_per_call_and_none_for_known_denials(lim: RedisLimiter, raw: Redis) -> None:
    target = LimitTarget("t/c", (RateWindow(20, 60.0),))
    assert (await lim.acquire(target)).allowed  # loads the script once
    first_answered = time.monotonic()  # the next cell is due 3 s after the first call, at the latest
    before = await commands(raw)
    for _ in range(19):
        assert (await lim.acquire(target)).allowed
    d = delta(before, await commands(raw))
    assert d["evalsha"] == 19 and d["time"] == 19  # TIME runs once inside each script
    assert not {"eval", "script|load", "get", "incr", "multi", "exec"} & d.keys()
    # The 20th call's answer already said "full until T": every later call before T is denied
    # in-process, without a Redis command.
    before = await commands(raw)
    for _ in range(100):
        d2 = await lim.acquire(target)
        left_ms = (first_answered + 3.0 - time.monotonic()) * 1000
        assert not d2.allowed and d2.source == "local-cache" and 0 < d2.retry_after_ms <= left_ms + 2
        assert d2.state.source == "configured" and d2.state.remaining == 0
    assert (await lim.peek(target)).is_limited
    assert delta(before, await commands(raw)) == {}  # zero Redis commands for 101 calls


class Channel:
    """Stands in for the store's invalidation channel between limiters in one test."""

    def __init__(self) -> None:
        self.limiters: list[RedisLimiter] = []
        self.announced: list[str] = []

    def join(self, limiter: RedisLimiter) -> RedisLimiter:
        self.limiters.append(limiter)
        limiter.use_invalidations(self.announce)
        return limiter

    async def announce(self, scope: str) -> None:
        self.announced.append(scope)
        tenant, _, connection = scope.partition("/")
        for limiter in self.limiters:
            limiter.on_invalidation(tenant, connection)


async def test_unconstrained_scope_with_nothing_learned_skips_redis_once_wired(
    redis_url: str, raw: Redis
) -> None:
    channel = Channel()
    a = channel.join(RedisLimiter.create(redis_url, fail_mode="closed", timeout_s=LIVE_TIMEOUT_S))
    b = channel.join(RedisLimiter.create(redis_url, fail_mode="closed", timeout_s=LIVE_TIMEOUT_S))
    plain = RedisLimiter.create(redis_url, fail_mode="closed", timeout_s=LIVE_TIMEOUT_S)  # not wired
    free = LimitTarget("t/free")
    try:
        for lim in (a, b, plain):
            assert (await lim.acquire(free)).allowed  # one round trip each
        before = await commands(raw)
        for _ in range(50):
            da, db = await a.acquire(free), await b.acquire(free)
            assert da.allowed and db.allowed and da.state.source is None
            assert not (await a.peek(free)).is_limited
        assert delta(before, await commands(raw)) == {}  # 150 answers, no Redis command
        before = await commands(raw)
        for _ in range(5):
            assert (await plain.acquire(free)).allowed
        assert delta(before, await commands(raw))["evalsha"] == 5  # unwired: a round trip each

        # b learns a block; a stops at once (as soon as the announcement arrives), b too.
        until = time.time() + 2
        await b.observe("t/free", Observation(429, until, (), ("retry-after",)))
        assert channel.announced == ["t/free"]
        for lim in (a, b, plain):
            asked = time.time()
            d = await lim.acquire(free)
            assert not d.allowed and waits_until(d, until, asked), d
        # Not the first live state: nothing to announce again.
        await a.observe("t/free", Observation(429, time.time() + 3, (), ("retry-after",)))
        assert channel.announced == ["t/free"]
    finally:
        for lim in (a, b, plain):
            await lim.close()


async def test_remembered_nothing_expires_and_a_racing_invalidation_wins(
    redis_url: str, raw: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    from proxy.ratelimit import redis as redis_limiter

    monkeypatch.setattr(redis_limiter, "CLEAR_TTL_S", 0.2)
    lim = Channel().join(RedisLimiter.create(redis_url, fail_mode="closed", timeout_s=LIVE_TIMEOUT_S))
    free = LimitTarget("t/ttl")
    try:
        await lim.acquire(free)
        before = await commands(raw)
        await lim.acquire(free)
        assert delta(before, await commands(raw)) == {}
        await asyncio.sleep(0.25)
        before = await commands(raw)
        await lim.acquire(free)  # the memo lapsed: asked again (a lost announcement costs <= TTL)
        assert delta(before, await commands(raw))["evalsha"] == 1

        # An invalidation landing while a round trip is under way: its answer is not remembered.
        lim.on_invalidation("*", None)
        real_run = lim._run

        async def run_with_invalidation(keys: list[str], args: list[Any]) -> list[Any] | None:
            reply = await real_run(keys, args)
            lim.on_invalidation("t", "ttl")
            return reply

        monkeypatch.setattr(lim, "_run", run_with_invalidation)
        await lim.acquire(free)
        assert "t/ttl" not in lim._clear
        monkeypatch.setattr(lim, "_run", real_run)
        await lim.acquire(free)
        assert "t/ttl" in lim._clear
    finally:
        await lim.close()


async def test_scopes_with_configured_windows_or_learned_state_always_ask_redis(
    redis_url: str, raw: Redis
) -> None:
    lim = Channel().join(RedisLimiter.create(redis_url, fail_mode="closed", timeout_s=LIVE_TIMEOUT_S))
    windowed = LimitTarget("t/w", (RateWindow(1000, 60.0),))
    learned = LimitTarget("t/l")
    try:
        await lim.observe(
            "t/l", Observation(200, None, (Policy("h", 100, 3600.0, 50, time.time() + 30),), ())
        )
        await lim.acquire(windowed)
        await lim.acquire(learned)
        before = await commands(raw)
        for _ in range(4):
            assert (await lim.acquire(windowed)).allowed
            assert (await lim.acquire(learned)).allowed  # counts the learned remaining down
        assert delta(before, await commands(raw))["evalsha"] == 8
        assert (await lim.peek(learned)).remaining == 50 - 5
    finally:
        await lim.close()


async def test_every_key_has_a_ttl_and_one_call_stays_in_one_slot(lim: RedisLimiter, raw: Redis) -> None:
    q = (RateWindow(100, 10.0),)
    plain = LimitTarget("t/plain", (RateWindow(10, 60.0),))
    members = [
        LimitTarget(f"t{i}/m", (RateWindow(5, 1.0),), quota_key="app", quota_windows=q) for i in range(3)
    ]
    for target in [plain, *members]:
        for _ in range(3):
            await lim.acquire(target)
    await lim.observe(
        "t/learned", Observation(200, None, (Policy("h", 100, 3600.0, 50, time.time() + 30),), ())
    )
    await lim.observe("t/blocked", Observation(429, time.time() + 5, (), ("retry-after",)))
    keys = [k async for k in raw.scan_iter("*")]
    assert len(keys) == 1 + 3 + 3 + 2  # plain, 3 members + group hash/zset/weights, 2 observed
    for key in keys:
        ttl = await raw.pttl(key)
        assert 0 < ttl <= 61_000, key  # derived from the state it holds, plus a 1 s margin
    assert 0 < await raw.pttl("{rl:t/plain}:s") <= 19_000  # 3 calls of a 6 s cell: ~18 s + margin
    assert 29_000 < await raw.pttl("{rl:t/learned}:s") <= 31_000
    grouped = [k for k in keys if k.startswith("{rlq:app}")]
    assert len(grouped) == 6 and len({slot(k) for k in grouped}) == 1
    assert slot("foo") == 12182  # the helper matches Redis Cluster's own slot function
    for scope, quota in [("t/c", None), ("t/c", "app")]:
        assert len({slot(k) for k in keys_for(scope, quota, True)}) == 1


async def test_observation_reaches_every_replica(redis_url: str, lim: RedisLimiter) -> None:
    other = RedisLimiter.create(redis_url, fail_mode="open", timeout_s=LIVE_TIMEOUT_S)
    try:
        # 100 a minute: one unit refills every 0.6 s ("remaining" below allows for what refilled).
        target = LimitTarget("t/c", (RateWindow(100, 60.0),))
        used_at = time.monotonic()
        assert (await other.acquire(target)).allowed
        until = time.time() + 2
        await lim.observe("t/c", Observation(429, until, (), ("retry-after",)))
        asked = time.time()
        d = await other.acquire(target)
        assert not d.allowed and d.source == "learned" and waits_until(d, until, asked), d
        mine = await lim.acquire(target)  # the observing process knows without asking
        assert not mine.allowed and mine.source == "local-cache"
        view = await other.describe(target)
        assert view["backend"] == "redis" and view["blocked_until"] is not None
        refilled = int((time.monotonic() - used_at) / 0.6)
        assert 99 <= view["windows"][0]["remaining"] <= min(100, 99 + refilled), view
        assert view["state"]["source"] == "learned"
        await other.reset("t/c")
        await lim.reset("t/c")
        assert (await lim.acquire(target)).allowed
    finally:
        await other.close()


async def test_learned_policy_counts_down_across_replicas(redis_url: str, lim: RedisLimiter) -> None:
    other = RedisLimiter.create(redis_url, fail_mode="open", timeout_s=LIVE_TIMEOUT_S)
    try:
        target = LimitTarget("t/c", reserve=1)
        reset = time.time() + 20
        await lim.observe("t/c", Observation(200, None, (Policy("day", 1000, 86400.0, 6, reset),), ("ietf",)))
        await other.observe(
            "t/c", Observation(200, None, (Policy("day", 1000, 86400.0, 9, reset),), ("ietf",))
        )
        got = [await (lim if i % 2 else other).acquire(target) for i in range(8)]
        assert sum(d.allowed for d in got) == 5  # 6 remaining, 1 kept in reserve, 9 was a late answer
        assert (await lim.peek(target)).remaining == 0
    finally:
        await other.close()


async def test_fair_share_between_two_members(lim: RedisLimiter) -> None:
    q = (RateWindow(40, 4.0),)  # one unit refills every 0.1 s
    alone = LimitTarget("t0/c", quota_key="solo", quota_windows=q)
    t0 = time.monotonic()
    got = sum([(await lim.acquire(alone)).allowed for _ in range(60)])
    # The whole budget (not a half share), plus what refilled while a slow machine made the calls.
    assert 40 <= got <= 40 + int((time.monotonic() - t0) / 0.1) + 1, got
    noisy = LimitTarget("t1/c", quota_key="app", quota_windows=q)
    quiet = LimitTarget("t2/c", quota_key="app", quota_windows=q)
    counts = {"noisy": 0, "quiet": 0, "quiet_denied": 0}
    done = asyncio.Event()

    def tally(d: Decision) -> None:
        counts["quiet" if d.allowed else "quiet_denied"] += 1

    async def hammer() -> None:
        while not done.is_set():
            counts["noisy"] += (await lim.acquire(noisy)).allowed
            await asyncio.sleep(0.001)

    async def steady() -> None:
        for _ in range(14):  # ~1.5 s of one call every 0.1 s, however slow the machine
            await asyncio.sleep(0.1)
            tally(await lim.acquire(quiet))
        done.set()

    t0 = time.monotonic()
    tally(await lim.acquire(quiet))  # the quiet member is active first
    quiet_task = asyncio.create_task(steady())
    await hammer()
    await quiet_task
    elapsed = time.monotonic() - t0
    # half the burst (20) plus half the rate (5/s) over the run, never the whole budget
    assert counts["noisy"] <= 20 + int(elapsed / 0.2) + 1
    assert counts == {**counts, "quiet": 15, "quiet_denied": 0}  # never starved
    view = await lim.describe(noisy)
    assert view["quota"]["windows"][0]["share"] == 0.5


async def test_make_limiter_builds_the_redis_limiter(redis_url: str) -> None:
    lim = make_limiter(Settings(redis_url=redis_url, ratelimit_fail_mode="closed"))
    try:
        assert isinstance(lim, RedisLimiter) and lim.fail_mode == "closed"
        assert (await lim.acquire(LimitTarget("t/c", (RateWindow(1, 1.0),)))).allowed
    finally:
        await lim.close()


def live(st: gcra.ScopeState, now: int) -> tuple[dict[str, int], dict[str, gcra.Learned], int]:
    return (
        {f: v for f, v in st.tats.items() if v > now},
        {n: p for n, p in st.policies.items() if p.reset_us > now},
        st.blocked_us if st.blocked_us > now else 0,
    )


async def test_lua_and_python_agree_decision_for_decision(raw: Redis) -> None:
    """One random sequence through limiter.lua and gcra.evaluate, at the script's own clock."""
    script = raw.register_script(SCRIPT)
    rng = random.Random(20240601)
    q = (RateWindow(8, 0.4), RateWindow(30, 3.0))
    targets = [
        LimitTarget("t/a", (RateWindow(5, 0.2), RateWindow(12, 1.0))),
        LimitTarget("t/b", (RateWindow(3, 0.1, burst=2),), reserve=1),
        LimitTarget("t1/m", (RateWindow(50, 1.0),), quota_key="app", quota_windows=q),
        LimitTarget("t2/m", (), quota_key="app", quota_windows=q, weight=2.5),
        LimitTarget("t3/m", (), quota_key="app", quota_windows=q, weight=0.5),
    ]
    scopes = {t.scope: gcra.ScopeState() for t in targets}
    group = gcra.GroupState()
    allowed = denied = learned = last_now = 0
    for _ in range(600):
        t = rng.choice(targets)
        spec = compile_target(t)
        keys = keys_for(t.scope, t.quota_key, bool(spec.quota))
        roll = rng.random()
        if roll < 0.12:
            now = time.time()
            policies = tuple(
                Policy(
                    name,
                    20,
                    rng.choice([None, 0.5]),
                    rng.randrange(0, 6),
                    rng.choice([None, now + rng.random()]),
                )
                for name in rng.sample(["a", "b"], rng.randrange(0, 3))
            )
            blocked = now + rng.random() * 0.3 if rng.random() < 0.3 else None
            blocked_us, pols = observation_args(Observation(200, blocked, policies, ()), int(now * gcra.US))
            args: list[Any] = ["o", blocked_us, len(pols)]
            for name, p in pols:
                args += [name, p.remaining, p.reset_us, p.limit, p.window_us]
            last_now = int((await script(keys=keys[:1], args=args))[0])
            gcra.apply_observation(scopes[t.scope], blocked_us, pols, last_now)
        else:
            mode = "a" if roll < 0.9 else "p"
            cost = rng.choice([1, 1, 1, 2])
            out = _outcome(await script(keys=keys, args=[mode, *_args(spec, cost)]))
            last_now = out.now_us
            py = gcra.evaluate(
                spec, scopes[t.scope], group if spec.quota else None, last_now, cost, mode == "a"
            )
            assert py == out
            allowed += out.allowed
            denied += not out.allowed
            learned += out.wait_source == gcra.SRC_LEARNED
        # The stored state equals the Python state, up to what is past (past = no state, and
        # Redis lets it expire).
        stored = live(gcra.ScopeState.from_hash(await raw.hgetall(keys[0])), last_now)
        assert stored == live(scopes[t.scope], last_now)
        await asyncio.sleep(rng.choice([0, 0, 0.001, 0.005, 0.02]))
    horizon = max(c.horizon for c in compile_target(targets[2]).quota)
    active = {m: int(s) for m, s in await raw.zrange("{rlq:app}:a", 0, -1, withscores=True)}
    recent = {m: t for m, t in group.active.items() if t > last_now - horizon}
    assert {m: t for m, t in active.items() if t > last_now - horizon} == recent
    weights = {m: float(w) for m, w in (await raw.hgetall("{rlq:app}:w")).items()}
    assert {m: weights[m] for m in recent} == {m: group.weights[m] for m in recent}
    assert min(allowed, denied, learned) > 10  # the sequence exercised every path
