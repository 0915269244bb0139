"""Stale-if-error: cached store reads keep answering, for a bounded time, while the store is down.

Why it exists: the service sits on the critical path of every workflow, and the seed contract asks
for graceful degradation ("return cached credentials if the backend is down"). The caches of
store reads (decrypted credentials, runtime-user resolutions, verified caller keys, tenant flags)
expire after a few seconds; without this, an outage of the store (SQLite or Redis) stops every
call as soon as they do. One ``StaleWindow`` per process is shared by all of them and by
``/readyz``, so they agree on whether the store is down and since when.

The security bounds, which every cache using it keeps:

- Only ``StoreUnavailable`` means "unreachable". ``StoreLost`` (the store is not the one opened:
  flushed, replaced) never serves stale, and any answer the store does give (not found, revoked,
  a key that does not open) replaces or drops the entry: an answer is never overridden.
- An entry is served stale only while ``now - loaded_at <= stale_if_error_s``, ``loaded_at``
  being its last successful load (not the outage's start). 0 disables stale serving.
- Stale serving adds nothing: what it serves is re-read from the cache *after* the failed load,
  so an entry an invalidation dropped meanwhile (a local write, a peer's pub/sub or change-log
  message, a FLUSH_ALL) is gone, and a load that was in flight when one arrived did not refill
  it (``proxy.cache``: puts carry the generation their fetch began at). A deletion or revocation
  this replica saw is never undone; one it could not see (it was cut off from its peers) is
  exposed for at most the bound.
- Probing is rate-limited: after a failure, calls that have a servable entry are answered from it
  without asking the store for ``RETRY_S``, so an outage whose failures are slow (timeouts, a
  busy file) costs one slow call per ``RETRY_S``, not one per call. The first call after
  ``RETRY_S`` probes; a success ends the outage for everyone. A call with nothing to serve
  always asks the store itself.

Pure module: no aiohttp, no redis.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Final, TypeGuard, TypeVar

from proxy.cache import TtlCache
from proxy.errors import StoreLost, StoreUnavailable
from proxy.observe import trace
from proxy.observe.metrics import STALE_SERVED_TALLY, STORE_ERRORS

__all__ = ["RETRY_S", "StaleWindow", "ttl_entry"]

log = logging.getLogger("proxy.stale")

K = TypeVar("K")
V = TypeVar("V")
# After a failed store read, the store is asked again (by one call) at most this often.
RETRY_S: Final = 1.0
# What a refused call tells the caller to wait (whole seconds; the store's recovery is unknown).
RETRY_AFTER_S: Final = 5


class StaleWindow:
    """The store's health as reads see it, and the rule for serving what the caches hold."""

    def __init__(
        self, stale_s: float, backend: str = "store", clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.stale_s = stale_s
        self.clock = clock
        # Failed reads count in proxy_store_errors_total{backend}: about one a second while
        # down (the probes), which is what its alert watches.
        self._errors = STORE_ERRORS.labels(backend=backend)
        self.failure: StoreUnavailable | None = None  # the last failure while the store is down
        self.down_since: float | None = None
        self.last_ok = clock()  # when the store last answered a read
        self._retry_at = 0.0

    @property
    def down(self) -> bool:
        return self.failure is not None

    def ok(self) -> None:
        """The store answered: the outage (if any) is over."""
        now = self.clock()
        if self.failure is not None and self.down_since is not None:
            log.warning("store reachable again after %.1f s of outage", now - self.down_since)
        self.failure, self.down_since, self.last_ok, self._retry_at = None, None, now, 0.0

    def failed(self, exc: StoreUnavailable) -> None:
        now = self.clock()
        self._errors.inc()
        if self.failure is None:
            self.down_since = now
            log.error(
                "store unreachable (%s); serving cached entries for up to %g s from their last load",
                exc.message,
                self.stale_s,
            )
        self.failure = exc
        self._retry_at = now + RETRY_S

    def serving(self) -> bool:
        """Whether an entry loaded before the outage may still be served (for ``/readyz``)."""
        return self.stale_s > 0 and self.clock() - self.last_ok <= self.stale_s

    def remaining_s(self) -> float:
        return max(0.0, self.last_ok + self.stale_s - self.clock()) if self.stale_s > 0 else 0.0

    async def load(
        self,
        kind: str,
        what: str,
        fetch: Callable[[], Awaitable[V]],
        cached: Callable[[], tuple[V, float] | None],
    ) -> V:
        """``fetch()``'s answer; while the store is unreachable, the cache's entry instead.

        ``cached()`` returns the entry as the cache holds it *now* (value, loaded_at), or None;
        it is called after a failed ``fetch`` so an invalidation during the attempt counts.
        ``kind`` labels the metric (a fixed vocabulary); ``what`` names the entry in a refusal
        (ids only, never a credential)."""
        if self.failure is not None:
            if self.clock() < self._retry_at:
                entry = cached()
                if self._servable(entry):
                    return self._serve(kind, entry)
                # Nothing to serve: this call asks the store itself (a failure in one record,
                # a malformed one say, must not refuse every other read for RETRY_S).
            else:
                self._retry_at = self.clock() + RETRY_S  # this call probes; the others do not wait
        try:
            value = await fetch()
        except StoreLost:
            raise
        except StoreUnavailable as exc:
            self.failed(exc)
            return self._stale(kind, what, cached(), exc)
        if self.failure is not None:
            self.ok()
        else:
            self.last_ok = self.clock()
        return value

    def _servable(self, entry: tuple[V, float] | None) -> TypeGuard[tuple[V, float]]:
        return entry is not None and self.stale_s > 0 and self.clock() - entry[1] <= self.stale_s

    def _serve(self, kind: str, entry: tuple[V, float]) -> V:
        STALE_SERVED_TALLY.inc((kind,))
        ctx = trace.current()
        if ctx is not None:
            ctx.stale = True
        return entry[0]

    def _stale(self, kind: str, what: str, entry: tuple[V, float] | None, exc: StoreUnavailable) -> V:
        if self._servable(entry):
            return self._serve(kind, entry)
        if self.stale_s <= 0:
            why = "serving cached copies is disabled (stale_if_error_s = 0)"
        elif entry is None:
            why = f"{what} is not cached on this replica"
        else:
            why = f"the cached copy of {what} is older than stale_if_error_s ({self.stale_s:g} s)"
        raise StoreUnavailable(
            f"the store is unreachable ({exc.message}) and {why}; retry once the store is back "
            "(GET /readyz reports it)",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        ) from None


def ttl_entry(cache: TtlCache[K, V], key: K, ttl_s: float) -> tuple[V, float] | None:
    """A ``TtlCache`` entry as ``(value, loaded_at)`` for ``StaleWindow.load``: entries put with
    an expiry of their load time plus ``ttl_s``, so that is when they were loaded."""
    hit = cache.get(key)
    return None if hit is None else (hit[1], hit[0] - ttl_s)
