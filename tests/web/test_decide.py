"""nginx in front, end to end: real nginx (generated config) -> ``/_decide`` -> a real upstream.

Each test runs the same call through path mode and through nginx (``front``), with the same
expectations: what the upstream saw, what the caller got back (status, JSON body, Retry-After).
The decision endpoint's own trust boundary (it answers credentials) is tested directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from yarl import URL

from proxy.web.decide import DECIDER
from tests.support.app import RunningService, bearer, free_port, running_service
from tests.support.nginx import DECISION_TOKEN, nginx_front
from tests.support.upstream import Upstream, running_upstream

CANARY = "canary-secret-5d1e"


@pytest.fixture(scope="module")
def report_port() -> int:
    return free_port()


@pytest.fixture
async def svc(tmp_path: Path) -> AsyncIterator[RunningService]:
    port = free_port()
    async with running_service(
        tmp_path / "data",
        decision_token=DECISION_TOKEN,
        nginx_report_listen=f"127.0.0.1:{port}",
        nginx_decision_cache_s=1,
        # nginx asks the lean listener; direct calls here test /_decide on the main one.
        decision_listen=f"127.0.0.1:{free_port()}",
    ) as s:
        yield s


NGINX = pytest.param("nginx", marks=pytest.mark.system)


@pytest.fixture(params=["path", NGINX])
async def front(request: pytest.FixtureRequest, svc: RunningService, tmp_path: Path) -> AsyncIterator[str]:
    """The base URL callers use: the service itself (path mode), or nginx in front of it."""
    if request.param == "path":
        yield svc.url
        return
    async with nginx_front(svc, tmp_path) as f:
        yield f.url


async def connect(
    svc: RunningService, up: Upstream, cid: str, integration: str, params: dict[str, Any], **kw: Any
) -> None:
    params = {"base_url": up.url + "/echo/base/", **params}
    await svc.put_connection("t1", cid, {"integration_id": integration, "parameters": params, **kw})


async def call(
    svc: RunningService,
    base: str,
    path: str,
    cid: str,
    *,
    key: str,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    data: bytes | None = None,
) -> tuple[int, dict[str, str], bytes]:
    h = {"X-Connection-Id": cid, **bearer(key), **(headers or {})}
    url = URL(base + path, encoded=True)
    async with svc.session.request(method, url, headers=h, data=data, allow_redirects=False) as r:
        return r.status, dict(r.headers), await r.read()


def _body(raw: bytes) -> dict[str, Any]:
    data = json.loads(raw)
    assert isinstance(data, dict)
    data.pop("request_id", None)
    return data


# --- injection and hygiene, as the upstream saw it ------------------------------------------------


async def test_bearer_and_caller_headers(svc: RunningService, upstream: Upstream, front: str) -> None:
    await connect(svc, upstream, "c1", "http_bearer", {"token": CANARY})
    key = await svc.mint_key("t1")
    status, _, body = await call(
        svc,
        front,
        "/proxy/v1/items?x=1&y=%2F",
        "c1",
        key=key,
        headers={
            "X-Tenant-Id": "t1",
            "Proxy-Authorization": f"Bearer {key}",
            "X-Proxy-Retries": "0",
            "X-Custom": "kept",
        },
    )
    assert status == 200, body
    seen = upstream.seen[-1]
    assert (seen.path, seen.query) == ("/echo/base/v1/items", "x=1&y=%2F")
    assert seen.header("Authorization") == [f"Bearer {CANARY}"]
    assert seen.header("X-Custom") == ["kept"]
    names = seen.header_names
    for gone in ("proxy-authorization", "x-connection-id", "x-tenant-id", "x-proxy-retries"):
        assert gone not in names
    assert key not in json.dumps(seen.headers)
    assert seen.header("Host") == [f"127.0.0.1:{upstream.port}"]


@pytest.mark.parametrize(
    ("params", "where"),
    [
        ({"api_key": "k-1"}, ("header", "X-API-Key")),
        ({"api_key": "k-1", "header_name": "X-Token"}, ("header", "X-Token")),  # service route
        ({"api_key": "k-1", "location": "query", "query_param": "apikey"}, ("query", "apikey")),
        ({"api_key": "k-1", "location": "cookie", "cookie_name": "sid"}, ("cookie", "sid")),
    ],
)
async def test_api_key_locations(
    svc: RunningService, upstream: Upstream, front: str, params: dict[str, str], where: tuple[str, str]
) -> None:
    await connect(svc, upstream, "c1", "http_api_key", params)
    key = await svc.mint_key("t1")
    status, _, body = await call(
        svc,
        front,
        "/proxy/x?apikey=forged&keep=1",
        "c1",
        key=key,
        headers={"X-API-Key": "forged", "X-Token": "forged", "Cookie": "sid=forged; other=1"},
    )
    assert status == 200, body
    seen = upstream.seen[-1]
    kind, name = where
    if kind == "header":
        assert seen.header(name) == ["k-1"]
    elif kind == "query":
        assert seen.query == "keep=1&apikey=k-1"
    else:
        assert seen.header("Cookie") == ["other=1; sid=k-1"]
    assert (json.dumps(seen.headers) + seen.query).count("k-1") == 1


async def test_unknown_control_header_goes_through_path_mode(
    svc: RunningService, upstream: Upstream, front: str
) -> None:
    await connect(svc, upstream, "c1", "http_bearer", {"token": CANARY})
    key = await svc.mint_key("t1")
    status, _, _ = await call(svc, front, "/proxy/a", "c1", key=key, headers={"X-Proxy-Whatever": "1"})
    assert status == 200
    seen = upstream.seen[-1]
    assert "x-proxy-whatever" not in seen.header_names
    assert seen.header("Authorization") == [f"Bearer {CANARY}"]


async def test_streaming_body_both_ways(svc: RunningService, upstream: Upstream, front: str) -> None:
    await svc.put_connection(
        "t1", "c1", {"integration_id": "http_bearer", "parameters": {"token": "t", "base_url": upstream.url}}
    )
    key = await svc.mint_key("t1")
    payload = bytes(range(256)) * 8192  # 2 MiB
    status, _, body = await call(svc, front, "/proxy/upload", "c1", key=key, method="POST", data=payload)
    assert status == 200
    assert json.loads(body)["len"] == len(payload)
    status, _, body = await call(svc, front, "/proxy/download?n=3000000&chunked=1", "c1", key=key)
    assert (status, len(body)) == (200, 3000000)


# --- refusals: the exact status, body and headers the service gives -------------------------------


async def test_refusals_are_the_services_own(svc: RunningService, upstream: Upstream, front: str) -> None:
    await connect(
        svc, upstream, "c1", "http_bearer", {"token": CANARY}, rate_limits=[{"limit": 1, "window": "1h"}]
    )
    await svc.put_connection("t1", "pending", {"integration_id": "http_bearer"})
    await svc.put_connection(
        "t1",
        "private",
        {"integration_id": "http_bearer", "parameters": {"token": "x", "base_url": "https://10.1.2.3/"}},
    )
    key = await svc.mint_key("t1")

    status, headers, body = await call(svc, front, "/proxy/a", "nope", key=key)
    assert status == 404 and headers["X-Proxy-Error"] == "CONNECTION_NOT_FOUND"
    assert _body(body)["error"] == "CONNECTION_NOT_FOUND"

    status, headers, body = await call(svc, front, "/proxy/a", "c1", key="cpk_bad_key")
    assert status == 401 and _body(body)["error"] == "UNAUTHENTICATED"

    status, _, body = await call(svc, front, "/proxy/a", "pending", key=key)
    assert status == 424 and _body(body)["error"] == "CONNECTION_NOT_AUTHORIZED"

    status, _, body = await call(svc, front, "/proxy/a", "private", key=key)
    assert status == 403 and _body(body)["error"] == "HOST_NOT_ALLOWED"

    status, _, body = await call(svc, front, "/proxy/%2e%2e/etc", "c1", key=key)
    assert status == 403 and _body(body)["error"] == "FORBIDDEN"

    assert (await call(svc, front, "/proxy/a", "c1", key=key))[0] == 200
    status, headers, body = await call(svc, front, "/proxy/a", "c1", key=key)
    assert status == 429, body
    data = _body(body)
    assert data["error"] == "RATE_LIMITED" and headers["X-Proxy-Error"] == "RATE_LIMITED"
    assert int(headers["Retry-After"]) == -(-data["retry_after_ms"] // 1000)
    assert int(headers["Retry-After-Ms"]) == data["retry_after_ms"]
    assert headers["Content-Type"].startswith("application/json")
    assert CANARY not in json.dumps(headers) + body.decode()

    status, headers, body = await call(svc, front, "/proxy/a", "c1", key=key, method="TRACE")
    assert status == 405 and _body(body)["error"] == "METHOD_NOT_ALLOWED"

    # Nothing but path mode is served through nginx (the service itself also serves /_decide,
    # to token holders only: test_decide_is_not_a_public_oracle).
    for path in ("/elsewhere", "/_cp_decide", *(("/_decide",) if front != svc.url else ())):
        status, headers, body = await call(svc, front, path, "c1", key=key)
        assert status == 404 and headers["X-Proxy-Error"] == "NOT_FOUND", (path, body)
        assert CANARY not in body.decode() + json.dumps(headers)


async def test_upstream_down(svc: RunningService, front: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    await svc.put_connection(
        "t1",
        "c1",
        {
            "integration_id": "http_bearer",
            "parameters": {"token": "t", "base_url": f"http://127.0.0.1:{dead}/"},
        },
    )
    key = await svc.mint_key("t1")
    status, headers, body = await call(svc, front, "/proxy/a", "c1", key=key)
    assert status == 502 and headers["X-Proxy-Error"] == "UPSTREAM_UNREACHABLE"
    assert json.loads(body)["error"] == "UPSTREAM_UNREACHABLE"


async def test_learned_retry_after_stops_next_calls(
    svc: RunningService, upstream: Upstream, front: str
) -> None:
    await connect(svc, upstream, "c1", "http_bearer", {"token": "t"})
    key = await svc.mint_key("t1")
    await svc.put_connection(
        "t1", "c2", {"integration_id": "http_bearer", "parameters": {"token": "t", "base_url": upstream.url}}
    )
    status, headers, _ = await call(svc, front, "/proxy/status/429?retry_after=30", "c2", key=key)
    assert status == 429 and "X-Proxy-Error" not in headers  # the upstream's own answer
    before = len(upstream.seen)
    loop = asyncio.get_running_loop()
    # Through nginx the 429's report travels after its response: a decision made in between may be
    # cached, and then the bound is the cache's (README: nginx_decision_cache_s + 1 s).
    bound = 1.0 + (svc.settings.nginx_decision_cache_s + 1 if front != svc.url else 0)
    deadline = loop.time() + bound
    while True:
        status, headers, body = await call(svc, front, "/proxy/echo/x", "c2", key=key)
        if status == 429 and headers.get("X-Proxy-Error") == "RATE_LIMITED":
            break
        assert loop.time() < deadline, f"a learned Retry-After did not stop calls within {bound} s"
        await asyncio.sleep(0.05)
    assert int(headers["Retry-After"]) >= 28
    assert _body(body)["limit_source"] == "learned"
    if front == svc.url:
        assert len(upstream.seen) <= before + 2
    # Once stopped, calls stay stopped: none of the next ones reaches the upstream.
    stopped_at = len(upstream.seen)
    for _ in range(3):
        status, headers, _ = await call(svc, front, "/proxy/echo/x", "c2", key=key)
        assert status == 429 and headers.get("X-Proxy-Error") == "RATE_LIMITED"
    assert len(upstream.seen) == stopped_at


# --- the decision endpoint's own boundary -----------------------------------------------------------


async def test_decide_is_not_a_public_oracle(svc: RunningService, upstream: Upstream) -> None:
    await connect(svc, upstream, "c1", "http_bearer", {"token": CANARY})
    key = await svc.mint_key("t1")
    ask = {"X-Original-Method": "GET", "X-Original-URI": "/proxy/a", "X-Connection-Id": "c1", **bearer(key)}
    for extra in ({}, {"X-CP-Decision-Token": "wrong" * 8}, {"X-CP-Decision-Token": DECISION_TOKEN[:-1]}):
        async with svc.session.get(svc.url + "/_decide", headers={**ask, **extra}) as r:
            text = await r.text()
            assert r.status == 401, text
            assert CANARY not in text + json.dumps(dict(r.headers))
    async with svc.session.get(
        svc.url + "/_decide", headers={**ask, "X-CP-Decision-Token": DECISION_TOKEN}
    ) as r:
        assert r.status == 200
        assert r.headers["X-CP-H-authorization"] == f"Bearer {CANARY}"
        assert r.headers["X-CP-Addr"] == f"127.0.0.1:{upstream.port}"
        assert r.headers["X-CP-URI"] == "/echo/base/a"
    # Direct callers (Envoy's ext_authz) get the real status.
    async with svc.session.get(
        svc.url + "/_decide",
        headers={**ask, "X-Connection-Id": "nope", "X-CP-Decision-Token": DECISION_TOKEN},
    ) as r:
        assert r.status == 404 and (await r.json())["error"] == "CONNECTION_NOT_FOUND"


async def test_decide_off_without_token(tmp_path: Path) -> None:
    async with (
        running_service(tmp_path) as s,
        s.session.get(s.url + "/_decide", headers={"X-CP-Decision-Token": "x" * 40}) as r,
    ):
        assert r.status == 404


# --- caching ---------------------------------------------------------------------------------------


async def _counting(svc: RunningService) -> list[int]:
    decider = svc.app[DECIDER]
    calls = [0]
    real = decider.decide

    async def counted(**kw: Any) -> Any:
        calls[0] += 1
        return await real(**kw)

    decider.decide = counted  # type: ignore[method-assign]
    return calls


@pytest.mark.system
async def test_safe_decisions_are_cached_briefly(
    svc: RunningService, upstream: Upstream, tmp_path: Path
) -> None:
    await connect(svc, upstream, "free", "http_bearer", {"token": "t-free"})
    await connect(
        svc,
        upstream,
        "windowed",
        "http_bearer",
        {"token": "t-w"},
        rate_limits=[{"limit": 100, "window": "1m"}],
    )
    key = await svc.mint_key("t1")
    calls = await _counting(svc)
    async with nginx_front(svc, tmp_path) as f:
        for _ in range(3):
            assert (await call(svc, f.url, "/proxy/a", "free", key=key))[0] == 200
        assert calls[0] == 1  # answered once, then from nginx's cache
        # Another caller key, URI or method is another entry.
        other = await svc.mint_key("t1")
        assert (await call(svc, f.url, "/proxy/a", "free", key=other))[0] == 200
        assert (await call(svc, f.url, "/proxy/b", "free", key=key))[0] == 200
        assert calls[0] == 3
        for _ in range(3):
            assert (await call(svc, f.url, "/proxy/a", "windowed", key=key))[0] == 200
        assert calls[0] == 6  # a configured window: every call is decided
    assert all(s.header("Authorization") in (["Bearer t-free"], ["Bearer t-w"]) for s in upstream.seen)


@pytest.mark.system
async def test_a_replaced_cached_decision_is_read_anew(
    svc: RunningService, upstream: Upstream, tmp_path: Path
) -> None:
    """nginx keeps cached decisions' files open (open_file_cache): once an entry expires and is
    decided again, every call reads the new file, never the old descriptor's decision."""
    await connect(svc, upstream, "free", "http_bearer", {"token": "t-old"})
    key = await svc.mint_key("t1")
    async with nginx_front(svc, tmp_path) as f:
        for _ in range(3):
            assert (await call(svc, f.url, "/proxy/a", "free", key=key))[0] == 200
        await connect(svc, upstream, "free", "http_bearer", {"token": "t-new"})
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 4.0  # nginx_decision_cache_s + 1, and nginx's whole-second clock
        while loop.time() < deadline:
            upstream.seen.clear()
            assert (await call(svc, f.url, "/proxy/a", "free", key=key))[0] == 200
            if upstream.seen[-1].header("Authorization") == ["Bearer t-new"]:
                break
            await asyncio.sleep(0.1)
        upstream.seen.clear()
        for _ in range(20):
            assert (await call(svc, f.url, "/proxy/a", "free", key=key))[0] == 200
    assert [s.header("Authorization") for s in upstream.seen] == [["Bearer t-new"]] * 20


# --- TLS: connect to the checked address, verify the name -------------------------------------------


@pytest.mark.parametrize("mode", ["path", NGINX])
async def test_tls_upstream_verified_by_name(tmp_path: Path, mode: str) -> None:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_ctx)
    ca_file = tmp_path / "upstream-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    async with (
        running_upstream("127.0.0.1", server_ctx) as up,
        running_service(
            tmp_path / "data", decision_token=DECISION_TOKEN, upstream_ca_file=str(ca_file)
        ) as svc,
        contextlib.AsyncExitStack() as stack,
    ):
        base = svc.url
        if mode == "nginx":
            base = (await stack.enter_async_context(nginx_front(svc, tmp_path, trusted_ca=ca_file))).url
        for cid, host in (("named", "localhost"), ("literal", "127.0.0.1")):
            params = {"token": CANARY, "base_url": f"https://{host}:{up.port}/"}
            await svc.put_connection("t1", cid, {"integration_id": "http_bearer", "parameters": params})
        key = await svc.mint_key("t1")
        status, _, body = await call(svc, base, "/proxy/echo/x", "named", key=key)
        assert status == 200, body
        assert up.seen[-1].header("Host") == [f"localhost:{up.port}"]
        assert up.seen[-1].header("Authorization") == [f"Bearer {CANARY}"]
        seen = len(up.seen)
        # The certificate names localhost, not 127.0.0.1: verification fails, nothing is sent.
        status, headers, _ = await call(svc, base, "/proxy/echo/x", "literal", key=key)
        assert status == 502 and headers["X-Proxy-Error"] == "UPSTREAM_UNREACHABLE"
        assert len(up.seen) == seen


# --- reports: only the service's own tokens teach the limiter ---------------------------------------


async def test_forged_reports_teach_nothing(
    svc: RunningService, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    await connect(svc, upstream, "c1", "http_bearer", {"token": "t"})
    key = await svc.mint_key("t1")
    where = svc.settings.nginx_report_listen
    assert where is not None
    decider = svc.app[DECIDER]
    genuine = decider.sign("api_key:x", "t1", "c1")
    body, _, mac = genuine.partition(".")
    other = decider.sign("api_key:x", "t1", "c2").partition(".")[0]
    forged = [
        "",
        "garbage",
        f"{other}.{mac}",  # another connection under this token's MAC
        f"{body}.{'A' * len(mac)}",
    ]
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, remote_addr=where)
    try:
        for token in forged:
            line = {"o": token, "s": "429", "r": "x", "h": {"retry-after": "60"}}
            transport.sendto(b"<190>cp: " + json.dumps(line).encode())
        # Datagrams that are no report at all are dropped too (no traceback per datagram).
        for junk in (
            b'<190>cp: {"o": "x.y", "s": 1e999}',
            b"<190>cp: " + b"[" * 5000 + b"]" * 5000,
            b'<190>cp: {"o": "\\ud800.x", "s": "429"}',
        ):
            transport.sendto(junk)
        await asyncio.sleep(0.3)
        status, _, _ = await call(svc, svc.url, "/proxy/a", "c1", key=key)
        assert status == 200  # nothing was learned
        line = {"o": genuine, "s": "429", "r": "x", "h": {"retry-after": "60"}}
        transport.sendto(b"<190>cp: " + json.dumps(line).encode())
        for _ in range(40):
            status, headers, _ = await call(svc, svc.url, "/proxy/a", "c1", key=key)
            if status == 429:
                break
            await asyncio.sleep(0.05)
        assert status == 429 and headers["X-Proxy-Error"] == "RATE_LIMITED"
        assert not [r for r in caplog.records if r.name == "asyncio" and r.levelname == "ERROR"], caplog.text
    finally:
        transport.close()


@pytest.mark.system
async def test_decisions_and_outcomes_are_audited(
    svc: RunningService, upstream: Upstream, tmp_path: Path
) -> None:
    await connect(svc, upstream, "c1", "http_bearer", {"token": "t"})
    key = await svc.mint_key("t1")
    async with nginx_front(svc, tmp_path) as f:
        assert (await call(svc, f.url, "/proxy/a", "c1", key=key))[0] == 200
        assert (await call(svc, f.url, "/proxy/a", "nope", key=key))[0] == 404
        assert (await call(svc, f.url, "/proxy/x?status=500", "c1", key=key))[0] == 500
        for _ in range(40):
            await svc.flush_audit()
            status, data = await svc.admin("GET", "/admin/tenants/t1/audit")
            events = {(e.get("action"), e.get("outcome")) for e in (data or {}).get("items", [])}
            if ("proxy.use", "upstream_5xx") in events:
                break
            await asyncio.sleep(0.05)
    assert status == 200, data
    assert {
        ("proxy.decide", "allowed"),
        ("proxy.decide", "CONNECTION_NOT_FOUND"),
        ("proxy.use", "upstream_5xx"),  # reported: the limiter may learn from a failure
    } <= events
    # nginx_report = "signals" (the default): a plain 200 without rate-limit headers is not reported.
    assert ("proxy.use", "ok") not in events


@pytest.mark.system
async def test_keepalive_pool_only_for_its_name_and_address(upstream: Upstream, tmp_path: Path) -> None:
    async with running_service(
        tmp_path / "data", decision_token=DECISION_TOKEN, egress_allow=["127.0.0.1/32", "localhost"]
    ) as svc:
        await _pooled(svc, upstream, tmp_path)


async def _pooled(svc: RunningService, upstream: Upstream, tmp_path: Path) -> None:
    await connect(svc, upstream, "c1", "http_bearer", {"token": "t1"})
    await svc.put_connection(
        "t1",
        "c2",
        {
            "integration_id": "http_bearer",
            "parameters": {"token": "t2", "base_url": f"http://localhost:{upstream.port}/"},
        },
    )
    key = await svc.mint_key("t1")
    pool = (f"127.0.0.1=127.0.0.1:{upstream.port}",)
    async with nginx_front(svc, tmp_path, keepalive=pool) as f:
        assert f"upstream cp_up_0 {{ server 127.0.0.1:{upstream.port}; keepalive 32; }}" in f.conf
        for _ in range(3):
            assert (await call(svc, f.url, "/proxy/a", "c1", key=key))[0] == 200  # pooled
            assert (await call(svc, f.url, "/proxy/b", "c2", key=key))[0] == 200  # same address, other name
    assert [s.header("Authorization")[0] for s in upstream.seen] == ["Bearer t1", "Bearer t2"] * 3
    assert [s.header("Host")[0] for s in upstream.seen[:2]] == [
        f"127.0.0.1:{upstream.port}",
        f"localhost:{upstream.port}",
    ]


async def test_unresolvable_upstream(svc: RunningService, front: str) -> None:
    params = {"token": "t", "base_url": "https://no-such-host.invalid/"}
    await svc.put_connection("t1", "c1", {"integration_id": "http_bearer", "parameters": params})
    key = await svc.mint_key("t1")
    status, headers, body = await call(svc, front, "/proxy/a", "c1", key=key)
    assert status == 502 and headers["X-Proxy-Error"] == "UPSTREAM_UNREACHABLE", body
    assert "could not be resolved" in json.loads(body)["message"]


@pytest.mark.system
async def test_refusal_bodies_are_byte_for_byte_the_services(
    svc: RunningService, upstream: Upstream, tmp_path: Path
) -> None:
    """The same refusal through path mode and through nginx: same status, same JSON (but the
    request id), same X-Proxy-Error and content type."""
    await connect(svc, upstream, "c1", "http_bearer", {"token": CANARY})
    await svc.put_connection("t1", "pending", {"integration_id": "http_bearer"})
    key = await svc.mint_key("t1")
    cases = [
        ("/proxy/a", "nope", key, {}),
        ("/proxy/a", "c1", "cpk_bad_key", {}),
        ("/proxy/a", "pending", key, {}),
        ("/proxy/%2e%2e/x", "c1", key, {}),
        ("/proxy/a", "c1", key, {"X-Proxy-Max-Wait-Ms": "soon"}),
        ("/proxy/a", "c1", key, {"X-Tenant-Id": "t2"}),
        # Both name the caller before reading the headers naming the connection: an unknown
        # caller with a malformed connection id hears 401, not what is wrong with the id.
        ("/proxy/a", "bad id!", "cpk_bad_key", {}),
        ("/proxy/a", "c1", key, {"X-Runtime-User-Id": "bad user!"}),
    ]
    async with nginx_front(svc, tmp_path) as f:
        for path, cid, k, extra in cases:
            direct = await call(svc, svc.url, path, cid, key=k, headers=extra)
            fronted = await call(svc, f.url, path, cid, key=k, headers=extra)
            assert direct[0] == fronted[0] >= 400, (path, cid, direct, fronted)
            assert _body(direct[2]) == _body(fronted[2]), (path, cid)
            for name in ("X-Proxy-Error", "Content-Type"):
                assert direct[1][name].split(";")[0] == fronted[1][name].split(";")[0], name
