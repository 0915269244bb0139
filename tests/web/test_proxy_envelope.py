"""Runtara's internal proxy envelope: JSON in, always-200 JSON out for upstream answers."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.app import RunningService, running_service
from tests.support.upstream import Upstream, pattern_bytes

ENDPOINT = "/api/internal/proxy"


@pytest.fixture
async def svc(tmp_path: Path, upstream: Upstream) -> AsyncIterator[RunningService]:
    # Runtara sends no auth header: its address is a trusted network.
    async with running_service(tmp_path, trusted_networks=["127.0.0.1/32"]) as s:
        await s.put_connection(
            "org1",
            "c1",
            {"integration_id": "http_bearer", "parameters": {"token": "tok", "base_url": upstream.url + "/"}},
        )
        yield s


async def post(
    svc: RunningService, payload: dict[str, Any], org: str | None = "org1", **headers: str
) -> tuple[int, dict[str, str], Any]:
    h = dict(headers)
    if org is not None:
        h["X-Org-Id"] = org
    async with svc.session.post(svc.url + ENDPOINT, json=payload, headers=h) as r:
        return r.status, dict(r.headers), await r.json()


async def test_json_round_trip(svc: RunningService, upstream: Upstream) -> None:
    status, _, data = await post(
        svc,
        {
            "method": "POST",
            "url": "/echo/items?page=2",
            "headers": {"X-Custom": "1", "Authorization": "Bearer forged"},
            "body": {"name": "widget", "n": 3},
            "connection_id": "c1",
        },
    )
    assert status == 200
    assert data["status"] == 200
    assert data["headers"]["content-type"].startswith("application/json")
    assert all(k == k.lower() for k in data["headers"])
    echoed = data["body"]  # parsed JSON
    assert echoed["method"] == "POST"
    assert echoed["path"] == "/echo/items"
    assert echoed["query"] == "page=2"
    seen = upstream.seen[-1]
    assert seen.header("Authorization") == ["Bearer tok"]
    assert seen.header("X-Custom") == ["1"]
    assert seen.header("Content-Type") == ["application/json"]
    sent = b'{"name":"widget","n":3}'
    assert seen.body_sha256 == hashlib.sha256(sent).hexdigest()
    assert json.loads(base64.b64decode(data["body_raw"])) == echoed


async def test_binary_round_trip(svc: RunningService, upstream: Upstream) -> None:
    blob = os.urandom(200_000)
    status, _, data = await post(
        svc,
        {
            "method": "PUT",
            "url": "upload",
            "headers": {"Content-Type": "application/octet-stream"},
            "body_raw": base64.b64encode(blob).decode(),
            "connection_id": "c1",
        },
    )
    assert status == 200
    assert data["body"] == {"len": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
    status, _, data = await post(svc, {"url": "/download?n=70000", "connection_id": "c1"})
    assert status == 200
    assert base64.b64decode(data["body_raw"]) == pattern_bytes(70000)
    assert data["body"] is None  # binary (not UTF-8): only body_raw, the exact bytes


async def test_upstream_errors_are_200_with_their_status(svc: RunningService, upstream: Upstream) -> None:
    status, _, data = await post(svc, {"url": "/status/404", "connection_id": "c1"})
    assert status == 200
    assert data["status"] == 404
    assert data["body"] == "status"


async def test_service_errors_keep_their_status(svc: RunningService, upstream: Upstream) -> None:
    status, headers, data = await post(svc, {"url": "/x", "connection_id": "nope"})
    assert (status, data["error"], headers["X-Proxy-Error"]) == (
        404,
        "CONNECTION_NOT_FOUND",
        "CONNECTION_NOT_FOUND",
    )
    status, _, data = await post(svc, {"url": "/x", "connection_id": "c1"}, org=None)
    assert (status, data["error"]) == (400, "BAD_REQUEST")
    assert "X-Org-Id" in data["message"]
    status, _, data = await post(svc, {"url": "/x"})
    assert (status, data["error"]) == (422, "VALIDATION_ERROR")
    assert upstream.seen == []


async def test_absolute_url_must_match_the_connection_host(svc: RunningService, upstream: Upstream) -> None:
    status, _, data = await post(svc, {"url": upstream.url + "/echo/abs?q=1", "connection_id": "c1"})
    assert status == 200
    assert data["body"]["path"] == "/echo/abs"
    status, _, data = await post(svc, {"url": "https://evil.example.com/steal", "connection_id": "c1"})
    assert (status, data["error"]) == (403, "HOST_NOT_ALLOWED")
    assert len(upstream.seen) == 1


async def test_rate_limited_preflight_is_429(svc: RunningService, upstream: Upstream) -> None:
    await svc.put_connection(
        "org1",
        "limited",
        {
            "integration_id": "http_bearer",
            "parameters": {"token": "t", "base_url": upstream.url + "/"},
            "rate_limits": [{"limit": 1, "window": "1m"}],
        },
    )
    status, _, _ = await post(svc, {"url": "/echo/1", "connection_id": "limited"})
    assert status == 200
    status, headers, data = await post(svc, {"url": "/echo/2", "connection_id": "limited"})
    assert (status, data["error"]) == (429, "RATE_LIMITED")
    assert data["retry_after_ms"] > 0
    assert int(headers["Retry-After"]) >= 1
    assert len(upstream.seen) == 1


async def test_untrusted_caller_needs_a_key(tmp_path: Path, upstream: Upstream) -> None:
    async with running_service(tmp_path) as s:  # no trusted networks
        await s.put_connection(
            "org1",
            "c1",
            {"integration_id": "http_bearer", "parameters": {"token": "tok", "base_url": upstream.url + "/"}},
        )
        status, _, data = await post(s, {"url": "/echo", "connection_id": "c1"})
        assert (status, data["error"]) == (401, "UNAUTHENTICATED")
        key = await s.mint_key("org1")
        status, _, data = await post(
            s, {"url": "/echo", "connection_id": "c1"}, Authorization=f"Bearer {key}"
        )
        assert (status, data["status"]) == (200, 200)
        # A key of org1 asking for org2: concealed as not found.
        status, _, data = await post(
            s, {"url": "/echo", "connection_id": "c1"}, org="org2", Authorization=f"Bearer {key}"
        )
        assert (status, data["error"]) == (404, "CONNECTION_NOT_FOUND")


@pytest.mark.parametrize(
    "framing",
    [
        {"Content-Length": "1000"},  # more than the body: the upstream would wait for the rest
        {"Content-Length": "2"},  # less: the rest of the body would read as the next request
        {"Transfer-Encoding": "chunked", "content-length": "5"},
        {"TE": "trailers", "Trailer": "X-Sig", "Expect": "100-continue"},
    ],
)
async def test_caller_framing_headers_are_dropped(
    svc: RunningService, upstream: Upstream, framing: dict[str, str]
) -> None:
    # The proxy frames the body it builds from the envelope, whatever the caller claims.
    status, _, data = await post(
        svc,
        {
            "method": "POST",
            "url": "/upload",
            "headers": {**framing, "X-Kept": "1"},
            "body": "hello",
            "connection_id": "c1",
            "timeout_ms": 5000,
        },
    )
    assert status == 200, data
    assert (data["status"], data["body"]) == (200, {"len": 5, "sha256": hashlib.sha256(b"hello").hexdigest()})
    seen = upstream.seen[-1]
    assert seen.header("Content-Length") == ["5"]
    assert seen.header("X-Kept") == ["1"]
    assert not {"transfer-encoding", "te", "trailer", "expect"} & seen.header_names
    assert len(upstream.seen) == 1


async def test_absolute_url_outside_the_base_path_is_refused(tmp_path: Path, upstream: Upstream) -> None:
    async with running_service(tmp_path, trusted_networks=["127.0.0.1/32"]) as s:
        await s.put_connection(
            "org1",
            "api",
            {
                "integration_id": "http_bearer",
                "parameters": {"token": "tok", "base_url": upstream.url + "/api"},
            },
        )
        status, _, data = await post(s, {"url": upstream.url + "/api/echo", "connection_id": "api"})
        assert (status, data["body"]["path"]) == (200, "/api/echo")
        for outside in ("/other", "/apix", "/", "/API/echo"):
            status, _, data = await post(s, {"url": upstream.url + outside, "connection_id": "api"})
            assert (status, data["error"]) == (403, "FORBIDDEN"), outside
            assert "base path" in data["message"]
        assert len(upstream.seen) == 1


async def test_refused_envelope_calls_are_audited_in_the_callers_own_tenant(svc: RunningService) -> None:
    key = await svc.mint_key("org1")
    key_id = key.split("_")[1]
    auth = {"Authorization": f"Bearer {key}"}
    call = {"method": "GET", "url": "/x"}
    assert (await post(svc, {**call, "connection_id": "nope"}, **auth))[0] == 404
    assert (await post(svc, {**call, "connection_id": "c1"}, org="org2", **auth))[0] == 404
    await svc.flush_audit()
    _, body = await svc.admin("GET", f"/admin/tenants/org1/audit?actor=api_key:{key_id}")
    got = {(e["action"], e["outcome"], e["connection_id"]) for e in body["items"]}
    assert got == {("proxy.use", "CONNECTION_NOT_FOUND", "nope"), ("proxy.use", "CONNECTION_NOT_FOUND", None)}
    _, body = await svc.admin("GET", "/admin/tenants/org2/audit")
    assert body["items"] == []
