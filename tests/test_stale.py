"""proxy.stale: the stale-if-error rule, on a fake clock (pure unit tests; the real outages are in
tests/web/test_degraded.py)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from proxy.cache import TtlCache
from proxy.errors import ConnectionNotFound, StoreLost, StoreUnavailable
from proxy.observe import trace
from proxy.observe.metrics import REGISTRY
from proxy.stale import RETRY_S, StaleWindow, ttl_entry

TTL = 5.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Store:
    """Answers or fails as told, counting what it was asked."""

    def __init__(self) -> None:
        self.error: Exception | None = None
        self.calls = 0

    def fetch(
        self, cache: TtlCache[str, str], clock: Clock, value: str = "fresh"
    ) -> Callable[[], Awaitable[str]]:
        async def run() -> str:
            self.calls += 1
            if self.error is not None:
                raise self.error
            return cache.put("k", value, clock.now + TTL)

        return run


def served(kind: str) -> float:
    return REGISTRY.get_sample_value("proxy_stale_served_total", {"cache": kind}) or 0.0


async def load(w: StaleWindow, cache: TtlCache[str, str], store: Store, clock: Clock) -> str:
    return await w.load(
        "credentials", "connection 'k'", store.fetch(cache, clock), lambda: ttl_entry(cache, "k", TTL)
    )


@pytest.fixture
def clock() -> Clock:
    return Clock()


async def test_serves_the_cached_entry_up_to_the_bound_from_its_last_load(clock: Clock) -> None:
    w, cache, store = StaleWindow(30.0, clock=clock), TtlCache[str, str](10), Store()
    assert await load(w, cache, store, clock) == "fresh"
    loaded = clock.now
    store.error = StoreUnavailable("redis store unavailable during get_connection (ConnectionError)")
    before = served("credentials")
    clock.now = loaded + 29.9
    assert await load(w, cache, store, clock) == "fresh"
    assert w.down and served("credentials") == before + 1
    clock.now = loaded + 30.1
    with pytest.raises(StoreUnavailable) as exc:
        await load(w, cache, store, clock)
    assert "older than stale_if_error_s (30 s)" in exc.value.message and exc.value.headers["Retry-After"]


async def test_a_miss_during_an_outage_is_refused_and_zero_disables(clock: Clock) -> None:
    store = Store()
    store.error = StoreUnavailable("down")
    with pytest.raises(StoreUnavailable, match="not cached on this replica"):
        await load(StaleWindow(30.0, clock=clock), TtlCache[str, str](10), store, clock)
    off, cache = StaleWindow(0.0, clock=clock), TtlCache[str, str](10)
    store.error = None
    await load(off, cache, store, clock)
    clock.now += TTL + 1
    store.error = StoreUnavailable("down")
    with pytest.raises(StoreUnavailable, match="disabled"):
        await load(off, cache, store, clock)


async def test_a_lost_store_or_an_answer_is_never_overridden(clock: Clock) -> None:
    w, cache, store = StaleWindow(30.0, clock=clock), TtlCache[str, str](10), Store()
    await load(w, cache, store, clock)
    clock.now += TTL + 1
    store.error = StoreLost("the store was flushed")
    with pytest.raises(StoreLost):
        await load(w, cache, store, clock)
    store.error = ConnectionNotFound("deleted")
    with pytest.raises(ConnectionNotFound):
        await load(w, cache, store, clock)
    assert not w.down


async def test_an_invalidation_during_the_failed_load_wins(clock: Clock) -> None:
    """What is served stale is read after the failure: an entry dropped meanwhile stays dropped."""
    w, cache = StaleWindow(30.0, clock=clock), TtlCache[str, str](10)
    cache.put("k", "old", clock.now + TTL)
    clock.now += TTL + 1

    async def fetch() -> str:
        cache.discard("k")  # a peer's invalidation arrives while the store is being asked
        raise StoreUnavailable("down")

    with pytest.raises(StoreUnavailable, match="not cached"):
        await w.load("credentials", "connection 'k'", fetch, lambda: ttl_entry(cache, "k", TTL))


async def test_the_store_is_probed_at_most_once_per_retry_interval_and_recovery_is_seen(clock: Clock) -> None:
    w, cache, store = StaleWindow(30.0, clock=clock), TtlCache[str, str](10), Store()
    await load(w, cache, store, clock)
    clock.now += TTL + 1
    store.error = StoreUnavailable("down")
    await load(w, cache, store, clock)
    asked = store.calls
    for _ in range(5):
        assert await load(w, cache, store, clock) == "fresh"
    assert store.calls == asked  # answered from the cache at once, the store not asked again
    with pytest.raises(StoreUnavailable, match="not cached"):  # nothing to serve: it asks
        await w.load("credentials", "connection 'x'", store.fetch(cache, clock), lambda: None)
    assert store.calls == asked + 1
    asked += 1
    clock.now += RETRY_S
    store.error = None
    assert await load(w, cache, store, clock) == "fresh" and store.calls == asked + 1
    assert not w.down and w.serving()


async def test_a_stale_serve_marks_the_request_context(clock: Clock) -> None:
    w, cache, store = StaleWindow(30.0, clock=clock), TtlCache[str, str](10), Store()
    await load(w, cache, store, clock)
    clock.now += TTL + 1
    store.error = StoreUnavailable("down")
    ctx, token = trace.begin("rid-1")
    try:
        await load(w, cache, store, clock)
        assert ctx.stale
    finally:
        trace.end(token)


def test_serving_follows_the_last_answer(clock: Clock) -> None:
    w = StaleWindow(10.0, clock=clock)
    w.failed(StoreUnavailable("down"))
    assert w.serving() and w.remaining_s() == 10.0
    clock.now += 10.5
    assert not w.serving() and w.remaining_s() == 0.0
    w.ok()
    assert w.serving() and not w.down
