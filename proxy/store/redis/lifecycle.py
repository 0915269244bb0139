"""Opening and closing the Redis store, and knowing it is still the one opened (identity, meta).

Lost data: ``cp:meta`` carries the store's identity marker (``store_id``), written once. Every
new connection reads it before carrying a command (``_on_connect``: a Redis restarted empty is
caught before the first write reaches it), and a watcher re-reads it every
``IDENTITY_CHECK_S`` (a ``FLUSHDB`` leaves connections up). Missing or changed, the store
refuses every operation with ``StoreLost`` until the marker is back (a restored backup) or an
operator accepts the loss (``accept_loss``), and delivers ``FLUSH_ALL`` so no cache outlives
the data it came from. ``cp:meta`` is its own slot, so no script can check the marker
atomically in Cluster; the write that matters, a connection's ciphertexts, is instead checked
atomically against its tenant's key record (same slot), see ``put_connection``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Final

from redis.exceptions import ConnectionError as RedisConnectionError

from proxy.errors import ConfigError, StoreUnavailable
from proxy.store.base import FLUSH_ALL, IdentityStore, MetaStore, StoreLifecycle
from proxy.store.common import (
    SCHEMA_VERSION_KEY,
    STORE_ID_KEY,
    STORE_REPLACES_KEY,
    deliver,
    judge_identity,
    new_identity,
    redis_lost,
    reserved_meta,
)
from proxy.store.redis.core import RedisCore
from proxy.store.redis.keys import META, TENANTS
from proxy.store.redisconn import REDIS_FAILURES, aclose_client, connect, follow_master, retry_safe, warm

log = logging.getLogger("proxy.store.redis")

SCHEMA_VERSION: Final = 1
# How often a running store re-reads its identity marker (a FLUSHDB closes no connection).
IDENTITY_CHECK_S: Final = 1.0


class RedisLifecycle(RedisCore, StoreLifecycle, IdentityStore, MetaStore):
    # --- identity ---------------------------------------------------------------------------
    async def _on_connect(self, conn: Any) -> None:
        """Runs on every new connection before its first command: a Redis that came back empty
        (or another Redis at the same address) is refused before anything is written to it."""
        await conn.on_connect()
        if self.identity is None or self._accepting:  # open() / accept_loss() set the marker
            return
        await conn.send_command("HMGET", META, STORE_ID_KEY, STORE_REPLACES_KEY, check_health=False)
        found, replaces = await conn.read_response()
        self._judge(found, replaces)
        if self._lost is not None:
            raise RedisConnectionError("the store's identity marker does not match")

    def _judge(self, found: str | None, replaces: str | None) -> None:
        mine = self.identity
        if mine is None:
            return
        verdict = judge_identity(mine, found, replaces)
        if verdict is None:
            if self._lost is None:
                self._lost = redis_lost(mine, found)
                log.error("%s", self._lost.message)
                self._flush_caches()
            return
        if verdict != mine:
            log.warning(
                "store identity %s was replaced by %s (an operator accepted a data loss); adopting "
                "it and dropping every cache",
                mine,
                verdict,
            )
            self.identity = verdict
        elif self._lost is None:
            return
        else:
            log.warning("store identity %s is back (restored); serving again", mine)
        self._lost = None
        self._flush_caches()

    def _flush_caches(self) -> None:
        """Nothing cached from a store that vanished may be used against what replaced it."""
        task = asyncio.get_running_loop().create_task(deliver(self._callbacks, FLUSH_ALL, None))
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    async def _watch_identity(self) -> None:
        while not self._closing:
            await asyncio.sleep(IDENTITY_CHECK_S)
            client = self._client
            if client is None:
                return
            try:
                async with asyncio.timeout(max(self.timeout_s * 4, 1.0)):
                    # Sentinel: notice a failover within a second, not when the old master is
                    # demoted seconds later (it accepts writes until then, and loses them).
                    if await follow_master(client):
                        log.warning("redis master moved (Sentinel failover); reconnected to the new master")
                    with retry_safe():
                        found, replaces = await client.hmget(META, [STORE_ID_KEY, STORE_REPLACES_KEY])
            except (*REDIS_FAILURES, TimeoutError):
                continue  # unreachable is reported by every operation; a new connection re-checks
            self._judge(found, replaces)

    async def accept_loss(self) -> str:
        if self._client is None:
            raise StoreUnavailable("redis store is closed (accept_loss); open it first")
        new = new_identity()
        self._accepting = True
        try:
            pipe = self._client.pipeline(transaction=True)
            pipe.hsetnx(META, SCHEMA_VERSION_KEY, str(SCHEMA_VERSION))
            pipe.hset(META, mapping={STORE_ID_KEY: new, STORE_REPLACES_KEY: self.identity or ""})
            await pipe.execute()
        except REDIS_FAILURES as exc:
            raise StoreUnavailable(
                f"redis store unavailable during accept_loss ({type(exc).__name__}); check that "
                "Redis is running and reachable at the configured PROXY_REDIS_URL"
            ) from exc
        finally:
            self._accepting = False
        log.warning("store accepted as it is now: new identity %s replaces %s", new, self.identity)
        self._judge(new, self.identity)
        return new

    # --- lifecycle --------------------------------------------------------------------------
    async def open(self) -> None:
        if self._client is not None:
            return
        self._closing = False
        self._client = connect(
            self._target, timeout_s=self.timeout_s, decode_responses=True, connect_func=self._on_connect
        )
        try:
            with self._guard("open", safe=True) as r:
                await warm(r)
                await r.hsetnx(META, SCHEMA_VERSION_KEY, str(SCHEMA_VERSION))
                # A store opened without a marker is taken as new (a first start, or one from
                # before markers existed): nothing here can tell it from a Redis that lost its
                # data before this process started, so say so loudly when it has no tenants.
                marked = await r.hsetnx(META, STORE_ID_KEY, new_identity())
                found, identity = await r.hmget(META, [SCHEMA_VERSION_KEY, STORE_ID_KEY])
                tenants = await r.scard(TENANTS)
            if not (found or "").isdigit() or int(found or 0) > SCHEMA_VERSION:
                raise ConfigError(
                    "redis_url",
                    f"this Redis holds connection-proxy data of schema {found!r}, newer than the "
                    f"{SCHEMA_VERSION} this version knows; upgrade connection-proxy or use another database",
                )
            if marked:
                log.warning(
                    "redis store had no identity marker: marked it as store %s (%d tenants). If this "
                    "Redis held connection-proxy data before, that data is lost: restore the backup "
                    "before writing",
                    identity,
                    int(tenants),
                )
            self.identity = str(identity)
            self._watcher = asyncio.create_task(self._watch_identity(), name="redis-identity")
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        self._closing = True
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.wait({self._watcher}, timeout=2.0)
            self._watcher = None
        if self._listener is not None:
            self._listener.cancel()
            # Bounded: a client library that turns the cancellation into a connection error
            # must not keep shutdown waiting (the listener also checks _closing and stops).
            await asyncio.wait({self._listener}, timeout=2.0)
            self._listener = None
        self._callbacks.clear()
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(*REDIS_FAILURES):
                await aclose_client(client)

    async def ping(self) -> None:
        with self._guard("ping", safe=True) as r:
            await r.ping()

    # --- meta -------------------------------------------------------------------------------
    async def get_meta(self, key: str) -> str | None:
        with self._guard("get_meta", safe=True) as r:
            value = await r.hget(META, key)
        return None if value is None else str(value)

    async def set_meta(self, key: str, value: str) -> None:
        reserved_meta(key)
        with self._guard("set_meta", safe=True) as r:
            await self._confirm("set_meta", r.pipeline(transaction=False).hset(META, key, value))
