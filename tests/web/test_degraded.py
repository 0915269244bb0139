"""Graceful degradation, tested by really stopping the store while callers keep calling.

Redis: a dedicated redis-server (AOF, so it comes back with its data) is killed with SIGKILL and
started again on the same port. SQLite: the data directory is moved away and back (the one
outage that really stops the embedded store: in WAL mode its open file keeps answering through
chmod, which root ignores, and through another process's locks, which do not block WAL readers).

While the store is down, a loop of callers keeps proxying through the service. Asserted: calls
keep succeeding from cached credentials (and cached caller keys) for ``stale_if_error_s`` after
their last load and then answer 503 ``SERVICE_UNAVAILABLE``, never anything else; ``/readyz``
says degraded with the reason, then 503; the stale-serve counter moves on the live ``/metrics``;
admin writes answer 503 saying the store is unreachable; a key revoked and a connection deleted
before the outage stay refused; the audit trail marks the stale uses; and once the store is
back, calls, writes and readiness recover. The figures (how long it kept serving, what callers
saw, recovery time) are printed (``pytest -s``) for the report.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import re
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.security import auth
from tests.support.app import RunningService, bearer, running_service
from tests.support.redis_server import RedisServer
from tests.support.upstream import Upstream
from tests.support.wait import wait_until

T = "acme"
CANARY = "tok-canary-5e1f0c"  # the connection's secret: in no degraded answer, metric or message
STALE_S = 3.0
TTL_S = 0.3
CALLERS = 4


@dataclass
class Call:
    started: float
    finished: float
    status: int
    code: str | None
    message: str | None = None


@dataclass
class Load:
    """Callers proxying through the service in a loop, every answer recorded."""

    svc: RunningService
    key: str
    calls: list[Call] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def caller(self) -> None:
        headers = {**bearer(self.key), "X-Connection-Id": "c1"}
        while not self.stop.is_set():
            started = time.monotonic()
            async with self.svc.session.get(self.svc.url + "/proxy/echo", headers=headers) as r:
                body = await r.json()
                code = r.headers.get("X-Proxy-Error")
                message = body.get("message") if code else None
                self.calls.append(Call(started, time.monotonic(), r.status, code, message))
            await asyncio.sleep(0.005)

    def since(self, t: float, until: float = float("inf")) -> list[Call]:
        return [c for c in self.calls if t <= c.started < until]


class Outage:
    """Stops and restores one back end for real."""

    async def begin(self) -> None:
        raise NotImplementedError

    async def end(self) -> None:
        raise NotImplementedError


class RedisOutage(Outage):
    def __init__(self, server: RedisServer) -> None:
        self.server = server

    async def begin(self) -> None:
        await asyncio.to_thread(self.server.stop)  # SIGKILL

    async def end(self) -> None:
        await asyncio.to_thread(self.server.start)


class SqliteOutage(Outage):
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.away = data_dir.with_name(data_dir.name + "-away")

    async def begin(self) -> None:
        os.rename(self.data_dir, self.away)

    async def end(self) -> None:
        os.rename(self.away, self.data_dir)


@pytest.fixture
def dedicated_redis() -> Iterator[RedisServer]:
    """Not the suite's shared server: this test kills it."""
    server = RedisServer(persist=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "redis"])
async def setup(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[RunningService, Outage, str]]:
    # Caller keys expire from their cache as fast as credentials here, so both serve stale.
    monkeypatch.setattr(auth, "KEY_CACHE_TTL_S", TTL_S)
    data_dir = tmp_path / "data"
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("dedicated_redis")
        redis_url: str | None = server.url
        outage: Outage = RedisOutage(server)
    else:
        redis_url, outage = None, SqliteOutage(data_dir)
    async with running_service(
        data_dir, redis_url=redis_url, stale_if_error_s=STALE_S, credential_cache_ttl_s=TTL_S
    ) as svc:
        yield svc, outage, request.param


async def _metrics(svc: RunningService) -> str:
    async with svc.session.get(svc.url + "/metrics") as r:
        assert r.status == 200
        return await r.text()


def _sample(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{name}{re.escape('{' + labels + '}') if labels else ''} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


async def _get(session: aiohttp.ClientSession, url: str, **kw: Any) -> tuple[int, Any]:
    async with session.get(url, **kw) as r:
        return r.status, await r.json()


async def _proxy(svc: RunningService, key: str, cid: str) -> tuple[int, Any]:
    return await _get(svc.session, svc.url + "/proxy/echo", headers={**bearer(key), "X-Connection-Id": cid})


def _counts(calls: list[Call]) -> dict[str, int]:
    return dict(collections.Counter(f"{c.status} {c.code or ''}".strip() for c in calls))


async def test_cached_credentials_serve_through_a_store_outage_up_to_the_bound_then_recover(
    setup: tuple[RunningService, Outage, str], upstream: Upstream
) -> None:
    svc, outage, backend = setup
    conn = {
        "integration_id": "http_bearer",
        "parameters": {"token": CANARY, "base_url": upstream.url},
        # A configured limit, so every call asks the limiter (Redis's, on Redis).
        "rate_limits": [{"limit": 1000000, "window": "1m"}],
    }
    await svc.put_connection(T, "c1", conn)
    await svc.put_connection(
        T, "gone", {**conn, "parameters": {"token": "tok-gone", "base_url": upstream.url}}
    )
    key = await svc.mint_key(T)
    # Revoked and deleted before the outage, both once used (so once cached) first.
    revoked = await svc.mint_key(T, "revoked")
    assert (await _proxy(svc, revoked, "c1"))[0] == 200
    assert (await _proxy(svc, key, "gone"))[0] == 200
    status, _ = await svc.admin("DELETE", f"/admin/tenants/{T}/api-keys/{revoked.split('_')[1]}")
    assert status == 204
    assert (await svc.admin("DELETE", f"/admin/tenants/{T}/connections/gone"))[0] == 204
    before = await _metrics(svc)

    load = Load(svc, key)
    callers = [asyncio.create_task(load.caller()) for _ in range(CALLERS)]
    try:
        await wait_until(lambda: len(load.calls) >= 40, timeout=10, message="the load never got going")
        # The revocation's tenant-wide invalidation (SQLite: polled from the change log) must have
        # landed: arriving during the outage it would drop the tenant's copies, as it should.
        await asyncio.sleep(1.0)
        await outage.begin()
        down = time.monotonic()

        # Within the bound: degraded, serving, writes refused, revocations and deletions hold.
        await asyncio.sleep(1.0)
        status, ready = await _get(svc.session, svc.url + "/readyz")
        assert status == 200 and ready["status"] == "degraded", ready
        assert CANARY not in json.dumps(ready)
        assert ready["reason"].startswith("store unreachable") and ready["stale_if_error_s"] == STALE_S
        status, body = await svc.admin("PUT", f"/admin/tenants/{T}/connections/c1", json=conn)
        assert status == 503 and body["error"] == "SERVICE_UNAVAILABLE", body
        assert "store is unreachable" in body["message"] and "retry" in body["message"], body
        # The Connection Service (Runtara's path) answers from the same caches.
        status, doc = await _get(svc.session, f"{svc.url}/connections/{T}/c1", headers=bearer(key))
        assert status == 200 and doc["parameters"]["token"] == CANARY, doc
        status, body = await _proxy(svc, revoked, "c1")
        assert status in (401, 503), body
        status, body = await _proxy(svc, key, "gone")
        assert status in (404, 503), body
        mid = await _metrics(svc)
        assert CANARY not in mid and CANARY not in json.dumps(body)
        assert _sample(mid, "proxy_stale_served_total", 'cache="credentials"') > _sample(
            before, "proxy_stale_served_total", 'cache="credentials"'
        )
        assert _sample(mid, "proxy_stale_served_total", 'cache="api_key"') > _sample(
            before, "proxy_stale_served_total", 'cache="api_key"'
        )
        assert _sample(mid, "proxy_store_degraded") == 1.0
        if backend == "redis":  # the limiter's configured fail mode (open) took over
            assert _sample(mid, "proxy_ratelimit_backend_errors_total", 'mode="open"') > _sample(
                before, "proxy_ratelimit_backend_errors_total", 'mode="open"'
            )

        # Past the bound: refused, and readiness says why.
        await wait_until(
            lambda: [c for c in load.since(down) if c.status == 503],
            timeout=STALE_S + 5,
            message="calls never stopped being served from the cache",
        )
        refused = min((c for c in load.since(down) if c.status == 503), key=lambda c: c.started)
        refused_at = refused.started
        assert "stale_if_error_s" in (refused.message or ""), refused

        async def unready() -> Any:
            status, body = await _get(svc.session, svc.url + "/readyz")
            return body if status == 503 else None

        # Once the youngest entry (of any cache: loaded at most TTL_S before the outage) is too old.
        body = await wait_until(unready, timeout=TTL_S + 1, message="/readyz stayed degraded past the bound")
        assert "stale_if_error_s" in body["message"] and body["error"] == "SERVICE_UNAVAILABLE", body
        await asyncio.sleep(0.5)

        restoring = time.monotonic()  # redis-server answers before start() has seen it answer
        await outage.end()
        up = time.monotonic()
        await wait_until(
            lambda: [c for c in load.since(restoring) if c.status == 200],
            timeout=10,
            message="calls did not recover after the store came back",
        )
        recovered_at = min(c.finished for c in load.since(restoring) if c.status == 200)
        await asyncio.sleep(0.3)
    finally:
        load.stop.set()
        await asyncio.gather(*callers)

    # Calls wholly inside the outage (one in flight when the store returned may be answered fresh).
    during = [c for c in load.since(down) if c.finished < restoring]
    assert not [c for c in load.calls if CANARY in (c.message or "")]
    assert upstream.seen[-1].header("Authorization") == [f"Bearer {CANARY}"]  # what was injected
    served = [c for c in during if c.status == 200]
    # Only served or refused with the contract's code: no 401 for a cached key, no 500.
    assert {(c.status, c.code) for c in during} <= {(200, None), (503, "SERVICE_UNAVAILABLE")}, _counts(
        during
    )
    kept_serving = max(c.started for c in served) - down
    # Every entry was loaded at most TTL_S before the outage, and never serves past STALE_S.
    assert STALE_S - TTL_S - 0.6 <= kept_serving <= STALE_S + 0.1, kept_serving
    assert not [c for c in during if c.status == 200 and c.started > refused_at + 0.1]
    after = load.since(restoring)
    assert all(c.status == 200 for c in after if c.started > recovered_at), _counts(after)

    status, ready = await _get(svc.session, svc.url + "/readyz")
    assert status == 200 and ready["status"] == "ready", ready
    status, body = await svc.admin("PUT", f"/admin/tenants/{T}/connections/c1", json=conn)
    assert status == 200, body
    assert (await _proxy(svc, revoked, "c1"))[0] == 401
    assert (await _proxy(svc, key, "gone"))[0] == 404
    await wait_until(lambda: svc.services.audit.pending == 0, timeout=5)
    status, page = await svc.admin(
        "GET", f"/admin/tenants/{T}/audit?action=proxy.use&connection_id=c1&limit=500"
    )
    assert status == 200
    stale_uses = sum(e["detail"]["count"] for e in page["items"] if e["detail"].get("stale_credentials"))
    assert stale_uses >= len(served) // 2, (stale_uses, len(served))  # kept in memory, written after

    print(
        f"\n[{backend}] stale_if_error_s={STALE_S} ttl={TTL_S}s callers={CALLERS}: "
        f"kept serving {kept_serving:.2f} s after the store went down; "
        f"outage {restoring - down:.2f} s, callers saw {_counts(during)}; "
        f"first 200 {recovered_at - restoring:.2f} s after the restore began "
        f"({recovered_at - up:+.2f} s from it answering a PING again); "
        f"audit stale uses {stale_uses}; before the outage {_counts(load.since(0, down))}, "
        f"after {_counts(after)}"
    )


async def test_the_limiter_follows_its_fail_mode_closed_through_a_redis_outage(
    tmp_path: Path, dedicated_redis: RedisServer, upstream: Upstream
) -> None:
    """Cached credentials would serve, but ``ratelimit_fail_mode = "closed"`` refuses a limited
    call while Redis is down: the operator's choice wins over stale serving."""
    async with running_service(
        tmp_path, redis_url=dedicated_redis.url, stale_if_error_s=STALE_S, ratelimit_fail_mode="closed"
    ) as svc:
        limited = {"parameters": {"token": CANARY, "base_url": upstream.url}, "integration_id": "http_bearer"}
        await svc.put_connection(T, "c1", {**limited, "rate_limits": [{"limit": 1000, "window": "1m"}]})
        await svc.put_connection(T, "free", limited)
        key = await svc.mint_key(T)
        assert (await _proxy(svc, key, "c1"))[0] == 200 and (await _proxy(svc, key, "free"))[0] == 200
        dedicated_redis.stop()
        try:
            status, body = await _proxy(svc, key, "c1")
            assert status == 503 and "ratelimit_fail_mode is 'closed'" in body["message"], body
            assert (await _proxy(svc, key, "free"))[0] == 200  # no configured limit: served from the cache
        finally:
            dedicated_redis.start()
