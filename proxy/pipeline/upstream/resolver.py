"""Applying the egress guard inside aiohttp's client, where the connection is actually made.

Checking a host name before the request is not enough: DNS can answer differently a moment
later (rebinding). ``GuardedResolver`` sits in the ``TCPConnector`` and checks every address the
lookup returns; aiohttp then connects only to addresses this resolver handed back, so the
checked address is the one connected to.

aiohttp does not call the resolver for hosts it considers IP literals (all digits and dots, or
containing ':'); it connects to them directly. Its own guard refuses non-canonical all-digit
forms (``2130706433``, ``127.1``), but ``127.0.0.1`` and ``[::1]`` never reach a resolver.
``literal_guard_middleware`` closes that gap as a client middleware, which aiohttp runs for
every request including each redirect hop; a session must use both::

    connector = aiohttp.TCPConnector(resolver=GuardedResolver(policy))
    session = aiohttp.ClientSession(connector=connector,
                                    middlewares=(literal_guard_middleware(policy),))

A caller that has just run ``EgressPolicy.check_literal`` on a request's host itself may send that
one request with ``middlewares=SKIP_LITERAL_GUARD`` (the pipeline does, for every proxied call).
"""

from __future__ import annotations

import socket
from typing import Final

from aiohttp import ClientHandlerType, ClientMiddlewareType, ClientRequest, ClientResponse
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from proxy.cache import BoundedCache
from proxy.security.egress import EgressPolicy, parse_ip_literal

__all__ = ["SKIP_LITERAL_GUARD", "GuardedResolver", "literal_guard_middleware"]

# For ``session.request(..., middlewares=SKIP_LITERAL_GUARD)``: aiohttp's per-request middlewares
# replace the session's, so that one request runs without the literal guard. Safe only when the
# caller checked this request's host with ``check_literal`` and follows no redirect (the guard
# runs for each hop). The resolver guard still applies. tests/pipeline/upstream/test_resolver.py checks
# that aiohttp still replaces rather than adds.
SKIP_LITERAL_GUARD: Final[tuple[ClientMiddlewareType, ...]] = ()


class GuardedResolver(AbstractResolver):
    """Resolves through ``inner`` and refuses the lookup if any returned address is refused.

    All addresses are checked, not only the first: aiohttp falls back to the next one when a
    connection fails, so an attacker could otherwise put a private address second. ``inner``
    defaults to aiohttp's ``DefaultResolver``, created on first use (it needs a running loop)
    and closed by ``close``; an ``inner`` passed in stays the caller's to close.
    """

    def __init__(self, policy: EgressPolicy, inner: AbstractResolver | None = None) -> None:
        self.policy = policy
        self._inner = inner
        self._owns_inner = inner is None

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if parse_ip_literal(host) is not None:
            # Spellings aiohttp passes on (e.g. "0x7f.1") are refused before libc reads them.
            self.policy.check_literal(host)
        if self._inner is None:
            self._inner = DefaultResolver()
        results = await self._inner.resolve(host, port, family)
        for result in results:
            self.policy.check_resolved(host, result["host"])
        return results

    async def close(self) -> None:
        if self._owns_inner and self._inner is not None:
            await self._inner.close()
            self._inner = None


def literal_guard_middleware(policy: EgressPolicy) -> ClientMiddlewareType:
    """A client middleware refusing non-public IP literal hosts, which skip the resolver."""

    # Hosts already found acceptable: the verdict depends only on the host string and the
    # (immutable) policy, so the per-request parse is paid once per host. Refusals are not
    # cached; they raise every time.
    passed: BoundedCache[str, bool] = BoundedCache(4096)

    async def guard(request: ClientRequest, handler: ClientHandlerType) -> ClientResponse:
        host = request.url.raw_host or ""
        if passed.get(host) is None:
            policy.check_literal(host)
            passed.put(host, True)
        return await handler(request)

    return guard
