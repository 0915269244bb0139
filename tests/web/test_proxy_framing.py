"""Secrets go only where an operator sent them: no injected header frames the request, TRACE is
refused on every front end, and a proxy-only connection's secret never comes back in a header."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from aiohttp import web
from yarl import URL

from proxy.model import ConnectionRecord
from tests.support.app import RunningService, bearer, running_service
from tests.support.nginx import FRONTS, front_settings, proxied_through
from tests.support.upstream import RawUpstream, Upstream, running_raw_upstream

SECRET = "s3cr/t+k=ey-0123"


async def store_directly(
    svc: RunningService, tenant: str, cid: str, integration_id: str, params: dict[str, Any]
) -> None:
    """Writes a connection the way an old release or a hand-edited store might have: without
    the admin API's validation, so only the injection-time check stands in the way."""
    vault = svc.services.vault
    integration = svc.services.catalogue.get(integration_id)
    public, secret = await vault.encrypt_params(tenant, cid, integration, params)
    record = ConnectionRecord(
        tenant_id=tenant,
        connection_id=cid,
        integration_id=integration_id,
        public_params=public,
        secret_params=secret,
    )
    await vault.save(record, None)


# --- an injected Transfer-Encoding cannot smuggle a request ------------------------------------


@pytest.fixture
async def raw() -> AsyncIterator[RawUpstream]:
    async with running_raw_upstream() as up:
        yield up


@pytest.mark.parametrize("mode", FRONTS)
@pytest.mark.parametrize("header_name", ["Transfer-Encoding", "transfer-encoding", "Content-Length", "Host"])
async def test_stored_framing_header_name_is_refused_at_injection_and_nothing_is_sent(
    tmp_path: Path, raw: RawUpstream, header_name: str, mode: str
) -> None:
    smuggled = b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
    async with (
        running_service(tmp_path / "data", **front_settings()) as svc,
        proxied_through(svc, tmp_path, mode) as svc,
    ):
        await store_directly(
            svc,
            "t1",
            "bad",
            "http_api_key",
            {"api_key": "chunked", "header_name": header_name, "base_url": raw.url + "/api"},
        )
        key = await svc.mint_key("t1")
        async with svc.session.post(
            svc.proxy_url + "/proxy/items",
            data=smuggled,
            headers={**bearer(key), "X-Connection-Id": "bad", "Content-Type": "text/plain"},
        ) as r:
            body = await r.json()
            assert r.status == 422, body
            assert r.headers["X-Proxy-Error"] == "VALIDATION_ERROR"
        assert body["fields"] == {"header_name": body["fields"]["header_name"]}
        assert "chunked" not in body["message"]  # the stored value is never quoted
        # A well-formed connection next to it still works, on the same upstream, exactly once.
        await svc.put_connection(
            "t1",
            "good",
            {"integration_id": "http_api_key", "parameters": {"api_key": "k", "base_url": raw.url + "/api"}},
        )
        async with svc.session.post(
            svc.proxy_url + "/proxy/items", data=smuggled, headers={**bearer(key), "X-Connection-Id": "good"}
        ) as r:
            assert r.status == 200
    await asyncio.sleep(0.2)  # a smuggled second request would arrive right behind the first
    assert raw.requests == ["POST /api/items HTTP/1.1"]


# --- TRACE is refused on every front end -------------------------------------------------------


@pytest.fixture
async def svc(tmp_path: Path, upstream: Upstream) -> AsyncIterator[RunningService]:
    async with running_service(tmp_path, trusted_networks=["127.0.0.1/32"]) as s:
        await s.put_connection(
            "t1",
            "c1",
            {
                "integration_id": "http_bearer",
                "parameters": {"token": SECRET, "base_url": upstream.url + "/base"},
            },
        )
        yield s


def _refused_trace(status: int, body: dict[str, Any]) -> None:
    assert status == 405, body
    assert body["error"] == "METHOD_NOT_ALLOWED"
    assert "TRACE" in body["message"] and "echo" in body["message"]
    assert SECRET not in json.dumps(body)


async def test_trace_refused_in_path_mode(svc: RunningService, upstream: Upstream) -> None:
    key = await svc.mint_key("t1")
    async with svc.session.request(
        "TRACE",
        svc.url + "/proxy/echo",
        headers={**bearer(key), "X-Connection-Id": "c1", "X-Proxy-Retries": "3"},
    ) as r:
        _refused_trace(r.status, await r.json())
        assert r.headers["X-Proxy-Error"] == "METHOD_NOT_ALLOWED"
    async with svc.session.request("TRACE", svc.url + "/proxy/echo") as r:  # refused before auth too
        _refused_trace(r.status, await r.json())
    assert upstream.seen == []


async def test_trace_refused_in_the_envelope(svc: RunningService, upstream: Upstream) -> None:
    for url in ("/echo", upstream.url + "/base/echo"):
        payload = {"method": "trace", "url": url, "connection_id": "c1"}
        async with svc.session.post(
            svc.url + "/api/internal/proxy", json=payload, headers={"X-Org-Id": "t1"}
        ) as r:
            _refused_trace(r.status, await r.json())
    assert upstream.seen == []


async def test_trace_refused_in_forward_mode(svc: RunningService, upstream: Upstream) -> None:
    key = await svc.mint_key("t1")
    reader, writer = await asyncio.open_connection("127.0.0.1", URL(svc.url).port)
    try:
        writer.write(
            (
                f"TRACE {upstream.url}/base/echo HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Bearer {key}\r\n"
                "X-Connection-Id: c1\r\nConnection: close\r\n\r\n"
            ).encode()
        )
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, payload = data.partition(b"\r\n\r\n")
    _refused_trace(int(head.split()[1]), json.loads(payload))
    assert upstream.seen == []


# --- a proxy-only connection's secret does not come back in a response header -----------------


@contextlib.asynccontextmanager
async def echoing_redirector() -> AsyncIterator[str]:
    """An upstream that answers every call with a redirect carrying the query it received (as
    APIs that sign links with the caller's key do) and the Authorization it got, decoded."""

    async def handle(request: web.Request) -> web.Response:
        return web.Response(
            status=302,
            headers={
                "Location": f"https://files.example.com/next?{request.rel_url.raw_query_string}",
                "X-Seen-Key": request.query.get("api_key", ""),
                "X-Seen-Auth": request.headers.get("Authorization", ""),
                "X-Seen-Lower": quote(request.query.get("api_key", ""), safe="").lower(),
                "Content-Type": "text/plain",
            },
            text="moved",
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        server = site._server
        assert server is not None
        port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def _query_key(base_url: str, **options: Any) -> dict[str, Any]:
    return {
        "integration_id": "http_api_key",
        "parameters": {
            "api_key": SECRET,
            "location": "query",
            "query_param": "api_key",
            "base_url": base_url,
        },
        "options": options,
    }


@pytest.mark.parametrize("mode", FRONTS)
async def test_proxy_only_secret_redacted_from_relayed_headers(tmp_path: Path, mode: str) -> None:
    async with (
        echoing_redirector() as up,
        running_service(tmp_path / "data", trusted_networks=["127.0.0.1/32"], **front_settings()) as svc,
        proxied_through(svc, tmp_path, mode) as svc,
    ):
        await svc.put_connection("t1", "hidden", _query_key(up + "/v1", proxy_only=True))
        await svc.put_connection("t1", "open", _query_key(up + "/v1"))
        key = await svc.mint_key("t1")

        async def path_call(cid: str) -> dict[str, str]:
            async with svc.session.get(
                svc.proxy_url + "/proxy/download?id=7",
                headers={**bearer(key), "X-Connection-Id": cid},
                allow_redirects=False,
            ) as r:
                assert r.status == 302
                return dict(r.headers)

        hidden = await path_call("hidden")
        assert hidden["Location"] == "https://files.example.com/next?id=7&api_key=********"
        assert hidden["X-Seen-Key"] == "********"
        assert hidden["X-Seen-Lower"] == "********"  # another percent-encoding: replaced whole
        assert all(SECRET not in v and quote(SECRET, safe="") not in v for v in hidden.values())

        payload = {"method": "GET", "url": "/download?id=7", "connection_id": "hidden"}
        async with svc.session.post(
            svc.url + "/api/internal/proxy", json=payload, headers={"X-Org-Id": "t1"}
        ) as r:
            envelope = await r.json()
        assert envelope["headers"]["location"] == "https://files.example.com/next?id=7&api_key=********"
        assert SECRET not in json.dumps(envelope["headers"])

        # Not proxy-only: the caller may read the secret from the Connection Service anyway, so
        # what the upstream says is relayed as it is.
        opened = await path_call("open")
        assert opened["X-Seen-Key"] == SECRET


@pytest.mark.parametrize("mode", FRONTS)
async def test_tenant_proxy_only_flag_redacts_an_echoed_authorization(tmp_path: Path, mode: str) -> None:
    async with (
        echoing_redirector() as up,
        running_service(tmp_path / "data", **front_settings()) as svc,
        proxied_through(svc, tmp_path, mode) as svc,
    ):
        await svc.put_connection(
            "t1", "c1", {"integration_id": "http_bearer", "parameters": {"token": SECRET, "base_url": up}}
        )
        key = await svc.mint_key("t1")

        async def seen_auth() -> str:
            async with svc.session.get(
                svc.proxy_url + "/proxy/x",
                headers={**bearer(key), "X-Connection-Id": "c1"},
                allow_redirects=False,
            ) as r:
                return r.headers["X-Seen-Auth"]

        assert await seen_auth() == f"Bearer {SECRET}"
        status, _ = await svc.admin("PUT", "/admin/tenants/t1", json={"proxy_only": True})
        assert status == 200
        if svc.proxy_base:
            # nginx may reuse a decision it cached before the change: at most the decision
            # lifetime plus nginx's one-second clock (nginx_decision_cache_s + 1, README).
            bound = svc.settings.nginx_decision_cache_s + 1
            await asyncio.sleep(bound + 0.1)
        assert await seen_auth() == "Bearer ********"
