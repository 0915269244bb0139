"""proxy.cache: bounded, expiring and by-identity caches of derived data."""

from __future__ import annotations

import gc

import pytest

from proxy.cache import DROPPED_MAX, UNBOUNDED, BoundedCache, IdentityCache, TtlCache


def test_bounded_cache_clears_when_full_and_get_survives_the_clear() -> None:
    cache: BoundedCache[str, int] = BoundedCache(max_size=2)
    get = cache.get  # callers may hold it: it must stay bound to the live entries
    assert cache.put("a", 1) == 1
    cache.put("b", 2)
    assert get("a") == 1 and get("b") == 2 and len(cache) == 2
    cache.put("b", 3)  # overwriting a key at max_size clears too: the simplest bound
    cache.put("c", 4)
    assert len(cache) <= 2, "never more than max_size entries"
    assert get("c") == 4 and get("a") is None
    assert "c" in cache and "a" not in cache


def test_bounded_cache_discards() -> None:
    cache: BoundedCache[tuple[str, str], int] = BoundedCache(max_size=100)
    for tenant in ("t1", "t2"):
        for cid in ("x", "y"):
            cache.put((tenant, cid), 1)
    cache.discard(("t1", "x"))
    cache.discard(("nope", "x"))  # absent keys are fine
    cache.discard_where(lambda k, _: k[0] == "t2")
    assert sorted(cache) == [("t1", "y")]
    cache.clear()
    assert len(cache) == 0 and cache.get(("t1", "y")) is None


def test_ttl_cache_entries_expire_on_the_callers_clock() -> None:
    cache: TtlCache[str, str] = TtlCache(max_size=2)
    assert cache.put("k", "v", expires=10.0) == "v"
    assert cache.get("k") == (10.0, "v")  # the raw entry: the hot paths compare it inline
    assert cache.fresh("k", now=9.9) == "v"
    assert cache.fresh("k", now=10.0) is None  # expired at its deadline, not after
    assert cache.fresh("missing", now=0.0) is None
    cache.put("a", "1", 20.0)
    cache.put("b", "2", 20.0)  # full: cleared first
    assert len(cache) <= 2 and cache.get("k") is None and cache.fresh("b", 0.0) == "2"
    cache.discard_where(lambda _, v: v == "2")
    cache.discard("a")
    assert "b" not in cache and len(cache) == 0


def test_ttl_cache_unbounded_is_never_cleared_for_size() -> None:
    cache: TtlCache[int, int] = TtlCache(UNBOUNDED)
    for i in range(10_000):
        cache.put(i, i, 1.0)
    assert len(cache) == 10_000


@pytest.mark.parametrize("kind", ["bounded", "ttl"])
def test_a_put_that_began_before_an_invalidation_of_its_key_is_skipped(kind: str) -> None:
    """The fetch-vs-invalidation race (module doc): ``since`` is read before the fetch; an
    invalidation of that key (or of everything) after it voids the put, others' puts stand."""
    cache: BoundedCache[str, str] | TtlCache[str, str]
    cache = BoundedCache(100) if kind == "bounded" else TtlCache(100)

    def put(key: str, value: str, since: int | None) -> str:
        if isinstance(cache, BoundedCache):
            return cache.put(key, value, since=since)
        return cache.put(key, value, 10.0, since=since)

    def has(key: str) -> bool:
        return key in cache

    since = cache.generation
    cache.discard("k")  # a revocation arrives while "k" is being fetched
    assert put("k", "before the revocation", since) == "before the revocation"  # still returned
    assert not has("k"), "a read that began before the invalidation must not be cached"
    assert put("other", "v", since) == "v" and has("other"), "another key's put is unaffected"
    assert put("k", "after", cache.generation) == "after" and has("k"), "a read begun after stands"
    assert put("k2", "v", None) == "v" and has("k2"), "no since: an unconditional put"

    for key, invalidate_all in (
        ("y", cache.clear),
        ("z", lambda: cache.discard_where(lambda k, _: k == "x")),
    ):
        since = cache.generation
        invalidate_all()  # its keys need not be in the cache: every put begun before is void
        put(key, "v", since)
        assert not has(key)
        put(key, "v", cache.generation)
        assert has(key)


def test_eviction_is_not_invalidation_and_the_marks_stay_bounded() -> None:
    cache: TtlCache[int, int] = TtlCache(max_size=2)
    since = cache.generation
    for i in range(3):  # the third put clears the full cache: eviction moves no generation
        cache.put(i, i, 1.0)
    assert cache.generation == since
    cache.put(9, 9, 1.0, since=since)
    assert 9 in cache
    big: TtlCache[int, int] = TtlCache(UNBOUNDED)
    since = big.generation
    for i in range(DROPPED_MAX + 1):  # more discards than marks kept: every key counts as dropped
        big.discard(i)
    assert len(big._dropped) <= DROPPED_MAX
    big.put(-1, 0, 1.0, since=since)  # never discarded itself, but its mark may have been lost
    assert -1 not in big
    big.put(-1, 0, 1.0, since=big.generation)
    assert -1 in big


def test_identity_cache_by_identity_and_tag() -> None:
    cache: IdentityCache[object, str] = IdentityCache(max_size=2)
    a, b = object(), object()
    cache.put(a, "va")
    assert cache.get(a) == "va"
    assert cache.get(b) is None
    assert cache.get(a, "t") is None  # a different tag (an OAuth token) is a different value
    cache.put(a, "va-t", "t")
    assert cache.get(a, "t") == "va-t"
    cache.put(b, "vb")
    cache.put(object(), "x")  # over max_size: cleared, never unbounded
    assert cache.get(a, "t") is None and len(cache) <= 2


def test_identity_cache_never_answers_for_a_new_object_at_a_reused_address() -> None:
    cache: IdentityCache[object, str] = IdentityCache()

    class Owner:
        pass

    owner = Owner()
    cache.put(owner, "derived from the first owner")
    key = id(owner)
    del owner
    gc.collect()
    # The entry holds its owner, so the address cannot be handed to another object while cached.
    others = [Owner() for _ in range(1000)]
    assert all(id(o) != key for o in others)
    assert all(cache.get(o) is None for o in others)
