"""``RedisStore``: the shared back end, assembled from one mixin per concern of the contract.

All state lives in ``RedisCore`` (the mixins share one client, script cache, identity watcher
and subscription); each mixin holds the operations of one part of ``proxy.store.base``.
"""

from __future__ import annotations

from proxy.store.base import Store
from proxy.store.redis.audit import RedisAudit
from proxy.store.redis.connections import RedisConnections
from proxy.store.redis.lifecycle import RedisLifecycle
from proxy.store.redis.pubsub import RedisPubSub
from proxy.store.redis.tenants import RedisTenants
from proxy.store.redis.tokens import RedisTokens


class RedisStore(
    RedisLifecycle,
    RedisTenants,
    RedisConnections,
    RedisAudit,
    RedisTokens,
    RedisPubSub,
    Store,
):
    name = "redis"
