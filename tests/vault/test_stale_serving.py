"""The vault's credential cache through a real store outage (the SQLite data directory moved
away): stale copies serve within the bound, and nothing the replica saw removed comes back.

Two vaults over one file are two replicas; the second one's changes reach the first only through
the store (no subscription here), so "seen" means seen by the first vault itself."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy.catalogue import Catalogue
from proxy.errors import ConnectionNotFound, StoreUnavailable
from proxy.model import ConnectionRecord
from proxy.security import crypto
from proxy.stale import RETRY_S, StaleWindow
from proxy.store import FLUSH_ALL
from proxy.store.base import ANY_VERSION
from proxy.store.sqlite import SqliteStore
from proxy.vault.vault import CREDENTIAL_CACHE_MAX, Vault
from tests.vault.test_vault import put

TTL = 0.05


class Replicas:
    def __init__(self, tmp_path: Path) -> None:
        self.data = tmp_path / "data"
        self.away = tmp_path / "away"
        ring = crypto.KeyRing.parse(crypto.generate_master_key_text())
        self.stores = [SqliteStore(self.data / "store.sqlite3") for _ in range(2)]
        self.window = StaleWindow(60.0)
        self.a = Vault(self.stores[0], ring, Catalogue.load(), cache_ttl_s=TTL, stale=self.window)
        self.b = Vault(self.stores[1], ring, Catalogue.load(), cache_ttl_s=TTL, stale=StaleWindow(0.0))

    def down(self) -> None:
        self.data.rename(self.away)

    def up(self) -> None:
        self.away.rename(self.data)


@pytest.fixture
async def replicas(tmp_path: Path) -> AsyncIterator[Replicas]:
    r = Replicas(tmp_path)
    for s in r.stores:
        await s.open()
    yield r
    if r.away.exists():
        r.up()
    for s in r.stores:
        await s.close()


async def _expire() -> None:
    await asyncio.sleep(TTL * 2)


async def _replace(vault: Vault, cid: str, token: str) -> None:
    integ = vault.catalogue.get("http_bearer")
    public, secret = await vault.encrypt_params(
        "t1", cid, integ, {"token": token, "base_url": "https://api.example.com"}
    )
    record = ConnectionRecord(
        tenant_id="t1",
        connection_id=cid,
        integration_id="http_bearer",
        public_params=public,
        secret_params=secret,
    )
    await vault.save(record, ANY_VERSION)


async def test_a_cached_copy_serves_while_the_store_is_away_and_the_store_wins_after(
    replicas: Replicas,
) -> None:
    await put(replicas.a, "t1", "c1", "tok-1")
    assert (await replicas.a.credentials("t1", "c1")).params["token"] == "tok-1"
    await _expire()
    replicas.down()
    assert (await replicas.a.credentials("t1", "c1")).params["token"] == "tok-1"
    assert replicas.window.down
    with pytest.raises(StoreUnavailable, match="not cached on this replica"):
        await replicas.a.credentials("t1", "never-read")
    replicas.up()
    await _replace(replicas.b, "c1", "tok-2")  # a is not told: only the store knows
    await asyncio.sleep(RETRY_S)  # the next call probes the store again
    assert (await replicas.a.credentials("t1", "c1")).params["token"] == "tok-2"
    assert not replicas.window.down


@pytest.mark.parametrize("how", ["local delete", "peer delete, answered reload", "flush all"])
async def test_a_connection_removed_before_the_outage_is_not_resurrected(
    replicas: Replicas, how: str
) -> None:
    a, b = replicas.a, replicas.b
    await put(a, "t1", "c1")
    await a.credentials("t1", "c1")  # cached on replica a
    if how == "local delete":
        await a.delete("t1", "c1")
    elif how == "peer delete, answered reload":
        await b.delete("t1", "c1")  # a is not told; its copy expires and the reload says 404
        await _expire()
        with pytest.raises(ConnectionNotFound):
            await a.credentials("t1", "c1")
    else:
        await a.invalidate(FLUSH_ALL, None)
    await _expire()
    replicas.down()
    with pytest.raises(StoreUnavailable, match="not cached on this replica"):
        await a.credentials("t1", "c1")


def test_the_credential_cache_is_bounded(replicas: Replicas) -> None:
    # proxy.cache clears a full cache: one flood of distinct connections cannot grow it for ever.
    assert replicas.a._creds.max_size == CREDENTIAL_CACHE_MAX <= 1 << 17
