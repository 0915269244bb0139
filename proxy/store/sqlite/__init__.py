"""The embedded store: one SQLite file, so a single machine needs no Redis.

One module per concern, each saying why it looks the way it does:

- ``core``: the worker thread that owns the connection, the transaction shape (which writes are
  durable), and the check that the file is still the one opened;
- ``schema``: tables and migrations; ``lifecycle``: open/close, WAL, file modes, the identity
  marker and meta;
- ``tenants`` (with their API keys), ``connections``, ``audit``, ``tokens`` (one-time tokens and
  locks), ``changes`` (cross-process invalidation through a polled change log);
- ``store``: ``SqliteStore``, assembled from them.
"""

from __future__ import annotations

from proxy.store.sqlite.schema import SCHEMA_VERSION
from proxy.store.sqlite.store import SqliteStore

__all__ = ["SCHEMA_VERSION", "SqliteStore"]
