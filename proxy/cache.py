"""The process-local caches of derived data: bounded, optionally expiring, or keyed by identity.

Everything cached this way can be recomputed from its source (the store, a ``Credentials``
object, a header name), so losing an entry costs time, never correctness. Three shapes:

- ``BoundedCache``: key -> value, at most ``max_size`` entries;
- ``TtlCache``: key -> ``(expires, value)``, the caller passes its own monotonic ``now`` (the hot
  paths read the clock once per call and share it), bounded the same way;
- ``IdentityCache``: keyed by the identity of an owner object plus an optional tag. Each entry
  holds its owner, so ``id()`` cannot be reused by another object while the entry exists.

Eviction is "clear when full": one ``dict.clear()`` when a put finds ``max_size`` entries. It is
the cheapest policy (no bookkeeping on a hit, so a hit is exactly one ``dict.get``), and for these
caches a full cache means a flood of distinct keys (names, paths, callers) where recency says
little; the working set refills on the next calls. LRU would cost a move or a timestamp on
every hit.

Hot path: ``get`` of ``BoundedCache`` and ``TtlCache`` *is* the underlying dict's ``get`` (a bound
method stored in a slot): no Python frame, no allocation. ``cache.get(k)`` still costs one
generic attribute load more than ``d.get(k)`` on a plain dict (CPython specialises method calls
on exact dicts only; about 40 ns on the bench machine); a loop hoists ``get = cache.get`` once,
which is then as cheap as the inlined ``dict.get``. A ``TtlCache`` hit is the raw
``(expires, value)`` entry; the caller compares ``entry[0]`` with its ``now`` (``fresh`` does it
for callers off the hot path).

Invalidation races (``BoundedCache`` and ``TtlCache``): a value fetched from a store while an
invalidation of it arrives (a local write, a peer's pub/sub message) may be the value from before
the change; put after the invalidation dropped the key, it would undo the invalidation until it
expires (a revoked caller key or a deleted connection serving on). So every ``discard``,
``discard_where`` and ``clear`` moves the cache's ``generation``, and a loader reads
``since = cache.generation`` *before* it starts fetching and stores with ``put(..., since=since)``:
the put is skipped (the value is still returned, for the call that fetched it) when the key was
invalidated after ``since``. ``discard`` marks its key only; ``discard_where`` and ``clear``
(whose keys a fetch in flight need not be among) mark every key, as does a ``discard`` once the
marks are full (at most ``max_size`` or ``DROPPED_MAX`` of them): a skipped put costs one more
fetch, never a stale answer. The clear of a full cache on a put is eviction, not invalidation, and
moves nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

__all__ = ["DROPPED_MAX", "UNBOUNDED", "BoundedCache", "IdentityCache", "TtlCache"]

K = TypeVar("K")
V = TypeVar("V")
O = TypeVar("O")  # noqa: E741 - the owner type of an IdentityCache

# A max_size that is never reached: for caches whose size is bounded elsewhere (one entry per
# stored connection), where clearing would only throw away work.
UNBOUNDED = 1 << 62
# Keys discarded one by one are remembered (for puts that began before) up to this many, or the
# cache's max_size if smaller; then every key counts as invalidated once and the marks restart.
DROPPED_MAX = 4096


class _Generations(Generic[K]):
    """Which keys were invalidated since a given ``generation`` (the module doc's races)."""

    __slots__ = ("_dropped", "_dropped_max", "_floor", "generation")

    def __init__(self, max_size: int) -> None:
        self.generation = 0  # moved by every invalidation; read it before a fetch begins
        self._floor = 0  # every key was invalidated at this generation
        self._dropped: dict[K, int] = {}  # key -> the generation it was last discarded at
        self._dropped_max = min(max_size, DROPPED_MAX)

    def _dropped_one(self, key: K) -> None:
        self.generation += 1
        dropped = self._dropped
        if len(dropped) >= self._dropped_max:
            self._dropped_all()
        else:
            dropped[key] = self.generation

    def _dropped_all(self) -> None:
        self.generation += 1
        self._floor = self.generation
        self._dropped.clear()

    def invalidated_since(self, key: K, since: int) -> bool:
        """Whether ``key`` was (or may have been) invalidated after ``generation`` was ``since``."""
        return self._floor > since or self._dropped.get(key, 0) > since


class BoundedCache(_Generations[K], Generic[K, V]):
    """key -> value, cleared when a put finds ``max_size`` entries."""

    __slots__ = ("_entries", "get", "max_size")

    get: Callable[[K], V | None]

    def __init__(self, max_size: int) -> None:
        super().__init__(max_size)
        self._entries: dict[K, V] = {}
        self.get = self._entries.get  # the dict's own get: no Python frame on a lookup
        self.max_size = max_size

    def put(self, key: K, value: V, *, since: int | None = None) -> V:
        """Store and return ``value``; with ``since`` (``generation`` when its fetch began), only
        if ``key`` was not invalidated meanwhile."""
        if since is not None and self.invalidated_since(key, since):
            return value
        entries = self._entries
        if len(entries) >= self.max_size:
            entries.clear()  # in place: ``get`` stays bound to this dict
        entries[key] = value
        return value

    def discard(self, key: K) -> None:
        self._dropped_one(key)
        self._entries.pop(key, None)

    def clear(self) -> None:
        self._dropped_all()
        self._entries.clear()

    def discard_where(self, drop: Callable[[K, V], bool]) -> None:
        self._dropped_all()
        for key in [k for k, v in self._entries.items() if drop(k, v)]:
            del self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[K]:
        return iter(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries


class TtlCache(_Generations[K], Generic[K, V]):
    """key -> ``(expires, value)`` on the caller's monotonic clock, cleared when full.

    ``get`` returns the raw entry, expired or not (see the module doc); an expired entry stays
    until it is overwritten, discarded or cleared, which bounds nothing but ``max_size`` does.
    """

    __slots__ = ("_entries", "get", "max_size")

    get: Callable[[K], tuple[float, V] | None]

    def __init__(self, max_size: int) -> None:
        super().__init__(max_size)
        self._entries: dict[K, tuple[float, V]] = {}
        self.get = self._entries.get
        self.max_size = max_size

    def fresh(self, key: K, now: float) -> V | None:
        """The value of ``key`` when its entry has not expired at ``now``, else None."""
        hit = self._entries.get(key)
        return hit[1] if hit is not None and hit[0] > now else None

    def put(self, key: K, value: V, expires: float, *, since: int | None = None) -> V:
        """Store ``value`` until ``expires`` (same clock as ``now``) and return it; with
        ``since`` (``generation`` when its fetch began), only if ``key`` was not invalidated
        meanwhile."""
        if since is not None and self.invalidated_since(key, since):
            return value
        entries = self._entries
        if len(entries) >= self.max_size:
            entries.clear()
        entries[key] = (expires, value)
        return value

    def discard(self, key: K) -> None:
        self._dropped_one(key)
        self._entries.pop(key, None)

    def clear(self) -> None:
        self._dropped_all()
        self._entries.clear()

    def discard_where(self, drop: Callable[[K, V], bool]) -> None:
        self._dropped_all()
        for key in [k for k, (_, v) in self._entries.items() if drop(k, v)]:
            del self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[K]:
        return iter(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries


class IdentityCache(Generic[O, V]):
    """Values keyed by the identity of an owner object (and an optional tag), cleared when full.

    Correct only for owners that are replaced, never mutated, when what the value was derived
    from changes (the vault's ``Credentials``). The tag tells apart values derived from the same
    owner and something else (an OAuth access token); a lookup with another tag misses.
    """

    __slots__ = ("_entries", "max_size")

    def __init__(self, max_size: int = 4096) -> None:
        self._entries: dict[int, tuple[O, str | None, V]] = {}
        self.max_size = max_size

    def get(self, owner: O, tag: str | None = None) -> V | None:
        hit = self._entries.get(id(owner))
        # ``is``: the entry holds its owner, so an equal id is this owner unless it was replaced.
        if hit is not None and hit[0] is owner and hit[1] == tag:
            return hit[2]
        return None

    def put(self, owner: O, value: V, tag: str | None = None) -> V:
        entries = self._entries
        if len(entries) >= self.max_size:
            entries.clear()
        entries[id(owner)] = (owner, tag, value)
        return value

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
