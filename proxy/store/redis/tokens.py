"""One-time tokens (connect sessions, OAuth state) and locks in Redis: keys with a PX TTL, so an
expired one is simply gone."""

from __future__ import annotations

import math
import secrets
from typing import Any, Final

from proxy.store.base import EphemeralStore, LockStore
from proxy.store.common import dumps
from proxy.store.redis.core import RedisCore, loads, lua
from proxy.store.redis.keys import ephemeral_key

RELEASE_LOCK: Final = lua("release_lock.lua")


class RedisTokens(RedisCore, EphemeralStore, LockStore):
    async def put_ephemeral(self, namespace: str, key: str, value: dict[str, Any], ttl_s: float) -> None:
        with self._guard("put_ephemeral", safe=True) as r:
            pipe = r.pipeline(transaction=False).set(
                ephemeral_key(namespace, key), dumps(value), px=_ttl_ms(ttl_s)
            )
            await self._confirm("put_ephemeral", pipe)

    async def get_ephemeral(self, namespace: str, key: str) -> dict[str, Any] | None:
        with self._guard("get_ephemeral", safe=True) as r:
            value = await r.get(ephemeral_key(namespace, key))
        return None if value is None else loads(value)

    async def pop_ephemeral(self, namespace: str, key: str) -> dict[str, Any] | None:
        with self._guard("pop_ephemeral") as r:
            (value,) = await self._confirm(
                "pop_ephemeral", r.pipeline(transaction=False).getdel(ephemeral_key(namespace, key))
            )
        return None if value is None else loads(value)

    # --- locks ------------------------------------------------------------------------------
    async def acquire_lock(self, name: str, ttl_s: float) -> str | None:
        token = secrets.token_urlsafe(18)
        with self._guard("acquire_lock") as r:
            # With wait_replicas, a lock the replicas did not confirm is not held (StoreUnavailable):
            # a failover could hand the same name to another replica while this one holds it.
            pipe = r.pipeline(transaction=False).set(f"cp:lock:{name}", token, nx=True, px=_ttl_ms(ttl_s))
            (ok,) = await self._confirm("acquire_lock", pipe)
        return token if ok else None

    async def release_lock(self, name: str, token: str) -> bool:
        return bool(await self._script("release_lock", RELEASE_LOCK, [f"cp:lock:{name}"], [token]))


def _ttl_ms(ttl_s: float) -> int:
    return max(1, math.ceil(ttl_s * 1000))
