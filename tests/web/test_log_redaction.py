"""Malformed requests carrying real credentials, sent as raw bytes to a real service: the log
output (every logger, default level) never holds them, and each refusal is one line naming
the peer and the parser's reason.

The canaries are the three credentials a caller's request head can carry: the admin token, a
tenant API key and a connect link's token (in the path). The service process is real
(``python -m proxy serve``), so what is checked is exactly what an operator's log would get.
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from proxy.observe import logs
from tests.support.app import ADMIN_TOKEN, bearer, start_service_process
from tests.support.wait import wait_until


async def send_raw(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        return await asyncio.wait_for(reader.read(65536), 10)
    finally:
        writer.close()


def malformed(admin: str, api_key: str, connect_token: str) -> Iterator[bytes]:
    """Heads the HTTP parser refuses, each quoting a credential in the part it would echo."""
    for secret in (admin, api_key):
        auth = b"Authorization: Bearer " + secret.encode()
        yield b"GET /admin/tenants HTTP/1.1\nHost: x\n" + auth + b"\n\n"  # bare LF line endings
        yield b"GET /admin/tenants HTTP/1.1\r\nHost: x\r\n" + auth + b"\x01\r\n\r\n"  # control byte
        yield b"GET /proxy/x HTTP/1.1\r\nHost: x\r\nProxy-" + auth + b"\x7f\r\n\r\n"
        yield b"GET /x HTTP/1.1\r\nHost: x\r\n" + auth + b"\xff\xfe\xc3\x28\r\nX: \x00\r\n\r\n"  # not UTF-8
        yield b"GET /x HTTP/1.1\r\n" + auth + b"\r\nContent-Length: 1x\r\n\r\n"
    path = b"/connect/" + connect_token.encode()
    yield b"GET " + path + b" HTTP/1.1\nHost: x\n\n"
    yield b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nX-Bad: \x01\r\n\r\n"
    yield b"GET " + path + b"\xff HTTP/1.1\r\nHost: x\r\n\r\n"


LINE = re.compile(
    r"^\S+ \S+ WARNING aiohttp\.server: malformed HTTP request from 127\.0\.0\.1 refused with 400: \S"
)


@pytest.mark.system
async def test_malformed_requests_never_log_the_credentials_they_carry(tmp_path: Path) -> None:
    with start_service_process(tmp_path / "data") as sp:
        port = int(sp.url.rsplit(":", 1)[1])
        async with aiohttp.ClientSession() as session:
            async with session.post(
                sp.url + "/admin/tenants/t1/api-keys", json={"name": "n"}, headers=sp.admin_headers
            ) as r:
                assert r.status == 201
                api_key = (await r.json())["api_key"]
            async with session.post(
                sp.url + "/admin/tenants/t1/connect-sessions",
                json={
                    "integration_id": "http_api_key",
                    "parameters": {"base_url": "https://api.example.com"},
                },
                headers=sp.admin_headers,
            ) as r:
                assert r.status == 201
                connect_token = (await r.json())["token"]
            # The credentials work when well-formed: they are live canaries.
            async with session.get(sp.url + "/admin/tenants/t1/api-keys", headers=bearer(api_key)) as r:
                assert r.status in (401, 403)  # a tenant key is not the admin token...
            async with session.get(sp.url + "/connections/t1/nope", headers=bearer(api_key)) as r:
                assert r.status == 404  # ...but authenticates to its tenant
        sent = list(malformed(ADMIN_TOKEN, api_key, connect_token))
        for raw in sent:
            answer = await send_raw(port, raw)
            assert answer.startswith(b"HTTP/1.") and b" 400 " in answer.split(b"\r\n", 1)[0], answer[:200]
        # The process's output is unbuffered: wait for the last lines to land.
        await wait_until(
            lambda: sp.output().count("malformed HTTP request") >= len(sent),
            timeout=5,
            message=lambda: sp.output()[-3000:],
        )
        assert sp.stop(signal.SIGTERM) == 0
    out = sp.output()
    for secret in (ADMIN_TOKEN, api_key, connect_token, connect_token.split(".")[-1]):
        assert secret not in out
    lines = out.splitlines()
    refusals = [line for line in lines if "malformed HTTP request" in line]
    assert len(refusals) == len(sent), "\n".join(lines[-40:])
    assert all(LINE.match(line) for line in refusals), refusals
    # One line each: no traceback, no quoted head.
    assert "Traceback" not in out and "Error handling request" not in out
    assert "Bearer" not in out and "/connect/" not in out


async def test_aiohttp_access_and_server_loggers_are_scrubbed(tmp_path: Path) -> None:
    """A plain aiohttp app with its access log on (quoting the Authorization header and the
    query) on a real socket, after ``logs.install``: every record any handler sees is scrubbed."""
    secret = "CanarySecret" + "x7Y" * 12
    logs.install([secret])
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)  # deliberately without the filter: the factory suffices
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s %(request_header)s"))
    access = logging.getLogger("aiohttp.access")
    access.addHandler(handler)
    access.setLevel(logging.INFO)

    async def boom(request: web.Request) -> web.Response:
        raise RuntimeError(f"upstream said no to {request.headers['Cookie']}")

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/boom", boom)
    app.router.add_get("/ok", ok)
    runner = web.AppRunner(app, access_log_format="%r %{Authorization}i %{Cookie}i")
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = logging.getLogger("aiohttp.server")
    server_stream = io.StringIO()
    server_handler = logging.StreamHandler(server_stream)
    server.addHandler(server_handler)
    try:
        port = runner.addresses[0][1]
        async with aiohttp.ClientSession() as session:
            headers = {"Authorization": f"Bearer {secret}", "Cookie": f"sid={secret}"}
            async with session.get(f"http://127.0.0.1:{port}/ok?access_token={secret}", headers=headers) as r:
                assert r.status == 200
            async with session.get(f"http://127.0.0.1:{port}/boom", headers=headers) as r:
                assert r.status == 500
        await send_raw(port, b"GET /ok HTTP/1.1\nAuthorization: Basic " + secret.encode() + b"\n\n")
    finally:
        await runner.cleanup()
        access.removeHandler(handler)
        server.removeHandler(server_handler)
        access.setLevel(logging.NOTSET)
    text = stream.getvalue() + server_stream.getvalue()
    assert "GET /ok?access_token=[REDACTED]" in text  # the records were there, scrubbed
    assert "Unhandled exception" in server_stream.getvalue() or "Error handling" in server_stream.getvalue()
    assert "malformed HTTP request from 127.0.0.1 refused with 400" in server_stream.getvalue()
    assert secret not in text
