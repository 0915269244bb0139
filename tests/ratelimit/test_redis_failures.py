"""The shared limiter when Redis fails or is slow: fail modes, the breaker, a bounded wait, and a
slow reply that must not stretch a cached denial past the real one."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from proxy.errors import ServiceUnavailable
from proxy.model import RateWindow
from proxy.observe.metrics import REGISTRY
from proxy.ratelimit.limiter import LimitTarget
from proxy.ratelimit.redis import RedisLimiter
from proxy.store.redisconn import connect
from tests.support.redis_server import RedisServer
from tests.support.wait import wait_until

# Redis is up (or refuses at once, when stopped) unless a test makes it slow or silent itself.
LIVE_TIMEOUT_S = 10.0


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
async def lim(redis_url: str) -> AsyncIterator[RedisLimiter]:
    limiter = RedisLimiter.create(redis_url, fail_mode="open", timeout_s=LIVE_TIMEOUT_S)
    yield limiter
    await limiter.close()


def errors(mode: str) -> float:
    return REGISTRY.get_sample_value("proxy_ratelimit_backend_errors_total", {"mode": mode}) or 0.0


@pytest.mark.system
async def test_fail_open_falls_back_counts_and_resumes(
    redis_server: RedisServer, redis_url: str, lim: RedisLimiter, raw: Redis
) -> None:  # lim, raw: the fixtures below
    target = LimitTarget("t/c", (RateWindow(3, 60.0),))
    assert (await lim.acquire(target)).source == "configured"
    redis_server.stop()
    try:
        before = errors("open")
        got = [await lim.acquire(target) for _ in range(5)]
        assert [d.allowed for d in got] == [True, True, True, False, False]  # same windows, locally
        assert {d.source for d in got} == {"fallback"}
        assert errors("open") - before == 5
        assert (await lim.peek(target)).is_limited
        assert (await lim.describe(target))["backend"] == "fallback"
    finally:
        redis_server.start()
    await asyncio.sleep(1.1)  # the breaker lets Redis be tried again by itself
    d = await lim.acquire(target)
    assert d.allowed and d.source == "configured"  # fresh Redis (no persistence), script reloaded
    assert await raw.exists("{rl:t/c}:s") == 1


@pytest.mark.system
async def test_fail_closed_refuses_then_resumes(redis_server: RedisServer, redis_url: str) -> None:
    lim = RedisLimiter.create(redis_url, fail_mode="closed", timeout_s=LIVE_TIMEOUT_S)
    target = LimitTarget("t/c", (RateWindow(3, 60.0),))
    try:
        assert (await lim.acquire(target)).allowed
        redis_server.stop()
        try:
            before = errors("closed")
            with pytest.raises(ServiceUnavailable, match="ratelimit_fail_mode is 'closed'"):
                await lim.acquire(target)
            with pytest.raises(ServiceUnavailable):
                await lim.peek(target)
            assert errors("closed") - before == 2
        finally:
            redis_server.start()
        await asyncio.sleep(1.1)
        assert (await lim.acquire(target)).source == "configured"
    finally:
        await lim.close()


async def test_unresponsive_redis_is_bounded_and_not_hammered() -> None:
    received: list[bytes] = []
    connections: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        while chunk := await reader.read(1024):
            received.append(chunk)  # a black hole: accepts, never answers
        writer.close()

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    # breaker_s is long enough that a loaded machine cannot let it lapse during the 20 calls.
    lim = RedisLimiter(
        connect(f"redis://127.0.0.1:{port}/0", timeout_s=0.2),
        fail_mode="open",
        timeout_s=0.2,
        breaker_s=60,
        owns_client=True,
    )
    try:
        target = LimitTarget("t/c", (RateWindow(3, 60.0),))
        # Bounded: the call gives up on its own (after timeout_s) and the fallback answers; the
        # outer deadline only keeps a regression from hanging the suite.
        async with asyncio.timeout(30):
            first = await lim.acquire(target)
        assert first.source == "fallback"
        await wait_until(lambda: received, timeout=10, message="the call never reached the server")
        sent, opened = len(received), len(connections)
        # Not hammered: the open breaker answers without a byte or a connection to the server.
        for _ in range(20):
            assert (await lim.acquire(target)).source == "fallback"
        await asyncio.sleep(0.05)  # anything sent would have arrived by now
        assert (len(received), len(connections)) == (sent, opened)
    finally:
        await lim.close()
        server.close()
        await server.wait_closed()


async def test_a_slow_reply_does_not_stretch_a_cached_denial(redis_server: RedisServer) -> None:
    """A denial is cached until it ends as Redis reckoned it, counted from before the round trip:
    a reply that took ``delay_s`` to arrive must not make this replica refuse that much longer."""
    delay_s = 0.4
    relays: list[asyncio.Task[Any]] = []

    async def relay(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        relays.append(task)
        server_r, server_w = await asyncio.open_connection("127.0.0.1", redis_server.port)

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter, delay: float) -> None:
            while chunk := await r.read(65536):
                await asyncio.sleep(delay)  # replies only: one chunk at a time, in order
                w.write(chunk)
                await w.drain()
            w.close()

        await asyncio.gather(pipe(client_r, server_w, 0.0), pipe(server_r, client_w, delay_s))

    server = await asyncio.start_server(relay, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    lim = RedisLimiter.create(f"redis://127.0.0.1:{port}/0", fail_mode="closed", timeout_s=LIVE_TIMEOUT_S)
    try:
        target = LimitTarget("t/slow", (RateWindow(1, 3.0),))  # one call per 3 s
        await lim.peek(LimitTarget("t/warm", (RateWindow(1, 3.0),)))  # connected, script loaded
        first = await lim.acquire(target)  # one round trip; the answer says "full for 3 s": cached
        assert first.allowed and first.state.is_limited
        # Redis admitted it at least delay_s before its reply arrived: the next is due by then + 3 s.
        due = time.monotonic() - delay_s + 3.0
        cached = await lim.acquire(target)
        left_ms = (due - time.monotonic()) * 1000
        # Read-time + retry_after would be delay_s (400 ms) late; send-time + retry_after is not.
        assert cached.source == "local-cache" and 0 < cached.retry_after_ms <= left_ms + 2, (cached, left_ms)
    finally:
        await lim.close()  # its connections close, so every relay ends
        await asyncio.wait_for(asyncio.gather(*relays, return_exceptions=True), 10)
        server.close()
        await server.wait_closed()
