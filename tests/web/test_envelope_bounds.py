"""The envelope's bounds: response size cap, concurrency cap, and large bodies (streamed, encoded
off the loop) keeping the contract: body_raw is the exact bytes, body the JSON or text."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from proxy.pipeline.bodykind import BINARY, JSON, TEXT, classify
from tests.support.app import RunningService, running_service
from tests.support.upstream import Upstream, pattern_bytes
from tests.support.wait import wait_until

ENDPOINT = "/api/internal/proxy"
BIG_JSON = json.dumps(
    {"items": [{"id": i, "name": f"item é {i}", "ok": True} for i in range(20000)]}
).encode()
BIG_TEXT = ('line with a "quote", a \\ and ünïcode ✓\n' * 20000).encode()


@pytest.fixture
async def documents() -> AsyncIterator[str]:
    """A second upstream serving large JSON and text documents."""

    async def doc(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        body, ctype = (BIG_JSON, "application/json") if name == "json" else (BIG_TEXT, "text/plain")
        return web.Response(body=body, content_type=ctype)

    app = web.Application()
    app.router.add_get("/doc/{name}", doc)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    await web.SockSite(runner, sock).start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        await runner.cleanup()


async def setup_connection(svc: RunningService, base_url: str) -> None:
    await svc.put_connection(
        "org1",
        "c1",
        {"integration_id": "http_bearer", "parameters": {"token": "tok", "base_url": base_url + "/"}},
    )


async def post(svc: RunningService, url: str) -> tuple[int, dict[str, str], Any]:
    async with svc.session.post(
        svc.url + ENDPOINT, json={"url": url, "connection_id": "c1"}, headers={"X-Org-Id": "org1"}
    ) as r:
        return r.status, dict(r.headers), json.loads(await r.read())


def test_classify() -> None:
    assert classify(b'{"a": [1, 2.5e3, "x"]}') == JSON
    assert classify(b" [1] \n") == JSON
    assert classify(b"NaN") == TEXT  # not JSON, whatever Python's json module accepts
    assert classify("plain ✓".encode()) == TEXT
    assert classify(b"\xff\xfe") == BINARY
    assert classify(b"text\x00with nul") == BINARY


async def test_large_json_and_text_bodies_keep_the_contract(tmp_path: Path, documents: str) -> None:
    async with running_service(tmp_path, trusted_networks=["127.0.0.1/32"]) as svc:
        await setup_connection(svc, documents)
        status, headers, data = await post(svc, "/doc/json")
        assert (status, data["status"]) == (200, 200)
        assert data["body"] == json.loads(BIG_JSON)  # parsed JSON, as for small bodies
        assert base64.b64decode(data["body_raw"]) == BIG_JSON
        assert headers["Content-Type"].startswith("application/json")
        status, _, data = await post(svc, "/doc/text")
        assert data["body"] == BIG_TEXT.decode()
        assert base64.b64decode(data["body_raw"]) == BIG_TEXT


async def test_large_binary_body_is_only_in_body_raw(tmp_path: Path, upstream: Upstream) -> None:
    async with running_service(tmp_path, trusted_networks=["127.0.0.1/32"]) as svc:
        await setup_connection(svc, upstream.url)
        for query in ("n=3000000", "n=3000000&chunked=1"):
            status, _, data = await post(svc, f"/download?{query}")
            assert (status, data["status"], data["body"]) == (200, 200, None)
            assert base64.b64decode(data["body_raw"]) == pattern_bytes(3_000_000)


async def test_an_answer_over_the_cap_is_refused_naming_the_setting(
    tmp_path: Path, upstream: Upstream
) -> None:
    async with running_service(
        tmp_path, trusted_networks=["127.0.0.1/32"], envelope_max_response_bytes=100_000
    ) as svc:
        await setup_connection(svc, upstream.url)
        # Sized (refused from Content-Length) and chunked (refused while reading, at the cap).
        for query in ("n=100001", "n=5000000&chunked=1"):
            status, headers, data = await post(svc, f"/download?{query}")
            assert (status, data["error"], headers["X-Proxy-Error"]) == (
                502,
                "UPSTREAM_RESPONSE_TOO_LARGE",
                "UPSTREAM_RESPONSE_TOO_LARGE",
            )
            assert "envelope_max_response_bytes" in data["message"] and "100000" in data["message"]
        status, _, data = await post(svc, "/download?n=100000")  # exactly the cap is fine
        assert base64.b64decode(data["body_raw"]) == pattern_bytes(100_000)


async def test_concurrency_cap_answers_503_and_frees_its_slot(tmp_path: Path, upstream: Upstream) -> None:
    async with running_service(tmp_path, trusted_networks=["127.0.0.1/32"], envelope_max_concurrent=1) as svc:
        await setup_connection(svc, upstream.url)
        slow = asyncio.create_task(post(svc, "/slow?before=1"))
        await wait_until(lambda: upstream.seen, timeout=2.0)  # until the slow call holds the slot
        status, headers, data = await post(svc, "/echo/second")
        assert (status, data["error"], headers["Retry-After"]) == (503, "SERVICE_UNAVAILABLE", "1")
        assert "envelope_max_concurrent" in data["message"]
        status, _, data = await slow
        assert (status, base64.b64decode(data["body_raw"])) == (200, b"12345678")
        status, _, data = await post(svc, "/echo/third")  # the slot is free again
        assert (status, data["status"]) == (200, 200)
        # A refused call never reached the upstream.
        assert [s.path for s in upstream.seen] == ["/slow", "/echo/third"]
