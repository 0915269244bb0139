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
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

__all__ = ["UNBOUNDED", "BoundedCache", "IdentityCache", "TtlCache"]

K = TypeVar("K")
V = TypeVar("V")
O = TypeVar("O")  # noqa: E741 - the owner type of an IdentityCache

# A max_size that is never reached: for caches whose size is bounded elsewhere (one entry per
# stored connection), where clearing would only throw away work.
UNBOUNDED = 1 << 62


class BoundedCache(Generic[K, V]):
    """key -> value, cleared when a put finds ``max_size`` entries."""

    __slots__ = ("_entries", "get", "max_size")

    get: Callable[[K], V | None]

    def __init__(self, max_size: int) -> None:
        self._entries: dict[K, V] = {}
        self.get = self._entries.get  # the dict's own get: no Python frame on a lookup
        self.max_size = max_size

    def put(self, key: K, value: V) -> V:
        """Store and return ``value``."""
        entries = self._entries
        if len(entries) >= self.max_size:
            entries.clear()  # in place: ``get`` stays bound to this dict
        entries[key] = value
        return value

    def discard(self, key: K) -> None:
        self._entries.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()

    def discard_where(self, drop: Callable[[K, V], bool]) -> None:
        for key in [k for k, v in self._entries.items() if drop(k, v)]:
            del self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[K]:
        return iter(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries


class TtlCache(Generic[K, V]):
    """key -> ``(expires, value)`` on the caller's monotonic clock, cleared when full.

    ``get`` returns the raw entry, expired or not (see the module doc); an expired entry stays
    until it is overwritten, discarded or cleared, which bounds nothing but ``max_size`` does.
    """

    __slots__ = ("_entries", "get", "max_size")

    get: Callable[[K], tuple[float, V] | None]

    def __init__(self, max_size: int) -> None:
        self._entries: dict[K, tuple[float, V]] = {}
        self.get = self._entries.get
        self.max_size = max_size

    def fresh(self, key: K, now: float) -> V | None:
        """The value of ``key`` when its entry has not expired at ``now``, else None."""
        hit = self._entries.get(key)
        return hit[1] if hit is not None and hit[0] > now else None

    def put(self, key: K, value: V, expires: float) -> V:
        """Store ``value`` until ``expires`` (same clock as ``now``) and return it."""
        entries = self._entries
        if len(entries) >= self.max_size:
            entries.clear()
        entries[key] = (expires, value)
        return value

    def discard(self, key: K) -> None:
        self._entries.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()

    def discard_where(self, drop: Callable[[K, V], bool]) -> None:
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
