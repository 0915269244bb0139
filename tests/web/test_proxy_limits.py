"""Rate limits at the proxy: configured and learned, 429 shape, waiting, embedded and Redis."""

from __future__ import annotations

import time

from yarl import URL

from tests.support.app import RunningService
from tests.support.upstream import Upstream
from tests.support.wait import wait_until


def hdrs(svc: RunningService, **extra: str) -> dict[str, str]:
    return {**svc.admin_headers, "X-Tenant-Id": "t1", "X-Connection-Id": "c1", **extra}


async def connect(svc: RunningService, upstream: Upstream, **extra: object) -> None:
    await svc.put_connection(
        "t1",
        "c1",
        {
            "integration_id": "http_bearer",
            "parameters": {"token": "t", "base_url": upstream.url + "/"},
            **extra,
        },
    )


async def get(svc: RunningService, path: str, **extra: str) -> tuple[int, dict[str, str], object]:
    async with svc.session.get(svc.url + path, headers=hdrs(svc, **extra)) as r:
        body = await r.json() if r.content_type == "application/json" else await r.read()
        return r.status, dict(r.headers), body


async def test_a_malformed_call_spends_no_quota(svc: RunningService, upstream: Upstream) -> None:
    await connect(svc, upstream, rate_limits=[{"limit": 1, "window": "1h"}])
    for path in ("/proxy/a/%2e%2e/secret", "/proxy/a/..%2fsecret"):
        url = URL(svc.url + path, encoded=True)  # sent as written, not normalised by the client
        async with svc.session.get(url, headers=hdrs(svc)) as r:
            assert r.status in (403, 422) and "X-Proxy-Error" in r.headers
    assert upstream.seen == []
    assert (await get(svc, "/proxy/echo"))[0] == 200  # the one call of the hour is still there
    assert (await get(svc, "/proxy/echo"))[0] == 429


async def test_configured_limit_answers_contract_429(svc: RunningService, upstream: Upstream) -> None:
    await connect(svc, upstream, rate_limits=[{"limit": 2, "window": "1m"}])
    assert (await get(svc, "/proxy/echo"))[0] == 200
    assert (await get(svc, "/proxy/echo"))[0] == 200
    status, headers, body = await get(svc, "/proxy/echo")
    assert status == 429
    assert headers["X-Proxy-Error"] == "RATE_LIMITED"
    assert isinstance(body, dict)
    ms = body["retry_after_ms"]
    assert 0 < ms <= 60_000
    assert int(headers["Retry-After-Ms"]) == ms
    assert int(headers["Retry-After"]) == -(-ms // 1000)  # whole seconds, rounded up
    assert body["limit_source"] == "configured"
    assert len(upstream.seen) == 2


async def test_max_wait_header_waits_then_goes(svc: RunningService, upstream: Upstream) -> None:
    await connect(svc, upstream, rate_limits=[{"limit": 1, "window": "1s"}])
    assert (await get(svc, "/proxy/echo"))[0] == 200
    started = time.monotonic()
    status, _, _ = await get(svc, "/proxy/echo", **{"X-Proxy-Max-Wait-Ms": "3000"})
    waited = time.monotonic() - started
    assert status == 200
    assert 0.5 <= waited < 2.5
    assert len(upstream.seen) == 2


async def test_max_wait_too_short_is_still_429(svc: RunningService, upstream: Upstream) -> None:
    await connect(svc, upstream, rate_limits=[{"limit": 1, "window": "10s"}])
    assert (await get(svc, "/proxy/echo"))[0] == 200
    started = time.monotonic()
    status, _, _ = await get(svc, "/proxy/echo", **{"X-Proxy-Max-Wait-Ms": "100"})
    assert status == 429
    assert time.monotonic() - started < 0.5  # no pointless wait when it cannot be enough


async def test_max_wait_from_connection_options(svc: RunningService, upstream: Upstream) -> None:
    await connect(svc, upstream, rate_limits=[{"limit": 1, "window": "1s"}], options={"max_wait_ms": 3000})
    statuses = [(await get(svc, "/proxy/echo"))[0] for _ in range(2)]
    assert statuses == [200, 200]


async def test_bad_control_header_is_422(svc: RunningService, upstream: Upstream) -> None:
    await connect(svc, upstream)
    status, headers, _ = await get(svc, "/proxy/echo", **{"X-Proxy-Max-Wait-Ms": "soon"})
    assert (status, headers["X-Proxy-Error"]) == (422, "VALIDATION_ERROR")
    assert upstream.seen == []


async def test_learned_from_upstream_429(svc: RunningService, upstream: Upstream) -> None:
    await connect(svc, upstream)
    status, headers, _ = await get(svc, "/proxy/status/429?retry_after=2")
    assert status == 429  # the upstream's own answer, passed through
    assert "X-Proxy-Error" not in headers
    # Merged off the latency path: give the background task a moment.
    answers: list[tuple[int, dict[str, str], object]] = []

    async def limited() -> bool:
        answers.append(await get(svc, "/proxy/echo"))
        return answers[-1][0] == 429

    await wait_until(limited, timeout=1.0, message=lambda: f"not limited: {answers[-1][:2]}")
    status, headers, body = answers[-1]
    assert status == 429
    assert headers["X-Proxy-Error"] == "RATE_LIMITED"
    assert isinstance(body, dict) and body["limit_source"] == "learned"
    reached = len(upstream.seen)
    for _ in range(3):
        assert (await get(svc, "/proxy/echo"))[0] == 429
    assert len(upstream.seen) == reached  # blocked at the proxy, not by the upstream
