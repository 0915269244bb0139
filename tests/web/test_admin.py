"""The admin API over real sockets, on both store back ends where storage matters."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict

from proxy.security import crypto
from tests.support.app import RunningService, ServiceProcess, bearer, running_service, start_service_process

SECRET = "tok-admin-secret-7f3a9c"
BEARER = {
    "integration_id": "http_bearer",
    "parameters": {"token": SECRET, "base_url": "https://api.example.com/v1"},
}


async def call(svc: RunningService, method: str, path: str, **kw: Any) -> tuple[int, Any, CIMultiDict[str]]:
    async with svc.session.request(method, svc.url + path, **kw) as r:
        text = await r.text()
        return r.status, (json.loads(text) if text else None), CIMultiDict(r.headers)


# --- authentication ----------------------------------------------------------------------------


async def test_admin_routes_need_the_admin_token(svc: RunningService) -> None:
    path = "/admin/tenants/t1/connections"
    status, body, headers = await call(svc, "GET", path)
    assert (
        status == 401 and body["error"] == "UNAUTHENTICATED" and headers["X-Proxy-Error"] == "UNAUTHENTICATED"
    )
    status, body, _ = await call(svc, "GET", path, headers=bearer("wrong-token-" + "x" * 20))
    assert status == 401
    status, body, _ = await call(svc, "GET", path, headers={"Authorization": "Basic YWRtaW46YWRtaW4="})
    assert status == 401
    key = await svc.mint_key("t1")
    for method, p in (("GET", path), ("PUT", path + "/c1"), ("GET", "/admin/integrations")):
        status, body, _ = await call(svc, method, p, headers=bearer(key), json=BEARER)
        assert (status, body["error"]) == (403, "FORBIDDEN"), p
    status, _, _ = await call(svc, "GET", path, headers=svc.admin_headers)
    assert status == 200


async def test_trusted_network_never_reaches_admin(tmp_path: Path) -> None:
    async with running_service(tmp_path, trusted_networks=["127.0.0.1/32"]) as svc:
        status, _, _ = await call(svc, "GET", "/admin/tenants/t1/connections")
        assert status == 401


# --- connections -------------------------------------------------------------------------------


async def test_create_replace_get_list_delete_with_redaction(svc: RunningService) -> None:
    status, created, headers = await call(
        svc, "PUT", "/admin/tenants/t1/connections/c1", json=BEARER, headers=svc.admin_headers
    )
    assert status == 201
    assert created["parameters"] == {"token": "********", "base_url": "https://api.example.com/v1"}
    assert created["status"] == "active" and created["version"] == 1 and headers["ETag"] == '"1"'
    assert created["secret_fields_set"] == ["token"]
    status, replaced, _ = await call(
        svc,
        "PUT",
        "/admin/tenants/t1/connections/c1",
        headers=svc.admin_headers,
        json={**BEARER, "metadata": {"team": "ops"}},
    )
    assert status == 200 and replaced["version"] == 2 and replaced["metadata"] == {"team": "ops"}
    assert replaced["created_at"] == created["created_at"]
    status, got, _ = await call(svc, "GET", "/admin/tenants/t1/connections/c1", headers=svc.admin_headers)
    assert status == 200 and got["parameters"]["token"] == "********"
    status, listing, _ = await call(svc, "GET", "/admin/tenants/t1/connections", headers=svc.admin_headers)
    assert [i["connection_id"] for i in listing["items"]] == ["c1"] and listing["next_cursor"] is None
    for text in (json.dumps(created), json.dumps(replaced), json.dumps(got), json.dumps(listing)):
        assert SECRET not in text
    status, body, _ = await call(svc, "DELETE", "/admin/tenants/t1/connections/c1", headers=svc.admin_headers)
    assert status == 204 and body is None
    status, body, _ = await call(svc, "DELETE", "/admin/tenants/t1/connections/c1", headers=svc.admin_headers)
    assert (status, body["error"]) == (404, "CONNECTION_NOT_FOUND")
    status, _, _ = await call(svc, "GET", "/admin/tenants/t1/connections/c1", headers=svc.admin_headers)
    assert status == 404


async def test_secrets_are_encrypted_at_rest(svc: RunningService) -> None:
    await svc.put_connection("t1", "c1", BEARER)
    record = await svc.services.store.get_connection("t1", "c1")
    assert record is not None
    assert SECRET not in json.dumps(record.to_dict())
    assert record.secret_params["token"].startswith("cpv1.")


async def test_pending_shell_with_only_integration_id(svc: RunningService) -> None:
    view = await svc.put_connection("t1", "shell", {"integration_id": "http_bearer"})
    assert view["status"] == "pending" and view["missing_fields"] == ["token", "base_url"]


async def expect_422(
    svc: RunningService, body: Any, *fields: str, method: str = "PUT", raw: bytes | None = None
) -> dict[str, Any]:
    kw: dict[str, Any] = {"data": raw} if raw is not None else {"json": body}
    status, answer, headers = await call(
        svc, method, "/admin/tenants/t1/connections/c1", headers=svc.admin_headers, **kw
    )
    assert status == 422, answer
    assert answer["error"] == "VALIDATION_ERROR" and headers["X-Proxy-Error"] == "VALIDATION_ERROR"
    for f in fields:
        assert f in answer["fields"], (f, answer["fields"])
    assert SECRET not in json.dumps(answer)
    return answer


async def test_validation_errors_name_every_field_and_never_echo_values(sqlite_svc: RunningService) -> None:
    svc = sqlite_svc
    await expect_422(svc, None, "body", raw=b"{not json")
    await expect_422(svc, None, "body", raw=b"[1, 2]")
    await expect_422(svc, None, "body", raw=b"")
    await expect_422(svc, {"parameters": {"token": SECRET}}, "integration_id")
    await expect_422(svc, {**BEARER, "surprise": 1}, "surprise")
    await expect_422(svc, {"integration_id": "bad id!"}, "integration_id")
    await expect_422(
        svc, {**BEARER, "parameters": {"token": SECRET, "base_url": "ftp://x"}}, "parameters.base_url"
    )
    await expect_422(
        svc,
        {**BEARER, "parameters": {"token": SECRET, "base_url": "https://u:p@x.example"}},
        "parameters.base_url",
    )
    await expect_422(svc, {**BEARER, "parameters": "token"}, "parameters")
    await expect_422(svc, {**BEARER, "rate_limits": [{"limit": 0, "window": "1m"}]}, "rate_limits[0]")
    await expect_422(svc, {**BEARER, "rate_limits": [{"limit": 5, "window": "forever"}]}, "rate_limits[0]")
    await expect_422(svc, {**BEARER, "allowed_hosts": "api.example.com"}, "allowed_hosts")
    await expect_422(svc, {**BEARER, "metadata": [1]}, "metadata")
    await expect_422(
        svc,
        {
            **BEARER,
            "options": {
                "retries": 9,
                "max_wait_ms": -1,
                "quota_weight": 0,
                "proxy_only": "yes",
                "bogus": 1,
                "timeouts": {"read_s": 0, "nap_s": 1},
                "reserve": 1.5,
            },
        },
        "options.retries",
        "options.max_wait_ms",
        "options.quota_weight",
        "options.proxy_only",
        "options.bogus",
        "options.timeouts.read_s",
        "options.timeouts.nap_s",
        "options.reserve",
    )
    await expect_422(svc, {**BEARER, "runtime_user_id": "u1"}, "default_connection_id")
    await expect_422(
        svc, {**BEARER, "runtime_user_id": "u1", "default_connection_id": "missing"}, "default_connection_id"
    )
    await expect_422(
        svc,
        {**BEARER, "parameters": {"token": "********", "base_url": "https://a.example"}},
        "parameters.token",
    )
    # Several problems at once are all reported.
    answer = await expect_422(
        svc, {"integration_id": 5, "metadata": 1, "x": 1}, "integration_id", "metadata", "x"
    )
    assert len(answer["fields"]) == 3
    status, body, _ = await call(
        svc, "PUT", "/admin/tenants/bad%20tenant/connections/c1", headers=svc.admin_headers, json=BEARER
    )
    assert status == 422 and "tenant_id" in body["fields"]
    # Nothing was stored by any of them.
    assert await svc.services.store.get_connection("t1", "c1") is None


async def test_injected_names_that_frame_the_request_and_control_characters_are_refused(
    sqlite_svc: RunningService,
) -> None:
    svc = sqlite_svc
    path = "/admin/tenants/t1/connections/c1"
    base = {"api_key": "k-secret", "base_url": "https://api.example.com"}
    for params, field in [
        ({"header_name": "Transfer-Encoding"}, "parameters.header_name"),
        ({"header_name": "X-Proxy-Retries"}, "parameters.header_name"),
        ({"location": "query", "query_param": "k\x00"}, "parameters.query_param"),
        ({"location": "cookie", "cookie_name": "a=b"}, "parameters.cookie_name"),
        ({"api_key": "k-secret\x01"}, "parameters.api_key"),
        ({"api_key": "k-secret\x7f"}, "parameters.api_key"),
        ({"api_key": "k-secret\x0b"}, "parameters.api_key"),
    ]:
        status, data = await svc.admin(
            "PUT", path, json={"integration_id": "http_api_key", "parameters": {**base, **params}}
        )
        assert (status, data["error"]) == (422, "VALIDATION_ERROR"), params
        assert field in data["fields"], data
        assert "k-secret" not in json.dumps(data)
    # PATCH goes through the same check.
    await svc.put_connection("t1", "c1", {"integration_id": "http_api_key", "parameters": base})
    status, data = await svc.admin("PATCH", path, json={"parameters": {"header_name": "Content-Length"}})
    assert status == 422 and "parameters.header_name" in data["fields"]
    status, data = await svc.admin("GET", path)
    assert "header_name" not in data["parameters"]  # nothing was stored: the default applies


async def test_runtara_rate_limit_shape_and_valid_options(sqlite_svc: RunningService) -> None:
    view = await sqlite_svc.put_connection(
        "t1",
        "c1",
        {
            **BEARER,
            "rate_limits": [{"requestsPerSecond": 10, "burstSize": 20}, {"limit": 1000, "window": "1h"}],
            "allowed_hosts": ["api.example.com", "*.example.org"],
            "options": {
                "retries": 2,
                "max_wait_ms": 500,
                "timeouts": {"read_s": 5},
                "proxy_only": True,
                "quota_key": "shared",
                "quota_weight": 2,
                "reserve": 1,
            },
        },
    )
    assert view["rate_limits"] == [
        {"limit": 10, "window_s": 1.0, "burst": 20},
        {"limit": 1000, "window_s": 3600.0},
    ]
    assert view["allowed_hosts"] == ["api.example.com", "*.example.org"]
    assert view["options"]["retries"] == 2 and view["options"]["proxy_only"] is True


async def test_if_match_compare_and_set(svc: RunningService) -> None:
    path = "/admin/tenants/t1/connections/c1"
    await svc.put_connection("t1", "c1", BEARER)
    status, body, _ = await call(
        svc, "PUT", path, json=BEARER, headers={**svc.admin_headers, "If-Match": '"1"'}
    )
    assert status == 200 and body["version"] == 2
    status, body, _ = await call(
        svc, "PUT", path, json=BEARER, headers={**svc.admin_headers, "If-Match": "1"}
    )
    assert (status, body["error"]) == (409, "CONFLICT")
    status, body, _ = await call(
        svc, "PATCH", path, json={"metadata": {"a": 1}}, headers={**svc.admin_headers, "If-Match": "1"}
    )
    assert status == 409
    status, body, _ = await call(
        svc, "PATCH", path, json={"metadata": {"a": 1}}, headers={**svc.admin_headers, "If-Match": "2"}
    )
    assert status == 200 and body["version"] == 3
    status, body, _ = await call(
        svc, "PUT", path, json=BEARER, headers={**svc.admin_headers, "If-Match": "abc"}
    )
    assert status == 422 and "If-Match" in body["fields"]


async def test_patch_merges_parameters(svc: RunningService) -> None:
    path = "/admin/tenants/t1/connections/c1"
    await svc.put_connection(
        "t1",
        "c1",
        {
            "integration_id": "http_api_key",
            "parameters": {"api_key": SECRET, "base_url": "https://a.example", "header_name": "X-Key"},
        },
    )
    status, body, _ = await call(
        svc,
        "PATCH",
        path,
        headers=svc.admin_headers,
        json={"parameters": {"api_key": "********"}, "metadata": {"m": 1}},
    )
    assert status == 200, body
    assert body["metadata"] == {"m": 1}
    creds = await svc.services.vault.credentials("t1", "c1")
    assert creds.params["api_key"] == SECRET  # the placeholder kept the stored secret
    # A new destination (header name, location) carries the secret again in the same write.
    status, body, _ = await call(
        svc,
        "PATCH",
        path,
        headers=svc.admin_headers,
        json={"parameters": {"header_name": None, "api_key": SECRET, "location": "query"}},
    )
    assert status == 200, body
    assert body["parameters"] == {"api_key": "********", "base_url": "https://a.example", "location": "query"}
    status, body, _ = await call(
        svc, "PATCH", path, headers=svc.admin_headers, json={"parameters": {"api_key": "new-secret-value"}}
    )
    assert status == 200
    assert (await svc.services.vault.credentials("t1", "c1")).params["api_key"] == "new-secret-value"
    status, body, _ = await call(
        svc, "PATCH", path, headers=svc.admin_headers, json={"parameters": {"api_key": None}}
    )
    assert body["status"] == "pending" and "api_key" not in body["parameters"]
    status, body, _ = await call(
        svc, "PATCH", path, headers=svc.admin_headers, json={"integration_id": "http_bearer"}
    )
    assert status == 422 and "integration_id" in body["fields"]
    status, body, _ = await call(
        svc, "PATCH", "/admin/tenants/t1/connections/nope", headers=svc.admin_headers, json={}
    )
    assert status == 404


async def test_runtime_user_connections_and_list_filters(svc: RunningService) -> None:
    await svc.put_connection("t1", "default", BEARER)
    await svc.put_connection(
        "t1", "alice-gh", {**BEARER, "runtime_user_id": "alice", "default_connection_id": "default"}
    )
    await svc.put_connection("t1", "other", {"integration_id": "http_basic"})
    status, body, _ = await call(
        svc,
        "PUT",
        "/admin/tenants/t1/connections/bad",
        headers=svc.admin_headers,
        json={**BEARER, "runtime_user_id": "bob", "default_connection_id": "alice-gh"},
    )
    assert status == 422 and "default_connection_id" in body["fields"]
    for query, expected in (
        ("runtime_user_id=alice", ["alice-gh"]),
        ("integration_id=http_basic", ["other"]),
        ("default_connection_id=default", ["alice-gh"]),
        ("", ["alice-gh", "default", "other"]),
    ):
        status, body, _ = await call(
            svc, "GET", f"/admin/tenants/t1/connections?{query}", headers=svc.admin_headers
        )
        assert [i["connection_id"] for i in body["items"]] == expected, query
    status, page1, _ = await call(
        svc, "GET", "/admin/tenants/t1/connections?limit=2", headers=svc.admin_headers
    )
    assert len(page1["items"]) == 2 and page1["next_cursor"]
    status, page2, _ = await call(
        svc,
        "GET",
        f"/admin/tenants/t1/connections?limit=2&cursor={page1['next_cursor']}",
        headers=svc.admin_headers,
    )
    assert [i["connection_id"] for i in page2["items"]] == ["other"] and page2["next_cursor"] is None
    status, body, _ = await call(
        svc, "GET", "/admin/tenants/t1/connections?limit=0", headers=svc.admin_headers
    )
    assert status == 422


# --- API keys ----------------------------------------------------------------------------------


async def test_api_key_shown_once_hashed_and_revocable(svc: RunningService) -> None:
    status, minted, headers = await call(
        svc, "POST", "/admin/tenants/t1/api-keys", headers=svc.admin_headers, json={"name": "runtara"}
    )
    assert status == 201 and headers.get("Cache-Control") == "no-store"
    key, key_id = minted["api_key"], minted["key_id"]
    assert minted["tenant_id"] == "t1" and minted["name"] == "runtara"
    stored = await svc.services.store.get_api_key(key_id)
    assert stored is not None and stored.secret_hash == crypto.hash_api_key(key)
    assert key.split("_", 2)[2] not in json.dumps(stored.to_dict())
    status, listing, _ = await call(svc, "GET", "/admin/tenants/t1/api-keys", headers=svc.admin_headers)
    assert [k["key_id"] for k in listing["items"]] == [key_id]
    assert key not in json.dumps(listing) and "secret_hash" not in json.dumps(listing)
    await svc.put_connection("t1", "c1", BEARER)
    status, _, _ = await call(svc, "GET", "/connections/t1/c1", headers=bearer(key))
    assert status == 200  # warms the verified-key cache
    status, _, _ = await call(
        svc, "DELETE", f"/admin/tenants/t1/api-keys/{key_id}", headers=svc.admin_headers
    )
    assert status == 204
    status, body, _ = await call(svc, "GET", "/connections/t1/c1", headers=bearer(key))
    assert (status, body["error"]) == (401, "UNAUTHENTICATED")  # at once, despite the cache
    status, _, _ = await call(
        svc, "DELETE", f"/admin/tenants/t2/api-keys/{key_id}", headers=svc.admin_headers
    )
    assert status == 404  # keys are addressed within their tenant
    status, listing, _ = await call(svc, "GET", "/admin/tenants/t1/api-keys", headers=svc.admin_headers)
    assert listing["items"][0]["revoked_at"] is not None


async def test_api_key_body_is_optional_but_validated(sqlite_svc: RunningService) -> None:
    status, body, _ = await call(
        sqlite_svc, "POST", "/admin/tenants/t1/api-keys", headers=sqlite_svc.admin_headers
    )
    assert status == 201 and body["name"] is None
    status, body, _ = await call(
        sqlite_svc,
        "POST",
        "/admin/tenants/t1/api-keys",
        headers=sqlite_svc.admin_headers,
        json={"name": 5, "x": 1},
    )
    assert status == 422 and set(body["fields"]) == {"name", "x"}


# --- tenants, catalogue, audit -----------------------------------------------------------------


async def test_tenant_proxy_only_flag(svc: RunningService) -> None:
    status, body, _ = await call(
        svc, "PUT", "/admin/tenants/t7", headers=svc.admin_headers, json={"proxy_only": True}
    )
    assert status == 200 and body == {"tenant_id": "t7", "proxy_only": True, "proxy_only_effective": True}
    tenant = await svc.services.store.get_tenant("t7")
    assert tenant is not None and tenant.proxy_only is True
    status, body, _ = await call(svc, "GET", "/admin/tenants/t7", headers=svc.admin_headers)
    assert body["proxy_only"] is True
    status, body, _ = await call(
        svc, "PUT", "/admin/tenants/t7", headers=svc.admin_headers, json={"proxy_only": "yes"}
    )
    assert status == 422 and "proxy_only" in body["fields"]


async def test_integrations_catalogue_lists_fields_without_values(sqlite_svc: RunningService) -> None:
    status, body, _ = await call(sqlite_svc, "GET", "/admin/integrations", headers=sqlite_svc.admin_headers)
    assert status == 200
    by_id = {i["id"]: i for i in body["items"]}
    token = next(f for f in by_id["http_bearer"]["fields"] if f["name"] == "token")
    assert token["secret"] is True and token["required"] is True
    assert by_id["sftp"]["proxyable"] is False


async def test_admin_changes_are_audited_and_queryable(svc: RunningService) -> None:
    await svc.put_connection("t1", "c1", BEARER)
    await svc.put_connection("t1", "c1", BEARER)
    await call(
        svc, "PATCH", "/admin/tenants/t1/connections/c1", headers=svc.admin_headers, json={"metadata": {}}
    )
    await svc.put_connection("t1", "c2", BEARER)
    await svc.mint_key("t1")
    await call(svc, "DELETE", "/admin/tenants/t1/connections/c2", headers=svc.admin_headers)
    await svc.flush_audit()
    status, body, _ = await call(svc, "GET", "/admin/tenants/t1/audit", headers=svc.admin_headers)
    actions = [e["action"] for e in body["items"]]
    assert actions == [
        "connection.delete",
        "api_key.create",
        "connection.create",
        "connection.update",
        "connection.replace",
        "connection.create",
    ]
    assert all(e["actor"] == "admin:admin" and e["request_id"] for e in body["items"])
    assert SECRET not in json.dumps(body)
    status, body, _ = await call(
        svc,
        "GET",
        "/admin/tenants/t1/audit?connection_id=c1&action=connection.create",
        headers=svc.admin_headers,
    )
    assert len(body["items"]) == 1
    status, page, _ = await call(svc, "GET", "/admin/tenants/t1/audit?limit=4", headers=svc.admin_headers)
    assert len(page["items"]) == 4 and page["next_cursor"]
    status, rest, _ = await call(
        svc, "GET", f"/admin/tenants/t1/audit?limit=4&cursor={page['next_cursor']}", headers=svc.admin_headers
    )
    assert [e["action"] for e in rest["items"]] == ["connection.replace", "connection.create"]
    newest_ts = page["items"][0]["ts"]
    status, body, _ = await call(
        svc, "GET", f"/admin/tenants/t1/audit?since={newest_ts}", headers=svc.admin_headers
    )
    assert [e["action"] for e in body["items"]] == ["connection.delete"]
    status, body, _ = await call(
        svc, "GET", "/admin/tenants/t1/audit?until=2000-01-01T00:00:00Z", headers=svc.admin_headers
    )
    assert body["items"] == []
    status, body, _ = await call(
        svc, "GET", "/admin/tenants/t1/audit?since=yesterday", headers=svc.admin_headers
    )
    assert status == 422 and "since" in body["fields"]
    status, body, _ = await call(svc, "GET", "/admin/tenants/t2/audit", headers=svc.admin_headers)
    assert body["items"] == []  # per tenant


# --- boot: the master key must open the data before anything listens --------------------------


def assert_never_listened(sp: ServiceProcess) -> None:
    assert "Running on" not in sp.output() and "http://127.0.0.1" not in sp.output()
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", int(sp.url.rsplit(":", 1)[1]))) != 0


@pytest.mark.system
def test_missing_master_key_without_dev_mode_exits_2_naming_the_key(tmp_path: Path) -> None:
    sp = start_service_process(tmp_path / "data", env={"PROXY_DEV_MODE": "false"}, wait=False)
    assert sp.wait_exit() == 2
    assert "master_key" in sp.output() and "PROXY_MASTER_KEY" in sp.output()
    assert_never_listened(sp)


@pytest.mark.system
async def test_wrong_or_missing_master_key_version_exits_2_naming_the_version(tmp_path: Path) -> None:
    data = tmp_path / "data"
    key1 = crypto.generate_master_key_text()
    env = {"PROXY_DEV_MODE": "false", "PROXY_MASTER_KEY": key1}
    with start_service_process(data, env=env) as sp:
        async with (
            aiohttp.ClientSession(headers=sp.admin_headers) as s,
            s.put(sp.url + "/admin/tenants/t1/connections/c1", json=BEARER) as r,
        ):
            assert r.status == 201
        assert sp.stop() == 0
    other = crypto.generate_master_key_text()  # also version 1, but another key
    sp = start_service_process(data, env={**env, "PROXY_MASTER_KEY": other}, wait=False)
    assert sp.wait_exit() == 2
    assert "master key version 1" in sp.output()
    assert_never_listened(sp)
    only_v2 = "2:" + other.strip().split(":", 1)[1]
    sp = start_service_process(data, env={**env, "PROXY_MASTER_KEY": only_v2}, wait=False)
    assert sp.wait_exit() == 2
    assert "master key version 1 is needed" in sp.output()
    assert_never_listened(sp)
    # Secrets never reach the output, whichever way start-up failed.
    assert key1.strip().split(":", 1)[1] not in sp.output() and SECRET not in sp.output()


async def test_deleting_a_default_with_runtime_user_connections_needs_cascade(svc: RunningService) -> None:
    base = {
        "integration_id": "http_bearer",
        "parameters": {"token": "t", "base_url": "https://api.example.com"},
    }
    await svc.put_connection("t1", "crm", base)
    await svc.put_connection(
        "t1", "crm-alice", {**base, "runtime_user_id": "alice", "default_connection_id": "crm"}
    )
    status, body = await svc.admin("DELETE", "/admin/tenants/t1/connections/crm")
    assert status == 409 and body["error"] == "CONFLICT"
    assert "crm-alice" in body["message"] and "cascade=true" in body["message"]
    assert (await svc.admin("GET", "/admin/tenants/t1/connections/crm"))[0] == 200

    status, _ = await svc.admin("DELETE", "/admin/tenants/t1/connections/crm?cascade=true")
    assert status == 204
    assert (await svc.admin("GET", "/admin/tenants/t1/connections/crm"))[0] == 404
    assert (await svc.admin("GET", "/admin/tenants/t1/connections/crm-alice"))[0] == 404
