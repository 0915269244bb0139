"""Path mode against the real service and a real upstream: injection, hygiene, resolution."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from yarl import URL

from tests.support.app import RunningService, running_service
from tests.support.nginx import FRONTS, front_settings, proxied_through
from tests.support.upstream import Upstream

CANARY = "canary-secret-7f3a9c"


@pytest.fixture(params=FRONTS)
async def svc(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[RunningService]:
    """The service, called in path mode or through real nginx in front (same expectations)."""
    extra = tmp_path / "integrations"
    extra.mkdir()
    (extra / "custom.toml").write_text(
        """
[[integration]]
id = "acme_signed"
auth = "template"
fields = [
  { name = "key_id", required = true },
  { name = "secret", secret = true, required = true },
  { name = "base_url", type = "url", required = true },
]
[integration.inject.headers]
X-Acme-Auth = "{{ (key_id ~ ':' ~ secret) | b64encode }}"
[integration.inject.query]
acme_key = "{{ key_id }}"
[integration.inject.cookies]
acme_session = "{{ secret }}"
"""
    )
    async with (
        running_service(tmp_path / "data", integrations_dirs=[str(extra)], **front_settings()) as s,
        proxied_through(s, tmp_path, request.param) as s,
    ):
        yield s


async def connect(
    svc: RunningService, up: Upstream, cid: str, integration_id: str, params: dict[str, Any], **extra: Any
) -> None:
    params = {"base_url": up.url + "/echo/base/", **params}
    await svc.put_connection("t1", cid, {"integration_id": integration_id, "parameters": params, **extra})


async def call(
    svc: RunningService,
    path: str,
    cid: str,
    *,
    method: str = "GET",
    key: str | None = None,
    headers: dict[str, str] | None = None,
    tenant: str | None = "t1",
    data: bytes | None = None,
) -> tuple[int, dict[str, str], bytes]:
    h = {"X-Connection-Id": cid}
    if key is None:
        h.update(svc.admin_headers)
        if tenant:
            h["X-Tenant-Id"] = tenant
    else:
        h["Authorization"] = f"Bearer {key}"
        if tenant:
            h["X-Tenant-Id"] = tenant
    h.update(headers or {})
    url = URL(svc.proxy_url + path, encoded=True)
    async with svc.session.request(method, url, headers=h, data=data, allow_redirects=False) as r:
        return r.status, dict(r.headers), await r.read()


# --- injection, as the upstream saw it ----------------------------------------------------------


async def test_bearer(svc: RunningService, upstream: Upstream) -> None:
    await connect(svc, upstream, "c1", "http_bearer", {"token": "tok-1"})
    status, _, body = await call(svc, "/proxy/v1/items?x=1", "c1")
    assert status == 200, body
    seen = upstream.seen[-1]
    assert seen.path == "/echo/base/v1/items"
    assert seen.query == "x=1"
    assert seen.header("Authorization") == ["Bearer tok-1"]


@pytest.mark.parametrize(
    ("params", "where"),
    [
        ({"api_key": "k-1"}, ("header", "X-API-Key")),
        ({"api_key": "k-1", "header_name": "X-Token"}, ("header", "X-Token")),
        ({"api_key": "k-1", "location": "query", "query_param": "apikey"}, ("query", "apikey")),
        ({"api_key": "k-1", "location": "cookie", "cookie_name": "sid"}, ("cookie", "sid")),
    ],
)
async def test_api_key_locations(
    svc: RunningService, upstream: Upstream, params: dict[str, str], where: tuple[str, str]
) -> None:
    await connect(svc, upstream, "c1", "http_api_key", params)
    # The caller tries to supply its own copy in every place: only the stored key may arrive.
    status, _, _ = await call(
        svc,
        "/proxy/x?apikey=forged&keep=1",
        "c1",
        headers={"X-API-Key": "forged", "X-Token": "forged", "Cookie": "sid=forged; other=1"},
    )
    assert status == 200
    seen = upstream.seen[-1]
    kind, name = where
    if kind == "header":
        assert seen.header(name) == ["k-1"]
    elif kind == "query":
        assert seen.query == "keep=1&apikey=k-1"
    else:
        assert seen.header("Cookie") == ["other=1; sid=k-1"]
    everything = json.dumps(seen.headers) + seen.query
    assert everything.count("k-1") == 1


async def test_basic(svc: RunningService, upstream: Upstream) -> None:
    await connect(svc, upstream, "c1", "http_basic", {"username": "ann", "password": "s3cr:et"})
    status, _, _ = await call(svc, "/proxy/", "c1")
    assert status == 200
    (auth,) = upstream.seen[-1].header("Authorization")
    assert base64.b64decode(auth.removeprefix("Basic ")) == b"ann:s3cr:et"


async def test_oauth2_stored_access_token(svc: RunningService, upstream: Upstream) -> None:
    await connect(
        svc,
        upstream,
        "c1",
        "http_oauth2_authorization_code",
        {"access_token": "at-1", "refresh_token": "rt-1"},
    )
    status, _, body = await call(svc, "/proxy/me", "c1")
    assert status == 200, body
    assert upstream.seen[-1].header("Authorization") == ["Bearer at-1"]


async def test_operator_template_integration(svc: RunningService, upstream: Upstream) -> None:
    await connect(svc, upstream, "c1", "acme_signed", {"key_id": "kid", "secret": "sek"})
    status, _, body = await call(svc, "/proxy/p?a=1", "c1", headers={"Cookie": "x=1"})
    assert status == 200, body
    seen = upstream.seen[-1]
    assert seen.header("X-Acme-Auth") == [base64.b64encode(b"kid:sek").decode()]
    assert seen.query == "a=1&acme_key=kid"
    assert seen.header("Cookie") == ["x=1; acme_session=sek"]


async def test_vendor_template_with_allowed_hosts_override(svc: RunningService, upstream: Upstream) -> None:
    # Mailgun's base URL is fixed (https://api.mailgun.net); its injection is checked through
    # an operator copy pointing at the local upstream in test_operator_template_integration.
    # Here: a vendor whose host binding refuses a crafted domain before anything is sent.
    await svc.put_connection(
        "t1",
        "shop",
        {
            "integration_id": "shopify_access_token",
            "parameters": {"access_token": CANARY, "shop_domain": f"127.0.0.1:{upstream.port}"},
        },
    )
    status, headers, body = await call(svc, "/proxy/2024-10/shop.json", "shop")
    assert status == 403
    assert headers["X-Proxy-Error"] == "HOST_NOT_ALLOWED"
    assert upstream.seen == []
    assert CANARY not in body.decode()


# --- header hygiene ------------------------------------------------------------------------------


async def test_header_hygiene_with_canary(svc: RunningService, upstream: Upstream) -> None:
    await connect(svc, upstream, "c1", "http_bearer", {"token": CANARY})
    key = await svc.mint_key("t1")
    sent = {
        "Proxy-Authorization": f"Bearer {key}",
        "X-Runtime-User-Id": "nobody",
        "X-Proxy-Max-Wait-Ms": "0",
        "X-Proxy-Something": "x",
        "Connection": "keep-alive, X-Hop-Named",
        "X-Hop-Named": "must-not-pass",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "Proxy-Connection": "keep-alive",
        "Trailer": "X-T",
        "X-Keep": "kept",
        "Accept": "application/json",
    }
    # The caller authenticates with Authorization too: neither credential may be forwarded.
    status, _, body = await call(svc, "/proxy/status-free", "c1", key=key, headers=sent)
    assert status == 200, body
    seen = upstream.seen[-1]
    names = seen.header_names
    for dropped in (
        "proxy-authorization",
        "x-connection-id",
        "x-tenant-id",
        "x-runtime-user-id",
        "x-proxy-max-wait-ms",
        "x-proxy-something",
        "x-hop-named",
        "keep-alive",
        "te",
        "proxy-connection",
        "trailer",
    ):
        assert dropped not in names, dropped
    assert seen.header("Authorization") == [f"Bearer {CANARY}"]
    assert key not in json.dumps(seen.headers)
    assert seen.header("X-Keep") == ["kept"]
    assert seen.header("Accept") == ["application/json"]


async def test_credential_never_in_response(svc: RunningService, upstream: Upstream) -> None:
    # base URL at /status/200: the upstream answers without echoing anything.
    await svc.put_connection(
        "t1",
        "quiet",
        {"integration_id": "http_bearer", "parameters": {"token": CANARY, "base_url": upstream.url + "/"}},
    )
    status, headers, body = await call(svc, "/proxy/status/200", "quiet")
    assert status == 200
    assert CANARY not in body.decode() + json.dumps(headers)
    # and not in the service's own errors either
    status, headers, body = await call(svc, "/proxy/status/200", "quiet", tenant="t2")
    assert status == 404
    assert CANARY not in body.decode() + json.dumps(headers)


async def test_upstream_cannot_forge_proxy_headers_or_hop_by_hop(
    svc: RunningService, upstream: Upstream
) -> None:
    await connect(svc, upstream, "c1", "http_bearer", {"token": "t"})
    q = "respond_header=X-Proxy-Error:FAKE&respond_header=Connection:X-Named&respond_header=X-Named:1&respond_header=X-Fine:yes"
    q += "&respond_header=X-Proxy-Retries:9&respond_header=X-Proxy-Max-Wait-Ms:9"
    status, headers, _ = await call(svc, "/proxy/r?" + q, "c1")
    assert status == 200
    # Every X-Proxy-* name the service defines is its own: an upstream cannot send one. (nginx
    # core hides names, not a prefix: an unknown X-Proxy-* name passes it, README.)
    for name in ("X-Proxy-Error", "X-Proxy-Retries", "X-Proxy-Max-Wait-Ms"):
        assert name not in headers, name
    if not svc.proxy_base:
        # Path mode drops what the upstream's Connection names; stock nginx cannot (no dynamic
        # response-header removal): a documented difference, not a credential (README).
        assert "X-Named" not in headers
    assert headers["X-Fine"] == "yes"


async def test_the_services_own_error_comes_back_from_every_route(
    svc: RunningService, upstream: Upstream
) -> None:
    """An unknown X-Proxy-* header sends the call through nginx to path mode (the service
    route): path mode's refusal keeps its X-Proxy-Error there too."""
    await connect(svc, upstream, "c1", "http_bearer", {"token": "t"})
    for headers in ({}, {"X-Proxy-Whatever": "1"}):
        status, got, body = await call(svc, "/proxy/a", "nope", headers=headers)
        assert (status, got.get("X-Proxy-Error")) == (404, "CONNECTION_NOT_FOUND"), (headers, body)
        assert json.loads(body)["error"] == "CONNECTION_NOT_FOUND"


async def test_crlf_in_caller_header_refused(svc: RunningService, upstream: Upstream) -> None:
    await connect(svc, upstream, "c1", "http_bearer", {"token": "t"})
    # aiohttp's client refuses to send CR/LF itself, so the raw request goes over a socket.
    import asyncio

    reader, writer = await asyncio.open_connection("127.0.0.1", URL(svc.proxy_url).port)
    writer.write(
        (
            "GET /proxy/x HTTP/1.1\r\nHost: h\r\n"
            f"Authorization: Bearer {svc.admin_token}\r\nX-Tenant-Id: t1\r\nX-Connection-Id: c1\r\n"
            "X-Bad: a\x00b\r\nConnection: close\r\n\r\n"
        ).encode()
    )
    await writer.drain()
    data = await reader.read()
    writer.close()
    assert data.split(b"\r\n")[0].split(b" ")[1] in (b"400", b"422")
    assert upstream.seen == []


# --- paths, queries, redirects ------------------------------------------------------------------


async def test_query_and_path_bytes_kept(svc: RunningService, upstream: Upstream) -> None:
    await connect(svc, upstream, "c1", "http_bearer", {"token": "t"})
    status, _, _ = await call(svc, "/proxy/a%2Bb/c%20d?x=%2B&y=+&z=%20&w", "c1")
    assert status == 200
    seen = upstream.seen[-1]
    assert seen.path == "/echo/base/a%2Bb/c%20d"
    assert seen.query == "x=%2B&y=+&z=%20&w"


@pytest.mark.parametrize(
    "path",
    ["/proxy/a/../b", "/proxy/a/%2e%2e/b", "/proxy/a/%252e%252e/b", "/proxy/a/..%2fb", "/proxy/..;/x"],
)
async def test_path_escapes_refused(svc: RunningService, upstream: Upstream, path: str) -> None:
    await connect(svc, upstream, "c1", "http_bearer", {"token": "t"})
    status, headers, _ = await call(svc, path, "c1")
    assert status in (403, 422), status
    assert "X-Proxy-Error" in headers
    assert upstream.seen == []


async def test_redirect_passed_back_not_followed(svc: RunningService, upstream: Upstream) -> None:
    await svc.put_connection(
        "t1",
        "c1",
        {"integration_id": "http_bearer", "parameters": {"token": CANARY, "base_url": upstream.url + "/"}},
    )
    status, headers, _ = await call(svc, "/proxy/redirect?to=http://127.0.0.1:1/steal", "c1")
    assert status == 302
    assert headers["Location"] == "http://127.0.0.1:1/steal"
    assert len(upstream.seen) == 1


# --- who may call what ----------------------------------------------------------------------------


async def test_errors_of_the_service(svc: RunningService, upstream: Upstream) -> None:
    await connect(svc, upstream, "c1", "http_bearer", {"token": "t"})
    key = await svc.mint_key("t1")
    async with svc.session.get(svc.proxy_url + "/proxy/x", headers={"X-Connection-Id": "c1"}) as r:
        assert r.status == 401
        assert r.headers["X-Proxy-Error"] == "UNAUTHENTICATED"
    status, headers, body = await call(svc, "/proxy/x", "", key=key)
    assert (status, headers["X-Proxy-Error"]) == (422, "VALIDATION_ERROR")
    assert "X-Connection-Id" in json.loads(body)["fields"]
    status, headers, _ = await call(svc, "/proxy/x", "c1", tenant=None)  # admin needs X-Tenant-Id
    assert (status, headers["X-Proxy-Error"]) == (422, "VALIDATION_ERROR")
    status, headers, _ = await call(svc, "/proxy/x", "nope", key=key)
    assert (status, headers["X-Proxy-Error"]) == (404, "CONNECTION_NOT_FOUND")
    # A key bound to t1 names another tenant: concealed as not found.
    await svc.put_connection(
        "t2", "c1", {"integration_id": "http_bearer", "parameters": {"token": "x", "base_url": upstream.url}}
    )
    status, headers, _ = await call(svc, "/proxy/x", "c1", key=key, tenant="t2")
    assert (status, headers["X-Proxy-Error"]) == (404, "CONNECTION_NOT_FOUND")
    # Its own tenant without X-Tenant-Id works.
    status, _, _ = await call(svc, "/proxy/x", "c1", key=key, tenant=None)
    assert status == 200
    assert len(upstream.seen) == 1


async def test_pending_connection_is_424_with_how_to_connect(svc: RunningService, upstream: Upstream) -> None:
    await svc.put_connection(
        "t1", "p1", {"integration_id": "http_bearer", "parameters": {"base_url": upstream.url}}
    )
    status, headers, body = await call(svc, "/proxy/x", "p1")
    assert (status, headers["X-Proxy-Error"]) == (424, "CONNECTION_NOT_AUTHORIZED")
    assert "POST /admin/tenants/t1/connect-sessions" in json.loads(body)["message"]
    assert upstream.seen == []


async def test_opaque_integration_refused(svc: RunningService, upstream: Upstream) -> None:
    await svc.put_connection(
        "t1", "s1", {"integration_id": "sftp", "parameters": {"host": "h", "username": "u", "password": "p"}}
    )
    status, _, body = await call(svc, "/proxy/x", "s1")
    assert status == 422
    assert json.loads(body)["error"] == "INTEGRATION_NOT_PROXYABLE"
    assert "integration 'sftp' is not proxied" in json.loads(body)["message"]


async def test_integration_outside_the_catalogue_is_stored_but_said_to_be_connection_service_only(
    svc: RunningService, upstream: Upstream
) -> None:
    body = {
        "integration_id": "acme_custom_agent",
        "parameters": {"token": "tok-123", "base_url": upstream.url},
    }
    view = await svc.put_connection("t1", "custom", body)  # stored: Runtara's custom agents need it
    assert view["served_by"] == ["connection_service"]
    assert "not in the catalogue" in view["notice"] and "GET /admin/integrations" in view["notice"]
    assert "tok-123" not in json.dumps(view)
    _, got = await svc.admin("GET", "/admin/tenants/t1/connections/custom")
    assert got["served_by"] == ["connection_service"] and got["notice"] == view["notice"]
    # Catalogued integrations say so as well: no notice.
    await connect(svc, upstream, "b1", "http_bearer", {"token": "t"})
    _, bearer = await svc.admin("GET", "/admin/tenants/t1/connections/b1")
    assert bearer["served_by"] == ["proxy", "connection_service"] and bearer["notice"] is None
    _, listed = await svc.admin("GET", "/admin/tenants/t1/connections")
    assert {i["connection_id"]: i["served_by"] for i in listed["items"]}["custom"] == ["connection_service"]

    status, headers, raw = await call(svc, "/proxy/x", "custom")
    error = json.loads(raw)
    assert (status, headers["X-Proxy-Error"], error["error"]) == (
        422,
        "INTEGRATION_NOT_PROXYABLE",
        "INTEGRATION_NOT_PROXYABLE",
    )
    assert (
        "not in the integration catalogue" in error["message"]
        and "GET /admin/integrations" in error["message"]
    )
    assert upstream.seen == []
    # The Connection Service hands it out.
    async with svc.session.get(svc.url + "/connections/t1/custom", headers=svc.admin_headers) as r:
        assert r.status == 200 and (await r.json())["parameters"]["token"] == "tok-123"


async def test_runtime_user_override(svc: RunningService, upstream: Upstream) -> None:
    await connect(svc, upstream, "c1", "http_bearer", {"token": "default-token"})
    await connect(
        svc,
        upstream,
        "c1-alice",
        "http_bearer",
        {"token": "alice-token"},
        runtime_user_id="alice",
        default_connection_id="c1",
    )
    await call(svc, "/proxy/x", "c1", headers={"X-Runtime-User-Id": "alice"})
    await call(svc, "/proxy/x", "c1", headers={"X-Runtime-User-Id": "bob"})
    await call(svc, "/proxy/x", "c1")
    assert [s.header("Authorization")[0] for s in upstream.seen] == [
        "Bearer alice-token",
        "Bearer default-token",
        "Bearer default-token",
    ]


async def test_audit_records_use(svc: RunningService, upstream: Upstream) -> None:
    await connect(svc, upstream, "c1", "http_bearer", {"token": "t"})
    for _ in range(3):
        await call(svc, "/proxy/x", "c1")

    async def used() -> int:
        # Through nginx the use is recorded when nginx's access-log report arrives (UDP).
        await svc.flush_audit()
        status, data = await svc.admin("GET", "/admin/tenants/t1/audit?action=proxy.use")
        assert status == 200, data
        uses = [e for e in data["items"] if e["action"] == "proxy.use" and e["connection_id"] == "c1"]
        return sum(e["detail"].get("count", 1) for e in uses)

    for _ in range(40):
        if await used() >= 3:
            break
        await asyncio.sleep(0.05)
    assert await used() == 3
