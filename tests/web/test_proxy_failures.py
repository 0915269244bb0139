"""Where calls may go, and what happens when the upstream or the caller fails."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.app import RunningService, free_port, running_service
from tests.support.upstream import Upstream, running_upstream
from tests.support.wait import wait_until


@pytest.fixture
async def svc(tmp_path: Path) -> AsyncIterator[RunningService]:
    async with running_service(tmp_path, upstream_max_per_host=2) as s:
        yield s


def hdrs(svc: RunningService, cid: str = "c1", **extra: str) -> dict[str, str]:
    return {**svc.admin_headers, "X-Tenant-Id": "t1", "X-Connection-Id": cid, **extra}


async def connect(svc: RunningService, base_url: str, cid: str = "c1", **extra: Any) -> None:
    await svc.put_connection(
        "t1",
        cid,
        {"integration_id": "http_bearer", "parameters": {"token": "tok", "base_url": base_url}, **extra},
    )


async def get(
    svc: RunningService, path: str, cid: str = "c1", **extra: str
) -> tuple[int, dict[str, str], bytes]:
    async with svc.session.get(svc.url + path, headers=hdrs(svc, cid, **extra)) as r:
        return r.status, dict(r.headers), await r.read()


# --- where calls may go ---------------------------------------------------------------------------


async def test_host_binding(svc: RunningService, upstream: Upstream) -> None:
    await connect(svc, upstream.url, allowed_hosts=["api.example.com"])
    status, headers, _ = await get(svc, "/proxy/echo")
    assert (status, headers["X-Proxy-Error"]) == (403, "HOST_NOT_ALLOWED")
    assert upstream.seen == []


async def test_plain_http_to_a_host_not_allowed_is_refused(svc: RunningService) -> None:
    # No DNS lookup and no connection: the https-only rule refuses before any I/O.
    await connect(svc, "http://api.example.invalid/")
    status, headers, body = await get(svc, "/proxy/x")
    assert (status, headers["X-Proxy-Error"]) == (403, "FORBIDDEN")
    assert b"https" in body


async def test_loopback_address_not_allowed_gets_nothing(tmp_path: Path) -> None:
    async with running_upstream(host="127.0.0.2") as other, running_service(tmp_path) as s:
        for scheme in ("http", "https"):
            await connect(s, f"{scheme}://127.0.0.2:{other.port}/", cid=f"c-{scheme}")
            status, headers, _ = await get(s, "/proxy/echo", cid=f"c-{scheme}")
            assert status == 403
            assert headers["X-Proxy-Error"] in ("HOST_NOT_ALLOWED", "FORBIDDEN")
        assert other.seen == []


async def test_name_resolving_to_loopback_refused_by_the_resolver(tmp_path: Path, upstream: Upstream) -> None:
    # "localhost" passes every check on the name; the guarded resolver refuses its address.
    async with running_service(tmp_path, egress_allow=[]) as s:
        await connect(s, f"https://localhost:{upstream.port}/")
        status, headers, body = await get(s, "/proxy/echo")
        assert (status, headers["X-Proxy-Error"]) == (403, "HOST_NOT_ALLOWED")
        assert b"loopback" in body
    assert upstream.seen == []


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.2",
        "2130706434",
        "0x7f000002",
        "0177.0.0.2",
        "[::ffff:127.0.0.2]",
        "169.254.169.254",
        "10.0.0.1",
        "[::1]",
        "0.0.0.0",
        "100.64.0.1",
    ],
)
async def test_egress_guard_refuses_non_public_literals(svc: RunningService, host: str) -> None:
    await connect(svc, f"https://{host}:{free_port()}/")
    status, headers, _ = await get(svc, "/proxy/x")
    assert (status, headers["X-Proxy-Error"]) == (403, "HOST_NOT_ALLOWED")


# --- upstream failures ----------------------------------------------------------------------------


async def test_unreachable_port_is_502(svc: RunningService) -> None:
    await connect(svc, f"http://127.0.0.1:{free_port()}/")
    status, headers, _ = await get(svc, "/proxy/x")
    assert (status, headers["X-Proxy-Error"]) == (502, "UPSTREAM_UNREACHABLE")


async def test_read_timeout_is_504(svc: RunningService, upstream: Upstream) -> None:
    await connect(svc, upstream.url, options={"timeouts": {"read_s": 0.3}})
    started = time.monotonic()
    status, headers, _ = await get(svc, "/proxy/slow?before=3")
    assert (status, headers["X-Proxy-Error"]) == (504, "UPSTREAM_TIMEOUT")
    assert time.monotonic() - started < 2


async def test_total_timeout_is_504(svc: RunningService, upstream: Upstream) -> None:
    await connect(svc, upstream.url, options={"timeouts": {"total_s": 0.4}})
    status, headers, _ = await get(svc, "/proxy/slow?before=3")
    assert (status, headers["X-Proxy-Error"]) == (504, "UPSTREAM_TIMEOUT")


async def test_stall_mid_body_breaks_the_response(svc: RunningService, upstream: Upstream) -> None:
    await connect(svc, upstream.url, options={"timeouts": {"read_s": 0.3}})
    async with svc.session.get(svc.url + "/proxy/slow?mid=3&chunked=1", headers=hdrs(svc)) as r:
        assert r.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()
    # A small sized answer is read whole first, so the stall is reported as such.
    status, headers, _ = await get(svc, "/proxy/slow?mid=3")
    assert (status, headers["X-Proxy-Error"]) == (504, "UPSTREAM_TIMEOUT")


@pytest.mark.parametrize("chunked", [False, True])
async def test_upstream_dying_mid_body_breaks_the_response(
    svc: RunningService, upstream: Upstream, chunked: bool
) -> None:
    await connect(svc, upstream.url)
    q = "size=1000000&after=100000" + ("&chunked=1" if chunked else "")
    async with svc.session.get(svc.url + "/proxy/die?" + q, headers=hdrs(svc)) as r:
        assert r.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()
    assert "died" in upstream.events


async def test_small_body_broken_off_is_a_clean_502(svc: RunningService, upstream: Upstream) -> None:
    # Small sized answers are read whole before replying, so the failure can still be reported.
    await connect(svc, upstream.url)
    status, headers, _ = await get(svc, "/proxy/die?size=5000&after=1000")
    assert (status, headers["X-Proxy-Error"]) == (502, "UPSTREAM_UNREACHABLE")


async def test_per_host_cap_fails_fast(svc: RunningService, upstream: Upstream) -> None:
    await connect(svc, upstream.url)
    hanging = [asyncio.create_task(get(svc, "/proxy/hang")) for _ in range(2)]
    try:
        await wait_until(lambda: upstream.events.count("hang-started") == 2, timeout=2.0)
        started = time.monotonic()
        status, headers, _ = await get(svc, "/proxy/echo")
        assert (status, headers["X-Proxy-Error"]) == (503, "SERVICE_UNAVAILABLE")
        assert time.monotonic() - started < 0.5
        assert len(upstream.seen) == 2  # the third call never left
        async with svc.session.get(svc.url + "/metrics") as r:
            assert "proxy_upstream_inflight 2.0" in await r.text()
    finally:
        for t in hanging:
            t.cancel()
        await asyncio.gather(*hanging, return_exceptions=True)
    # Slots are released when callers go away: the host is usable again.
    await upstream.wait_event("hang-cancelled")
    statuses: list[int] = []

    async def served() -> bool:
        statuses.append((await get(svc, "/proxy/echo"))[0])
        return statuses[-1] == 200

    await wait_until(served, timeout=5.0, interval=0.1, message=lambda: f"still answering {statuses[-1]}")


# --- the caller going away --------------------------------------------------------------------------


async def test_client_disconnect_before_headers_cancels_upstream(
    svc: RunningService, upstream: Upstream
) -> None:
    await connect(svc, upstream.url)
    port = int(svc.url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(
        (
            f"GET /proxy/hang HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {svc.admin_token}\r\n"
            "X-Tenant-Id: t1\r\nX-Connection-Id: c1\r\n\r\n"
        ).encode()
    )
    await upstream.wait_event("hang-started")
    sock.close()
    await upstream.wait_event("hang-cancelled", timeout=3)


async def test_client_disconnect_mid_body_stops_upstream(svc: RunningService, upstream: Upstream) -> None:
    await connect(svc, upstream.url)
    async with svc.session.get(svc.url + "/proxy/trickle", headers=hdrs(svc)) as r:
        assert r.status == 200
        await r.content.read(2048)
        r.close()  # drop the connection mid-body
    await upstream.wait_event("trickle-stopped", timeout=3)


# --- retries ------------------------------------------------------------------------------------------


async def test_get_retried_on_503_then_succeeds(svc: RunningService, upstream: Upstream) -> None:
    await connect(svc, upstream.url)
    status, _, body = await get(svc, "/proxy/flaky/a?fail=2&code=503", **{"X-Proxy-Retries": "3"})
    assert status == 200, body
    assert len(upstream.seen) == 3


async def test_retries_from_connection_options(svc: RunningService, upstream: Upstream) -> None:
    await connect(svc, upstream.url, options={"retries": 2})
    status, _, _ = await get(svc, "/proxy/flaky/o?fail=1&code=502")
    assert status == 200
    assert len(upstream.seen) == 2


async def test_no_retries_unless_asked(svc: RunningService, upstream: Upstream) -> None:
    await connect(svc, upstream.url)
    status, _, _ = await get(svc, "/proxy/flaky/n?fail=1&code=503")
    assert status == 503
    assert len(upstream.seen) == 1


async def test_post_without_idempotency_key_never_retried(svc: RunningService, upstream: Upstream) -> None:
    await connect(svc, upstream.url)
    async with svc.session.post(
        svc.url + "/proxy/flaky/p?fail=1&code=503",
        data=b"payload",
        headers=hdrs(svc, **{"X-Proxy-Retries": "5"}),
    ) as r:
        assert r.status == 503
    assert len(upstream.seen) == 1


async def test_post_with_idempotency_key_retried_with_same_body(
    svc: RunningService, upstream: Upstream
) -> None:
    await connect(svc, upstream.url)
    extra = {"X-Proxy-Retries": "2", "Idempotency-Key": "k-1"}
    async with svc.session.post(
        svc.url + "/proxy/flaky/i?fail=1&code=503", data=b"payload", headers=hdrs(svc, **extra)
    ) as r:
        assert r.status == 200
        assert (await r.json())["body_len"] == 7
    assert [s.body_len for s in upstream.seen] == [7, 7]
    assert upstream.seen[1].header("Idempotency-Key") == ["k-1"]


async def test_streamed_body_not_retried(svc: RunningService, upstream: Upstream) -> None:
    await connect(svc, upstream.url)

    async def gen() -> AsyncIterator[bytes]:
        yield b"x" * 1000

    extra = {"X-Proxy-Retries": "2", "Idempotency-Key": "k-2"}
    async with svc.session.put(
        svc.url + "/proxy/flaky/s?fail=1&code=503", data=gen(), headers=hdrs(svc, **extra)
    ) as r:
        assert r.status == 503  # chunked upload: cannot be replayed, so not retried
    assert len(upstream.seen) == 1


async def test_retry_honours_retry_after(svc: RunningService, upstream: Upstream) -> None:
    await connect(svc, upstream.url)
    started = time.monotonic()
    status, _, _ = await get(svc, "/proxy/flaky/r?fail=1&code=429&retry_after=1", **{"X-Proxy-Retries": "1"})
    assert status == 200
    assert time.monotonic() - started >= 1.0
    assert len(upstream.seen) == 2


async def test_retry_never_past_total_timeout(svc: RunningService, upstream: Upstream) -> None:
    await connect(svc, upstream.url, options={"timeouts": {"total_s": 1}})
    started = time.monotonic()
    status, headers, _ = await get(
        svc, "/proxy/flaky/t?fail=1&code=503&retry_after=5", **{"X-Proxy-Retries": "3"}
    )
    assert status == 503  # the upstream's own answer, handed back instead of waiting 5 s
    assert headers["Retry-After"] == "5"
    assert time.monotonic() - started < 1
    assert len(upstream.seen) == 1


async def test_refused_calls_are_audited_in_the_callers_own_tenant(
    svc: RunningService, upstream: Upstream
) -> None:
    """A refusal before the call became a use is a ``proxy.use`` with the error code, in the
    caller's tenant; one naming another tenant's connection carries none of the ids it named;
    an unauthenticated one is in no trail."""
    await connect(svc, upstream.url + "/echo")
    key = await svc.mint_key("t1")
    key_id = key.split("_")[1]
    session = svc.session
    for extra in ({"X-Connection-Id": "nope"}, {"X-Connection-Id": "c1", "X-Tenant-Id": "t2"}):
        async with session.get(
            f"{svc.url}/proxy/x", headers={"Authorization": f"Bearer {key}", **extra}
        ) as r:
            assert r.status == 404
    async with session.get(
        f"{svc.url}/proxy/x", headers={"Authorization": "Bearer cpk_nokey_x", "X-Tenant-Id": "t3"}
    ) as r:
        assert r.status == 401
    await svc.flush_audit()
    _, body = await svc.admin("GET", f"/admin/tenants/t1/audit?actor=api_key:{key_id}")
    got = {(e["action"], e["outcome"], e["connection_id"]) for e in body["items"]}
    assert got == {("proxy.use", "CONNECTION_NOT_FOUND", "nope"), ("proxy.use", "CONNECTION_NOT_FOUND", None)}
    for other in ("t2", "t3"):
        _, body = await svc.admin("GET", f"/admin/tenants/{other}/audit")
        assert body["items"] == []
