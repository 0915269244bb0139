"""The Redis store and limiter on a real 3-master Redis Cluster (``redis+cluster://``).

The store contract itself runs against the Cluster in ``test_contract.py`` (the ``cluster``
parameter); a script or MULTI touching two slots would fail there with CROSSSLOT. These cases
check what only a cluster can show: the data really spreads over every master, listings that
span tenants find them all, invalidation published on one node reaches a subscriber on another
(classic pub/sub: see ``proxy.store.redis.pubsub``), the limiter admits exactly its limit
across two replicas, the lock stays exclusive, and a flushed node is noticed.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator

import pytest
import redis
from redis.crc import key_slot

from proxy.errors import StoreLost, StoreUnavailable
from proxy.model import ApiKeyRecord, AuditEvent, ConnectionRecord, RateWindow, TenantRecord
from proxy.ratelimit.limiter import LimitTarget
from proxy.ratelimit.redis import RedisLimiter
from proxy.store.base import AuditQuery
from proxy.store.redis import RedisStore
from proxy.store.redis.keys import META
from tests.support.redis_server import free_port
from tests.support.redis_topologies import RedisClusterSet

pytestmark = pytest.mark.system

TENANTS = [f"tenant{i}" for i in range(24)]


@pytest.fixture
async def stores(redis_cluster: RedisClusterSet, redis_cluster_url: str) -> AsyncIterator[list[RedisStore]]:
    """Two replicas' stores, each discovering the cluster from a different single node."""
    opened = [
        RedisStore(f"redis+cluster://127.0.0.1:{n.port}", timeout_s=2.0) for n in redis_cluster.nodes[:2]
    ]
    for s in opened:
        await s.open()
    yield opened
    for s in opened:
        await s.close()


def node_keys(cluster: RedisClusterSet) -> list[list[str]]:
    keys = []
    for n in cluster.nodes:
        with redis.Redis(port=n.port, decode_responses=True) as r:
            keys.append(list(r.scan_iter(match="cp:*")))
    return keys


async def test_tenants_spread_over_every_master_and_listings_find_them_all(
    redis_cluster: RedisClusterSet, stores: list[RedisStore]
) -> None:
    a, b = stores
    for i, t in enumerate(TENANTS):
        await a.put_tenant(TenantRecord(t, 1), None)
        await a.put_connection(
            ConnectionRecord(
                tenant_id=t, connection_id="c1", integration_id="http_bearer", runtime_user_id="u1"
            ),
            None,
        )
        await a.put_api_key(
            ApiKeyRecord(key_id=f"k{i}", tenant_id=t, secret_hash="h" * 64, created_at=float(i))
        )
    await a.append_audit(
        [AuditEvent(ts=time.time(), tenant_id=t, action="connection.put", actor="admin") for t in TENANTS]
    )

    per_node = node_keys(redis_cluster)
    assert all(any(k.startswith("cp:{t:") for k in keys) for keys in per_node), [len(k) for k in per_node]
    # Every key of one tenant is on one node: its records, indexes and audit stream.
    for t in TENANTS:
        holders = {i for i, keys in enumerate(per_node) if any(k.startswith(f"cp:{{t:{t}}}:") for k in keys)}
        assert len(holders) == 1, (t, holders)

    # Listings over every master, read through the other replica's client.
    assert sorted(x.tenant_id for x in await b.list_tenants()) == sorted(TENANTS)
    for i, t in enumerate(TENANTS):
        page = await b.list_connections(t, runtime_user_id="u1")
        assert [c.connection_id for c in page.items] == ["c1"]
        assert [k.key_id for k in await b.list_api_keys(t)] == [f"k{i}"]
        events = await b.query_audit(AuditQuery(tenant_id=t))
        assert [e.action for e in events.items] == ["connection.put"]
    assert await b.prune_audit(time.time() + 60) == len(TENANTS)


async def test_invalidation_crosses_nodes_within_a_second(stores: list[RedisStore]) -> None:
    """Scripts PUBLISH on the tenant's master; the other replica is subscribed through another
    node. Classic pub/sub is forwarded over the cluster bus to every node."""
    a, b = stores
    heard: asyncio.Queue[tuple[float, str, str | None]] = asyncio.Queue()

    async def on(tenant: str, connection: str | None) -> None:
        heard.put_nowait((time.monotonic(), tenant, connection))

    await b.subscribe_invalidations(on)
    delays = []
    for t in TENANTS:
        start = time.monotonic()
        await a.put_connection(
            ConnectionRecord(tenant_id=t, connection_id="c1", integration_id="http_bearer"), None
        )
        while True:
            at, tenant, connection = await asyncio.wait_for(heard.get(), 1.0)
            if (tenant, connection) == (t, "c1"):
                break
        delays.append(at - start)
    assert max(delays) < 1.0
    print(
        f"cluster invalidation: median {statistics.median(delays) * 1000:.2f} ms, max {max(delays) * 1000:.2f} ms"
    )


async def test_lock_is_exclusive_across_replicas(stores: list[RedisStore]) -> None:
    a, b = stores
    tokens = await asyncio.gather(*(s.acquire_lock("refresh:t1/c1", 10.0) for s in [a, b] * 25))
    held = [t for t in tokens if t is not None]
    assert len(held) == 1
    assert not await b.release_lock("refresh:t1/c1", "not-the-owner")
    assert await a.acquire_lock("refresh:t1/c1", 10.0) is None
    assert await a.release_lock("refresh:t1/c1", held[0])
    assert await b.acquire_lock("refresh:t1/c1", 10.0) is not None


async def test_limiter_admits_exactly_the_limit_across_two_replicas(redis_cluster_url: str) -> None:
    limiters = [RedisLimiter.create(redis_cluster_url, fail_mode="closed", timeout_s=2.0) for _ in range(2)]
    try:
        # Plain scopes land on different masters; grouped ones touch four keys in one slot.
        plain = [LimitTarget(f"t{i}/c", (RateWindow(15, 3600.0),)) for i in range(6)]
        grouped = [
            LimitTarget(
                f"g{i}/c",
                (RateWindow(100, 3600.0),),
                quota_key="app",
                quota_windows=(RateWindow(20, 3600.0),),
            )
            for i in range(3)
        ]
        calls = [lim.acquire(t) for t in plain + grouped for lim in limiters for _ in range(20)]
        results = await asyncio.gather(*calls)
        by_scope: dict[str, int] = {}
        for target, lim_results in zip(
            [t for t in plain + grouped for _ in limiters for _ in range(20)], results, strict=True
        ):
            by_scope[target.scope] = by_scope.get(target.scope, 0) + lim_results.allowed
        assert all(by_scope[t.scope] == 15 for t in plain), by_scope
        assert sum(by_scope[t.scope] for t in grouped) == 20, by_scope
        assert all(d.source != "fallback" for d in results)
    finally:
        for lim in limiters:
            await lim.close()


async def test_a_flushed_node_holding_the_marker_is_noticed(
    redis_cluster: RedisClusterSet, stores: list[RedisStore]
) -> None:
    """A Cluster skips the per-connection marker check (its nodes hold different keys); the
    watcher re-reads the marker every second and catches the loss."""
    a, _ = stores
    await a.put_tenant(TenantRecord("acme", 1), None)
    flushed = 0
    for n in redis_cluster.nodes:
        with redis.Redis(port=n.port) as r:
            if r.cluster("countkeysinslot", key_slot(META.encode())):  # this node holds cp:meta
                r.flushall()
                flushed += 1
    assert flushed == 1
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            await a.get_tenant("acme")
        except StoreLost:
            return
        await asyncio.sleep(0.1)
    pytest.fail("the store kept serving after the node holding its identity marker was flushed")


async def test_an_unreachable_cluster_is_store_unavailable_not_a_raw_client_error() -> None:
    """redis-py's cluster errors are not RedisErrors; they must map like every other failure."""
    url = f"redis+cluster://127.0.0.1:{free_port()}"
    with pytest.raises(StoreUnavailable) as err:
        await RedisStore(url, timeout_s=0.5).open()
    assert "PROXY_REDIS_URL" in err.value.message and "127.0.0.1" not in err.value.message
    lim = RedisLimiter.create(url, fail_mode="open", timeout_s=0.5)
    try:
        decision = await lim.acquire(LimitTarget("t/c", (RateWindow(5, 60.0),)))
        assert decision.allowed and decision.source == "fallback"
    finally:
        await lim.close()
