"""Forward-proxy mode: absolute-form requests over a raw socket; CONNECT to an unbound host refused.

(CONNECT interception itself, with real clients, is tested in tests/web/test_tunnel*.py.)"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from yarl import URL

from tests.support.app import RunningService, running_service
from tests.support.upstream import Upstream, running_upstream


@pytest.fixture
async def svc(tmp_path: Path, upstream: Upstream) -> AsyncIterator[RunningService]:
    async with running_service(tmp_path) as s:
        await s.put_connection(
            "t1",
            "c1",
            {
                "integration_id": "http_bearer",
                "parameters": {"token": "tok", "base_url": upstream.url + "/base"},
            },
        )
        yield s


async def raw_request(svc: RunningService, head: str, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    port = URL(svc.url).port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head_raw, _, payload = data.partition(b"\r\n\r\n")
    lines = head_raw.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, payload


async def test_absolute_form_request(svc: RunningService, upstream: Upstream) -> None:
    key = await svc.mint_key("t1")
    status, _, body = await raw_request(
        svc,
        f"POST http://127.0.0.1:{upstream.port}/base/echo/fwd?x=1&y=%2F HTTP/1.1\n"
        f"Host: 127.0.0.1:{upstream.port}\n"
        f"Proxy-Authorization: Bearer {key}\n"
        "X-Connection-Id: c1\n"
        "Content-Type: text/plain\n"
        "Content-Length: 5\n"
        "Connection: close\n",
        b"hello",
    )
    assert status == 200, body
    seen = upstream.seen[-1]
    # The request's own path (under the base path) and query, with the credential injected.
    assert (seen.method, seen.path, seen.query) == ("POST", "/base/echo/fwd", "x=1&y=%2F")
    assert seen.header("Authorization") == ["Bearer tok"]
    assert "proxy-authorization" not in seen.header_names
    assert "x-connection-id" not in seen.header_names
    assert seen.body_len == 5
    assert json.loads(body)["body_len"] == 5


async def test_absolute_form_to_another_host_refused(svc: RunningService, upstream: Upstream) -> None:
    key = await svc.mint_key("t1")
    status, headers, _ = await raw_request(
        svc,
        "GET http://evil.example.com/steal HTTP/1.1\n"
        "Host: evil.example.com\n"
        f"Proxy-Authorization: Bearer {key}\n"
        "X-Connection-Id: c1\n"
        "Connection: close\n",
    )
    assert status == 403
    assert headers["x-proxy-error"] == "HOST_NOT_ALLOWED"
    assert upstream.seen == []


@pytest.mark.parametrize(
    ("target", "code"),
    [
        ("/other", "FORBIDDEN"),
        ("/basement", "FORBIDDEN"),
        ("/", "FORBIDDEN"),
        ("/BASE/echo", "FORBIDDEN"),
        ("/base/%2e%2e/other", "VALIDATION_ERROR"),
        ("/base/%252e%252e/other", "FORBIDDEN"),  # double-encoded: path mode's own check
        ("/base/../other", "VALIDATION_ERROR"),  # not even a valid absolute target
    ],
)
async def test_absolute_form_outside_the_base_path_is_refused(
    svc: RunningService, upstream: Upstream, target: str, code: str
) -> None:
    # The same refusal as path mode's "/proxy/../other": the credential is scoped to /base.
    key = await svc.mint_key("t1")
    status, headers, body = await raw_request(
        svc,
        f"GET http://127.0.0.1:{upstream.port}{target} HTTP/1.1\n"
        f"Host: x\nProxy-Authorization: Bearer {key}\nX-Connection-Id: c1\nConnection: close\n",
    )
    assert headers["x-proxy-error"] == code, body
    if code == "FORBIDDEN":
        assert status == 403
        assert "escapes the connection's base path" in json.loads(body)["message"]
    assert upstream.seen == []


async def test_absolute_form_to_another_port_of_the_bound_host_is_refused(
    svc: RunningService, upstream: Upstream
) -> None:
    # Same host, another port: another service, which the caller may not send the credential to.
    async with running_upstream() as other:
        key = await svc.mint_key("t1")
        status, headers, body = await raw_request(
            svc,
            f"GET http://127.0.0.1:{other.port}/base/x HTTP/1.1\n"
            f"Host: x\nProxy-Authorization: Bearer {key}\nX-Connection-Id: c1\nConnection: close\n",
        )
        assert (status, headers["x-proxy-error"]) == (403, "HOST_NOT_ALLOWED"), body
        assert other.seen == [] and upstream.seen == []


async def test_absolute_form_at_the_base_path_itself(svc: RunningService, upstream: Upstream) -> None:
    key = await svc.mint_key("t1")
    status, _, body = await raw_request(
        svc,
        f"GET http://127.0.0.1:{upstream.port}/base?x=1 HTTP/1.1\n"
        f"Host: x\nProxy-Authorization: Bearer {key}\nX-Connection-Id: c1\nConnection: close\n",
    )
    assert status == 200, body
    assert (upstream.seen[-1].path, upstream.seen[-1].query) == ("/base", "x=1")


async def test_absolute_form_needs_auth(svc: RunningService, upstream: Upstream) -> None:
    status, headers, _ = await raw_request(
        svc,
        f"GET http://127.0.0.1:{upstream.port}/echo HTTP/1.1\nHost: x\nX-Connection-Id: c1\nConnection: close\n",
    )
    # A proxy answers 407 with Proxy-Authenticate: clients then send their proxy URL's credentials.
    assert (status, headers["x-proxy-error"]) == (407, "UNAUTHENTICATED")
    assert headers["proxy-authenticate"].startswith("Basic ")
    assert upstream.seen == []


async def test_absolute_form_for_an_admin_route_is_still_proxied(
    svc: RunningService, upstream: Upstream
) -> None:
    # The path of an absolute-form target names the upstream's resource, never one of ours.
    key = await svc.mint_key("t1")
    status, _, body = await raw_request(
        svc,
        f"GET http://127.0.0.1:{upstream.port}/base/admin/tenants/t1/connections HTTP/1.1\n"
        f"Host: x\nProxy-Authorization: Bearer {key}\nX-Connection-Id: c1\nConnection: close\n",
    )
    assert status == 200
    assert upstream.seen[-1].path == "/base/admin/tenants/t1/connections"
    assert json.loads(body)["path"] == "/base/admin/tenants/t1/connections"  # the upstream's echo


async def test_connect_to_an_unbound_host_refused(svc: RunningService) -> None:
    key = await svc.mint_key("t1")
    status, headers, body = await raw_request(
        svc,
        f"CONNECT api.example.com:443 HTTP/1.1\nHost: api.example.com:443\nProxy-Authorization: Bearer {key}\n"
        "X-Connection-Id: c1\n",
    )
    # No blind tunnels: a host the connection is not bound to is refused before any 200.
    assert status == 403
    assert headers["x-proxy-error"] == "HOST_NOT_ALLOWED"
    assert "api.example.com" in json.loads(body)["message"]


async def test_upgraded_to_https_when_base_url_is_https(tmp_path: Path) -> None:
    # A raw listener records the first bytes: a TLS ClientHello proves the upgrade.
    first: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first.append(await reader.read(16))
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with running_service(tmp_path) as s:
            await s.put_connection(
                "t1",
                "tls",
                {
                    "integration_id": "http_bearer",
                    "parameters": {"token": "t", "base_url": f"https://127.0.0.1:{port}/"},
                },
            )
            key = await s.mint_key("t1")
            status, headers, _ = await raw_request(
                s,
                f"GET http://127.0.0.1:{port}/x HTTP/1.1\nHost: x\nProxy-Authorization: Bearer {key}\n"
                "X-Connection-Id: tls\nConnection: close\n",
            )
            assert status == 502  # the listener is no TLS server
            assert headers["x-proxy-error"] == "UPSTREAM_UNREACHABLE"
    finally:
        server.close()
        await server.wait_closed()
    assert first and first[0][:1] == b"\x16"  # TLS handshake record, not "GET /x"


async def test_absolute_form_with_basic_proxy_credentials(svc: RunningService, upstream: Upstream) -> None:
    # What HTTP_PROXY=http://c1:KEY@proxy makes every client send: the user names the connection.
    import base64

    key = await svc.mint_key("t1")
    for user in ("c1", "t1%2Fc1", "t1/c1"):
        auth = base64.b64encode(f"{user}:{key}".encode()).decode()
        status, _, body = await raw_request(
            svc,
            f"GET http://127.0.0.1:{upstream.port}/base/echo/basic HTTP/1.1\n"
            f"Host: x\nProxy-Authorization: Basic {auth}\nConnection: close\n",
        )
        assert status == 200, body
        seen = upstream.seen[-1]
        assert seen.header("Authorization") == ["Bearer tok"]
        assert "proxy-authorization" not in seen.header_names
    bad = base64.b64encode(f"c1:{key}x".encode()).decode()
    status, headers, _ = await raw_request(
        svc,
        f"GET http://127.0.0.1:{upstream.port}/base/echo/basic HTTP/1.1\n"
        f"Host: x\nProxy-Authorization: Basic {bad}\nConnection: close\n",
    )
    assert status == 407 and headers["proxy-authenticate"] == 'Basic realm="connection-proxy"'
    assert len(upstream.seen) == 3
