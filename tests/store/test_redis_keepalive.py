"""The invalidation subscription probes a silent link sparingly (a keepalive published on its own
channel) and stays up while Redis answers."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis

from proxy.store.redis import RedisStore
from proxy.store.redis import pubsub as redis_pubsub
from tests.support.wait import wait_until


def _publishes(url: str) -> int:
    stats = redis.Redis.from_url(url).info("commandstats")
    return int(stats.get("cmdstat_publish", {}).get("calls", 0))


async def test_idle_subscription_pings_at_most_once_per_interval(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_pubsub, "PUBSUB_PING_S", 0.3)
    monkeypatch.setattr(redis_pubsub, "PUBSUB_DEAD_S", 2.0)
    store = RedisStore(redis_url, timeout_s=1.0)
    await store.open()
    flushes: list[Any] = []
    await store.subscribe_invalidations(lambda t, c: flushes.append((t, c)))
    before = _publishes(redis_url)
    await asyncio.sleep(3.0)
    probes = _publishes(redis_url) - before
    # Idle for 3 s with a 0.3 s probe interval: a handful of probes, never a flood ...
    assert 1 <= probes <= 12, probes
    # ... and the answers keep the link alive: no reconnect, so no flush-everything delivered.
    assert flushes == []
    await store.publish_invalidation("t1", "c1")
    await wait_until(lambda: flushes, timeout=1.0)
    assert flushes == [("t1", "c1")]
    await store.close()
