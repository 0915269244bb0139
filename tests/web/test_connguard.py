"""Connection bounds on real sockets: the request-head deadline and the connection cap."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.web_protocol import RequestHandler

from proxy.web.connguard import HANDLER_INTERNALS, handler_internals_present, plan_connections
from tests.support.app import RunningService, running_service
from tests.support.wait import wait_until

HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"


async def connect(svc: RunningService) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = svc.url.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port))


async def response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length body."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", "0"))), 5)
    return int(lines[0].split()[1]), headers, body


async def closed_by_server(reader: asyncio.StreamReader, within: float) -> bool:
    try:
        return await asyncio.wait_for(reader.read(1), within) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_the_aiohttp_internals_the_guard_reads_still_exist() -> None:
    # If this fails, aiohttp changed RequestHandler: re-check proxy/web/connguard.py's _Guarded.
    assert handler_internals_present(), HANDLER_INTERNALS
    assert RequestHandler.data_received.__qualname__ == "RequestHandler.data_received"


# --- head deadline ---------------------------------------------------------------------------


@pytest.fixture
async def quick_heads(tmp_path: Path) -> AsyncIterator[RunningService]:
    async with running_service(tmp_path, head_timeout_s=0.4) as s:
        yield s


async def test_a_half_sent_head_is_closed_after_the_deadline(quick_heads: RunningService) -> None:
    reader, writer = await connect(quick_heads)
    started = time.monotonic()
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: t\r\n")  # no blank line: the head never ends
    await writer.drain()
    assert await closed_by_server(reader, 5)
    assert time.monotonic() - started >= 0.35
    writer.close()
    # A prompt client on a new connection is served as usual.
    reader, writer = await connect(quick_heads)
    writer.write(HEALTHZ)
    assert (await response(reader))[0] == 200
    writer.close()


async def test_a_silent_new_connection_is_closed_too(quick_heads: RunningService) -> None:
    reader, writer = await connect(quick_heads)
    assert await closed_by_server(reader, 5)
    writer.close()


async def test_an_https_listener_bounds_the_handshake_and_then_the_head(tmp_path: Path) -> None:
    """With the listener over TLS, a client silent before or during its handshake is closed
    after head_timeout_s, and so is one that completes the handshake but sends no head."""
    import ssl

    from proxy.web.tunnel import TUNNEL_CA

    async with running_service(tmp_path, head_timeout_s=0.4, listen_tls_hostnames=["127.0.0.1"]) as svc:
        port = int(svc.url.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        started = time.monotonic()
        assert await closed_by_server(reader, 5)  # no ClientHello at all
        assert time.monotonic() - started >= 0.35
        writer.close()
        ctx = ssl.create_default_context(cadata=svc.app[TUNNEL_CA].bundle_pem)
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
        assert await closed_by_server(reader, 5)  # handshake done, then nothing
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
        writer.write(HEALTHZ)
        assert (await response(reader))[0] == 200  # a prompt TLS client is served
        writer.close()


async def test_failed_tls_handshakes_free_their_connection_slots(tmp_path: Path) -> None:
    """asyncio never tells a protocol about a connection whose handshake failed; the guard runs
    the handshake itself, so plain-HTTP clients, scanners and clients that do not trust the
    certificate cannot fill max_connections."""
    import ssl

    from proxy.web.tunnel import TUNNEL_CA

    async with running_service(
        tmp_path, max_connections=2, connection_reserve=0, listen_tls_hostnames=["127.0.0.1"]
    ) as svc:
        assert svc.guard is not None
        port = int(svc.url.rsplit(":", 1)[1])
        untrusting = ssl.create_default_context()  # system roots only: refuses the certificate
        for n in range(6):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            if n % 2:
                writer.write(HEALTHZ)  # plain HTTP to the TLS port
                assert await closed_by_server(reader, 5)
                writer.close()
            else:
                with pytest.raises(ssl.SSLCertVerificationError):
                    await asyncio.open_connection("127.0.0.1", port, ssl=untrusting)
                writer.close()
        await wait_until(lambda: svc.guard is not None and svc.guard.open == 0, 5, 0.02)
        ctx = ssl.create_default_context(cadata=svc.app[TUNNEL_CA].bundle_pem)
        for _ in range(2):  # both slots are free: served on the main lane, not refused
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
            writer.write(HEALTHZ)
            assert (await response(reader))[0] == 200
            writer.close()


async def test_kept_alive_connections_idle_freely_but_a_dribbled_next_head_is_closed(
    quick_heads: RunningService,
) -> None:
    reader, writer = await connect(quick_heads)
    writer.write(HEALTHZ)
    assert (await response(reader))[0] == 200
    # Idle between requests for longer than the head deadline: still open (keep-alive's business).
    assert not await closed_by_server(reader, 1.0)
    writer.write(HEALTHZ)
    assert (await response(reader))[0] == 200
    # Now the next head arrives a byte at a time, never completing within the deadline.
    started = time.monotonic()
    closed = False
    for byte in b"GET /healthz HTTP/1.1\r\nHost: t\r\n":
        try:
            writer.write(bytes([byte]))
            await writer.drain()
        except ConnectionError:
            closed = True
            break
        if await closed_by_server(reader, 0.1):
            closed = True
            break
    assert closed, "the dribbled head was never cut off"
    assert 0.35 <= time.monotonic() - started < 3
    writer.close()


# --- connection cap --------------------------------------------------------------------------


async def test_connection_cap_refuses_beyond_the_limit_and_recovers(tmp_path: Path) -> None:
    async with running_service(tmp_path, max_connections=3, connection_reserve=2, head_timeout_s=30) as svc:
        held = [await connect(svc) for _ in range(3)]  # fill the cap with idle connections
        await wait_until(lambda: svc.guard is not None and svc.guard.open == 3, timeout=2.0)
        # The reserve: /healthz answers on a new connection although the service is full...
        reader, writer = await connect(svc)
        writer.write(HEALTHZ)
        status, headers, body = await response(reader)
        assert (status, json.loads(body)) == (200, {"status": "ok"})
        assert headers["connection"].lower() == "close"
        writer.close()
        # ...and anything else gets a 503 that names the setting.
        reader, writer = await connect(svc)
        writer.write(b"GET /readyz HTTP/1.1\r\nHost: t\r\n\r\n")
        status, headers, body = await response(reader)
        data = json.loads(body)
        assert (status, data["error"], headers["x-proxy-error"]) == (
            503,
            "SERVICE_UNAVAILABLE",
            "SERVICE_UNAVAILABLE",
        )
        assert "max_connections" in data["message"] and headers["retry-after"] == "1"
        writer.close()
        # Reserve full (two half-open ops connections): the next one is closed before a byte is read.
        ops = [await connect(svc) for _ in range(2)]
        await wait_until(lambda: svc.guard is not None and len(svc.guard._ops_conns) == 2, timeout=2.0)
        reader, writer = await connect(svc)
        assert await closed_by_server(reader, 2)
        writer.close()
        # The existing connections are still served.
        r0, w0 = held[0]
        w0.write(HEALTHZ)
        assert (await response(r0))[0] == 200
        # Recovery: once clients leave, new connections are served normally again.
        for _, w in held + ops:
            w.close()

        async def ready() -> bool:
            reader, writer = await connect(svc)
            writer.write(b"GET /readyz HTTP/1.1\r\nHost: t\r\n\r\n")
            try:
                status = (await response(reader))[0]
            except (asyncio.IncompleteReadError, ConnectionError):
                status = 0  # still refused: the server has not seen the closes yet
            writer.close()
            return status == 200

        await wait_until(ready, timeout=5, interval=0.05, message="/readyz never answered 200 again")
        assert svc.guard is not None and svc.guard.open <= 3


# --- descriptor plan -------------------------------------------------------------------------


def test_the_cap_is_lowered_to_what_the_descriptor_limit_covers() -> None:
    plan = plan_connections(1024, 16, limits=(1024, 1024), in_use=20)
    assert plan.lowered
    assert plan.max_connections == (1024 - 20 - 64 - 16) // 2
    assert "RLIMIT_NOFILE is 1024" in plan.message and "max_connections" in plan.message
    plan = plan_connections(1024, 16, limits=(65536, 65536), in_use=20)
    assert (plan.lowered, plan.max_connections) == (False, 1024)
    assert "65536" in plan.message
