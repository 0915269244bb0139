"""Upstream answers that are not valid HTTP: a clean 502 for the caller, recorded as a failure.

A raw socket upstream writes what no HTTP library would: a control character in a header value
or in the reason phrase, a 70 KiB header, a ``101 Switching Protocols``. Relaying any of them
used to drop the caller's connection with no answer (and audit "ok"), or switch protocols
through the proxy. Each must be a 502 ``UPSTREAM_UNREACHABLE`` JSON with ``X-Proxy-Error``, in
path mode and in the envelope, with the audit trail and ``proxy_requests_total`` saying so.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.app import RunningService, running_service
from tests.support.raw_upstream import raw_upstream

HOSTILE = {
    "control-in-header": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Evil: a\x01b\r\n\r\nok",
    "control-in-header-streamed": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Evil: a\x01b\r\n\r\n2\r\nok\r\n0\r\n\r\n"
    ),
    "control-in-reason": b"HTTP/1.1 200 O\x0bK\r\nContent-Length: 2\r\n\r\nok",
    "70-KiB-header": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Big: " + b"a" * 70 * 1024 + b"\r\n\r\nok",
    "101-switching": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
}


@pytest.fixture
async def svc(tmp_path: Path) -> AsyncIterator[RunningService]:
    async with running_service(tmp_path, trusted_networks=["127.0.0.1/32"]) as s:
        yield s


async def _metric(svc: RunningService, front: str, outcome: str) -> float:
    async with svc.session.get(svc.url + "/metrics") as r:
        text = await r.text()
    m = re.search(rf'^proxy_requests_total{{front="{front}",outcome="{outcome}"}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


async def _outcomes(svc: RunningService, tenant: str) -> list[str]:
    await svc.flush_audit()
    status, data = await svc.admin("GET", f"/admin/tenants/{tenant}/audit?action=proxy.use")
    assert status == 200
    return [e["outcome"] for e in data["items"]]


@pytest.mark.parametrize("case", sorted(HOSTILE))
async def test_hostile_answer_is_a_502_in_path_mode_and_the_envelope(svc: RunningService, case: str) -> None:
    tenant = "t-" + case
    async with raw_upstream(HOSTILE[case]) as up:
        await svc.put_connection(
            tenant,
            "c1",
            {"integration_id": "http_bearer", "parameters": {"token": "tok", "base_url": up.url + "/"}},
        )
        before = {front: await _metric(svc, front, "UPSTREAM_UNREACHABLE") for front in ("path", "envelope")}
        ok_before = {front: await _metric(svc, front, "ok") for front in ("path", "envelope")}

        headers = {**svc.admin_headers, "X-Tenant-Id": tenant, "X-Connection-Id": "c1"}
        async with svc.session.get(svc.url + "/proxy/x", headers=headers) as r:
            assert r.status == 502, case
            assert r.headers["X-Proxy-Error"] == "UPSTREAM_UNREACHABLE"
            assert r.content_type == "application/json"
            body = await r.json()
        assert body["error"] == "UPSTREAM_UNREACHABLE" and body["message"]

        envelope = {"connection_id": "c1", "url": "/x"}
        async with svc.session.post(
            svc.url + "/api/internal/proxy", json=envelope, headers={"X-Org-Id": tenant}
        ) as r:
            assert r.status == 502, case
            assert r.headers["X-Proxy-Error"] == "UPSTREAM_UNREACHABLE"
            assert (await r.json())["error"] == "UPSTREAM_UNREACHABLE"
        assert up.requests == 2  # the upstream was asked both times; its answer was refused

    assert await _outcomes(svc, tenant) == ["UPSTREAM_UNREACHABLE", "UPSTREAM_UNREACHABLE"]
    for front in ("path", "envelope"):
        assert await _metric(svc, front, "UPSTREAM_UNREACHABLE") == before[front] + 1
        assert await _metric(svc, front, "ok") == ok_before[front]


async def test_the_service_answers_normally_after_hostile_upstreams(svc: RunningService) -> None:
    # A refused answer leaves nothing behind: the next call on another upstream is clean.
    async with (
        raw_upstream(HOSTILE["101-switching"]) as bad,
        raw_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Fine: caf\xc3\xa9\ttab\r\n\r\nok") as good,
    ):
        for cid, up in (("bad", bad), ("good", good)):
            await svc.put_connection(
                "t1",
                cid,
                {"integration_id": "http_bearer", "parameters": {"token": "tok", "base_url": up.url + "/"}},
            )
        headers = {**svc.admin_headers, "X-Tenant-Id": "t1"}
        for _ in range(3):
            async with svc.session.get(
                svc.url + "/proxy/x", headers={**headers, "X-Connection-Id": "bad"}
            ) as r:
                assert r.status == 502
            async with svc.session.get(
                svc.url + "/proxy/x", headers={**headers, "X-Connection-Id": "good"}
            ) as r:
                assert r.status == 200 and await r.read() == b"ok"
                assert r.headers["X-Fine"] == "café\ttab"
