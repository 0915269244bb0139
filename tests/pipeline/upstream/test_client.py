"""The upstream session against a real upstream on 127.0.0.1: read-timeout semantics of the lazy
timer, and a guard that notices when an aiohttp upgrade silently drops the fast paths."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest

from proxy.pipeline.upstream.aiohttp_internals import (
    SKIP_AUTO_HEADERS,
    LazyReadTimeoutProtocol,
    UpstreamRequest,
    install_lazy_read_timeout,
)
from proxy.pipeline.upstream.client import make_session
from proxy.security.egress import EgressPolicy
from proxy.settings import load_settings
from tests.support.upstream import Upstream


def _session(tmp_path: Path) -> aiohttp.ClientSession:
    settings = load_settings(env={}, overrides={"data_dir": str(tmp_path), "egress_allow": ["127.0.0.1/32"]})
    return make_session(settings, EgressPolicy(settings.egress_allow))


async def test_the_fast_paths_are_installed_with_this_aiohttp(tmp_path: Path) -> None:
    # If this fails after an aiohttp upgrade, the service still works (stock aiohttp behaviour)
    # but pays a timer per chunk again: re-check the overridden internals.
    connector = aiohttp.TCPConnector()
    try:
        assert install_lazy_read_timeout(connector)
        assert connector._factory().__class__ is LazyReadTimeoutProtocol
    finally:
        await connector.close()
    async with _session(tmp_path) as session:
        assert session._request_class is UpstreamRequest
        assert session.connector is not None
        assert session.connector._factory.func is LazyReadTimeoutProtocol


async def test_no_headers_of_aiohttps_own_are_added(tmp_path: Path, upstream: Upstream) -> None:
    async with _session(tmp_path) as session, session.get(upstream.url + "/echo", data=b"{}") as r:
        assert r.status == 200
    names = upstream.seen[-1].header_names
    assert not names & {h.lower() for h in SKIP_AUTO_HEADERS}


async def test_a_slow_but_steady_body_is_not_timed_out(tmp_path: Path, upstream: Upstream) -> None:
    # 1 KiB every 20 ms for 0.6 s under a 0.25 s read timeout: every gap is far below it, the
    # whole transfer is not, so the deadline must move with each chunk.
    timeout = aiohttp.ClientTimeout(sock_read=0.25)
    got = 0
    async with _session(tmp_path) as session, session.get(upstream.url + "/trickle", timeout=timeout) as r:
        started = time.monotonic()
        while time.monotonic() - started < 0.6:
            got += len(await r.content.readany())
    assert got >= 10 * 1024


@pytest.mark.parametrize("where", ["before", "mid"])
async def test_a_stall_times_out_after_the_read_timeout(
    tmp_path: Path, upstream: Upstream, where: str
) -> None:
    timeout = aiohttp.ClientTimeout(sock_read=0.3)
    async with _session(tmp_path) as session:
        started = time.monotonic()
        with pytest.raises((aiohttp.SocketTimeoutError, aiohttp.ClientPayloadError)):
            async with session.get(f"{upstream.url}/slow?{where}=3", timeout=timeout) as r:
                await r.read()
        took = time.monotonic() - started
    assert 0.3 <= took < 1.5


async def test_a_kept_alive_connection_times_each_response_afresh(tmp_path: Path, upstream: Upstream) -> None:
    # The timer outlives the first response on the pooled connection; the second, stalled
    # response must still time out after its own read timeout, not the first one's leftovers.
    timeout = aiohttp.ClientTimeout(sock_read=0.3)
    async with _session(tmp_path) as session:
        async with session.get(upstream.url + "/echo", timeout=timeout) as r:
            await r.read()
        await asyncio.sleep(0.2)
        started = time.monotonic()
        with pytest.raises(aiohttp.SocketTimeoutError):
            async with session.get(upstream.url + "/slow?before=3", timeout=timeout) as r:
                await r.read()
        assert 0.3 <= time.monotonic() - started < 1.5
        # And a prompt answer on the same pool after the timeout is unaffected.
        async with session.get(upstream.url + "/echo", timeout=timeout) as r:
            assert r.status == 200


async def test_a_shorter_read_timeout_after_a_longer_one_on_the_same_connection(
    tmp_path: Path, upstream: Upstream
) -> None:
    # Calls of connections with different timeouts share pooled connections to one host.
    async with _session(tmp_path) as session:
        async with session.get(upstream.url + "/echo", timeout=aiohttp.ClientTimeout(sock_read=30)) as r:
            await r.read()
        started = time.monotonic()
        with pytest.raises(aiohttp.SocketTimeoutError):
            async with session.get(
                upstream.url + "/slow?before=3", timeout=aiohttp.ClientTimeout(sock_read=0.3)
            ) as r:
                await r.read()
        assert 0.3 <= time.monotonic() - started < 1.5


async def test_a_lost_connection_cancels_its_timer(tmp_path: Path, upstream: Upstream) -> None:
    async with _session(tmp_path) as session:
        async with session.get(upstream.url + "/echo", timeout=aiohttp.ClientTimeout(sock_read=30)) as r:
            await r.read()
            assert r.connection is None or r.connection.protocol is not None
        connector = session.connector
        assert connector is not None
        protocols = [proto for conns in connector._conns.values() for proto, _ in conns]
        assert protocols and all(isinstance(p, LazyReadTimeoutProtocol) for p in protocols)
        armed = [p for p in protocols if p._read_timeout_handle is not None]
        assert armed  # the 30 s timer outlives the response on the idle pooled connection
    # Closing the session loses every connection: the timers go with them.
    assert all(p._read_timeout_handle is None for p in protocols)
