"""The one place that overrides aiohttp internals: the upstream client's request class and
response protocol, both there for CPU per proxied call (figures: bench/README.md).

- ``UpstreamRequest`` precomputes aiohttp's skip-list bookkeeping, which otherwise rebuilds a
  sorted multidict of the skip list on every call to conclude that nothing is to be added;
- ``LazyReadTimeoutProtocol`` keeps one long-lived read timer per upstream connection. Stock
  aiohttp cancels and re-creates a timer on every chunk received and every response; here a
  deadline float moves forward instead, and the timer, when it fires, re-arms for what is left or
  times the read out. The semantics (``sock_read`` counts from the last byte received) and the
  precision are aiohttp's.

Both check at import (``_NOTHING_TO_ADD``) or install time (``install_lazy_read_timeout``) that
the internals look as expected and fall back to aiohttp's own behaviour otherwise;
``tests/pipeline/upstream/test_client.py`` fails if the fast path is silently lost after an upgrade.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import cast

import aiohttp
from aiohttp.client_proto import ResponseHandler
from multidict import CIMultiDict, istr

__all__ = ["SKIP_AUTO_HEADERS", "LazyReadTimeoutProtocol", "UpstreamRequest", "install_lazy_read_timeout"]

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
