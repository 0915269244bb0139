"""bench/ratelimit.py counts what it claims: its "redis commands per admitted call" counts the
rate limiter's round trips only, not the store's batched audit and last-used writes that share
the Redis. Real redis-server, real MONITOR, the service's real limiter and store."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from proxy.model import ApiKeyRecord, AuditEvent, RateWindow
from proxy.ratelimit.limiter import LimitTarget
from proxy.ratelimit.redis import RedisLimiter
from proxy.security import crypto
from proxy.store.redis import RedisStore
from tests.support.redis_server import RedisServer

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.append(str(BENCH))  # appended: bench/proxy.py must never shadow the proxy package

import ratelimit as bench  # noqa: E402


async def test_only_the_limiters_commands_count_per_call(redis_server: RedisServer, redis_url: str) -> None:
    store = RedisStore(redis_url)
    await store.open()
    limiter = RedisLimiter.create(redis_url, fail_mode="closed", timeout_s=2.0)
    target = LimitTarget(scope="t1/c1", windows=(RateWindow(limit=1000, window_s=3600.0),))
    key_id, full = crypto.new_api_key()
    await store.put_api_key(
        ApiKeyRecord(
            key_id=key_id, tenant_id="t1", secret_hash=crypto.hash_api_key(full), created_at=time.time()
        )
    )
    try:
        assert (await limiter.acquire(target)).allowed  # loads the script before counting
        monitor = bench.Monitor(redis_server.port)
        try:
            monitor.take()
            for _ in range(3):
                assert (await limiter.acquire(target)).allowed
            # What a flush interval adds while calls run: an audit batch and last-used times.
            await store.append_audit(
                [AuditEvent(ts=time.time(), tenant_id="t1", action="proxy.use", actor="a")]
            )
            await store.touch_api_keys({key_id: time.time()})
            client, _ = monitor.take()
        finally:
            monitor.close()
    finally:
        await limiter.close()
        await store.close()
    assert client["evalsha(limiter)"] == 3, client
    assert sum(client.values()) > 3, f"the store's batch was not seen at all: {client}"
    assert bench.limiter_commands(client) == 3, client
