"""The egress guard inside a real aiohttp client, against a real server on 127.0.0.1."""

from __future__ import annotations

import socket
from collections.abc import Sequence

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from proxy.errors import HostNotAllowed
from proxy.pipeline.upstream.resolver import SKIP_LITERAL_GUARD, GuardedResolver, literal_guard_middleware
from proxy.security.egress import EgressPolicy


@pytest.fixture
async def server(aiohttp_server: AiohttpServer) -> TestServer:
    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="upstream ok")

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(request.query["to"])

    app = web.Application()
    app.router.add_get("/ok", ok)
    app.router.add_get("/redirect", redirect)
    return await aiohttp_server(app, host="127.0.0.1")


def _session(policy: EgressPolicy, inner: AbstractResolver | None = None) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(resolver=GuardedResolver(policy, inner), use_dns_cache=False)
    return aiohttp.ClientSession(connector=connector, middlewares=(literal_guard_middleware(policy),))


class StubResolver(AbstractResolver):
    """Answers every lookup with fixed addresses, as a rebinding DNS server would."""

    def __init__(self, addresses: Sequence[str]) -> None:
        self.addresses = list(addresses)
        self.calls: list[str] = []
        self.closed = False

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.calls.append(host)
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for address in self.addresses
        ]

    async def close(self) -> None:
        self.closed = True


async def test_loopback_literal_refused_without_allow(server: TestServer) -> None:
    async with _session(EgressPolicy([])) as session:
        with pytest.raises(HostNotAllowed, match="loopback"):
            await session.get(f"http://127.0.0.1:{server.port}/ok")


async def test_skip_literal_guard_drops_the_literal_guard_for_that_request_only(server: TestServer) -> None:
    # The pipeline sends every proxied call with SKIP_LITERAL_GUARD after checking the host
    # itself. This fails if aiohttp stops replacing the session's middlewares with a request's
    # (the guard would then run twice: slower, not unsafe).
    url = f"http://127.0.0.1:{server.port}/ok"
    async with _session(EgressPolicy([])) as session:
        async with session.get(url, middlewares=SKIP_LITERAL_GUARD) as resp:
            assert resp.status == 200
        with pytest.raises(HostNotAllowed, match="loopback"):
            await session.get(url)  # the next request has the guard again


async def test_loopback_literal_passes_with_cidr_allow(server: TestServer) -> None:
    async with (
        _session(EgressPolicy(["127.0.0.1/32"])) as session,
        session.get(f"http://127.0.0.1:{server.port}/ok") as resp,
    ):
        assert resp.status == 200
        assert await resp.text() == "upstream ok"


async def test_aiohttp_skips_the_resolver_for_literals(server: TestServer) -> None:
    # Why the middleware exists: with the resolver alone, a canonical literal is not checked.
    connector = aiohttp.TCPConnector(resolver=GuardedResolver(EgressPolicy([])))
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get(f"http://127.0.0.1:{server.port}/ok") as resp,
    ):
        assert resp.status == 200


@pytest.mark.parametrize("host", ["2130706433", "127.1", "0x7f.1", "0177.0.0.1"])
async def test_odd_literal_spellings_refused(server: TestServer, host: str) -> None:
    async with _session(EgressPolicy([])) as session:
        with pytest.raises(HostNotAllowed):
            await session.get(f"http://{host}:{server.port}/ok")


async def test_hex_literal_refused_by_resolver_alone(server: TestServer) -> None:
    # aiohttp hands "0x7f.1" to the resolver (it is not all digits), which refuses it.
    connector = aiohttp.TCPConnector(resolver=GuardedResolver(EgressPolicy([])))
    async with aiohttp.ClientSession(connector=connector) as session:
        with pytest.raises(HostNotAllowed, match=r"'0x7f\.1' is a loopback address"):
            await session.get(f"http://0x7f.1:{server.port}/ok")


async def test_localhost_name_refused(server: TestServer) -> None:
    async with _session(EgressPolicy([])) as session:
        with pytest.raises(HostNotAllowed, match="'localhost' resolves to a loopback address"):
            await session.get(f"http://localhost:{server.port}/ok")


async def test_localhost_name_passes_when_listed(server: TestServer) -> None:
    async with (
        _session(EgressPolicy(["localhost"])) as session,
        session.get(f"http://localhost:{server.port}/ok") as resp,
    ):
        assert resp.status == 200


async def test_rebinding_refused_when_any_address_is_private(server: TestServer) -> None:
    stub = StubResolver(["93.184.216.34", "127.0.0.1"])
    async with _session(EgressPolicy([]), stub) as session:
        with pytest.raises(HostNotAllowed, match=r"'rebind\.test' resolves to a loopback"):
            await session.get(f"http://rebind.test:{server.port}/ok")
    assert stub.calls == ["rebind.test"]
    assert not stub.closed  # an inner resolver passed in stays the caller's


async def test_connects_to_the_address_the_resolver_checked(server: TestServer) -> None:
    # The name means nothing to DNS; the request reaches the server only through the stub's
    # answer, so the connection goes to exactly the address the guard saw.
    stub = StubResolver(["127.0.0.1"])
    async with (
        _session(EgressPolicy(["127.0.0.1/32"]), stub) as session,
        session.get(f"http://upstream.invalid:{server.port}/ok") as resp,
    ):
        assert resp.status == 200
        assert await resp.text() == "upstream ok"


async def test_redirect_to_metadata_literal_refused(server: TestServer) -> None:
    async with _session(EgressPolicy(["127.0.0.1/32"])) as session:
        with pytest.raises(HostNotAllowed, match="cloud metadata"):
            await session.get(
                f"http://127.0.0.1:{server.port}/redirect",
                params={"to": "http://169.254.169.254/latest/meta-data/"},
            )


async def test_public_answer_passes_through_unchanged() -> None:
    stub = StubResolver(["93.184.216.34", "2606:4700::1111"])
    resolver = GuardedResolver(EgressPolicy([]), stub)
    results = await resolver.resolve("example.com", 443, socket.AF_UNSPEC)
    assert [r["host"] for r in results] == ["93.184.216.34", "2606:4700::1111"]
    await resolver.close()
    assert not stub.closed


async def test_default_inner_resolver_is_owned_and_closed() -> None:
    resolver = GuardedResolver(EgressPolicy(["localhost"]))
    results = await resolver.resolve("localhost", 80, socket.AF_INET)
    assert results and all(r["host"] == "127.0.0.1" for r in results)
    await resolver.close()
    assert resolver._inner is None
