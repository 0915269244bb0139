"""nginx in front, the attacks on its trust boundaries (proxy.nginxconf, proxy.web.decide): secrets at
rest in nginx's files, forged and replayed reports, and the cache key confusing two requests.

The cached-decision tests run real nginx (the generated config) in front of the service; the
report tests drive the service's own UDP listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from proxy.nginxconf import memory_backed
from proxy.observe.metrics import REGISTRY
from proxy.web.decide import DECIDER, REPORTS, ReportProtocol
from tests.support.app import RunningService, free_port, running_service
from tests.support.nginx import DECISION_TOKEN, nginx_front
from tests.support.upstream import Upstream
from tests.web.test_decide import _counting, call, connect

CANARY = "canary-at-rest-9b2e41"
QUERY_CANARY = "canary-in-query-77c0d3"
NGINX = pytest.param("nginx", marks=pytest.mark.system)


@pytest.fixture
async def svc(tmp_path: Path) -> AsyncIterator[RunningService]:
    async with running_service(
        tmp_path / "data",
        decision_token=DECISION_TOKEN,
        nginx_report_listen=f"127.0.0.1:{free_port()}",
        nginx_report="all",
        nginx_decision_cache_s=2,
        decision_listen=f"127.0.0.1:{free_port()}",
    ) as s:
        yield s


def _files_holding(root: Path, *needles: str) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            found += [f"{path}: {n}" for n in needles if n.encode() in data]
    return found


# --- 1. secrets at rest ----------------------------------------------------------------------------


@pytest.mark.system
async def test_cached_decisions_leave_no_secret_on_persistent_disk(
    svc: RunningService, upstream: Upstream, tmp_path: Path
) -> None:
    await connect(svc, upstream, "c1", "http_bearer", {"token": CANARY})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    # Upstreams that are down: nginx's error log names the upstream URI it failed to reach (a
    # query-carried credential would be in it: those calls take the service route).
    params = {"api_key": QUERY_CANARY, "location": "query", "query_param": "apikey"}
    params["base_url"] = f"http://127.0.0.1:{dead}/"
    await svc.put_connection("t1", "downq", {"integration_id": "http_api_key", "parameters": params})
    params = {"token": CANARY, "base_url": f"http://127.0.0.1:{dead}/"}
    await svc.put_connection("t1", "down", {"integration_id": "http_bearer", "parameters": params})
    key = await svc.mint_key("t1")
    calls = await _counting(svc)
    async with nginx_front(svc, tmp_path) as f:
        for _ in range(3):
            assert (await call(svc, f.url, "/proxy/a", "c1", key=key))[0] == 200
        assert calls[0] == 1  # the later calls were answered from nginx's cache
        for cid in ("down", "downq"):
            status, headers, _ = await call(svc, f.url, "/proxy/a?x=1", cid, key=key)
            assert status == 502 and headers["X-Proxy-Error"] == "UPSTREAM_UNREACHABLE", cid
        # The cache holds the credential and the caller's key, in memory only.
        assert memory_backed(f.cache_dir, Path("/proc/self/mounts").read_text()) is True
        assert _files_holding(f.cache_dir, CANARY, key), "the cached decision is where the test expects it"
        leaks = _files_holding(tmp_path, CANARY, QUERY_CANARY, key)
        assert not leaks, leaks
        assert "connect() failed" in f.error_log()  # the failure was logged, without the credential


@pytest.mark.system
async def test_no_cache_no_cache_files(upstream: Upstream, tmp_path: Path) -> None:
    async with running_service(
        tmp_path / "data", decision_token=DECISION_TOKEN, nginx_decision_cache_s=0
    ) as svc:
        await connect(svc, upstream, "c1", "http_bearer", {"token": CANARY})
        key = await svc.mint_key("t1")
        calls = await _counting(svc)
        async with nginx_front(svc, tmp_path) as f:
            assert "proxy_cache" not in f.conf
            for extra in ({}, {"X-Proxy-Whatever": "1"}):
                assert (await call(svc, f.url, "/proxy/a", "c1", key=key, headers=extra))[0] == 200
                assert "x-proxy-whatever" not in upstream.seen[-1].header_names
            assert calls[0] == 2  # every call decided: the unknown X-Proxy-* took the service route
            assert not list(f.cache_dir.iterdir())
            assert not _files_holding(tmp_path, CANARY, key)


# --- 4. the cache key: no two requests share an entry ------------------------------------------------


@pytest.mark.parametrize("front", ["path", NGINX])
async def test_a_cached_decision_does_not_carry_a_header_path_mode_drops(
    svc: RunningService, upstream: Upstream, tmp_path: Path, front: str
) -> None:
    """The cache key holds the caller's Connection but not the headers it names: a decision made
    when the named header was absent, served from the cache to a call that sends it, let nginx
    forward what path mode drops. Such calls are never answered from the cache."""
    await connect(svc, upstream, "c1", "http_bearer", {"token": CANARY})
    key = await svc.mint_key("t1")
    async with contextlib.AsyncExitStack() as stack:
        base = svc.url
        if front == "nginx":
            base = (await stack.enter_async_context(nginx_front(svc, tmp_path))).url
        named = {"Connection": "keep-alive, X-Hop"}
        for extra in ({}, {"X-Hop": "must-not-pass"}, {}, {"X-Hop": "must-not-pass"}):
            status, _, body = await call(svc, base, "/proxy/a", "c1", key=key, headers={**named, **extra})
            assert status == 200, body
            seen = upstream.seen[-1]
            assert "x-hop" not in seen.header_names
            assert seen.header("Authorization") == [f"Bearer {CANARY}"]


# --- 3. reports: from loopback, signed, once -----------------------------------------------------


def _dropped(reason: str) -> float:
    return REGISTRY.get_sample_value("proxy_nginx_reports_dropped_total", {"reason": reason}) or 0.0


def _report(token: str, rid: str, status: int = 500, **headers: str) -> bytes:
    line: dict[str, Any] = {"o": token, "s": str(status), "r": rid, "h": headers}
    return b"<190>cp: " + json.dumps(line).encode()


async def _uses(svc: RunningService, outcome: str) -> int:
    await svc.flush_audit()
    status, data = await svc.admin("GET", "/admin/tenants/t1/audit")
    assert status == 200, data
    uses = [e for e in data["items"] if (e.get("action"), e.get("outcome")) == ("proxy.use", outcome)]
    return sum(int((e.get("detail") or {}).get("count", 1)) for e in uses)


async def test_reports_from_elsewhere_are_dropped(svc: RunningService, upstream: Upstream) -> None:
    await connect(svc, upstream, "c1", "http_bearer", {"token": "t"})
    key = await svc.mint_key("t1")
    proto = svc.app[REPORTS].get_protocol()
    assert isinstance(proto, ReportProtocol) and proto.loopback_only
    token = svc.app[DECIDER].sign("api_key:x", "t1", "c1")
    before = _dropped("source")
    # The listener is on loopback: a datagram from another address is no nginx of this machine.
    for source in (("192.0.2.7", 514), ("::ffff:192.0.2.7", 514, 0, 0), ("2001:db8::1", 514, 0, 0)):
        proto.datagram_received(_report(token, f"r-{source[0]}", 429, **{"retry-after": "60"}), source)
    assert _dropped("source") == before + 3
    status, _, _ = await call(svc, svc.url, "/proxy/a", "c1", key=key)
    assert status == 200  # nothing was learned
    proto.datagram_received(
        _report(token, "r-local", 429, **{"retry-after": "60"}), ("::ffff:127.0.0.1", 514)
    )
    for _ in range(40):
        status, headers, _ = await call(svc, svc.url, "/proxy/a", "c1", key=key)
        if status == 429:
            break
        await asyncio.sleep(0.05)
    assert status == 429 and headers["X-Proxy-Error"] == "RATE_LIMITED"


async def test_a_replayed_report_is_dropped(svc: RunningService, upstream: Upstream) -> None:
    """Over the real UDP listener: the same datagram twice counts once; the same token under
    another request id (another call of the same cached decision) counts again."""
    await connect(svc, upstream, "c1", "http_bearer", {"token": "t"})
    where = svc.settings.nginx_report_listen
    assert where is not None
    token = svc.app[DECIDER].sign("api_key:x", "t1", "c1")
    replays, invalid = _dropped("replay"), _dropped("invalid")
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, remote_addr=where)
    try:
        for rid in ("rid-1", "rid-1", "rid-1", "rid-2"):
            transport.sendto(_report(token, rid))
        transport.sendto(_report(token.partition(".")[0] + ".AAAA", "rid-3"))  # forged MAC
        for _ in range(40):
            if _dropped("replay") == replays + 2 and _dropped("invalid") == invalid + 1:
                break
            await asyncio.sleep(0.05)
        assert (_dropped("replay"), _dropped("invalid")) == (replays + 2, invalid + 1)
        for _ in range(40):  # the accepted reports are learned from off the listener's path
            if await _uses(svc, "upstream_5xx") >= 2:
                break
            await asyncio.sleep(0.05)
        assert await _uses(svc, "upstream_5xx") == 2
    finally:
        transport.close()


def test_replay_memory_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    proto = ReportProtocol.__new__(ReportProtocol)
    proto._seen = {}
    monkeypatch.setattr(ReportProtocol, "MAX_SEEN", 4)
    assert all(proto._first_time("b.mac", f"r{i}") for i in range(10))
    assert len(proto._seen) == 4
    assert not proto._first_time("b.mac", "r9")  # the newest are remembered
    assert proto._first_time("b.mac", "r0")  # the oldest were forgotten first


# --- an upstream's answer is relayed, never obeyed --------------------------------------------------


@pytest.mark.parametrize("front", ["path", NGINX])
@pytest.mark.parametrize("target", ["/_cp_decide", "/proxy/b", "@cp_refused"])
async def test_an_upstream_cannot_redirect_nginx_internally(
    svc: RunningService, upstream: Upstream, tmp_path: Path, front: str, target: str
) -> None:
    """nginx obeys an upstream's X-Accel-Redirect (an internal redirect, even to an internal
    location): to /_cp_decide it would answer the caller with the decision, credential included."""
    await connect(svc, upstream, "c1", "http_bearer", {"token": CANARY})
    key = await svc.mint_key("t1")
    async with contextlib.AsyncExitStack() as stack:
        base = svc.url
        if front == "nginx":
            base = (await stack.enter_async_context(nginx_front(svc, tmp_path))).url
        q = f"respond_header=X-Accel-Redirect:{target}"
        status, headers, body = await call(svc, base, "/proxy/a?" + q, "c1", key=key)
    assert status == 200, body
    assert json.loads(body)["path"] == "/echo/base/a"  # the upstream's own answer (an echo)
    assert CANARY not in json.dumps(headers) and not any(h.lower().startswith("x-cp-") for h in headers)
    assert len(upstream.seen) == 1
