"""A revoked caller key is refused at once under load, by the replica that revoked it and by its
peer as soon as the invalidation reached it, even when a read of the key was in flight then.

Two in-process services share one real Redis (one key ring) and serve real HTTP calls from a
steady load. The key cache's TTL is shortened so entries expire during the run, and the peer's
next read of the key is held (``tests.support.gate``) from the moment Redis answered "valid"
until after the revocation's invalidation reached it: the window in which a late answer used to
refill the cache the invalidation had just emptied (then the key kept working until that entry
expired, and stale after it while the store is down).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest

from proxy.security import auth as auth_mod
from proxy.security import crypto
from tests.support.app import RunningService, bearer, running_service
from tests.support.gate import GatedReads
from tests.support.wait import wait_until

TTL_S = 2.0  # the key cache's lifetime here: entries expire during the run, and outlive the hold
WATCH_S = 0.5  # how long calls are watched after the hold ends (a wrong entry would serve at once)
WORKERS = 4  # per replica


async def _load(
    svc: RunningService, key: str, stop: asyncio.Event, go: asyncio.Event, seen: list[tuple[float, int]]
) -> None:
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            await go.wait()
            started = time.monotonic()
            async with session.get(f"{svc.url}/connections/t1/c1", headers=bearer(key)) as r:
                await r.read()
                seen.append((started, r.status))


async def test_a_revoked_key_is_refused_at_once_under_load_with_a_read_in_flight(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(auth_mod, "KEY_CACHE_TTL_S", TTL_S)
    ring = crypto.generate_master_key_text().strip()
    quota = {"service_quota_per_minute": 10**7, "master_key": ring}
    async with (
        running_service(tmp_path / "a", redis_url=redis_url, **quota) as a,
        running_service(tmp_path / "b", redis_url=redis_url, **quota) as b,
    ):
        await a.put_connection(
            "t1",
            "c1",
            {"integration_id": "http_bearer", "parameters": {"token": "tok", "base_url": "https://x.test"}},
        )
        key = await a.mint_key("t1")
        key_id = crypto.split_api_key(key)[0]  # type: ignore[index]
        peer_auth = b.services.auth
        gated = GatedReads(peer_auth.store, "get_api_key")
        stop = asyncio.Event()
        go = {"a": asyncio.Event(), "b": asyncio.Event()}
        for event in go.values():
            event.set()
        seen: dict[str, list[tuple[float, int]]] = {"a": [], "b": []}
        workers = [
            asyncio.create_task(_load(svc, key, stop, go[name], seen[name]))
            for name, svc in (("a", a), ("b", b))
            for _ in range(WORKERS)
        ]
        try:
            await wait_until(lambda: len(seen["b"]) > 20, timeout=10, message="no load reached the peer")
            assert {s for _, s in seen["a"] + seen["b"]} == {200}
            peer_auth.store = gated  # type: ignore[assignment]
            # The peer's entry expires under load; its next read gets "valid" and is held.
            await asyncio.wait_for(gated.read.wait(), 10)
            held = time.monotonic()
            # The peer sends nothing new while its read is held, so no later read (answered
            # "revoked") lands after the held one and hides what that one left in the cache.
            go["b"].clear()
            status, _ = await a.admin("DELETE", f"/admin/tenants/t1/api-keys/{key_id}")
            assert status == 204
            revoked = time.monotonic()
            await wait_until(
                lambda: key_id not in peer_auth._keys,
                timeout=5,
                message="the peer never got the invalidation",
            )
            reached_peer = time.monotonic()
            gated.release()  # the pre-revocation answer arrives now, still fresh for its TTL
            assert time.monotonic() - held < TTL_S - WATCH_S, "the hold outlasted the entry it races"
            go["b"].set()
            await asyncio.sleep(WATCH_S)
        finally:
            stop.set()
            go["b"].set()
            await asyncio.gather(*workers)
    late_a = [s for t, s in seen["a"] if t >= revoked]
    late_b = [s for t, s in seen["b"] if t >= reached_peer]
    assert len(late_a) > 10 and len(late_b) > 10, (len(late_a), len(late_b))
    assert set(late_a) == {401}, f"the revoking replica accepted the key after the DELETE: {late_a}"
    assert set(late_b) == {401}, f"the peer accepted the key after the invalidation: {late_b}"
