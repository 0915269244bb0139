"""TokenManager against a real authorization server process and real stores (no mocks).

"Replicas" are separate store/vault/token-manager stacks sharing one SQLite file or one Redis,
exactly what separate processes share, so single-flight across replicas is really exercised.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest

from proxy.catalogue import Catalogue
from proxy.errors import ConnectionNotAuthorized, HostNotAllowed, ServiceUnavailable, UpstreamUnreachable
from proxy.model import ConnectionRecord
from proxy.oauth import state as pkce
from proxy.oauth.tokens import TokenManager
from proxy.pipeline.upstream.resolver import GuardedResolver
from proxy.security.crypto import KeyRing
from proxy.security.egress import EgressPolicy
from proxy.settings import Settings
from proxy.stale import StaleWindow
from proxy.store.base import Store
from proxy.store.redis import RedisStore
from proxy.store.sqlite import SqliteStore
from proxy.vault.records import Credentials
from proxy.vault.vault import Vault
from tests.support.authserver import AuthServer, authserver_fixture, authserver_process_fixture  # noqa: F401

TENANT = "acme"
CATALOGUE = Catalogue.load()
REDIRECT = "http://127.0.0.1:9/oauth/callback"


@dataclass
class Replica:
    store: Store
    vault: Vault
    tokens: TokenManager
    http: aiohttp.ClientSession

    async def close(self) -> None:
        await self.http.close()
        await self.store.close()

    async def creds(self, cid: str) -> Credentials:
        return await self.vault.decrypt(await self.vault.get_record(TENANT, cid))


async def make_replica(
    store: Store, ring: KeyRing, egress_allow: tuple[str, ...] = ("127.0.0.1/32",)
) -> Replica:
    settings = Settings(
        egress_allow=egress_allow, upstream_total_timeout_s=5.0, upstream_connect_timeout_s=2.0
    )
    await store.open()
    vault = Vault(store, ring, CATALOGUE, cache_ttl_s=5.0, stale=StaleWindow(0.0))
    await vault.verify_keys()
    tokens = TokenManager(vault, store, settings)
    http = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(resolver=GuardedResolver(EgressPolicy(egress_allow)))
    )
    tokens.bind_client(http)
    return Replica(store, vault, tokens, http)


@pytest.fixture
def ring() -> KeyRing:
    return KeyRing({1: os.urandom(32)})


@pytest.fixture
async def replica(tmp_path: Path, ring: KeyRing) -> AsyncIterator[Replica]:
    r = await make_replica(SqliteStore(tmp_path / "store.sqlite3"), ring)
    yield r
    await r.close()


async def obtain_tokens(r: Replica, auth: AuthServer, **client_overrides: Any) -> dict[str, Any]:
    """Runs a real authorization-code flow (PKCE) against the test server; returns token params."""
    client = await r.tokens.client_config(
        "http_oauth2_authorization_code",
        {**auth.endpoints(), **client_overrides},
        tenant_id=TENANT,
        default_connection_id=None,
    )
    verifier, state = pkce.new_code_verifier(), pkce.new_state()
    from proxy.oauth import flows

    url = flows.authorization_url(
        client, redirect_uri=REDIRECT, state=state, code_challenge=pkce.code_challenge(verifier)
    )
    async with r.http.get(url, allow_redirects=False) as resp:
        assert resp.status == 302
        q = parse_qs(urlsplit(resp.headers["Location"]).query)
    assert q["state"] == [state]
    tokens = await r.tokens.exchange_code(
        client, code=q["code"][0], redirect_uri=REDIRECT, code_verifier=verifier
    )
    return tokens.to_params()


async def put_connection(
    r: Replica,
    cid: str,
    params: dict[str, Any],
    integration_id: str = "http_oauth2_authorization_code",
    **fields: Any,
) -> ConnectionRecord:
    integration = CATALOGUE.get(integration_id)
    public, secret = await r.vault.encrypt_params(
        TENANT, cid, integration, {k: v for k, v in params.items() if v is not None}
    )
    record = ConnectionRecord(
        tenant_id=TENANT,
        connection_id=cid,
        integration_id=integration_id,
        public_params=public,
        secret_params=secret,
        **fields,
    )
    return await r.vault.save(record, None)


async def oauth_connection(
    r: Replica, auth: AuthServer, cid: str = "crm", **overrides: Any
) -> dict[str, Any]:
    tokens = await obtain_tokens(r, auth)
    params = {**auth.endpoints(), **tokens, **overrides}
    await put_connection(r, cid, params)
    return params


async def api_me(r: Replica, auth: AuthServer, token: str) -> int:
    async with r.http.get(auth.url + "/api/me", headers={"Authorization": f"Bearer {token}"}) as resp:
        return resp.status


async def test_code_exchange_stores_tokens_encrypted(
    replica: Replica, authserver: AuthServer, tmp_path: Path
) -> None:
    params = await oauth_connection(replica, authserver)
    assert authserver.state()["last_token"]["client_auth"] == "basic"  # secret with ':' and '&' accepted
    record = await replica.vault.get_record(TENANT, "crm")
    assert record.status == "active"
    assert {"access_token", "refresh_token", "client_secret"} <= set(record.secret_params)
    raw = (tmp_path / "store.sqlite3").read_bytes()
    for name in ("access_token", "refresh_token"):
        assert params[name].encode() not in raw
        assert params[name] not in str(record.to_dict())
    creds = await replica.creds("crm")
    assert await replica.tokens.access_token(creds) == params["access_token"]
    assert await api_me(replica, authserver, params["access_token"]) == 200
    assert authserver.count("refreshes") == 0


async def test_refresh_on_expiry_rotates_and_persists(replica: Replica, authserver: AuthServer) -> None:
    authserver.control(expires_in=0)  # expired on arrival: due for refresh at once
    old = await oauth_connection(replica, authserver)
    authserver.control(expires_in=3600)
    token = await replica.tokens.access_token(await replica.creds("crm"))
    assert token != old["access_token"] and authserver.count("refreshes") == 1
    stored = await replica.creds("crm")
    assert stored.params["access_token"] == token
    assert stored.params["refresh_token"] != old["refresh_token"]  # rotated and saved
    assert stored.params["expires_at"] > old["expires_at"] + 3000
    assert await api_me(replica, authserver, token) == 200
    # Fresh now: no further refresh.
    assert await replica.tokens.access_token(stored) == token
    assert authserver.count("refreshes") == 1


async def test_short_lived_tokens_are_refreshed_halfway_not_on_every_call(
    replica: Replica, authserver: AuthServer
) -> None:
    # The real server issues 20-second tokens: shorter than the one-minute refresh margin, which
    # used to make every call refresh. The manager's clock steps one second per call.
    authserver.control(expires_in=20)
    now = [float(int(time.time()))]
    replica.tokens.clock = lambda: now[0]
    await oauth_connection(replica, authserver)
    seen = []
    for _ in range(40):
        now[0] += 1
        seen.append(await replica.tokens.access_token(await replica.creds("crm")))
    # Renewed at 10, 20, 30 and 40 s: halfway through each token's life.
    assert authserver.count("refreshes") == 4
    assert len(set(seen)) == 5 and seen[8] != seen[9] and seen[9] == seen[18] != seen[19]
    assert await api_me(replica, authserver, seen[-1]) == 200
    assert (await replica.creds("crm")).params["issued_at"] == int(now[0])


async def test_non_rotating_server_keeps_refresh_token(replica: Replica, authserver: AuthServer) -> None:
    authserver.control(expires_in=0, rotate=False)
    old = await oauth_connection(replica, authserver)
    await replica.tokens.access_token(await replica.creds("crm"))
    assert (await replica.creds("crm")).params["refresh_token"] == old["refresh_token"]


async def test_twenty_concurrent_calls_refresh_once(replica: Replica, authserver: AuthServer) -> None:
    authserver.control(expires_in=0)  # due for refresh at once
    await oauth_connection(replica, authserver)
    authserver.control(expires_in=3600, delay_s=0.3)
    creds = await replica.creds("crm")
    results = await asyncio.gather(*(replica.tokens.access_token(creds) for _ in range(20)))
    assert len(set(results)) == 1
    assert authserver.count("refreshes") == 1


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_concurrent_refresh_across_replicas_happens_once(
    backend: str, authserver: AuthServer, tmp_path: Path, ring: KeyRing, request: pytest.FixtureRequest
) -> None:
    def new_store() -> Store:
        if backend == "redis":
            return RedisStore(request.getfixturevalue("redis_url"))
        return SqliteStore(tmp_path / "shared.sqlite3")

    a, b = await make_replica(new_store(), ring), await make_replica(new_store(), ring)
    try:
        authserver.control(expires_in=0)  # due for refresh at once
        await oauth_connection(a, authserver)
        authserver.control(expires_in=3600, delay_s=0.4)
        ca, cb = await a.creds("crm"), await b.creds("crm")
        calls = [a.tokens.access_token(ca) if i % 2 else b.tokens.access_token(cb) for i in range(20)]
        results = await asyncio.gather(*calls)
        assert len(set(results)) == 1
        assert authserver.count("refreshes") == 1
        assert (await b.creds("crm")).params["access_token"] == results[0]
    finally:
        await a.close()
        await b.close()


async def test_invalid_grant_marks_needs_reauth(replica: Replica, authserver: AuthServer) -> None:
    authserver.control(expires_in=0)  # due for refresh at once
    await oauth_connection(replica, authserver)
    authserver.control(fail_next=["invalid_grant"])
    with pytest.raises(ConnectionNotAuthorized) as info:
        await replica.tokens.access_token(await replica.creds("crm"))
    assert info.value.status == 424
    assert "connect-sessions" in info.value.message and "invalid_grant" in info.value.message
    record = await replica.vault.get_record(TENANT, "crm")
    assert record.status == "needs_reauth" and "invalid_grant" in (record.status_detail or "")
    before = authserver.count("token_requests")
    with pytest.raises(ConnectionNotAuthorized):
        await replica.tokens.access_token(await replica.creds("crm"))
    assert authserver.count("token_requests") == before  # no hammering a dead grant


async def test_transient_failure_changes_nothing(replica: Replica, authserver: AuthServer) -> None:
    authserver.control(expires_in=0)  # due for refresh at once
    await oauth_connection(replica, authserver)
    authserver.control(fail_next=["500"], expires_in=3600)
    with pytest.raises(UpstreamUnreachable) as info:
        await replica.tokens.access_token(await replica.creds("crm"))
    assert info.value.status == 502 and "<html>" not in info.value.message
    assert (await replica.vault.get_record(TENANT, "crm")).status == "active"
    token = await replica.tokens.access_token(await replica.creds("crm"))
    assert await api_me(replica, authserver, token) == 200


async def test_on_unauthorized_forces_one_refresh(replica: Replica, authserver: AuthServer) -> None:
    params = await oauth_connection(replica, authserver)
    authserver.control(expire_access_tokens=True)
    assert await api_me(replica, authserver, params["access_token"]) == 401
    creds = await replica.creds("crm")
    await replica.tokens.on_unauthorized(creds, params["access_token"])
    token = await replica.tokens.access_token(creds)
    assert token != params["access_token"] and await api_me(replica, authserver, token) == 200
    # A late 401 report about the replaced token does not cause a second refresh.
    await replica.tokens.on_unauthorized(creds, params["access_token"])
    assert await replica.tokens.access_token(await replica.creds("crm")) == token
    assert authserver.count("refreshes") == 1


async def test_expired_without_refresh_token_needs_reauth(replica: Replica, authserver: AuthServer) -> None:
    params = await oauth_connection(replica, authserver, refresh_token=None, expires_at=1)
    assert "refresh_token" not in (await replica.creds("crm")).params
    with pytest.raises(ConnectionNotAuthorized):
        await replica.tokens.access_token(await replica.creds("crm"))
    record = await replica.vault.get_record(TENANT, "crm")
    assert record.status == "needs_reauth" and "no refresh token" in (record.status_detail or "")
    assert params["access_token"]


async def test_refresh_token_only_import_becomes_active(replica: Replica, authserver: AuthServer) -> None:
    tokens = await obtain_tokens(replica, authserver)
    await put_connection(
        replica, "imported", {**authserver.endpoints(), "refresh_token": tokens["refresh_token"]}
    )
    assert (await replica.vault.get_record(TENANT, "imported")).status == "pending"
    token = await replica.tokens.access_token(await replica.creds("imported"))
    assert await api_me(replica, authserver, token) == 200
    assert (await replica.vault.get_record(TENANT, "imported")).status == "active"


async def test_runtime_user_connection_uses_default_connections_client(
    replica: Replica, authserver: AuthServer
) -> None:
    await oauth_connection(replica, authserver, cid="default")
    authserver.control(expires_in=0)  # due for refresh at once
    user_tokens = await obtain_tokens(replica, authserver)
    authserver.control(expires_in=3600)
    await put_connection(
        replica,
        "default-user-a",
        {**user_tokens, "base_url": authserver.url},
        runtime_user_id="user-a",
        default_connection_id="default",
    )
    creds = await replica.creds("default-user-a")
    assert "client_id" not in creds.params
    token = await replica.tokens.access_token(creds)
    assert token != user_tokens["access_token"] and authserver.count("refreshes") == 1


async def test_client_credentials_minted_once_and_cached(replica: Replica, authserver: AuthServer) -> None:
    params = {k: v for k, v in authserver.endpoints().items() if k not in ("auth_url", "revocation_url")}
    await put_connection(
        replica, "svc", {**params, "scope": "read", "token_auth": "post"}, "http_oauth2_client_credentials"
    )
    creds = await replica.creds("svc")
    authserver.control(delay_s=0.2)
    results = await asyncio.gather(*(replica.tokens.access_token(creds) for _ in range(10)))
    assert len(set(results)) == 1 and authserver.count("client_credentials") == 1
    assert authserver.state()["last_token"] == {
        "grant_type": "client_credentials",
        "client_auth": "post",
        "fields": ["client_id", "client_secret", "grant_type", "scope"],
    }
    assert await replica.tokens.access_token(creds) == results[0]
    assert await api_me(replica, authserver, results[0]) == 200
    await replica.tokens.on_unauthorized(creds)
    fresh = await replica.tokens.access_token(creds)
    assert fresh != results[0] and authserver.count("client_credentials") == 2
    # Minted tokens live in process memory only.
    assert fresh not in str((await replica.vault.get_record(TENANT, "svc")).to_dict())


async def test_client_credentials_invalid_client_marks_error(
    replica: Replica, authserver: AuthServer
) -> None:
    params = {k: v for k, v in authserver.endpoints().items() if k not in ("auth_url", "revocation_url")}
    await put_connection(
        replica, "svc", {**params, "client_secret": "wrong"}, "http_oauth2_client_credentials"
    )
    with pytest.raises(ConnectionNotAuthorized) as info:
        await replica.tokens.access_token(await replica.creds("svc"))
    assert "wrong" not in info.value.message
    record = await replica.vault.get_record(TENANT, "svc")
    assert record.status == "error" and "invalid_client" in (record.status_detail or "")


async def test_revoke_hits_revocation_endpoint(replica: Replica, authserver: AuthServer) -> None:
    params = await oauth_connection(replica, authserver)
    outcome = await replica.tokens.revoke(await replica.creds("crm"))
    assert outcome == {"refresh_token": "revoked", "access_token": "revoked"}
    revoked = authserver.state()["revoked"]
    assert [(r["token"], r["hint"], r["kind"]) for r in revoked] == [
        (params["refresh_token"], "refresh_token", "refresh"),
        (params["access_token"], "access_token", "access"),
    ]
    assert await api_me(replica, authserver, params["access_token"]) == 401


async def test_revoke_failure_never_raises(
    replica: Replica, authserver: AuthServer, caplog: pytest.LogCaptureFixture
) -> None:
    params = await oauth_connection(replica, authserver, revocation_url="http://127.0.0.1:9/revoke")
    outcome = await replica.tokens.revoke(await replica.creds("crm"))
    assert outcome == {"refresh_token": "failed", "access_token": "failed"}
    assert params["refresh_token"] not in caplog.text and params["access_token"] not in caplog.text


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_plain_http_or_private_token_endpoint_refused_without_egress_allow(
    host: str, authserver: AuthServer, tmp_path: Path, ring: KeyRing, replica: Replica
) -> None:
    tokens = await obtain_tokens(replica, authserver)
    guarded = await make_replica(SqliteStore(tmp_path / "g.sqlite3"), ring, egress_allow=())
    try:
        url = authserver.url.replace("127.0.0.1", host)
        await put_connection(
            guarded, "crm", {**authserver.endpoints(), **tokens, "token_url": url + "/token", "expires_at": 1}
        )
        with pytest.raises(HostNotAllowed):
            await guarded.tokens.access_token(await guarded.creds("crm"))
        https_local = url.replace("http://", "https://") + "/token"
        await put_connection(
            guarded, "crm2", {**authserver.endpoints(), **tokens, "token_url": https_local, "expires_at": 1}
        )
        with pytest.raises(HostNotAllowed, match="loopback"):
            await guarded.tokens.access_token(await guarded.creds("crm2"))
    finally:
        await guarded.close()
    assert authserver.count("refreshes") == 0


async def test_store_outage_serves_the_unexpired_access_token_and_refuses_an_expired_one(
    tmp_path: Path, ring: KeyRing, authserver: AuthServer
) -> None:
    """While the store is unreachable no refreshed token could be saved (and a rotated refresh
    token must never be spent unsaved): the current access token serves until it has really
    expired, the refresh margin skipped; then 503 says why. The store back, the refresh happens."""
    data = tmp_path / "data"
    r = await make_replica(SqliteStore(data / "store.sqlite3"), ring)
    try:
        authserver.control(expires_in=30)  # inside the one-minute refresh margin: a refresh is due
        params = await oauth_connection(r, authserver)
        creds = await r.creds("crm")
        data.rename(tmp_path / "away")  # the store really stops answering
        assert await r.tokens.access_token(creds) == params["access_token"]
        assert authserver.count("refreshes") == 0
        r.tokens.clock = lambda: time.time() + 31  # now past expiry
        with pytest.raises(ServiceUnavailable) as exc:
            await r.tokens.access_token(creds)
        assert "has expired and cannot be refreshed while the store is unreachable" in exc.value.message
        assert params["access_token"] not in exc.value.message
        assert authserver.count("refreshes") == 0
        (tmp_path / "away").rename(data)
        authserver.control(expires_in=3600)
        token = await r.tokens.access_token(creds)
        assert token != params["access_token"] and authserver.count("refreshes") == 1
    finally:
        await r.close()
