"""Lost store data becomes refused writes, never lost writes.

Redis flushed (FLUSHDB) or restarted empty under a running service, or the SQLite file deleted:
the service stops answering from (and writing to) a store that no longer holds its key records,
says so (503 and /readyz), and every write it acknowledged with 2xx still decrypts after a
restart (a new service over the same store). An operator resumes by restoring the backup or with
POST /admin/store/accept-loss.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from proxy.security import crypto
from proxy.store.redis import lifecycle as redis_lifecycle
from tests.support.app import RunningService, running_service
from tests.support.redis_server import RedisServer
from tests.support.wait import wait_until

T = "acme"


def bearer_body(token: str) -> dict[str, Any]:
    return {
        "integration_id": "http_bearer",
        "parameters": {"token": token, "base_url": "https://api.example.com"},
    }


async def _put(svc: RunningService, cid: str, token: str) -> tuple[int, Any]:
    return await svc.admin("PUT", f"/admin/tenants/{T}/connections/{cid}", json=bearer_body(token))


async def _read(svc: RunningService, cid: str) -> tuple[int, Any]:
    async with svc.session.get(f"{svc.url}/connections/{T}/{cid}", headers=svc.admin_headers) as r:
        return r.status, await r.json()


async def _writes(
    svc: RunningService, log: list[tuple[float, float, str, int, Any]], stop: asyncio.Event, writer: int
) -> None:
    """Writes new connections one after another: (started, finished, id, status, body)."""
    n = 0
    while not stop.is_set():
        cid = f"w{writer}c{n}"
        n += 1
        started = time.monotonic()
        status, body = await _put(svc, cid, f"tok-{cid}")
        log.append((started, time.monotonic(), cid, status, body))


async def _check_after_restart(tmp_path: Path, redis_url: str | None, acked: list[str]) -> int:
    """Every acknowledged write is either gone with the lost data (404) or decrypts: never 503."""
    decrypted = 0
    async with running_service(tmp_path, redis_url=redis_url) as svc:
        for cid in acked:
            status, body = await _read(svc, cid)
            assert status in (200, 404), (cid, status, body)
            if status == 200:
                assert body["parameters"]["token"] == f"tok-{cid}"
                decrypted += 1
    return decrypted


async def _readyz(svc: RunningService) -> tuple[int, Any]:
    async with svc.session.get(svc.url + "/readyz") as r:
        return r.status, await r.json()


async def _readyz_status(svc: RunningService, status: int) -> tuple[int, Any] | None:
    """``/readyz``'s answer once it is ``status`` (None before), for ``wait_until``."""
    answer = await _readyz(svc)
    return answer if answer[0] == status else None


@pytest.mark.parametrize("how", ["flushdb", pytest.param("restart-empty", marks=pytest.mark.system)])
async def test_lost_redis_data_under_running_writes_loses_no_acknowledged_write(
    tmp_path: Path, redis_server: RedisServer, redis_url: str, how: str
) -> None:
    log: list[tuple[float, float, str, int, Any]] = []
    stop = asyncio.Event()
    async with running_service(tmp_path, redis_url=redis_url) as svc:
        writers = [asyncio.create_task(_writes(svc, log, stop, i)) for i in range(3)]
        await wait_until(lambda: sum(1 for e in log if e[3] == 201) >= 3, timeout=10)  # writes under way
        before = sum(1 for e in log if e[3] == 201)
        if how == "flushdb":
            redis.Redis(port=redis_server.port).flushdb()
            lost_at = time.monotonic()
        else:
            redis_server.stop()
            redis_server.start()
            lost_at = time.monotonic()
        await asyncio.sleep(2.0)  # more than the identity check interval
        stop.set()
        await asyncio.gather(*writers)
        # The loss is reported, with what to do, instead of 200 / 401s.
        status, body = await _readyz(svc)
        assert status == 503 and "accept-loss" in body["message"], body
        late = [e for e in log if e[0] > lost_at + redis_lifecycle.IDENTITY_CHECK_S + 0.5]
        assert late and all(e[3] == 503 and e[4]["error"] == "SERVICE_UNAVAILABLE" for e in late), late[:3]
        assert not [e for e in log if e[3] not in (201, 503)], [e for e in log if e[3] not in (201, 503)][:3]
    assert before > 0
    acked = [e[2] for e in log if e[3] == 201]
    if how == "restart-empty":
        # Every new connection checks the marker first: nothing reached the empty Redis.
        assert not [e for e in log if e[0] > lost_at and e[3] == 201]
    decrypted = await _check_after_restart(tmp_path, redis_url, acked)
    if how == "restart-empty":
        assert decrypted == 0


async def test_readyz_names_the_loss_and_accept_loss_resumes(
    tmp_path: Path, redis_url: str, redis_server: RedisServer
) -> None:
    async with running_service(tmp_path, redis_url=redis_url) as svc:
        assert (await _put(svc, "c1", "tok-c1"))[0] == 201
        key = await svc.mint_key(T)
        status, body = await _readyz(svc)
        assert status == 200 and body["store_id"] == svc.services.store.identity
        redis.Redis(port=redis_server.port).flushdb()
        status, body = await wait_until(
            lambda: _readyz_status(svc, 503), timeout=redis_lifecycle.IDENTITY_CHECK_S + 5
        )
        assert status == 503 and "lost its data" in body["message"] and "accept-loss" in body["message"]
        # A caller hears that the store is gone, not that its key is wrong.
        async with svc.session.get(
            f"{svc.url}/connections/{T}/c1", headers={"Authorization": f"Bearer {key}"}
        ) as r:
            assert r.status == 503 and (await r.json())["error"] == "SERVICE_UNAVAILABLE"
        assert (await _put(svc, "c2", "tok-c2"))[0] == 503
        status, body = await svc.admin("POST", "/admin/store/accept-loss", json={})
        assert status == 422 and "confirm" in body["fields"]
        status, body = await svc.admin("POST", "/admin/store/accept-loss", json={"confirm": True})
        assert status == 200 and body["store_id"] != ""
        assert (await _readyz(svc))[0] == 200
        assert (await _put(svc, "c2", "tok-c2"))[0] == 201
        assert (await _read(svc, "c2"))[1]["parameters"]["token"] == "tok-c2"
    assert await _check_after_restart(tmp_path, redis_url, ["c1", "c2"]) == 1


async def test_a_second_replica_adopts_an_accepted_loss(
    tmp_path: Path, redis_url: str, redis_server: RedisServer
) -> None:
    key = crypto.generate_master_key_text().strip()  # replicas share one key ring
    async with (
        running_service(tmp_path / "a", redis_url=redis_url, master_key=key) as a,
        running_service(tmp_path / "b", redis_url=redis_url, master_key=key) as b,
    ):
        redis.Redis(port=redis_server.port).flushdb()
        answer = await wait_until(
            lambda: _readyz_status(b, 503), timeout=redis_lifecycle.IDENTITY_CHECK_S + 5
        )
        assert answer[0] == 503
        status, body = await a.admin("POST", "/admin/store/accept-loss", json={"confirm": True})
        assert status == 200, body
        status, body = await wait_until(
            lambda: _readyz_status(b, 200), timeout=redis_lifecycle.IDENTITY_CHECK_S + 5
        )
        assert status == 200 and body["store_id"] == a.services.store.identity


async def test_recreating_a_connection_before_the_loss_is_noticed_stays_decryptable(
    tmp_path: Path, redis_url: str, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The admin API re-creates a connection right after FLUSHDB, before the identity check runs:
    the cached data key of the vanished key record is not used for it.

    The guarantee: the first write after the loss is refused (503, saying what to do), whichever
    check meets the loss first: the write's own key-record check ("key record"), or a new Redis
    connection of any component (the audit writer's, a pool growing under load) reading the
    missing identity marker first ("accept-loss"). Both orders occur; neither stores anything."""
    monkeypatch.setattr(redis_lifecycle, "IDENTITY_CHECK_S", 3600.0)
    async with running_service(tmp_path, redis_url=redis_url) as svc:
        assert (await _put(svc, "c1", "tok-c1"))[0] == 201
        redis.Redis(port=redis_server.port).flushdb()
        # The first write finds its key record gone (or the store lost): refused, not sealed
        # with the cached key.
        status, body = await _put(svc, "c1", "tok-c1")
        assert status == 503 and body["error"] == "SERVICE_UNAVAILABLE", body
        assert "key record" in body["message"] or "accept-loss" in body["message"], body
        # The next makes new keys, unless a new connection noticed the loss meanwhile (the audit
        # writer's, say): then it is refused too. Either way nothing undecryptable is stored.
        second, body = await _put(svc, "c1", "tok-c1")
        assert second in (201, 503), body
        if second == 201:
            # Read back at once; a loss noticed in between answers 503 (checked after restart).
            status, doc = await _read(svc, "c1")
            assert (status == 200 and doc["parameters"]["token"] == "tok-c1") or status == 503, doc
    acked = ["c1"] if second == 201 else []
    assert await _check_after_restart(tmp_path, redis_url, acked) == len(acked)


async def test_sqlite_file_deleted_while_running_is_refused_then_accepted(tmp_path: Path) -> None:
    async with running_service(tmp_path) as svc:
        assert (await _put(svc, "c1", "tok-c1"))[0] == 201
        path = svc.settings.store_path
        for p in path.parent.glob(path.name + "*"):
            p.unlink()
        status, body = await _put(svc, "c2", "tok-c2")
        assert status == 503 and "file was deleted" in body["message"], body
        status, body = await _readyz(svc)
        assert status == 503 and "accept-loss" in body["message"]
        status, body = await svc.admin("POST", "/admin/store/accept-loss", json={"confirm": True})
        assert status == 200, body
        assert (await _put(svc, "c2", "tok-c2"))[0] == 201
    assert await _check_after_restart(tmp_path, None, ["c1", "c2"]) == 1
