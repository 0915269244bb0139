"""One behaviour, two back ends: every case here runs against SqliteStore and RedisStore (on one
server, on a 3-master Redis Cluster, and through Sentinel with every write WAITed for).

Where a case needs a second replica (concurrent pops, CAS races, invalidation) it opens a second
store instance on the same backing data: the same SQLite file, or the same Redis.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from proxy.errors import Conflict, KeyRecordChanged, ValidationError
from proxy.model import ApiKeyRecord, AuditEvent, ConnectionRecord, RateWindow, TenantRecord
from proxy.store.base import ANY_VERSION, AuditQuery, Store
from proxy.store.redis import RedisStore
from proxy.store.sqlite import SqliteStore

Factory = Callable[[], Awaitable[Store]]


@pytest.fixture(
    params=[
        "sqlite",
        "redis",
        pytest.param("cluster", marks=pytest.mark.system),
        pytest.param("sentinel", marks=pytest.mark.system),
    ]
)
async def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Factory]:
    opened: list[Store] = []
    if request.param == "sqlite":
        path = tmp_path / "data" / "proxy.sqlite3"

        def make() -> Store:
            return SqliteStore(path)
    else:
        # "cluster": the same cases against a real 3-master Redis Cluster (redis+cluster://);
        # "sentinel": through Sentinel, every write WAITed for by the replica (redis+sentinel://).
        fixture = {"redis": "redis_url", "cluster": "redis_cluster_url", "sentinel": "redis_sentinel_url"}
        url = request.getfixturevalue(fixture[request.param])

        def make() -> Store:
            return RedisStore(url, timeout_s=2.0)

    async def factory() -> Store:
        s = make()
        await s.open()
        opened.append(s)
        return s

    yield factory
    for s in opened:
        await s.close()


@pytest.fixture
async def store(open_store: Factory) -> Store:
    return await open_store()


def conn(cid: str, tenant: str = "t1", **kw: object) -> ConnectionRecord:
    kw.setdefault("integration_id", "http_bearer")
    return ConnectionRecord(tenant_id=tenant, connection_id=cid, **kw)  # type: ignore[arg-type]


# --- connections: compare-and-set --------------------------------------------------------------


async def test_create_stores_version_1_and_reads_back(store: Store) -> None:
    stored = await store.put_connection(conn("c1", version=42), None)
    assert stored.version == 1
    assert await store.get_connection("t1", "c1") == stored


async def test_create_when_existing_conflicts(store: Store) -> None:
    await store.put_connection(conn("c1", status="active"), None)
    with pytest.raises(Conflict):
        await store.put_connection(conn("c1", status="error"), None)
    got = await store.get_connection("t1", "c1")
    assert got is not None and got.status == "active" and got.version == 1


async def test_replace_with_current_version_increments(store: Store) -> None:
    v1 = await store.put_connection(conn("c1"), None)
    v2 = await store.put_connection(v1.evolve(status="active"), 1)
    v3 = await store.put_connection(v2.evolve(status="needs_reauth"), 2)
    assert (v2.version, v3.version) == (2, 3)
    got = await store.get_connection("t1", "c1")
    assert got is not None and got.version == 3 and got.status == "needs_reauth"


async def test_stale_version_conflicts_and_keeps_record(store: Store) -> None:
    v1 = await store.put_connection(conn("c1"), None)
    await store.put_connection(v1.evolve(status="active"), 1)
    with pytest.raises(Conflict) as exc:
        await store.put_connection(v1.evolve(status="error"), 1)
    assert "c1" in exc.value.message
    got = await store.get_connection("t1", "c1")
    assert got is not None and got.status == "active" and got.version == 2


async def test_expected_version_on_missing_record_conflicts(store: Store) -> None:
    with pytest.raises(Conflict):
        await store.put_connection(conn("ghost"), 3)
    assert await store.get_connection("t1", "ghost") is None


async def test_any_version_creates_then_overwrites(store: Store) -> None:
    a = await store.put_connection(conn("c1", status="pending"), ANY_VERSION)
    b = await store.put_connection(conn("c1", status="active"), ANY_VERSION)
    assert (a.version, b.version) == (1, 2)
    got = await store.get_connection("t1", "c1")
    assert got is not None and got.status == "active"


async def test_concurrent_cas_from_two_replicas_has_one_winner(open_store: Factory) -> None:
    a, b = await open_store(), await open_store()
    base = await a.put_connection(conn("c1"), None)
    results = await asyncio.gather(
        a.put_connection(base.evolve(status="active"), 1),
        b.put_connection(base.evolve(status="error"), 1),
        return_exceptions=True,
    )
    assert sum(isinstance(r, Conflict) for r in results) == 1
    winner = next(r for r in results if isinstance(r, ConnectionRecord))
    assert await a.get_connection("t1", "c1") == winner


async def test_full_record_round_trips_exactly(store: Store) -> None:
    rec = conn(
        "c1",
        connection_subtype="sub",
        status="active",
        status_detail="ok now",
        public_params={"base_url": "https://api.example.com", "n": [1, 2.5, None]},
        secret_params={"token": "v1.ciphertext"},
        runtime_user_id="u1",
        default_connection_id="d1",
        rate_limits=(RateWindow(100, 60.0), RateWindow(5, 1.0, burst=2)),
        allowed_hosts=("api.example.com",),
        metadata={"note": "ünïcode ✓"},
        options={"max_wait_ms": 250},
        created_at=1700000000.123456,
        updated_at=1700000001.654321,
    )
    stored = await store.put_connection(rec, None)
    assert stored == rec.evolve(version=1)
    assert await store.get_connection("t1", "c1") == stored


async def test_delete(store: Store) -> None:
    await store.put_connection(conn("c1", runtime_user_id="u1", default_connection_id="d1"), None)
    assert await store.delete_connection("t1", "c1") is True
    assert await store.get_connection("t1", "c1") is None
    assert await store.find_user_connection("t1", "d1", "u1") is None
    assert (await store.list_connections("t1")).items == []
    assert await store.delete_connection("t1", "c1") is False
    recreated = await store.put_connection(conn("c1"), None)
    assert recreated.version == 1


async def test_put_rejects_ids_unsafe_as_keys(store: Store) -> None:
    with pytest.raises(ValidationError):
        await store.put_connection(conn("c1", tenant="t{x}"), None)
    with pytest.raises(ValidationError):
        await store.put_connection(conn("a/b"), None)
    with pytest.raises(ValidationError):
        await store.put_tenant(TenantRecord("bad tenant", 1), None)


# --- listing -----------------------------------------------------------------------------------


async def test_list_is_ordered_and_pages_without_gaps(store: Store) -> None:
    ids = ["c05", "c01", "c10", "c03", "c02", "c04", "c07"]
    for cid in ids:
        await store.put_connection(conn(cid), None)
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        page = await store.list_connections("t1", cursor=cursor, limit=3)
        pages += 1
        seen += [c.connection_id for c in page.items]
        if page.next_cursor is None:
            break
        assert len(page.items) == 3
        cursor = page.next_cursor
    assert seen == sorted(ids)
    assert pages == 3


async def test_list_filters(store: Store) -> None:
    await store.put_connection(conn("d1"), None)
    await store.put_connection(conn("d2", integration_id="http_basic"), None)
    await store.put_connection(conn("u1-d1", runtime_user_id="u1", default_connection_id="d1"), None)
    await store.put_connection(conn("u2-d1", runtime_user_id="u2", default_connection_id="d1"), None)
    await store.put_connection(
        conn("u1-d2", runtime_user_id="u1", default_connection_id="d2", integration_id="http_basic"), None
    )

    async def ids(**kw: str) -> list[str]:
        return [c.connection_id for c in (await store.list_connections("t1", **kw)).items]  # type: ignore[arg-type]

    assert await ids(runtime_user_id="u1") == ["u1-d1", "u1-d2"]
    assert await ids(integration_id="http_basic") == ["d2", "u1-d2"]
    assert await ids(default_connection_id="d1") == ["u1-d1", "u2-d1"]
    assert await ids(runtime_user_id="u1", integration_id="http_bearer") == ["u1-d1"]
    assert await ids(runtime_user_id="u1", default_connection_id="d2") == ["u1-d2"]
    assert await ids(runtime_user_id="nobody") == []


async def test_filtered_list_pages(store: Store) -> None:
    for i in range(9):
        await store.put_connection(conn(f"c{i}", runtime_user_id="u1" if i % 2 else "u2"), None)
    first = await store.list_connections("t1", runtime_user_id="u1", limit=3)
    assert [c.connection_id for c in first.items] == ["c1", "c3", "c5"]
    assert first.next_cursor == "c5"
    second = await store.list_connections("t1", runtime_user_id="u1", cursor=first.next_cursor, limit=3)
    assert [c.connection_id for c in second.items] == ["c7"]
    assert second.next_cursor is None


async def test_list_limit_must_be_positive(store: Store) -> None:
    with pytest.raises(ValidationError):
        await store.list_connections("t1", limit=0)


# --- runtime user connections ----------------------------------------------------------------


async def test_find_user_connection(store: Store) -> None:
    await store.put_connection(conn("default"), None)
    mine = await store.put_connection(
        conn("u1-conn", runtime_user_id="u1", default_connection_id="default"), None
    )
    assert await store.find_user_connection("t1", "default", "u1") == mine
    assert await store.find_user_connection("t1", "default", "u2") is None
    assert await store.find_user_connection("t1", "other", "u1") is None


async def test_find_user_connection_follows_changes(store: Store) -> None:
    v1 = await store.put_connection(conn("uc", runtime_user_id="u1", default_connection_id="d1"), None)
    v2 = await store.put_connection(v1.evolve(runtime_user_id="u2"), 1)
    assert await store.find_user_connection("t1", "d1", "u1") is None
    assert await store.find_user_connection("t1", "d1", "u2") == v2
    assert (await store.list_connections("t1", runtime_user_id="u1")).items == []

    v3 = await store.put_connection(v2.evolve(default_connection_id="d2"), 2)
    assert await store.find_user_connection("t1", "d1", "u2") is None
    assert await store.find_user_connection("t1", "d2", "u2") == v3
    assert (await store.list_connections("t1", default_connection_id="d1")).items == []

    await store.put_connection(v3.evolve(runtime_user_id=None), 3)
    assert await store.find_user_connection("t1", "d2", "u2") is None
    assert (await store.list_connections("t1", runtime_user_id="u2")).items == []
    # The slot is free again for another connection.
    other = await store.put_connection(conn("uc2", runtime_user_id="u2", default_connection_id="d2"), None)
    assert await store.find_user_connection("t1", "d2", "u2") == other


async def test_one_runtime_user_connection_per_default(store: Store) -> None:
    first = await store.put_connection(conn("a", runtime_user_id="u1", default_connection_id="d1"), None)
    with pytest.raises(Conflict):
        await store.put_connection(conn("b", runtime_user_id="u1", default_connection_id="d1"), None)
    assert await store.get_connection("t1", "b") is None
    assert await store.find_user_connection("t1", "d1", "u1") == first
    # Rewriting the holder itself is fine.
    again = await store.put_connection(first.evolve(status="active"), 1)
    assert await store.find_user_connection("t1", "d1", "u1") == again


async def test_tenants_are_isolated(store: Store) -> None:
    a = await store.put_connection(
        conn("same", tenant="ta", runtime_user_id="u", default_connection_id="d"), None
    )
    b = await store.put_connection(
        conn("same", tenant="tb", runtime_user_id="u", default_connection_id="d", status="active"), None
    )
    assert await store.get_connection("ta", "same") == a
    assert await store.get_connection("tb", "same") == b
    assert await store.find_user_connection("ta", "d", "u") == a
    assert [c.tenant_id for c in (await store.list_connections("tb")).items] == ["tb"]
    assert await store.delete_connection("ta", "same")
    assert await store.get_connection("tb", "same") == b
    assert await store.find_user_connection("tb", "d", "u") == b


# --- tenants -----------------------------------------------------------------------------------


async def test_tenant_cas_and_list(store: Store) -> None:
    t1 = await store.put_tenant(TenantRecord("t1", 1, {"1": {"kek_version": 1, "blob": "x"}}), None)
    await store.put_tenant(TenantRecord("t0", 1, created_at=5.5), None)
    assert t1.version == 1
    with pytest.raises(Conflict):
        await store.put_tenant(TenantRecord("t1", 9), None)
    t1b = await store.put_tenant(
        TenantRecord("t1", 2, {**t1.wrapped_deks, "2": {"kek_version": 1, "blob": "y"}}), 1
    )
    with pytest.raises(Conflict):
        await store.put_tenant(TenantRecord("t1", 3), 1)
    assert t1b.version == 2
    assert await store.get_tenant("t1") == t1b
    assert await store.get_tenant("nope") is None
    listed = await store.list_tenants()
    assert [t.tenant_id for t in listed] == ["t0", "t1"]
    assert listed[1] == t1b
    assert (await store.put_tenant(TenantRecord("t1", 4), ANY_VERSION)).version == 3


# --- API keys ----------------------------------------------------------------------------------


async def test_api_keys_put_get_list(store: Store) -> None:
    k1 = ApiKeyRecord("k1", "t1", "hash1", name="ci", created_at=10.0)
    k2 = ApiKeyRecord("k2", "t1", "hash2", created_at=5.0)
    k3 = ApiKeyRecord("k3", "t2", "hash3", created_at=1.0)
    for k in (k1, k2, k3):
        await store.put_api_key(k)
    assert await store.get_api_key("k1") == k1
    assert await store.get_api_key("missing") is None
    assert await store.list_api_keys("t1") == [k2, k1]
    assert await store.list_api_keys("t2") == [k3]
    revoked = ApiKeyRecord("k1", "t1", "hash1", name="ci", created_at=10.0, revoked_at=20.0)
    await store.put_api_key(revoked)
    assert await store.get_api_key("k1") == revoked


async def test_touch_api_keys_is_monotonic(store: Store) -> None:
    await store.put_api_key(ApiKeyRecord("k1", "t1", "h", created_at=1.0))
    await store.put_api_key(ApiKeyRecord("k2", "t1", "h", created_at=2.0))
    await store.touch_api_keys({"k1": 100.5, "k2": 50.25, "ghost": 1.0})
    await store.touch_api_keys({"k1": 90.0, "k2": 60.75})
    k1, k2 = await store.get_api_key("k1"), await store.get_api_key("k2")
    assert k1 is not None and k1.last_used_at == 100.5
    assert k2 is not None and k2.last_used_at == 60.75
    assert await store.get_api_key("ghost") is None
    # Writing back a stale copy (e.g. on revoke) does not move last_used_at backwards.
    await store.put_api_key(ApiKeyRecord("k1", "t1", "h", created_at=1.0, revoked_at=5.0, last_used_at=3.0))
    k1 = await store.get_api_key("k1")
    assert k1 is not None and k1.last_used_at == 100.5 and k1.revoked_at == 5.0


# --- audit -------------------------------------------------------------------------------------


def event(i: int, tenant: str = "t1", **kw: object) -> AuditEvent:
    kw.setdefault("action", "connection.read")
    kw.setdefault("actor", "api_key:k1")
    return AuditEvent(ts=1000.0 + i, tenant_id=tenant, detail={"i": i}, **kw)  # type: ignore[arg-type]


async def test_audit_newest_first_with_store_assigned_seq(store: Store) -> None:
    await store.append_audit([event(i) for i in range(5)])
    await store.append_audit([event(99, tenant="t2")])
    page = await store.query_audit(AuditQuery("t1"))
    assert [e.detail["i"] for e in page.items] == [4, 3, 2, 1, 0]
    seqs = [e.seq for e in page.items]
    assert seqs == sorted(seqs, reverse=True) and len(set(seqs)) == 5
    assert page.items[0].actor == "api_key:k1" and page.items[0].ts == 1004.0
    assert page.next_cursor is None


async def test_audit_retention_prunes_every_tenant_by_age_only(store: Store) -> None:
    await store.append_audit([event(i) for i in range(10)])  # ts 1000 .. 1009
    await store.append_audit([event(i, tenant="t2") for i in range(3)])
    assert await store.prune_audit(1005.0) == 5 + 3
    page = await store.query_audit(AuditQuery("t1"))
    assert [e.detail["i"] for e in page.items] == [9, 8, 7, 6, 5]
    assert (await store.query_audit(AuditQuery("t2"))).items == []
    assert await store.prune_audit(1005.0) == 0  # idempotent
    await store.append_audit([event(20)])  # the trail keeps working after a prune
    assert [e.detail["i"] for e in (await store.query_audit(AuditQuery("t1"))).items][:2] == [20, 9]


async def test_audit_filters(store: Store) -> None:
    await store.append_audit(
        [
            event(0, connection_id="c1"),
            event(1, connection_id="c2", action="connection.write"),
            event(2, connection_id="c1", outcome="denied"),
            event(3, actor="admin:root", connection_id="c1"),
            event(4, tenant="t2", connection_id="c1"),
        ]
    )

    async def found(**kw: object) -> list[int]:
        page = await store.query_audit(AuditQuery("t1", **kw))  # type: ignore[arg-type]
        return [e.detail["i"] for e in page.items]

    assert await found(connection_id="c1") == [3, 2, 0]
    assert await found(action="connection.write") == [1]
    assert await found(outcome="denied") == [2]
    assert await found(actor="admin:root") == [3]
    assert await found(since=1001.0, until=1003.0) == [2, 1]
    assert await found(since=1002.0, connection_id="c1") == [3, 2]
    assert await found(until=1000.5) == [0]


async def test_audit_cursor_paging_has_no_gaps_or_duplicates(store: Store) -> None:
    cases = (("t1", {}, list(range(22, -1, -1))), ("t2", {"outcome": "denied"}, [21, 18, 15, 12, 9, 6, 3, 0]))
    for tenant, _, _ in cases:
        await store.append_audit([event(i, tenant, outcome="ok" if i % 3 else "denied") for i in range(23)])
    for tenant, kw, expected in cases:
        got: list[int] = []
        cursor = None
        while True:
            page = await store.query_audit(AuditQuery(tenant, cursor=cursor, limit=4, **kw))  # type: ignore[arg-type]
            got += [e.detail["i"] for e in page.items]
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
            # Events appended while paging are newer than the cursor: they never show up later.
            await store.append_audit([event(100, tenant, outcome="denied")])
        assert got == expected


async def test_audit_late_arrivals_keep_arrival_order_and_match_time_filters(store: Store) -> None:
    # A replica flushing a buffer late appends events older than ones already stored.
    await store.append_audit([event(1000), event(1001)])
    await store.append_audit([event(500), event(5)])
    assert [e.detail["i"] for e in (await store.query_audit(AuditQuery("t1"))).items] == [5, 500, 1001, 1000]
    window = await store.query_audit(AuditQuery("t1", since=1004.0, until=1501.0))
    assert [e.detail["i"] for e in window.items] == [5, 500]
    assert [e.detail["i"] for e in (await store.query_audit(AuditQuery("t1", since=2000.0))).items] == [
        1001,
        1000,
    ]


async def test_audit_rejects_foreign_cursor(store: Store) -> None:
    with pytest.raises(ValidationError):
        await store.query_audit(AuditQuery("t1", cursor="not-a-cursor!"))


# --- one-time tokens ---------------------------------------------------------------------------


async def test_ephemeral_put_get_pop_once(store: Store) -> None:
    await store.put_ephemeral("connect", "tok-1", {"tenant": "t1", "n": 1}, ttl_s=30)
    assert await store.get_ephemeral("connect", "tok-1") == {"tenant": "t1", "n": 1}
    assert await store.get_ephemeral("oauth", "tok-1") is None
    assert await store.pop_ephemeral("connect", "tok-1") == {"tenant": "t1", "n": 1}
    assert await store.pop_ephemeral("connect", "tok-1") is None
    assert await store.get_ephemeral("connect", "tok-1") is None


async def test_concurrent_pops_have_exactly_one_winner(open_store: Factory) -> None:
    a, b = await open_store(), await open_store()
    for i in range(10):
        await a.put_ephemeral("oauth", f"state-{i}", {"i": i}, ttl_s=30)
    for i in range(10):
        results = await asyncio.gather(
            a.pop_ephemeral("oauth", f"state-{i}"), b.pop_ephemeral("oauth", f"state-{i}")
        )
        assert sorted(results, key=lambda r: r is None) == [{"i": i}, None]


async def test_ephemeral_expires(store: Store) -> None:
    await store.put_ephemeral("connect", "short", {"x": 1}, ttl_s=0.2)
    await store.put_ephemeral("connect", "long", {"x": 2}, ttl_s=30)
    await asyncio.sleep(0.35)
    assert await store.get_ephemeral("connect", "short") is None
    assert await store.pop_ephemeral("connect", "short") is None
    assert await store.get_ephemeral("connect", "long") == {"x": 2}


# --- locks -------------------------------------------------------------------------------------


async def test_lock_is_exclusive_and_released_by_owner_only(open_store: Factory) -> None:
    a, b = await open_store(), await open_store()
    token = await a.acquire_lock("refresh:t1:c1", ttl_s=30)
    assert token
    assert await b.acquire_lock("refresh:t1:c1", ttl_s=30) is None
    assert await b.release_lock("refresh:t1:c1", "not-the-owner") is False
    assert await b.acquire_lock("refresh:t1:c1", ttl_s=30) is None
    assert await b.acquire_lock("refresh:t1:c2", ttl_s=30)  # other names are independent
    assert await a.release_lock("refresh:t1:c1", token) is True
    assert await a.release_lock("refresh:t1:c1", token) is False
    assert await b.acquire_lock("refresh:t1:c1", ttl_s=30)


async def test_lock_expires(store: Store) -> None:
    old = await store.acquire_lock("rotate", ttl_s=0.2)
    assert old and await store.acquire_lock("rotate", ttl_s=0.2) is None
    await asyncio.sleep(0.35)
    new = await store.acquire_lock("rotate", ttl_s=30)
    assert new and new != old
    assert await store.release_lock("rotate", old) is False
    assert await store.acquire_lock("rotate", ttl_s=30) is None


# --- invalidation ------------------------------------------------------------------------------


async def test_invalidation_reaches_a_second_replica_within_a_second(open_store: Factory) -> None:
    writer, reader = await open_store(), await open_store()
    got: asyncio.Queue[tuple[str, str | None]] = asyncio.Queue()

    async def on_change(tenant_id: str, connection_id: str | None) -> None:
        await got.put((tenant_id, connection_id))

    await reader.subscribe_invalidations(on_change)

    async def expect(item: tuple[str, str | None]) -> None:
        deadline = time.monotonic() + 1.0
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"{item} not delivered within 1 s"
            if await asyncio.wait_for(got.get(), remaining) == item:
                return

    v1 = await writer.put_connection(conn("c1"), None)
    await expect(("t1", "c1"))
    await writer.put_connection(v1.evolve(status="active"), 1)
    await expect(("t1", "c1"))
    await writer.put_tenant(TenantRecord("t1", 1), None)
    await expect(("t1", None))
    await writer.delete_connection("t1", "c1")
    await expect(("t1", "c1"))
    await writer.publish_invalidation("t9", "cx")
    await expect(("t9", "cx"))


# --- meta --------------------------------------------------------------------------------------


async def test_meta_get_set(open_store: Factory) -> None:
    a, b = await open_store(), await open_store()
    assert await a.get_meta("kek_current") is None
    await a.set_meta("kek_current", "2")
    await a.set_meta("kek_current", "3")
    assert await b.get_meta("kek_current") == "3"
    from proxy.store import redis as redis_store
    from proxy.store import sqlite as sqlite_store

    schema = {"sqlite": sqlite_store.SCHEMA_VERSION, "redis": redis_store.SCHEMA_VERSION}[a.name]
    assert await a.get_meta("schema_version") == str(schema)
    with pytest.raises(ValidationError):
        await a.set_meta("schema_version", "7")
    await a.ping()


# --- writes conditional on the tenant key record -----------------------------------------------


def _tenant(blob: str, version: int = 1) -> TenantRecord:
    wrapped = {"kek_version": 1, "dek_version": version, "blob": blob}
    return TenantRecord(tenant_id="t1", current_dek_version=version, wrapped_deks={str(version): wrapped})


async def test_put_connection_holds_only_while_the_key_record_does(store: Store) -> None:
    # No key record at all: refused, nothing written.
    with pytest.raises(KeyRecordChanged):
        await store.put_connection(conn("c1"), None, key_check={"1": "YmxvYi1h"})
    assert await store.get_connection("t1", "c1") is None
    tenant = await store.put_tenant(_tenant("YmxvYi1h"), None)
    stored = await store.put_connection(conn("c1"), None, key_check={"1": "YmxvYi1h"})
    assert stored.version == 1
    # The key record was replaced (a loss, then new keys): the old blob no longer matches.
    await store.put_tenant(_tenant("YmxvYi1i"), tenant.version)
    for check in ({"1": "YmxvYi1h"}, {"2": "YmxvYi1i"}):
        with pytest.raises(KeyRecordChanged):
            await store.put_connection(conn("c1", status="active"), 1, key_check=check)
    got = await store.get_connection("t1", "c1")
    assert got is not None and got.version == 1 and got.status != "active"


async def test_store_identity_is_written_once_and_shared(open_store: Factory) -> None:
    a = await open_store()
    b = await open_store()
    assert a.identity and a.identity == b.identity
    with pytest.raises(ValidationError):
        await a.set_meta("store_id", "forged")
    new = await a.accept_loss()
    assert new != b.identity and a.identity == new
    c = await open_store()
    assert c.identity == new
