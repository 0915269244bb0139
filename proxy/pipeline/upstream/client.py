"""The one HTTP client the service uses to reach upstream APIs, and why it is not stock aiohttp.

Every proxied call, OAuth token request and connection test goes through the session built by
``make_session``. Its security properties come from ``proxy.pipeline.upstream.resolver`` (egress guard in
the resolver and for IP literals), a dummy cookie jar (one tenant's cookies never ride along on
another's call), no proxy environment variables, no automatic decompression and no headers of
aiohttp's own.

Two pieces exist only because the proxy's CPU budget per call is a few tens of microseconds:

- ``UpstreamRequest`` precomputes aiohttp's skip-list bookkeeping, which otherwise rebuilds a
  sorted multidict of the skip list on every call to conclude that nothing is to be added;
- ``LazyReadTimeoutProtocol`` keeps one long-lived read timer per upstream connection. Stock
  aiohttp cancels and re-creates a timer on every chunk received and every response; here a
  deadline float moves forward instead, and the timer, when it fires, re-arms for what is left or
  times the read out. The semantics (``sock_read`` counts from the last byte received) and the
  precision are aiohttp's.

Both override aiohttp internals, so both check at import time that the internals look as
expected and fall back to aiohttp's own behaviour otherwise; ``tests/test_upstream_client.py``
fails if the fast path is silently lost after an upgrade.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Iterable
from typing import cast

import aiohttp
from aiohttp.client_proto import ResponseHandler
from multidict import CIMultiDict, istr

from proxy.pipeline.upstream.resolver import GuardedResolver, literal_guard_middleware
from proxy.security.egress import EgressPolicy
from proxy.settings import Settings

__all__ = ["SKIP_AUTO_HEADERS", "LazyReadTimeoutProtocol", "UpstreamRequest", "make_session"]

# The upstream sees only the headers the caller sent plus the injected credential: aiohttp adds
# none of its defaults (and no Content-Type guessed from the body).
SKIP_AUTO_HEADERS = ("User-Agent", "Accept-Encoding", "Accept", "Content-Type")
_SKIPPED = frozenset(istr(h) for h in SKIP_AUTO_HEADERS)
_SKIPPED_PAIRS: list[tuple[str, None]] = [(h, None) for h in sorted(_SKIPPED)]
# True while every header aiohttp would add on its own is in the skip list (so an aiohttp
# upgrade that adds a default header falls back to aiohttp's own code).
_NOTHING_TO_ADD = {istr(h) for h in aiohttp.ClientRequest.DEFAULT_HEADERS} | {istr("User-Agent")} <= _SKIPPED


class UpstreamRequest(aiohttp.ClientRequest):
    """aiohttp's request with the skip-list bookkeeping precomputed (see the module doc)."""

    def update_auto_headers(self, skip_auto_headers: Iterable[str] | None) -> None:
        if _NOTHING_TO_ADD and skip_auto_headers == _SKIPPED:
            self._skip_auto_headers = CIMultiDict(_SKIPPED_PAIRS)
            return
        super().update_auto_headers(skip_auto_headers)


class LazyReadTimeoutProtocol(ResponseHandler):
    """aiohttp's response protocol with one long-lived read timer (see the module doc).

    Invariant: ``_read_deadline`` is None exactly when no read is being timed; an armed timer
    whose deadline was dropped lapses without effect when it fires. The timer is cancelled for
    real when the connection is lost, so a closed connection is not kept alive by it.
    """

    _read_deadline: float | None = None

    def _reschedule_timeout(self) -> None:
        timeout = self._read_timeout
        if not timeout:
            self._read_deadline = None
            return
        deadline = self._loop.time() + timeout
        self._read_deadline = deadline
        handle = self._read_timeout_handle
        # A pooled connection serves calls with different read timeouts: a timer armed for a
        # longer one than this must be brought forward, or this call would time out late.
        if handle is None or handle.when() > deadline:
            if handle is not None:
                handle.cancel()
            self._read_timeout_handle = self._loop.call_at(deadline, self._read_timer_fired)

    def _drop_timeout(self) -> None:
        self._read_deadline = None

    def _read_timer_fired(self) -> None:
        self._read_timeout_handle = None
        deadline = self._read_deadline
        if deadline is None:
            return
        if self._loop.time() < deadline:
            self._read_timeout_handle = self._loop.call_at(deadline, self._read_timer_fired)
            return
        self._read_deadline = None
        self._on_read_timeout()

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self._read_deadline = None
        if self._read_timeout_handle is not None:
            self._read_timeout_handle.cancel()
            self._read_timeout_handle = None


def _internals_as_expected() -> bool:
    """Whether aiohttp's protocol still has the members the lazy timer overrides and uses."""
    needed = ("_reschedule_timeout", "_drop_timeout", "_on_read_timeout", "connection_lost")
    return all(callable(getattr(ResponseHandler, name, None)) for name in needed)


def install_lazy_read_timeout(connector: aiohttp.TCPConnector) -> bool:
    """Make ``connector`` build ``LazyReadTimeoutProtocol``s; False (stock aiohttp) if it cannot."""
    factory = getattr(connector, "_factory", None)
    if not (
        isinstance(factory, functools.partial)
        and factory.func is ResponseHandler
        and not factory.args
        and _internals_as_expected()
    ):
        return False
    connector._factory = cast(
        "functools.partial[ResponseHandler]", functools.partial(LazyReadTimeoutProtocol, **factory.keywords)
    )
    return True


def make_session(settings: Settings, egress: EgressPolicy) -> aiohttp.ClientSession:
    """The upstream session; must be called with the event loop running."""
    asyncio.get_running_loop()  # fail here, not on first use, when called outside the loop
    connector = aiohttp.TCPConnector(
        resolver=GuardedResolver(egress),
        limit=0,
        limit_per_host=0,  # the per-host cap is enforced by the pipeline with a fast 503
        ttl_dns_cache=10,
        enable_cleanup_closed=True,
    )
    install_lazy_read_timeout(connector)
    return aiohttp.ClientSession(
        connector=connector,
        # aiohttp connects to IP literals without asking the resolver; this guard covers them.
        middlewares=(literal_guard_middleware(egress),),
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),  # never carry one tenant's cookies to another call
        timeout=aiohttp.ClientTimeout(
            total=settings.upstream_total_timeout_s,
            sock_connect=settings.upstream_connect_timeout_s,
            sock_read=settings.upstream_read_timeout_s,
        ),
        trust_env=False,
        skip_auto_headers=SKIP_AUTO_HEADERS,
        request_class=UpstreamRequest,
    )
