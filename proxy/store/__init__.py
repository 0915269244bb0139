"""Where records live: ``open_store`` picks the back end.

The embedded SQLite store is the zero-setup default; setting ``redis_url`` moves shared state
into Redis so several replicas agree. The contract is ``proxy.store.base``; the rules both back
ends share are ``proxy.store.common``.

Back-end packages are imported lazily: importing ``proxy.store.base`` must not pull in redis.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from proxy.store.base import FLUSH_ALL, Store

if TYPE_CHECKING:
    from proxy.settings import Settings


def open_store(settings: Settings) -> Store:
    """The configured back end, not yet opened (the caller awaits ``.open()``)."""
    if settings.redis_url:
        from proxy.store.redis import RedisStore

        return RedisStore(settings.redis_url, timeout_s=settings.redis_timeout_s)
    from proxy.store.sqlite import SqliteStore

    return SqliteStore(settings.store_path)


__all__ = ["FLUSH_ALL", "Store", "open_store"]
