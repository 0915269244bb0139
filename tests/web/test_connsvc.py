"""The Runtara Connection Service over real sockets, against the behaviours Runtara clients rely on."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from multidict import CIMultiDict
from yarl import URL

from proxy.store.base import AuditQuery
from tests.support.app import RunningService, bearer, running_service
from tests.support.redis_server import RedisServer

SECRET = "runtara-bearer-secret-91c2"
BEARER = {
    "integration_id": "http_bearer",
    "parameters": {"token": SECRET, "base_url": "https://api.example.com"},
}
CONTRACT_KEYS = {"parameters", "integration_id", "connection_subtype"}


async def get(
    svc: RunningService, path: str, headers: dict[str, str] | None = None
) -> tuple[int, Any, CIMultiDict[str]]:
    # yarl would collapse or re-encode some of the shapes under test: send the path verbatim.
    async with svc.session.get(URL(svc.url + path, encoded=True), headers=headers or {}) as r:
        text = await r.text()
        return r.status, (json.loads(text) if text else None), CIMultiDict(r.headers)


async def test_exact_contract_json(svc: RunningService) -> None:
    await svc.put_connection("t1", "c1", BEARER)
    await svc.put_connection(
        "t1",
        "k1",
        {
            "integration_id": "http_api_key",
            "parameters": {"api_key": SECRET, "base_url": "https://a.example"},
        },
    )
    key = await svc.mint_key("t1")
    status, body, headers = await get(svc, "/connections/t1/c1", bearer(key))
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert set(body) == CONTRACT_KEYS  # no configured limit and no learned state: rate_limit omitted
    assert body == {
        "parameters": {"token": SECRET, "base_url": "https://api.example.com"},
        "integration_id": "http_bearer",
        "connection_subtype": None,
    }
    assert headers["Cache-Control"] == "no-store"
    status, body, _ = await get(svc, "/connections/t1/k1", bearer(key))
    # Defaults of the integration are part of the parameters agents receive.
    assert body["parameters"]["header_name"] == "X-API-Key" and body["parameters"]["api_key"] == SECRET


async def test_configured_limits_count_each_fetch_as_one_call(svc: RunningService) -> None:
    await svc.put_connection(
        "t1", "c1", {**BEARER, "connection_subtype": "oauth2", "rate_limits": [{"limit": 2, "window": "1m"}]}
    )
    status, body, _ = await get(svc, "/connections/t1/c1", svc.admin_headers)
    assert set(body) == CONTRACT_KEYS | {"rate_limit"} and body["connection_subtype"] == "oauth2"
    rl = body["rate_limit"]
    assert rl["is_limited"] is False and rl["remaining"] == 1 and rl["retry_after_ms"] is None
    assert isinstance(rl["reset_at"], int) and rl["reset_at"] > time.time()
    status, body, _ = await get(svc, "/connections/t1/c1", svc.admin_headers)
    assert body["rate_limit"]["is_limited"] is False and body["rate_limit"]["remaining"] == 0
    status, body, _ = await get(svc, "/connections/t1/c1", svc.admin_headers)
    # Still exactly 200 (Runtara accepts nothing else): the state tells the workflow to wait.
    assert status == 200 and body["rate_limit"]["is_limited"] is True
    assert (
        isinstance(body["rate_limit"]["retry_after_ms"], int)
        and 0 < body["rate_limit"]["retry_after_ms"] <= 60000
    )


async def test_unknown_and_cross_tenant_are_the_same_404(svc: RunningService) -> None:
    await svc.put_connection("tenant-b", "secret-conn", BEARER)
    key_a = await svc.mint_key("tenant-a")
    status, foreign, headers = await get(svc, "/connections/tenant-b/secret-conn", bearer(key_a))
    assert (status, foreign["error"], headers["X-Proxy-Error"]) == (
        404,
        "CONNECTION_NOT_FOUND",
        "CONNECTION_NOT_FOUND",
    )
    status, missing, _ = await get(svc, "/connections/tenant-b/no-such-conn", bearer(key_a))
    assert status == 404
    assert foreign["message"].replace("secret-conn", "X") == missing["message"].replace("no-such-conn", "X")
    assert SECRET not in json.dumps(foreign)
    status, _, _ = await get(svc, "/connections/tenant-a/secret-conn", bearer(key_a))
    assert status == 404
    for path in (
        "/connections/t1",
        "/connections/t1/c1/extra/x",
        "/connections/t1/c1/other",
        "/connections/bad%20id/c1",
    ):
        status, body, _ = await get(svc, path, svc.admin_headers)
        assert (status, body["error"]) == (404, "CONNECTION_NOT_FOUND"), path
    # The admin token reads any tenant.
    status, body, _ = await get(svc, "/connections/tenant-b/secret-conn", svc.admin_headers)
    assert status == 200 and body["parameters"]["token"] == SECRET


async def test_jwt_caller_is_bound_to_its_tenant_claim(tmp_path: Path) -> None:
    secret = "jwt-shared-secret-for-connsvc-0123456789"
    async with running_service(tmp_path, jwt_hs256_secret=secret) as svc:
        await svc.put_connection("t1", "c1", BEARER)
        await svc.put_connection("t2", "c1", BEARER)
        token = jwt.encode(
            {"sub": "wf", "tenant_id": "t1", "exp": int(time.time()) + 60}, secret, algorithm="HS256"
        )
        assert (await get(svc, "/connections/t1/c1", bearer(token)))[0] == 200
        assert (await get(svc, "/connections/t2/c1", bearer(token)))[0] == 404


async def test_trusted_network_needs_no_header_but_others_do(tmp_path: Path) -> None:
    async with running_service(tmp_path, trusted_networks=["127.0.0.1/32"]) as svc:
        await svc.put_connection("t1", "c1", BEARER)
        status, body, _ = await get(svc, "/connections/t1/c1")
        assert status == 200 and body["parameters"]["token"] == SECRET
        status, body, _ = await get(svc, "/connections/t1/c1", {"Authorization": "Bearer nope"})
        assert status == 401  # a wrong credential is not rescued by the network
    async with running_service(tmp_path / "b", trusted_networks=["10.0.0.0/8"]) as svc:
        await svc.put_connection("t1", "c1", BEARER)
        status, body, _headers = await get(svc, "/connections/t1/c1")
        assert (status, body["error"]) == (401, "UNAUTHENTICATED")
        assert SECRET not in json.dumps(body)


async def test_url_shapes_runtara_clients_send(svc: RunningService) -> None:
    await svc.put_connection("tenant:1", "conn+1", BEARER)
    key = await svc.mint_key("tenant:1")
    for path in (
        "/connections/tenant:1/conn+1",
        "/connections/tenant%3A1/conn%2B1",
        "/connections/tenant%3a1/conn+1",
        "/connections//tenant%3A1/conn+1",  # base URL with a trailing slash
        "/connections/tenant:1/conn+1/",
        "/connections/tenant:1/conn+1?x=1",
    ):
        status, body, _ = await get(svc, path, bearer(key))
        assert status == 200, (path, body)
        assert body["integration_id"] == "http_bearer"
    # An encoded slash never shifts the segments.
    status, _, _ = await get(svc, "/connections/tenant%3A1%2Fconn+1/metadata", bearer(key))
    assert status == 404


async def test_prefix_with_a_path(tmp_path: Path) -> None:
    async with running_service(tmp_path, connection_service_prefix="/runtara/v1/connections/") as svc:
        await svc.put_connection("t1", "c1", BEARER)
        status, body, _ = await get(svc, "/runtara/v1/connections/t1/c1", svc.admin_headers)
        assert status == 200 and body["parameters"]["token"] == SECRET
        status, body, _ = await get(svc, "/runtara/v1/connections//t1/c1/metadata", svc.admin_headers)
        assert status == 200 and body["connectionId"] == "c1"
        status, _, _ = await get(svc, "/connections/t1/c1", svc.admin_headers)
        assert status == 404


async def test_runtime_user_override_by_header_and_query(svc: RunningService) -> None:
    await svc.put_connection("t1", "gh", BEARER)
    await svc.put_connection(
        "t1",
        "gh-alice",
        {
            "integration_id": "http_bearer",
            "parameters": {"token": "alice-token", "base_url": "https://api.example.com"},
            "runtime_user_id": "alice",
            "default_connection_id": "gh",
        },
    )
    h = svc.admin_headers
    assert (await get(svc, "/connections/t1/gh", {**h, "X-Runtime-User-Id": "alice"}))[1]["parameters"][
        "token"
    ] == "alice-token"
    assert (await get(svc, "/connections/t1/gh?runtime_user_id=alice", h))[1]["parameters"][
        "token"
    ] == "alice-token"
    assert (await get(svc, "/connections/t1/gh", {**h, "X-Runtime-User-Id": "bob"}))[1]["parameters"][
        "token"
    ] == SECRET
    assert (await get(svc, "/connections/t1/gh", h))[1]["parameters"]["token"] == SECRET
    status, body, _ = await get(svc, "/connections/t1/gh/metadata", {**h, "X-Runtime-User-Id": "alice"})
    assert body["connectionId"] == "gh-alice"
    status, body, _ = await get(svc, "/connections/t1/gh", {**h, "X-Runtime-User-Id": "bad user"})
    assert status == 422


async def test_proxy_only_connections_and_tenants_release_no_secret(tmp_path: Path) -> None:
    async with running_service(tmp_path, proxy_only_tenants=["locked"]) as svc:
        await svc.put_connection(
            "t1",
            "po",
            {**BEARER, "options": {"proxy_only": True}, "rate_limits": [{"limit": 1, "window": "1m"}]},
        )
        await svc.put_connection("t2", "c1", BEARER)
        await svc.put_connection("locked", "c1", BEARER)
        h = svc.admin_headers
        for path in ("/connections/t1/po", "/connections/locked/c1"):
            status, body, _ = await get(svc, path, h)
            assert status == 200 and body["parameters"] == {"base_url": "https://api.example.com"}, path
            assert SECRET not in json.dumps(body)
        # A proxy-only fetch only peeks: the proxy counts the real calls.
        status, body, _ = await get(svc, "/connections/t1/po", h)
        assert body["rate_limit"]["is_limited"] is False
        assert (await get(svc, "/connections/t2/c1", h))[1]["parameters"]["token"] == SECRET
        status, _ = await svc.admin("PUT", "/admin/tenants/t2", json={"proxy_only": True})
        assert status == 200
        assert "token" not in (await get(svc, "/connections/t2/c1", h))[1]["parameters"]
        await svc.admin("PUT", "/admin/tenants/t2", json={"proxy_only": False})
        assert (await get(svc, "/connections/t2/c1", h))[1]["parameters"]["token"] == SECRET


async def set_status(svc: RunningService, tenant: str, cid: str, status: str) -> None:
    store = svc.services.store
    record = await store.get_connection(tenant, cid)
    assert record is not None
    await store.put_connection(record.evolve(status=status), record.version)
    await svc.services.vault.invalidate(tenant, cid)


async def test_status_handling_and_metadata_mapping(svc: RunningService) -> None:
    await svc.put_connection("t1", "pending", {"integration_id": "http_bearer"})
    for cid in ("active", "reauth", "broken"):
        await svc.put_connection("t1", cid, BEARER)
    await set_status(svc, "t1", "reauth", "needs_reauth")
    await set_status(svc, "t1", "broken", "error")
    h = svc.admin_headers
    for cid in ("pending", "reauth"):
        status, body, headers = await get(svc, f"/connections/t1/{cid}", h)
        assert (status, body["error"], headers["X-Proxy-Error"]) == (
            424,
            "CONNECTION_NOT_AUTHORIZED",
            "CONNECTION_NOT_AUTHORIZED",
        )
        assert "connect-sessions" in body["message"] and SECRET not in json.dumps(body)
    assert (await get(svc, "/connections/t1/broken", h))[0] == 200
    expected = {
        "active": "ACTIVE",
        "reauth": "REQUIRES_RECONNECTION",
        "broken": "INVALID_CREDENTIALS",
        "pending": "REQUIRES_RECONNECTION",
    }
    for cid, mapped in expected.items():
        status, body, _ = await get(svc, f"/connections/t1/{cid}/metadata", h)
        assert status == 200
        assert body == {
            "connectionId": cid,
            "integrationId": "http_bearer",
            "connectionSubtype": None,
            "status": mapped,
        }
    await set_status(svc, "t1", "active", "mystery")
    assert (await get(svc, "/connections/t1/active/metadata", h))[1]["status"] == "UNKNOWN"
    assert (await get(svc, "/connections/t1/nope/metadata", h))[0] == 404


async def test_per_caller_quota_answers_429_with_integer_retry_after(tmp_path: Path) -> None:
    async with running_service(tmp_path, service_quota_per_minute=3) as svc:
        await svc.put_connection("t1", "c1", BEARER)
        key_a, key_b = await svc.mint_key("t1"), await svc.mint_key("t1")
        for _ in range(3):
            assert (await get(svc, "/connections/t1/c1", bearer(key_a)))[0] == 200
        status, body, headers = await get(svc, "/connections/t1/c1", bearer(key_a))
        assert (status, body["error"]) == (429, "RATE_LIMITED")
        assert headers["Retry-After"].isdigit() and 1 <= int(headers["Retry-After"]) <= 60
        assert SECRET not in json.dumps(body)
        # The quota is per caller: another key is unaffected.
        assert (await get(svc, "/connections/t1/c1", bearer(key_b)))[0] == 200


async def test_reads_are_audited_with_outcomes(svc: RunningService) -> None:
    await svc.put_connection("t1", "c1", BEARER)
    key = await svc.mint_key("t1")
    key_id = key.split("_")[1]
    for _ in range(5):
        await get(svc, "/connections/t1/c1", bearer(key))
    await get(svc, "/connections/t1/c1/metadata", bearer(key))
    await get(svc, "/connections/t1/missing", bearer(key))
    await get(svc, "/connections/t2/c1", bearer(key))  # another tenant: denied, recorded here
    await svc.flush_audit()
    _, body = await svc.admin("GET", f"/admin/tenants/t1/audit?actor=api_key:{key_id}")
    by = {(e["action"], e["outcome"], e["connection_id"]): e for e in body["items"]}
    # Uses are coalesced per flush interval: on a slow machine the five reads may span two
    # intervals (two rows); every read is counted exactly once either way.
    reads = [
        e
        for e in body["items"]
        if (e["action"], e["outcome"], e["connection_id"]) == ("credential.read", "ok", "c1")
    ]
    assert sum(e["detail"]["count"] for e in reads) == 5, reads
    assert ("connection.metadata", "ok", "c1") in by
    assert ("credential.read", "CONNECTION_NOT_FOUND", "missing") in by
    # The refusal is in the caller's own trail, without the ids it chose; the named tenant's
    # trail holds nothing the caller wrote.
    assert ("credential.read", "denied", None) in by
    _status, body = await svc.admin("GET", "/admin/tenants/t2/audit")
    assert body["items"] == []


@pytest.mark.system
async def test_audit_required_withholds_the_credential_when_the_trail_is_down(
    tmp_path: Path, redis_server: RedisServer, redis_url: str
) -> None:
    async with running_service(
        tmp_path, redis_url=redis_url, audit_required=True, trusted_networks=["127.0.0.1/32"]
    ) as svc:
        await svc.put_connection("t1", "c1", BEARER)
        status, body, _ = await get(svc, "/connections/t1/c1")
        assert status == 200  # written synchronously, before the answer
        page = await svc.services.store.query_audit(AuditQuery(tenant_id="t1", action="credential.read"))
        assert len(page.items) == 1
        redis_server.stop()
        try:
            status, body, _headers = await get(svc, "/connections/t1/c1")
            assert (status, body["error"]) == (503, "SERVICE_UNAVAILABLE")
            assert "credential not released" in body["message"]
            assert SECRET not in json.dumps(body)
        finally:
            redis_server.start()
