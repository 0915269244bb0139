"""The Redis store and limiter through Sentinel (``redis+sentinel://``), across a failover under load.

A real set-up (``tests.support.redis_topologies.SentinelSet``): one master, one or two replicas,
three sentinels. Two service replicas (each its own store and limiter, as two processes would
have) write connections, take the refresh lock and consume one rate limit while a sentinel is
asked for a manual failover (``SENTINEL FAILOVER``). With ``wait_replicas`` = the number of
replicas, every write and every admission is confirmed by every replica before it counts, so:

- no acknowledged write is lost (every one is read back from the new master);
- the limiter never admits more than its limit; it admits fewer only by admissions that ran but
  were refused as unconfirmed (the new master has no replica until the old one rejoins);
- the lock is never held by two replicas at once;
- invalidation reaches the other replica within a second after the failover.

What callers saw is printed (``-s``): the failover time, errors by operation, admitted vs limit.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import pytest

from proxy.errors import ServiceUnavailable, StoreUnavailable
from proxy.model import ConnectionRecord, RateWindow
from proxy.ratelimit.limiter import LimitTarget
from proxy.ratelimit.redis import RedisLimiter
from proxy.store.redis import RedisStore
from tests.support.redis_topologies import SentinelSet

pytestmark = pytest.mark.system

LIMIT = 400
LOCK_TTL_S = 2.0


@dataclass(frozen=True)
class Case:
    replicas: int
    wait_replicas: int
    crash: bool


# A manual failover keeps the old master taking writes until Sentinel demotes it (~10 s), so only
# waiting for every replica is safe; a crash leaves no old master writing, so one of two is.
CASES = [Case(1, 1, crash=False), Case(2, 1, crash=True)]


@pytest.fixture(params=CASES, ids=["manual-1-replica-wait-1", "crash-2-replicas-wait-1"])
def case(request: pytest.FixtureRequest) -> Case:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def sentinel_set(case: Case) -> Iterator[SentinelSet]:
    s = SentinelSet(replicas=case.replicas)
    try:
        s.start()
        yield s
    finally:
        s.stop()


@dataclass
class Replica:
    store: RedisStore
    limiter: RedisLimiter


@pytest.fixture
async def replicas(sentinel_set: SentinelSet, case: Case) -> AsyncIterator[list[Replica]]:
    # (A manual failover with two replicas and wait_replicas=1 lost acknowledged writes: the old
    # master's other replica confirmed them, then resynced from the new master. See the README.)
    url = sentinel_set.url(f"wait_replicas={case.wait_replicas}&wait_timeout_ms=500")
    made = []
    for _ in range(2):
        store = RedisStore(url, timeout_s=1.0)
        await store.open()
        made.append(Replica(store, RedisLimiter.create(url, fail_mode="closed", timeout_s=1.0)))
    yield made
    for r in made:
        await r.limiter.close()
        await r.store.close()


@dataclass
class Seen:
    acked: list[str] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    write_ok_at: list[float] = field(default_factory=list)
    admitted: int = 0
    unconfirmed: int = 0
    holds: list[tuple[float, float]] = field(default_factory=list)


async def test_failover_under_load_loses_nothing_acknowledged(
    sentinel_set: SentinelSet, replicas: list[Replica], case: Case
) -> None:
    a, b = replicas
    seen = Seen()
    stop = asyncio.Event()
    # A week-long window: nothing refills while the test runs, so admissions are countable.
    target = LimitTarget("acme/github", (RateWindow(LIMIT, 7 * 86400.0),))

    async def writer(r: Replica, name: str) -> None:
        i = 0
        while not stop.is_set():
            cid = f"{name}-{i}"
            i += 1
            try:
                await r.store.put_connection(
                    ConnectionRecord(tenant_id="acme", connection_id=cid, integration_id="http_bearer"), None
                )
            except StoreUnavailable:
                seen.errors["put_connection"] += 1
                await asyncio.sleep(0.01)
                continue
            seen.acked.append(cid)
            seen.write_ok_at.append(time.monotonic())

    async def spender(r: Replica) -> None:
        while not stop.is_set() and seen.admitted < LIMIT:
            try:
                decision = await r.limiter.acquire(target)
            except ServiceUnavailable:
                seen.errors["acquire"] += 1
                seen.unconfirmed += 1
                await asyncio.sleep(0.01)
                continue
            seen.admitted += decision.allowed
            await asyncio.sleep(0.02)

    async def locker(r: Replica) -> None:
        while not stop.is_set():
            try:
                token = await r.store.acquire_lock("refresh:acme/github", LOCK_TTL_S)
            except StoreUnavailable:
                seen.errors["acquire_lock"] += 1
                await asyncio.sleep(0.01)
                continue
            if token is None:
                await asyncio.sleep(0.002)
                continue
            start = time.monotonic()
            await asyncio.sleep(0.02)  # the "refresh"
            end = time.monotonic()
            try:
                released = await r.store.release_lock("refresh:acme/github", token)
            except StoreUnavailable:
                seen.errors["release_lock"] += 1
                released = False
            # Unreleased, the lock may still be held until its TTL ends: count it held till then.
            seen.holds.append((start, end if released else start + LOCK_TTL_S))

    heard: asyncio.Queue[tuple[float, str, str | None]] = asyncio.Queue()

    async def on(tenant: str, connection: str | None) -> None:
        heard.put_nowait((time.monotonic(), tenant, connection))

    await b.store.subscribe_invalidations(on)
    tasks = [
        asyncio.create_task(c)
        for c in (writer(a, "a"), writer(b, "b"), spender(a), spender(b), locker(a), locker(b))
    ]
    await asyncio.sleep(0.5)
    assert seen.acked and seen.admitted, "load did not start"
    began = time.monotonic()
    old, new = await asyncio.to_thread(sentinel_set.failover, crash=case.crash)
    failover_s = time.monotonic() - began
    await asyncio.sleep(1.0)
    stop.set()
    # Spend what is left of the limit, then the limiter must refuse.
    while seen.admitted < LIMIT:
        decision = await a.limiter.acquire(target)
        seen.admitted += decision.allowed
        if not decision.allowed:
            break
    await asyncio.gather(*tasks)
    extra = await asyncio.gather(*(r.limiter.acquire(target) for r in (a, b) for _ in range(5)))
    seen.admitted += sum(d.allowed for d in extra)

    # No acknowledged write lost: every one is on the new master.
    assert new != old
    missing = [cid for cid in seen.acked if await b.store.get_connection("acme", cid) is None]
    assert missing == []
    # The limiter: never more than the limit; fewer only by admissions the replica did not confirm.
    assert LIMIT - seen.unconfirmed <= seen.admitted <= LIMIT
    # The lock: no two holds overlap.
    holds = sorted(seen.holds)
    assert len(holds) > 10
    assert all(prev[1] <= nxt[0] for prev, nxt in itertools.pairwise(holds))

    # Invalidation after the failover: the subscription made before it still delivers (on the
    # new master), to the other replica, within a second.
    while not heard.empty():
        heard.get_nowait()
    delays = []
    for i in range(10):
        start = time.monotonic()
        await a.store.put_connection(ConnectionRecord("acme", f"after-{i}", "http_bearer"), None)
        while True:
            at, _, connection = await asyncio.wait_for(heard.get(), 1.0)
            if connection == f"after-{i}":
                break
        delays.append(at - start)
    assert max(delays) < 1.0

    gaps = [y - x for x, y in zip(seen.write_ok_at, seen.write_ok_at[1:], strict=False)]
    print(
        f"\nsentinel {'crash' if case.crash else 'manual'} failover, {case.replicas} replica(s), "
        f"wait_replicas={case.wait_replicas}: {failover_s:.2f} s until the new master and its replicas were in place; "
        f"longest gap between acknowledged writes {max(gaps):.2f} s; acknowledged writes {len(seen.acked)}, "
        f"lost 0; errors seen by callers {dict(seen.errors)}; admitted {seen.admitted} of limit {LIMIT} "
        f"({seen.unconfirmed} calls refused with 503 while no replica could confirm); lock holds {len(holds)}, overlaps 0; "
        f"invalidation after failover median {statistics.median(delays) * 1000:.1f} ms"
    )
