"""Sending a prepared call: the per-host cap, opt-in retries that ask the limiter again, and the
statuses never relayed. Real upstream on 127.0.0.1, real aiohttp client, the real local limiter."""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import MappingProxyType
from typing import Any

import aiohttp
import pytest
from aiohttp import ClientTimeout
from yarl import URL

from proxy.catalogue import Catalogue
from proxy.errors import RateLimited, ServiceUnavailable
from proxy.model import ConnectionRecord, RateWindow
from proxy.pipeline.exchange import Exchange
from proxy.pipeline.plan import Plan
from proxy.pipeline.send import send
from proxy.ratelimit.limiter import LocalLimiter
from proxy.security.egress import EgressPolicy
from proxy.settings import Settings
from proxy.vault.records import Credentials
from tests.support.upstream import Upstream, running_upstream

CAT = Catalogue.load()


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    async with running_upstream() as up:
        yield up


def exchange(up: Upstream, path: str, *, retries: int, windows: tuple[RateWindow, ...] = ()) -> Exchange:
    rec = ConnectionRecord(
        tenant_id="t1", connection_id="c1", integration_id="http_bearer", rate_limits=windows
    )
    creds = Credentials(
        record=rec,
        integration=CAT.get("http_bearer"),
        params=MappingProxyType({"token": "x", "base_url": up.url}),
    )
    plan = Plan(creds, EgressPolicy(("127.0.0.1/32",)), Settings())
    return Exchange(
        caller=None,  # type: ignore[arg-type]  # not read while sending
        tenant_id="t1",
        connection_id="c1",
        request_id="r1",
        method="GET",
        plan=plan,
        url=URL(up.url + path),
        headers=[],
        timeout=ClientTimeout(total=10, sock_connect=2, sock_read=5),
        retries=retries,
        host_key="127.0.0.1:1",
    )


async def _send(
    ex: Exchange, limiter: LocalLimiter, inflight: dict[str, int], **kw: Any
) -> aiohttp.ClientResponse:
    seen: list[int] = []
    async with aiohttp.ClientSession() as session:
        resp = await send(
            ex,
            None,
            idempotency_key=False,
            session=session,
            limiter=limiter,
            observe=lambda plan, status, headers, token: seen.append(status),
            inflight=inflight,
            cap=kw.get("cap", 4),
        )
        await resp.read()
        resp.statuses = seen  # type: ignore[attr-defined]
        return resp


async def test_a_full_host_is_refused_before_anything_is_sent(upstream: Upstream) -> None:
    inflight = {"127.0.0.1:1": 2}
    with pytest.raises(ServiceUnavailable):
        await _send(exchange(upstream, "/echo/a", retries=0), LocalLimiter(), inflight, cap=2)
    assert inflight == {"127.0.0.1:1": 2} and not upstream.seen


async def test_retries_observe_every_answer_and_take_the_slot_once(upstream: Upstream) -> None:
    inflight: dict[str, int] = {}
    resp = await _send(
        exchange(upstream, "/flaky/k1?fail=2&retry_after=0", retries=2), LocalLimiter(), inflight
    )
    assert resp.status == 200 and resp.statuses == [503, 503, 200]  # type: ignore[attr-defined]
    assert inflight == {"127.0.0.1:1": 1}  # held until the pipeline's finish gives it back
    assert len(upstream.seen) == 3


async def test_a_retry_that_the_limit_does_not_allow_is_not_sent(upstream: Upstream) -> None:
    ex = exchange(upstream, "/flaky/k2?fail=5&retry_after=0", retries=3, windows=(RateWindow(1, 3600.0),))
    limiter = LocalLimiter()
    assert (await limiter.acquire(ex.plan.target)).allowed  # the first call's own admission
    with pytest.raises(RateLimited):
        await _send(ex, limiter, {})
    assert len(upstream.seen) == 1
