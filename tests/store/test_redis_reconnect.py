"""Pooled Redis connections that died without a FIN (a restarted container, a dropped NAT entry)
do not fail calls once Redis answers again.

A real TCP relay sits between the clients and redis-server; ``cut()`` drops its upstream side
silently and answers the next bytes a client sends on an old connection with a reset, which is
what such a connection does after a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator

import pytest

from proxy.model import ConnectionRecord, RateWindow
from proxy.ratelimit.limiter import LimitTarget
from proxy.ratelimit.redis import RedisLimiter
from proxy.store import redisconn
from proxy.store.redis import RedisStore
from tests.support.redis_server import RedisServer


class Relay:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.server: asyncio.Server | None = None
        self.port = 0
        self._poisoned: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter, list[bool]]] = []

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        dead = [False]
        self._poisoned.append((writer, up_w, dead))

        async def to_server() -> None:
            while data := await reader.read(65536):
                if dead[0]:
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    writer.transport.abort()  # RST: the peer this connection knew is gone
                    return
                up_w.write(data)
                await up_w.drain()

        async def to_client() -> None:
            with contextlib.suppress(ConnectionError):
                while data := await up_r.read(65536):
                    writer.write(data)
                    await writer.drain()
            # Upstream gone: the client side stays open and silent, no FIN.

        with contextlib.suppress(ConnectionError):
            await asyncio.gather(to_server(), to_client())

    def cut(self) -> None:
        for _client, upstream, dead in self._poisoned:
            dead[0] = True
            upstream.transport.abort()
        self._poisoned.clear()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()


@pytest.fixture
async def relay(redis_server: RedisServer, redis_url: str) -> AsyncIterator[Relay]:
    r = Relay(redis_server.port)
    await r.start()
    yield r
    await r.close()


async def test_reads_after_dead_connections_are_retried_once_on_a_fresh_one(relay: Relay) -> None:
    store = RedisStore(f"redis://127.0.0.1:{relay.port}/0", timeout_s=1.0)
    await store.open()
    try:
        stored = await store.put_connection(ConnectionRecord("t", "c", "x"), None)
        # Several pooled connections, all of which die silently.
        await asyncio.gather(*(store.get_connection("t", "c") for _ in range(8)))
        relay.cut()
        got = await asyncio.gather(*(store.get_connection("t", "c") for _ in range(8)))
        assert got == [stored] * 8
        await store.ping()
    finally:
        await store.close()


async def test_idle_dead_connections_are_health_checked_before_a_non_idempotent_call(
    relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redisconn, "HEALTH_CHECK_S", 0.2)
    limiter = RedisLimiter.create(f"redis://127.0.0.1:{relay.port}/0", fail_mode="closed", timeout_s=1.0)
    target = LimitTarget("t/c", (RateWindow(100, 60.0),))
    try:
        assert (await limiter.acquire(target)).source == "configured"
        relay.cut()
        await asyncio.sleep(0.4)  # idle past the interval: PINGed (and replaced) before use
        decision = await limiter.acquire(target)  # fail-closed: a failure would raise
        assert decision.allowed and decision.source == "configured"
        assert decision.state.remaining == 98  # counted once per call, never twice
    finally:
        await limiter.close()


async def test_a_busy_dead_connection_does_not_repeat_a_non_idempotent_call(relay: Relay) -> None:
    """No health check is due (it was used just now), so the acquire meets the dead connection:
    it fails rather than risk consuming quota twice, and the next call works."""
    limiter = RedisLimiter.create(f"redis://127.0.0.1:{relay.port}/0", fail_mode="open", timeout_s=1.0)
    target = LimitTarget("t/c2", (RateWindow(100, 60.0),))
    try:
        assert (await limiter.acquire(target)).source == "configured"
        relay.cut()
        assert (await limiter.acquire(target)).source == "fallback"
        await asyncio.sleep(1.1)  # the limiter's breaker
        assert (await limiter.acquire(target)).source == "configured"
    finally:
        await limiter.close()
