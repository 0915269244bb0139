"""A canary secret must never leave the service except as a Connection Service parameter.

The canary is planted as a secret parameter, then every admin answer (PUT, PATCH, GET, list,
validation errors), the audit trail, the metrics, the logs (in-process via caplog and a real
process's output at debug level) and the data at rest are searched for it. The only place it
may appear is the ``parameters`` of a Connection Service answer for a connection that is not
proxy-only.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.app import bearer, running_service, start_service_process
from tests.support.wait import wait_until


def canary() -> str:
    return "CANARY" + secrets.token_hex(12)


async def refused_connect(url: str, credential: str) -> str:
    """A CONNECT the service refuses (to a host no connection is bound to, or with a bad
    credential), with ``credential`` as the proxy password: the answer's text."""
    host, port = url.rsplit("/", 1)[1].rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    auth = base64.b64encode(f"c1:{credential}".encode()).decode()
    writer.write(
        f"CONNECT unbound.example:443 HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Basic {auth}\r\n\r\n".encode()
    )
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert data.startswith((b"HTTP/1.1 403", b"HTTP/1.1 407")), data[:200]
    return data.decode("latin-1")


async def exercise(session: aiohttp.ClientSession, url: str, admin: dict[str, str], secret: str) -> list[str]:
    """Drives every surface; returns the text of every answer that must NOT hold the canary.
    Asserts on the way that the Connection Service does hand it out where it should.

    The refused CONNECTs are audited (proxy.connect): one with a valid key (403, the key is the
    proxy credential, so ``PROXY_KEY_MARK`` marks it for the searches) and one presenting that
    key's id with the canary as its secret (407)."""
    seen: list[str] = []

    async def call(
        method: str, path: str, expect: int, headers: dict[str, str] | None = None, **kw: Any
    ) -> Any:
        async with session.request(method, url + path, headers=headers or admin, **kw) as r:
            text = await r.text()
            assert r.status == expect, (method, path, r.status, text)
            return text

    conn = "/admin/tenants/t1/connections/c1"
    body = {
        "integration_id": "http_api_key",
        "parameters": {"api_key": secret, "base_url": "https://api.example.com"},
    }
    seen.append(await call("PUT", conn, 201, json=body))
    seen.append(await call("PUT", conn, 200, json=body))
    seen.append(await call("GET", conn, 200))
    seen.append(await call("GET", "/admin/tenants/t1/connections", 200))
    seen.append(await call("PATCH", conn, 200, json={"metadata": {"x": 1}}))
    seen.append(await call("PATCH", conn, 200, json={"parameters": {"api_key": secret}}))
    # Validation errors with the canary in every kind of position: none may echo it.
    for bad in (
        {**body, "bogus": secret},
        {**body, "connection_subtype": secret * 20},
        {**body, "parameters": {"api_key": secret, "base_url": "ftp://" + secret}},
        {**body, "parameters": {"api_key": secret, "base_url": "https://a.example", "location": secret}},
        {**body, "rate_limits": [{"limit": secret, "window": secret}]},
        {**body, "options": {"retries": secret, "quota_key": secret + " !"}},
        {**body, "runtime_user_id": secret + " !", "default_connection_id": "c0"},
        {"integration_id": secret + " !", "parameters": {"api_key": secret}},
    ):
        seen.append(await call("PUT", "/admin/tenants/t1/connections/c2", 422, json=bad))
    seen.append(await call("PUT", conn, 422, data=b'{"parameters": {"api_key": "' + secret.encode() + b'"'))
    seen.append(
        await call("PATCH", conn, 422, json={"parameters": {"api_key": secret}, "integration_id": "x"})
    )
    # A proxy-only twin never releases it; pending and unknown connections neither.
    seen.append(
        await call(
            "PUT", "/admin/tenants/t1/connections/po", 201, json={**body, "options": {"proxy_only": True}}
        )
    )
    seen.append(await call("GET", "/connections/t1/po", 200))
    seen.append(
        await call(
            "PUT", "/admin/tenants/t1/connections/pending", 201, json={"integration_id": "http_api_key"}
        )
    )
    seen.append(await call("GET", "/connections/t1/pending", 424))
    seen.append(await call("GET", "/connections/t1/nope", 404))
    seen.append(await call("GET", "/connections/t1/c1/metadata", 200))
    # The one place it belongs.
    released = json.loads(await call("GET", "/connections/t1/c1", 200))
    assert released["parameters"]["api_key"] == secret
    key = json.loads(await call("POST", "/admin/tenants/t1/api-keys", 201, json={"name": "n"}))["api_key"]
    released = json.loads(await call("GET", "/connections/t1/c1", 200, headers=bearer(key)))
    assert released["parameters"]["api_key"] == secret
    seen.append(await call("GET", "/connections/t1/c1", 401, headers=bearer(secret)))
    PROXY_KEYS.append(key)
    seen.append(await refused_connect(url, key))
    prefix, key_id, _ = key.split("_", 2)
    seen.append(await refused_connect(url, f"{prefix}_{key_id}_{secret.ljust(43, 'x')}"))  # key-shaped
    seen.append(await call("GET", "/admin/tenants/t1", 401, headers=bearer(secret)))
    seen.append(await call("GET", "/admin/tenants/t1/api-keys", 200))
    seen.append(await call("DELETE", "/admin/tenants/t1/connections/po", 204))
    seen.append(await call("GET", "/metrics", 200))
    return seen


async def read_audit(session: aiohttp.ClientSession, url: str, admin: dict[str, str]) -> str:
    """The tenant's audit trail, once the buffered reads have been flushed (polls briefly)."""

    async def trail() -> str | None:
        async with session.get(url + "/admin/tenants/t1/audit?limit=1000", headers=admin) as r:
            assert r.status == 200
            text = await r.text()
        # The refused CONNECTs are buffered after the reads: wait for both of them too.
        wanted = ("credential.read", '"HOST_NOT_ALLOWED"', '"UNAUTHENTICATED"')
        return text if all(w in text for w in wanted) else None

    text = await wait_until(trail, timeout=10, interval=0.05, message="no credential.read in the audit trail")
    assert "credential.read" in text and "connection.create" in text
    # The refused CONNECTs are on record, with their outcome codes.
    connects = [e for e in json.loads(text)["items"] if e["action"] == "proxy.connect"]
    assert {e["outcome"] for e in connects} == {"HOST_NOT_ALLOWED", "UNAUTHENTICATED"}, connects
    return text


# The proxy credentials exercise() used, which must be absent wherever the canary must.
PROXY_KEYS: list[str] = []


def assert_absent(secret: str, texts: list[str]) -> None:
    for i, text in enumerate(texts):
        assert secret not in text, f"canary leaked in answer #{i}: {text[:200]}"


def data_at_rest(data_dir: Path) -> bytes:
    return b"".join(p.read_bytes() for p in data_dir.rglob("*") if p.is_file() and "sqlite" in p.name)


async def test_canary_never_leaves_in_process(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    secret = canary()
    async with running_service(tmp_path, log_level="debug") as svc:
        texts = await exercise(svc.session, svc.url, svc.admin_headers, secret)
        await svc.flush_audit()
        texts.append(await read_audit(svc.session, svc.url, svc.admin_headers))
    assert_absent(secret, texts)
    logged = [r.getMessage() + (r.exc_text or "") for r in caplog.records]
    assert logged, "expected some log output to search"
    assert_absent(secret, logged)
    for key in PROXY_KEYS:
        assert_absent(key, [texts[-1], *logged])  # the audit trail and the logs
    assert secret.encode() not in data_at_rest(tmp_path)


@pytest.mark.system
@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_canary_never_reaches_a_real_process_output(tmp_path: Path, log_format: str) -> None:
    secret = canary()
    data = tmp_path / "data"
    with start_service_process(data, env={"PROXY_LOG_LEVEL": "debug", "PROXY_LOG_FORMAT": log_format}) as sp:
        async with aiohttp.ClientSession() as session:
            texts = await exercise(session, sp.url, sp.admin_headers, secret)
            texts.append(await read_audit(session, sp.url, sp.admin_headers))
        assert sp.stop(signal.SIGTERM) == 0
    assert_absent(secret, texts)
    assert sp.output(), "expected some process output to search"
    if log_format == "json":
        assert all(json.loads(line) for line in sp.output().splitlines() if line.strip())
    assert secret not in sp.output()
    assert secret.encode() not in data_at_rest(data)
    for key in PROXY_KEYS:
        assert key not in sp.output() and key not in texts[-1]
