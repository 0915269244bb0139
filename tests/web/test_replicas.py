"""Several real service processes sharing one Redis behave as one service.

- a configured limit L admits exactly L calls in total, whichever replica they reach;
- an upstream 429 with Retry-After seen by one replica stops every replica for that long;
- an admin change made through one replica is used by the others within a second.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from redis.asyncio import Redis

from proxy.ratelimit.redis import keys_for
from proxy.security import crypto
from tests.support.app import ServiceProcess, bearer, start_service_process
from tests.support.upstream import Upstream
from tests.support.wait import wait_until

pytestmark = pytest.mark.system


@pytest.fixture
def replicas(tmp_path: Path, redis_url: str) -> Iterator[list[ServiceProcess]]:
    # Replicas share one key ring, as production replicas must.
    env = {"PROXY_MASTER_KEY": crypto.generate_master_key_text().strip()}
    procs = [
        start_service_process(tmp_path / f"r{i}", redis_url=redis_url, env=env, wait=False) for i in range(3)
    ]
    try:
        for p in procs:
            p.wait_ready()
        yield procs
    finally:
        for p in procs:
            p.stop()


async def _setup(
    session: aiohttp.ClientSession,
    replica: ServiceProcess,
    upstream: Upstream,
    limits: list[dict[str, object]],
) -> str:
    body = {
        "integration_id": "http_bearer",
        "parameters": {"token": "tok-1", "base_url": upstream.url},
        "rate_limits": limits,
    }
    async with session.put(
        f"{replica.url}/admin/tenants/t1/connections/api", json=body, headers=replica.admin_headers
    ) as r:
        assert r.status in (200, 201), await r.text()
    async with session.post(
        f"{replica.url}/admin/tenants/t1/api-keys", json={"name": "w"}, headers=replica.admin_headers
    ) as r:
        return str((await r.json())["api_key"])


async def _call(
    session: aiohttp.ClientSession, replica: ServiceProcess, key: str, path: str = "/echo"
) -> int:
    headers = {**bearer(key), "X-Connection-Id": "api"}
    async with session.get(f"{replica.url}/proxy{path}", headers=headers) as r:
        await r.read()
        return r.status


async def test_exactly_the_limit_is_admitted_across_replicas(
    replicas: list[ServiceProcess], upstream: Upstream
) -> None:
    async with aiohttp.ClientSession() as s:
        key = await _setup(s, replicas[0], upstream, [{"limit": 12, "window": "1h"}])
        statuses = await asyncio.gather(*(_call(s, replicas[i % 3], key) for i in range(45)))
    assert statuses.count(200) == 12
    assert statuses.count(429) == 33
    assert len(upstream.seen) == 12


async def _blocked_until(raw: Redis) -> float | None:
    """The learned block of the test connection's scope in Redis (epoch seconds), if any."""
    value = await raw.hget(keys_for("t1/api", None, False)[0], "b")
    return int(value) / 1e6 if value else None


async def test_learned_retry_after_stops_every_replica(
    replicas: list[ServiceProcess], upstream: Upstream, redis_url: str
) -> None:
    raw = Redis.from_url(redis_url)
    async with aiohttp.ClientSession() as s:
        key = await _setup(s, replicas[0], upstream, [])
        assert await _call(s, replicas[0], key, "/status/429?retry_after=3") == 429
        seen_before = len(upstream.seen)
        # The observation is merged off the latency path: wait for it to land in Redis, then
        # call every replica until 1 s before the block ends (slack for a slow call's decision).
        ends = await wait_until(
            lambda: _blocked_until(raw), timeout=10, message="the learned block never reached Redis"
        )
        during = []
        while time.time() < ends - 1.0:
            for replica in replicas:
                during.append(await _call(s, replica, key))
            await asyncio.sleep(0.1)
        assert during and set(during) == {429}
        assert len(upstream.seen) == seen_before, "an upstream call slipped through during Retry-After"
        await asyncio.sleep(max(0.0, ends + 0.2 - time.time()))
        assert {await _call(s, r, key) for r in replicas} == {200}
    await raw.aclose()


async def test_admin_change_reaches_other_replicas_within_a_second(
    replicas: list[ServiceProcess], upstream: Upstream
) -> None:
    async with aiohttp.ClientSession() as s:
        key = await _setup(s, replicas[0], upstream, [])
        # Warm every replica's credential cache with the old token.
        for r in replicas:
            assert await _call(s, r, key) == 200
        body = {"integration_id": "http_bearer", "parameters": {"token": "tok-2", "base_url": upstream.url}}
        async with s.put(
            f"{replicas[0].url}/admin/tenants/t1/connections/api",
            json=body,
            headers=replicas[0].admin_headers,
        ) as resp:
            assert resp.status == 200
        changed_at = time.monotonic()
        for replica in replicas[1:]:
            while True:
                upstream.seen.clear()
                assert await _call(s, replica, key) == 200
                if upstream.seen[-1].header("Authorization") == ["Bearer tok-2"]:
                    break
                assert time.monotonic() - changed_at < 1.0, "replica still used the old token after 1 s"
                await asyncio.sleep(0.05)


async def test_revoked_key_is_refused_by_every_replica_within_a_second(
    replicas: list[ServiceProcess], upstream: Upstream
) -> None:
    async with aiohttp.ClientSession() as s:
        key = await _setup(s, replicas[0], upstream, [])
        for r in replicas:  # every replica has verified (and cached) the key
            assert await _call(s, r, key) == 200
        key_id = key.split("_")[1]
        async with s.delete(
            f"{replicas[0].url}/admin/tenants/t1/api-keys/{key_id}", headers=replicas[0].admin_headers
        ) as resp:
            assert resp.status == 204
        revoked_at = time.monotonic()
        for replica in replicas[1:]:
            while await _call(s, replica, key) != 401:
                assert time.monotonic() - revoked_at < 1.0, "a replica still accepted a revoked key after 1 s"
                await asyncio.sleep(0.05)


async def test_proxy_only_reaches_other_replicas_within_a_second(
    replicas: list[ServiceProcess], upstream: Upstream
) -> None:
    """Turning a tenant proxy-only is a protection (secrets withheld from the Connection Service,
    redacted from echoes): every replica applies it within a second, not its cache's lifetime."""
    async with aiohttp.ClientSession() as s:
        key = await _setup(s, replicas[0], upstream, [])

        async def token_shown(replica: ServiceProcess) -> bool:
            async with s.get(f"{replica.url}/connections/t1/api", headers=bearer(key)) as r:
                assert r.status == 200, await r.text()
                return "tok-1" in await r.text()

        for r in replicas:  # every replica has cached "not proxy-only"
            assert await token_shown(r)
        async with s.put(
            f"{replicas[0].url}/admin/tenants/t1",
            json={"proxy_only": True},
            headers=replicas[0].admin_headers,
        ) as resp:
            assert resp.status == 200
        changed_at = time.monotonic()
        for replica in replicas[1:]:
            while await token_shown(replica):
                assert time.monotonic() - changed_at < 1.0, "a replica still showed the secret after 1 s"
                await asyncio.sleep(0.05)
