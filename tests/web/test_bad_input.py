"""Each bad input found in review, named: a 4xx with an error code, never a 500 with a traceback.

The generated counterpart is tests/web/test_fuzz_routes.py; these pin the specific cases (on
both back ends where storage is involved) so a regression names its cause.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from yarl import URL

from tests.support.app import RunningService, running_service
from tests.support.upstream import Upstream

ENDPOINT = "/api/internal/proxy"


@pytest.fixture
async def svc(backend: str | None, tmp_path: Path, upstream: Upstream) -> AsyncIterator[RunningService]:
    async with running_service(tmp_path, redis_url=backend, trusted_networks=["127.0.0.1/32"]) as s:
        await s.put_connection(
            "t1",
            "c1",
            {"integration_id": "http_bearer", "parameters": {"token": "tok", "base_url": upstream.url + "/"}},
        )
        yield s


async def raw(svc: RunningService, head: bytes, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """One request written byte for byte (aiohttp's client would refuse to send these)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", URL(svc.url).port)
    try:
        writer.write(head + b"\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head_raw, _, payload = data.partition(b"\r\n\r\n")
    lines = head_raw.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, payload


def _error(status: int, headers: dict[str, str], body: bytes, want_status: int, code: str) -> dict[str, Any]:
    assert status == want_status, body
    assert headers["x-proxy-error"] == code
    data = json.loads(body)
    assert data["error"] == code and data["message"]
    return data


async def envelope(svc: RunningService, payload: str) -> tuple[int, dict[str, str], bytes]:
    return await raw(
        svc, b"POST " + ENDPOINT.encode() + b" HTTP/1.1\r\nHost: x\r\nX-Org-Id: t1", payload.encode()
    )


async def test_a_bearer_token_with_non_utf8_bytes_is_a_401(svc: RunningService) -> None:
    for path in (b"/admin/tenants/t1/connections", b"/connections/t1/c1", b"/proxy/echo"):
        status, headers, body = await raw(
            svc,
            b"GET "
            + path
            + b" HTTP/1.1\r\nHost: x\r\nX-Connection-Id: c1\r\nAuthorization: Bearer \xff\xfe\x80",
        )
        _error(status, headers, body, 401, "UNAUTHENTICATED")


@pytest.mark.parametrize(
    "payload,field",
    [
        ('{"connection_id": "c1", "url": "/echo", "headers": {"X-A": "a\\u000bb"}}', "headers"),
        ('{"connection_id": "c1", "url": "/echo", "headers": {"X-A": "a\\u007fb"}}', "headers"),
        ('{"connection_id": "c1", "url": "/echo", "headers": {"X-A": "a\\u0001b"}}', "headers"),
        ('{"connection_id": "c1", "url": "/echo", "headers": {"X-A": "\\ud800"}}', "headers"),
        ('{"connection_id": "c1", "url": "/echo", "method": "G T"}', "method"),
        ('{"connection_id": "c1", "url": "/echo", "method": "GET\\n"}', "method"),
        ('{"connection_id": "c1", "url": "/echo", "timeout_ms": -1}', "timeout_ms"),
        ('{"connection_id": "c1", "url": "/echo", "timeout_ms": 1e300}', "timeout_ms"),
        ('{"connection_id": "c1", "url": "/echo\\ud800"}', "url"),
        ('{"connection_id": "c1", "url": "/echo\\u0001"}', "url"),
        ('{"connection_id": "c1", "url": "/echo", "body": "\\udc00"}', "body"),
    ],
)
async def test_bad_envelope_fields_are_a_422_naming_the_field(
    svc: RunningService, upstream: Upstream, payload: str, field: str
) -> None:
    status, headers, body = await envelope(svc, payload)
    data = _error(status, headers, body, 422, "VALIDATION_ERROR")
    assert field in data["fields"]
    assert "\x01" not in data["message"] and "\x0b" not in data["message"]
    assert upstream.seen == []


@pytest.mark.parametrize("literal", ["Infinity", "-Infinity", "NaN", "1e400"])
async def test_non_finite_numbers_in_the_envelope_are_a_400(svc: RunningService, literal: str) -> None:
    payload = '{"connection_id": "c1", "url": "/echo", "timeout_ms": ' + literal + "}"
    status, headers, body = await envelope(svc, payload)
    assert "finite" in _error(status, headers, body, 400, "BAD_REQUEST")["message"]


async def test_valid_envelope_fields_still_pass(svc: RunningService, upstream: Upstream) -> None:
    status, _, body = await envelope(
        svc,
        '{"connection_id": "c1", "url": "/echo/x?q=%C3%A9", "method": "patch", "timeout_ms": 2500.5,'
        ' "headers": {"X-Tab": "a\\tb", "X-Utf8": "caf\\u00e9"}}',
    )
    assert status == 200, body
    assert json.loads(body)["status"] == 200
    seen = upstream.seen[-1]
    assert seen.method == "PATCH" and seen.header("X-Tab") == ["a\tb"]


async def test_deeply_nested_json_is_refused_by_the_admin_api_and_the_envelope(svc: RunningService) -> None:
    deep = '{"a":' * 100_000 + "1" + "}" * 100_000
    status, headers, body = await raw(
        svc,
        b"PUT /admin/tenants/t1/connections/c2 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + svc.admin_token.encode(),
        deep.encode(),
    )
    assert "nested deeper" in _error(status, headers, body, 422, "VALIDATION_ERROR")["message"]
    # Just past the cap, in a field the handler would otherwise store.
    metadata = '{"integration_id": "http_bearer", "metadata": ' + "[" * 64 + "]" * 64 + "}"
    status, headers, body = await raw(
        svc,
        b"PUT /admin/tenants/t1/connections/c2 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + svc.admin_token.encode(),
        metadata.encode(),
    )
    _error(status, headers, body, 422, "VALIDATION_ERROR")
    for payload in (
        "[" * 100_000,
        '{"connection_id": "c1", "url": "/echo", "body": ' + "[" * 70 + "]" * 70 + "}",
    ):
        status, headers, body = await envelope(svc, payload)
        assert "nested deeper" in _error(status, headers, body, 400, "BAD_REQUEST")["message"]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e400", "-1", "1e300"])
async def test_audit_times_must_be_finite(svc: RunningService, value: str) -> None:
    for name in ("since", "until"):
        status, data = await svc.admin("GET", f"/admin/tenants/t1/audit?{name}={value}")
        assert (status, data["error"]) == (422, "VALIDATION_ERROR") and name in data["fields"]
    status, data = await svc.admin("GET", "/admin/tenants/t1/audit?since=0&until=2030-01-01T00:00:00Z")
    assert status == 200 and "items" in data


@pytest.mark.parametrize("path", ["/admin/tenants/t1/audit", "/admin/tenants/t1/connections"])
async def test_non_ascii_digits_in_limit_are_a_422(svc: RunningService, path: str) -> None:
    for value in ("%C2%B2", "%D9%A1", "1" * 30):  # superscript and Arabic-Indic digits pass str.isdigit()
        status, data = await svc.admin("GET", f"{path}?limit={value}")
        assert (status, data["error"]) == (422, "VALIDATION_ERROR"), (path, value)


@pytest.mark.parametrize("cursor", ["%C2%B2", "9" * 40, "-1", "%201", "1_0", "1-2-3", "18446744073709551616"])
async def test_audit_cursors_that_are_not_entry_ids_are_a_4xx(svc: RunningService, cursor: str) -> None:
    status, data = await svc.admin("GET", f"/admin/tenants/t1/audit?cursor={cursor}")
    assert 400 <= status < 500 and data["error"], data


async def test_if_match_and_proxy_controls_with_non_ascii_digits_are_a_422(svc: RunningService) -> None:
    status, data = await svc.admin(
        "PATCH", "/admin/tenants/t1/connections/c1", json={"metadata": {}}, headers={"If-Match": '"²"'}
    )
    assert (status, data["error"]) == (422, "VALIDATION_ERROR")
    headers = {**svc.admin_headers, "X-Tenant-Id": "t1", "X-Connection-Id": "c1", "X-Proxy-Retries": "²"}
    async with svc.session.get(svc.url + "/proxy/echo", headers=headers) as r:
        assert r.status == 422 and r.headers["X-Proxy-Error"] == "VALIDATION_ERROR"


@pytest.mark.parametrize("bad", ["acme%0A", "acme%0D", "acme%0A%0A"])
async def test_ids_with_a_trailing_newline_are_refused(svc: RunningService, bad: str) -> None:
    status, data = await svc.admin("PUT", f"/admin/tenants/{bad}", json={"proxy_only": True})
    assert (status, data["error"]) == (422, "VALIDATION_ERROR")
    status, data = await svc.admin(
        "PUT", f"/admin/tenants/t1/connections/{bad}", json={"integration_id": "http_bearer"}
    )
    assert (status, data["error"]) == (422, "VALIDATION_ERROR")
    status, data = await svc.admin("GET", f"/admin/tenants/t1/connections?runtime_user_id={bad}")
    assert (status, data["error"]) == (422, "VALIDATION_ERROR")
    status, data = await svc.admin("GET", f"/admin/tenants/{bad}")
    assert status == 422


async def test_a_connect_form_that_is_not_utf8_is_a_400_page(svc: RunningService) -> None:
    status, session = await svc.admin(
        "POST",
        "/admin/tenants/t1/connect-sessions",
        json={"integration_id": "http_bearer", "parameters": {"base_url": "https://api.example.com/"}},
    )
    assert status == 201
    status, headers, _ = await raw(
        svc,
        b"POST /connect/" + session["token"].encode() + b" HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/x-www-form-urlencoded",
        b"csrf=\x80\xff&token=\xfe",
    )
    assert status == 400 and headers["x-proxy-error"] == "BAD_REQUEST"
    assert headers["content-type"].startswith("text/html")
