"""JSON logs of a real ``serve`` process: one access line per proxied call, trace context
propagated to a real upstream, every record JSON, and a canary credential in none of them."""

from __future__ import annotations

import json
import secrets
import signal
import socket
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.app import ADMIN_TOKEN, bearer, start_service_process
from tests.support.upstream import running_upstream

pytestmark = pytest.mark.system

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"


def records(output: str) -> list[dict[str, Any]]:
    """Every line of the process's output as JSON; fails on any line that is not."""
    out = []
    for line in output.splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except ValueError:
                raise AssertionError(f"not a JSON log line: {line!r}") from None
    return out


def access(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in recs if r.get("event") == "proxy.call"]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_json_access_lines_trace_context_and_no_secret(tmp_path: Path) -> None:
    secret = "CANARY" + secrets.token_hex(12)
    admin = bearer(ADMIN_TOKEN)
    async with running_upstream() as up, aiohttp.ClientSession() as session:
        # PROXY_LOG_FORMAT unset: the output is a file, not a terminal, so "auto" means JSON.
        with start_service_process(tmp_path / "data", env={"PROXY_LOG_FORMAT": ""}) as sp:

            async def put(cid: str, base_url: str, **extra: Any) -> None:
                body = {
                    "integration_id": "http_bearer",
                    "parameters": {"token": secret, "base_url": base_url},
                    **extra,
                }
                async with session.put(
                    f"{sp.url}/admin/tenants/t1/connections/{cid}", json=body, headers=admin
                ) as r:
                    assert r.status == 201, await r.text()

            await put("c1", up.url + "/echo/", rate_limits=[{"limit": 2, "window": "1h"}])
            await put("dead", f"http://127.0.0.1:{closed_port()}/")
            async with session.post(
                f"{sp.url}/admin/tenants/t1/api-keys", json={"name": "k"}, headers=admin
            ) as r:
                key = (await r.json())["api_key"]

            calls = iter(range(100))

            async def call(cid: str, **headers: str) -> tuple[int, str]:
                # A caller's tame X-Request-Id is kept: the access line names it.
                rid = f"test-call-{next(calls)}"
                h = {**bearer(key), "X-Connection-Id": cid, "X-Request-Id": rid, **headers}
                async with session.get(f"{sp.url}/proxy/items?q={secret}", headers=h) as r:
                    await r.read()
                    return r.status, rid

            ok_status, ok_rid = await call("c1", traceparent=TRACEPARENT, tracestate="vendor=opaque-1")
            bad_tp = TRACEPARENT.upper()
            bad_status, bad_rid = await call("c1", traceparent=bad_tp, tracestate="vendor=opaque-2")
            limited_status, limited_rid = await call("c1")
            missing_status, missing_rid = await call("nope")
            dead_status, dead_rid = await call("dead")
            assert (ok_status, bad_status, limited_status, missing_status, dead_status) == (
                200,
                200,
                429,
                404,
                502,
            )
            assert sp.stop(signal.SIGTERM) == 0

    output = sp.output()
    recs = records(output)
    lines = {r["request_id"]: r for r in access(recs)}
    assert len(access(recs)) == 5, access(recs)

    # 1. The caller's valid trace: same trace id upstream, our span as the parent, tracestate kept.
    first, second = up.seen[0], up.seen[1]
    sent = first.header("traceparent")
    assert len(sent) == 1
    _, trace_id, parent, flags = sent[0].split("-")
    assert (trace_id, flags) == (CALLER_TRACE, "01") and parent != CALLER_SPAN
    assert first.header("tracestate") == ["vendor=opaque-1"]
    line = lines[ok_rid]
    assert line["trace_id"] == CALLER_TRACE
    assert line["span_id"] == parent and line["parent_span_id"] == CALLER_SPAN
    assert line["tenant"] == "t1" and line["connection"] == "c1" and line["integration"] == "http_bearer"
    assert line["upstream_host"] == "127.0.0.1" and line["front"] == "path"
    assert (line["status"], line["upstream_status"], line["outcome"]) == (200, 200, "ok")
    assert line["limit"] == "allowed" and line["limit_source"] == "configured"
    assert line["duration_ms"] >= line["upstream_ms"] > 0
    assert line["level"] == "INFO" and line["logger"] == "proxy.access" and line["ts"].endswith("Z")

    # 2. A malformed traceparent is not trusted: a fresh trace, its tracestate dropped.
    fresh = second.header("traceparent")[0].split("-")[1]
    assert fresh != CALLER_TRACE and lines[bad_rid]["trace_id"] == fresh
    assert lines[bad_rid]["parent_span_id"] is None
    assert second.header("tracestate") == []
    assert bad_tp not in output and "opaque-2" not in output

    # 3.-5. Refusals get their line too, with what was known by then.
    limited = lines[limited_rid]
    assert (limited["status"], limited["outcome"], limited["limit"]) == (429, "RATE_LIMITED", "denied")
    assert limited["upstream_status"] is None and limited["connection"] == "c1"
    missing = lines[missing_rid]
    assert (missing["status"], missing["outcome"], missing["limit"]) == (
        404,
        "CONNECTION_NOT_FOUND",
        "unchecked",
    )
    assert missing["tenant"] == "t1" and missing["connection"] == "nope" and missing["integration"] is None
    dead = lines[dead_rid]
    assert (dead["status"], dead["outcome"]) == (502, "UPSTREAM_UNREACHABLE")

    # Other records are JSON too, and one logged while a request ran names its ids.
    warned = [r for r in recs if r["logger"] == "proxy.web" and "UPSTREAM_UNREACHABLE" in r["message"]]
    assert warned and warned[0]["request_id"] == dead_rid and warned[0]["trace_id"] == dead["trace_id"]
    assert any("Running on" in r["message"] for r in recs)

    # The canary credential (sent upstream, and in the query) and the caller key: in no record.
    assert first.header("authorization") == [f"Bearer {secret}"]
    assert secret not in output and key not in output and ADMIN_TOKEN not in output


async def test_access_line_follows_the_log_level(tmp_path: Path) -> None:
    async with running_upstream() as up, aiohttp.ClientSession() as session:
        env = {"PROXY_LOG_LEVEL": "warning", "PROXY_LOG_FORMAT": "json"}
        with start_service_process(tmp_path / "data", env=env) as sp:
            body = {"integration_id": "http_bearer", "parameters": {"token": "t", "base_url": up.url}}
            async with session.put(
                f"{sp.url}/admin/tenants/t1/connections/c1", json=body, headers=bearer(ADMIN_TOKEN)
            ) as r:
                assert r.status == 201
            h = {**bearer(ADMIN_TOKEN), "X-Connection-Id": "c1", "X-Tenant-Id": "t1"}
            async with session.get(f"{sp.url}/proxy/x", headers=h) as r:
                assert r.status == 200
            assert up.seen[-1].header("traceparent"), "trace context is sent whatever the log level"
            assert sp.stop(signal.SIGTERM) == 0
    assert access(records(sp.output())) == []


async def test_text_format_writes_a_readable_access_line(tmp_path: Path) -> None:
    async with running_upstream() as up, aiohttp.ClientSession() as session:
        with start_service_process(tmp_path / "data", env={"PROXY_LOG_FORMAT": "text"}) as sp:
            body = {"integration_id": "http_bearer", "parameters": {"token": "t", "base_url": up.url}}
            async with session.put(
                f"{sp.url}/admin/tenants/t1/connections/c1", json=body, headers=bearer(ADMIN_TOKEN)
            ) as r:
                assert r.status == 201
            h = {**bearer(ADMIN_TOKEN), "X-Connection-Id": "c1", "X-Tenant-Id": "t1"}
            rid = "text-call-1"
            async with session.get(f"{sp.url}/proxy/x", headers={**h, "X-Request-Id": rid}) as r:
                assert r.status == 200
            assert sp.stop(signal.SIGTERM) == 0
    lines = [ln for ln in sp.output().splitlines() if "proxy.access" in ln]
    assert len(lines) == 1
    assert "INFO proxy.access: path t1/c1 -> 127.0.0.1: 200 ok" in lines[0] and f"request {rid}" in lines[0]
    assert not lines[0].startswith("{")
