"""The lean decision listener (``decision_listen``), over real sockets: the same answers as
``/_decide`` on the main listener, keep-alive, and strict refusal of anything but the shape
nginx sends. End to end through nginx it is exercised by tests/web/test_decide.py and every
nginx-parametrized proxy test (their services set ``decision_listen``)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from proxy.web.decide_listen import _render
from tests.support.app import RunningService, free_port, running_service
from tests.support.nginx import DECISION_TOKEN
from tests.support.upstream import Upstream, running_upstream

CANARY = "canary-lean-7c2f"


@pytest.fixture
async def lean(tmp_path: Path) -> AsyncIterator[tuple[RunningService, str]]:
    where = f"unix:{tmp_path}/decide.sock"
    async with running_service(tmp_path / "data", decision_token=DECISION_TOKEN, decision_listen=where) as s:
        yield s, where[5:]


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    async with running_upstream() as up:
        yield up


async def _exchange(path: str, raw: bytes, answers: int = 1) -> list[tuple[int, dict[str, str], bytes]]:
    """Send ``raw`` on one connection; read ``answers`` responses (or until the peer closes)."""
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(raw)
    await writer.drain()
    out = []
    try:
        for _ in range(answers):
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            except asyncio.IncompleteReadError as exc:
                assert not exc.partial, exc.partial  # closed cleanly between answers
                break
            lines = head.decode().split("\r\n")
            status = int(lines[0].split(" ")[1])
            headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            out.append((status, headers, body))
    finally:
        writer.close()
    return out


def _req(headers: dict[str, str], target: str = "/_decide") -> bytes:
    lines = [f"GET {target} HTTP/1.1", "Host: cp", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def test_decides_like_the_main_listener_and_keeps_alive(
    lean: tuple[RunningService, str], upstream: Upstream
) -> None:
    svc, path = lean
    await svc.put_connection(
        "t1",
        "c1",
        {
            "integration_id": "http_bearer",
            "parameters": {"token": CANARY, "base_url": upstream.url + "/echo/"},
        },
    )
    key = await svc.mint_key("t1")
    ask = _ask(key, "/proxy/items?x=1")
    # Two pipelined requests on one connection: two answers, in order, connection kept.
    got = await _exchange(path, _req(ask) + _req({**ask, "X-Original-URI": "/proxy/other"}), answers=2)
    assert [s for s, _, _ in got] == [200, 200]
    assert got[0][1]["x-cp-h-authorization"] == f"Bearer {CANARY}"
    assert got[0][1]["x-cp-uri"].endswith("/echo/items?x=1")
    assert got[1][1]["x-cp-uri"].endswith("/echo/other")
    # The same question on the main listener gets the same verdict.
    async with svc.session.get(svc.url + "/_decide", headers=ask) as r:
        assert r.status == 200
        assert r.headers["X-CP-H-authorization"] == got[0][1]["x-cp-h-authorization"]
        assert r.headers["X-CP-Addr"] == got[0][1]["x-cp-addr"]
    # Without the token: 401 (nginx passes it on), the service's JSON error, nothing else.
    ((status, headers, body),) = await _exchange(
        path, _req({k: v for k, v in ask.items() if "Token" not in k})
    )
    assert status == 401 and headers["x-proxy-error"] == "UNAUTHENTICATED"
    assert CANARY not in body.decode() and not any(k.startswith("x-cp-") for k in headers)
    ((status, headers, body),) = await _exchange(
        path, _req({k: v for k, v in ask.items() if "Token" not in k and "Front" not in k})
    )
    assert status == 401 and json.loads(body)["error"] == "UNAUTHENTICATED"
    assert headers["x-proxy-error"] == "UNAUTHENTICATED" and CANARY not in body.decode()


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /_decide HTTP/1.1\r\nHost: a\nX-Smuggled: 1\r\n\r\n",  # bare LF
        b"GET /_decide HTTP/1.1\r\nBad Name: 1\r\n\r\n",
        b"GET /_decide HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET /_decide HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"GET /_decide HTTP/2.0\r\n\r\n",
        b"GET /_decide\x00 HTTP/1.1\r\n\r\n",
        # Non-ASCII digits: str.isdigit() admits them, int() reads or refuses them.
        "GET /_decide HTTP/1.1\r\nContent-Length: \u00b2\r\n\r\n".encode(),
        "GET /_decide HTTP/1.1\r\nContent-Length: \u0661\u0660\r\n\r\n".encode(),
    ],
)
async def test_malformed_requests_are_refused_and_closed(
    lean: tuple[RunningService, str], raw: bytes
) -> None:
    _, path = lean
    got = await _exchange(path, raw + _req({"X-CP-Decision-Token": DECISION_TOKEN}), answers=2)
    assert len(got) == 1, "the connection is closed after a refusal: nothing after it is read"
    status, headers, body = got[0]
    assert status == 400 and headers["connection"] == "close"
    assert json.loads(body)["error"] == headers["x-proxy-error"]


async def test_other_paths_and_oversized_heads(lean: tuple[RunningService, str]) -> None:
    _, path = lean
    ((status, headers, _),) = await _exchange(path, _req({"X-CP-Decision-Token": DECISION_TOKEN}, "/admin/x"))
    assert status == 404 and headers["x-proxy-error"] == "NOT_FOUND"
    ((status, _, _),) = await _exchange(path, b"GET /_decide HTTP/1.1\r\nX-A: " + b"a" * 70_000)
    assert status == 431


async def test_many_pipelined_requests_are_answered_in_order(lean: tuple[RunningService, str]) -> None:
    """Answers that complete at once are not nested: a long pipeline neither overflows the stack
    nor reorders (each answer names the request id it was asked with)."""
    _, path = lean
    n = 1500
    raw = b"".join(_req({"X-Request-Id": f"r{i}"}, f"/nope{i}") for i in range(n))
    got = await _exchange(path, raw, answers=n)
    assert [h["x-request-id"] for _, h, _ in got] == [f"r{i}" for i in range(n)]
    assert {s for s, _, _ in got} == {404}


def test_a_header_value_with_cr_or_lf_is_never_written() -> None:
    assert _render(200, {"X-CP-H-authorization": "Bearer ok"}, b"", False).count(b"\r\n") == 4
    for bad in ("a\r\nX-Evil: 1", "a\nb", "a\rb"):
        with pytest.raises(ValueError):
            _render(200, {"X-CP-H-authorization": bad}, b"", False)
    with pytest.raises(ValueError):
        _render(200, {"X-Evil\r\nA": "1"}, b"", False)


async def test_tcp_listener_and_generated_config(tmp_path: Path) -> None:
    port = free_port()
    async with running_service(
        tmp_path / "data",
        decision_token=DECISION_TOKEN,
        decision_listen=f"0.0.0.0:{port}",
        nginx_network_ok=True,
    ) as svc:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(_req({"X-CP-Decision-Token": DECISION_TOKEN, "Connection": "close"}))
        data = await asyncio.wait_for(reader.read(), 5)  # read to EOF: closed as asked
        writer.close()
        assert data.startswith(b"HTTP/1.1 404 ")
        from proxy.nginxconf import render

        conf = render(svc.settings, (), listen="127.0.0.1:1", service=svc.url, prefix=tmp_path)
        assert f"upstream cp_decider {{ server 127.0.0.1:{port}; keepalive 64; }}" in conf
        assert "proxy_pass http://cp_decider/_decide;" in conf


# --- the same question again: every memo on the way (head parse, inputs, verdict replay, answer
# bytes) must give exactly what a first-time question would get, after any change. ---------------


def _ask(key: str, uri: str = "/proxy/items") -> dict[str, str]:
    """nginx's subrequest for GET ``uri`` on connection c1 with the caller's ``key``."""
    return {
        "Authorization": f"Bearer {key}",
        "X-Connection-Id": "c1",
        "X-Original-Method": "GET",
        "X-Original-URI": uri,
        "X-CP-Front": "nginx",
        "X-CP-Decision-Token": DECISION_TOKEN,
    }


async def _decide(path: str, ask: dict[str, str]) -> tuple[int, dict[str, str]]:
    ((status, headers, _),) = await _exchange(path, _req(ask))
    if status == 403 and "x-cp-status" in headers:  # nginx's shape of a refusal
        return int(headers["x-cp-status"]), headers
    return status, headers


async def test_a_repeated_question_follows_every_change(
    lean: tuple[RunningService, str], upstream: Upstream
) -> None:
    from proxy.security import crypto

    svc, path = lean
    params = {"token": CANARY, "base_url": upstream.url}
    body: dict[str, Any] = {"integration_id": "http_bearer", "parameters": params}
    await svc.put_connection("t1", "c1", body)
    key = await svc.mint_key("t1")
    ask = _ask(key)
    # Tracing callers differ in every call; they are asked the same question.
    for i in range(3):
        tp = f"00-{i:032x}-{i + 1:016x}-01"
        status, h = await _decide(path, {**ask, "X-Request-Id": f"r{i}", "traceparent": tp})
        assert status == 200 and h["x-cp-h-authorization"] == f"Bearer {CANARY}"
    # The connection changes: the very next answer carries the new credential.
    await svc.put_connection("t1", "c1", {**body, "parameters": {**params, "token": "new-tok"}})
    status, h = await _decide(path, ask)
    assert status == 200 and h["x-cp-h-authorization"] == "Bearer new-tok"
    # The tenant becomes proxy-only: the call goes to the service's path mode.
    status, _ = await svc.admin("PUT", "/admin/tenants/t1", {"proxy_only": True})
    assert status == 200
    status, h = await _decide(path, ask)
    # (the caller's own Authorization goes to path mode, never the connection's credential)
    assert status == 200 and h["x-cp-route"] == "service"
    assert h["x-cp-h-authorization"] == f"Bearer {key}"
    status, _ = await svc.admin("PUT", "/admin/tenants/t1", {"proxy_only": False})
    status, h = await _decide(path, ask)
    assert status == 200 and h["x-cp-route"] == "upstream"
    # The connection is deleted: refused at once.
    status, _ = await svc.admin("DELETE", "/admin/tenants/t1/connections/c1")
    assert status in (200, 204)
    status, h = await _decide(path, ask)
    assert status == 404 and h["x-cp-error"] == "CONNECTION_NOT_FOUND"
    # Back, then the caller's key is revoked: refused at once, nothing of the credential.
    await svc.put_connection("t1", "c1", body)
    status, h = await _decide(path, ask)
    assert status == 200
    key_id = crypto.split_api_key(key)[0]  # type: ignore[index]
    status, _ = await svc.admin("DELETE", f"/admin/tenants/t1/api-keys/{key_id}")
    assert status in (200, 204)
    status, h = await _decide(path, ask)
    assert status == 401 and h["x-cp-error"] == "UNAUTHENTICATED"
    assert not any(CANARY in v for v in h.values())


async def test_a_repeated_question_still_spends_the_limit(
    lean: tuple[RunningService, str], upstream: Upstream
) -> None:
    svc, path = lean
    await svc.put_connection(
        "t1",
        "c1",
        {
            "integration_id": "http_bearer",
            "parameters": {"token": CANARY, "base_url": upstream.url},
            "rate_limits": [{"limit": 3, "window": "1h"}],
        },
    )
    key = await svc.mint_key("t1")
    ask = _ask(key)
    got = [await _decide(path, ask) for _ in range(5)]
    assert [s for s, _ in got] == [200, 200, 200, 429, 429]
    assert all(h["x-accel-expires"] == "0" for _, h in got)  # a windowed decision is never cached
    assert int(got[3][1]["x-cp-retry-after"]) > 0


def test_per_call_headers_with_control_characters_stay_in_the_memo_key() -> None:
    from proxy.pipeline.decision import _memo_headers

    kept = _memo_headers([("Accept", "*/*"), ("X-Request-Id", "r1"), ("traceparent", "a\x00b")])
    assert kept == (("Accept", "*/*"), ("traceparent", "a\x00b"))


async def test_remembered_requests_are_forgotten_within_their_bound(
    lean: tuple[RunningService, str], upstream: Upstream
) -> None:
    """The memos hold callers' requests, API keys included (the auth cache keeps only hashes):
    each is emptied on a timer no longer than its bound."""
    from proxy.pipeline.decision import MEMO_S
    from proxy.web.decide import DECIDER, FORGET, INPUTS, LEAN
    from proxy.web.decide_listen import HEADS_FORGET_S

    svc, path = lean
    params = {"token": CANARY, "base_url": upstream.url}
    body: dict[str, Any] = {"integration_id": "http_bearer", "parameters": params}
    await svc.put_connection("t1", "c1", body)
    key = await svc.mint_key("t1")
    for _ in range(2):
        assert (await _decide(path, _ask(key)))[0] == 200
    app = svc.app
    listener, decider, inputs = app[LEAN], app[DECIDER], app[INPUTS]

    def held() -> list[str]:
        where = {
            "heads": listener.heads._entries,
            "inputs": inputs._entries,
            "verdicts": decider._memo._entries,
        }
        return [name for name, d in where.items() if key in repr(d)]

    assert held() == ["heads", "inputs", "verdicts"]
    loop = asyncio.get_running_loop()
    (timer,) = app[FORGET]
    assert 0 < timer.when() - loop.time() <= MEMO_S
    assert 0 < listener._forgetter.when() - loop.time() <= HEADS_FORGET_S
    for handle in (timer, listener._forgetter):  # fire them now, as the loop would
        fire = handle._callback  # type: ignore[attr-defined]
        handle.cancel()
        fire()  # forgets, and schedules the next round
    assert held() == []
    assert app[FORGET][0] is not timer and not app[FORGET][0].cancelled()
    # Forgetting costs nothing but a fresh decision.
    status, h = await _decide(path, _ask(key))
    assert status == 200 and h["x-cp-h-authorization"] == f"Bearer {CANARY}"


async def test_a_cross_tenant_question_is_audited_in_the_callers_tenant(
    lean: tuple[RunningService, str], upstream: Upstream
) -> None:
    svc, path = lean
    await svc.put_connection(
        "t2",
        "c1",
        {"integration_id": "http_bearer", "parameters": {"token": CANARY, "base_url": upstream.url}},
    )
    key = await svc.mint_key("t1")
    status, h = await _decide(path, {**_ask(key), "X-Tenant-Id": "t2"})
    assert status == 404 and not any(CANARY in v for v in h.values())
    await svc.flush_audit()
    _, body = await svc.admin("GET", "/admin/tenants/t1/audit?action=proxy.decide")
    assert [(e["outcome"], e["connection_id"]) for e in body["items"]] == [("CONNECTION_NOT_FOUND", None)]
    _, body = await svc.admin("GET", "/admin/tenants/t2/audit?action=proxy.decide")
    assert body["items"] == []
