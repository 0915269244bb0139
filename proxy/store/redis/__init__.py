"""The shared store: Redis, so every replica sees the same connections, keys, audit and locks.

One module per concern, each saying why it looks the way it does:

- ``keys``: the key layout (Redis Cluster-safe: every multi-key command or script touches ONE
  hash slot) and the order of the writes that span two slots;
- ``core``: the client, error translation (never the URL) and the script cache;
- ``lifecycle``: open/close, the identity marker that catches a Redis that lost its data, meta;
- ``tenants`` (with their API keys), ``connections``, ``audit``, ``tokens`` (one-time tokens and
  locks), ``pubsub`` (cross-replica invalidation);
- ``store``: ``RedisStore``, assembled from them.

Every script is a ``.lua`` file beside the module that runs it.
"""

from __future__ import annotations

from proxy.store.redis.lifecycle import SCHEMA_VERSION
from proxy.store.redis.store import RedisStore

__all__ = ["SCHEMA_VERSION", "RedisStore"]
