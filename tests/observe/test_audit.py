"""The audit writer against real stores: batching, aggregation, bounds, failures, shutdown."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.errors import ServiceUnavailable
from proxy.model import AuditEvent
from proxy.observe.audit import AuditLog
from proxy.observe.metrics import REGISTRY
from proxy.settings import Settings, load_settings
from proxy.store.base import AuditQuery, Store
from proxy.store.sqlite import SqliteStore
from tests.support.app import start_service_process
from tests.support.wait import wait_until


def settings(**overrides: Any) -> Settings:
    return load_settings(env={}, overrides={"audit_flush_interval_s": 60, **overrides})


def event(action: str = "connection.create", tenant: str = "t1", **kw: Any) -> AuditEvent:
    return AuditEvent(ts=time.time(), tenant_id=tenant, action=action, actor="admin:admin", **kw)


def aged(ts: float) -> AuditEvent:
    return AuditEvent(ts=ts, tenant_id="t1", action="connection.read", actor="api_key:k1")


async def events(store: Store, tenant: str = "t1", **filters: Any) -> list[AuditEvent]:
    return (await store.query_audit(AuditQuery(tenant_id=tenant, limit=1000, **filters))).items


async def count_all(store: Store, tenant: str = "t1") -> int:
    total, cursor = 0, None
    while True:
        page = await store.query_audit(AuditQuery(tenant_id=tenant, limit=500, cursor=cursor))
        total += len(page.items)
        if page.next_cursor is None:
            return total
        cursor = page.next_cursor


def metric(result: str) -> float:
    return REGISTRY.get_sample_value("proxy_audit_events_total", {"result": result}) or 0.0


async def test_record_is_buffered_until_flush(store: Store) -> None:
    log = AuditLog(store, settings())
    log.record(event(connection_id="c1", request_id="r1", detail={"version": 1}))
    assert log.pending == 1
    assert await events(store) == []  # nothing written on the caller's path
    await log.flush()
    [written] = await events(store)
    assert (written.action, written.connection_id, written.request_id, written.detail) == (
        "connection.create",
        "c1",
        "r1",
        {"version": 1},
    )
    assert log.pending == 0


async def test_record_use_aggregates_per_key_within_an_interval(store: Store) -> None:
    log = AuditLog(store, settings())
    for i in range(1000):
        log.record_use("api_key:k1", "t1", "c1", "credential.read", "ok", f"r{i}")
    log.record_use("api_key:k1", "t1", "c1", "credential.read", "connection_not_found", "rx")
    log.record_use("api_key:k2", "t1", "c1", "credential.read", "ok", "ry")
    assert log.pending == 3
    await log.flush()
    ok = await events(store, actor="api_key:k1", outcome="ok")
    assert len(ok) == 1
    assert ok[0].detail == {
        "count": 1000,
        "first_request_id": "r0",
        "last_request_id": "r999",
        "last_ts": ok[0].detail["last_ts"],
    }
    assert ok[0].request_id == "r0"
    assert len(await events(store, outcome="connection_not_found")) == 1
    [single] = await events(store, actor="api_key:k2")
    assert single.detail == {"count": 1}
    # The next interval starts a new aggregate.
    log.record_use("api_key:k1", "t1", "c1", "credential.read", "ok", "r-next")
    await log.flush()
    assert len(await events(store, actor="api_key:k1", outcome="ok")) == 2


async def test_store_failure_keeps_events_for_the_next_flush(tmp_path: Path) -> None:
    path = tmp_path / "fail.sqlite3"
    store = SqliteStore(path)
    await store.open()
    log = AuditLog(store, settings())
    log.record(event(connection_id="c1"))
    log.record_use("admin:admin", "t1", "c1", "credential.read", "ok", "r1")
    await store.close()
    failed = metric("failed")
    await log.flush()
    assert log.pending == 2 and metric("failed") > failed
    store2 = SqliteStore(path)
    await store2.open()
    log.store = store2
    await log.flush()
    assert log.pending == 0
    assert len(await events(store2)) == 2
    await store2.close()


async def test_bounded_buffer_drops_and_counts_overflow(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "bound.sqlite3")  # never opened: every flush fails
    log = AuditLog(store, settings(audit_buffer_max=100))
    dropped = metric("dropped")
    for i in range(130):
        log.record(event(request_id=f"r{i}"))
    for i in range(10):
        log.record_use(f"api_key:k{i}", "t1", "c1", "credential.read", "ok", None)
    assert log.pending == 100
    assert metric("dropped") - dropped == 40
    await log.flush()  # fails: still bounded, nothing more lost
    assert log.pending == 100


async def test_background_flusher_writes_without_explicit_flush(store: Store) -> None:
    log = AuditLog(store, settings(audit_flush_interval_s=0.05))
    await log.start()
    try:
        log.record(event())
        await wait_until(lambda: events(store), timeout=5, interval=0.05, message="nothing was flushed")
        assert len(await events(store)) == 1
    finally:
        await log.stop()


async def _pruned(store: Store) -> bool:
    return await count_all(store) <= 1


async def test_retention_prunes_old_events_in_the_background(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    from proxy.observe import audit

    old = time.time() - 40 * 86400
    await store.append_audit([aged(old), aged(old + 1)])
    await store.append_audit([event()])
    monkeypatch.setattr(audit, "PRUNE_FIRST_S", 0.1)
    log = AuditLog(store, settings(audit_flush_interval_s=0.05, audit_retention_days=30))
    await log.start()
    try:
        await wait_until(lambda: _pruned(store), timeout=5, interval=0.05, message="nothing was pruned")
        assert [e.ts > old + 1 for e in await events(store)] == [True]
    finally:
        await log.stop()


async def test_retention_zero_keeps_everything(store: Store) -> None:
    await store.append_audit([aged(1000.0)])
    assert await AuditLog(store, settings(audit_retention_days=0)).prune() == 0
    assert await count_all(store) == 1
    assert await AuditLog(store, settings(audit_retention_days=1)).prune() == 1
    assert await count_all(store) == 0


async def test_stop_flushes_everything_buffered(store: Store) -> None:
    log = AuditLog(store, settings())  # 60 s interval: only stop() can write these
    await log.start()
    for i in range(1200):  # more than one batch
        log.record(event(request_id=f"r{i}"))
    log.record_use("admin:admin", "t1", "c9", "credential.read", "ok", "r")
    await log.stop()
    assert await count_all(store) == 1201


async def test_stop_ends_a_flusher_whose_cancellation_was_swallowed(tmp_path: Path) -> None:
    """Code a flush awaits may eat a CancelledError; stop() must still end the flusher promptly."""

    class Swallowing(SqliteStore):
        swallowed = 0

        async def append_audit(self, events: list[AuditEvent]) -> None:
            try:
                await asyncio.sleep(0.3)
            except asyncio.CancelledError:
                type(self).swallowed += 1  # lost, as a library race would lose it
            await super().append_audit(events)

    store = Swallowing(tmp_path / "s.sqlite3")
    await store.open()
    log = AuditLog(store, settings(audit_flush_interval_s=0.01))
    await log.start()
    log.record(event())
    await asyncio.sleep(0.05)  # the flusher is inside append_audit now
    log.record(event(request_id="late"))
    started = time.monotonic()
    await asyncio.wait_for(log.stop(), 3.0)
    assert time.monotonic() - started < 2.0 and Swallowing.swallowed >= 1
    assert await count_all(store) == 2
    await store.close()


async def test_record_required_writes_now_or_refuses(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "req.sqlite3")
    await store.open()
    log = AuditLog(store, settings(audit_required=True))
    await log.record_required(event("credential.read", connection_id="c1", request_id="r1"))
    assert len(await events(store)) == 1  # durable before returning, no flush needed
    await store.close()
    with pytest.raises(ServiceUnavailable) as info:
        await log.record_required(event("credential.read", connection_id="c1"))
    assert "credential not released" in info.value.message


async def test_flush_hooks_run_after_each_flush_and_failures_are_contained(store: Store) -> None:
    log = AuditLog(store, settings())
    calls: list[str] = []

    async def good() -> None:
        calls.append("good")

    async def bad() -> None:
        raise RuntimeError("boom")

    log.add_flush_hook(bad)
    log.add_flush_hook(good)
    log.add_flush_hook(good)  # registered once
    await log.flush()
    await log.flush()
    assert calls == ["good", "good"]


# --- a real process: graceful stop loses nothing -----------------------------------------------


@pytest.mark.system
async def test_sigterm_flushes_the_buffer_and_a_restart_serves_the_trail(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = {"PROXY_AUDIT_FLUSH_INTERVAL_S": "3600"}  # only the shutdown flush can write the reads
    body = {"integration_id": "http_bearer", "parameters": {"token": "t0k", "base_url": "https://a.example"}}
    with start_service_process(data, env=env) as sp:
        async with aiohttp.ClientSession(headers=sp.admin_headers) as s:
            async with s.put(sp.url + "/admin/tenants/t1/connections/c1", json=body) as r:
                assert r.status == 201
            for _ in range(7):
                async with s.get(sp.url + "/connections/t1/c1") as r:
                    assert r.status == 200
        assert sp.stop(signal.SIGTERM) == 0
    with start_service_process(data, env=env) as sp:
        async with (
            aiohttp.ClientSession(headers=sp.admin_headers) as s,
            s.get(sp.url + "/admin/tenants/t1/audit") as r,
        ):
            items = (await r.json())["items"]
    reads = [e for e in items if e["action"] == "credential.read"]
    assert sum(e["detail"]["count"] for e in reads) == 7
    assert any(e["action"] == "connection.create" for e in items)
