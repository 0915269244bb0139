"""Tenant records (which hold each tenant's wrapped data keys) and the tenant's caller API keys, in
Redis. Both are written index first (registry, key set), then the record: see ``proxy.store.redis.keys``."""

from __future__ import annotations

from dataclasses import replace
from typing import Final

from proxy.model import ID_RE, ApiKeyRecord, TenantRecord, check_id
from proxy.store.base import ApiKeyStore, ExpectedVersion, TenantStore
from proxy.store.common import dumps
from proxy.store.redis.core import RedisCore, cas_args, conflict, loads, lua, queue_script
from proxy.store.redis.keys import CHANNEL, TENANTS, prefix

PUT_TENANT: Final = lua("put_tenant.lua")
PUT_API_KEY: Final = lua("put_api_key.lua")
TOUCH_API_KEY: Final = lua("touch_api_key.lua")


class RedisTenants(RedisCore, TenantStore, ApiKeyStore):
    async def get_tenant(self, tenant_id: str) -> TenantRecord | None:
        if not ID_RE.match(tenant_id):
            return None
        with self._guard("get_tenant", safe=True) as r:
            v, d = await r.hmget(prefix(tenant_id) + "tenant", ["v", "d"])
        if v is None or d is None:
            return None
        return TenantRecord.from_dict({**loads(d), "version": int(v)})

    async def put_tenant(self, record: TenantRecord, expected_version: ExpectedVersion) -> TenantRecord:
        t = check_id("tenant_id", record.tenant_id)
        mode, expected = cas_args(expected_version)
        with self._guard("put_tenant", safe=True) as r:  # SADD: a repeat changes nothing
            await self._confirm(
                "put_tenant", r.pipeline(transaction=False).sadd(TENANTS, t)
            )  # registry first
        status, value = await self._script(
            "put_tenant",
            PUT_TENANT,
            [prefix(t) + "tenant"],
            [mode, expected, dumps(record.to_dict()), CHANNEL, dumps({"t": t, "c": None})],
        )
        if status != "ok":
            conflict("tenant", t, expected_version, int(value))
        return replace(record, version=int(value))

    async def list_tenants(self) -> list[TenantRecord]:
        with self._guard("list_tenants", safe=True) as r:
            ids = sorted(await r.smembers(TENANTS))
            pipe = r.pipeline(transaction=False)
            for t in ids:
                pipe.hmget(prefix(t) + "tenant", ["v", "d"])
            rows = await pipe.execute() if ids else []
        return [
            TenantRecord.from_dict({**loads(d), "version": int(v)})
            for v, d in rows
            if v is not None and d is not None
        ]

    # --- API keys ---------------------------------------------------------------------------
    async def put_api_key(self, record: ApiKeyRecord) -> None:
        t = check_id("tenant_id", record.tenant_id)
        with self._guard("put_api_key", safe=True) as r:  # index first: see proxy.store.redis.keys
            await self._confirm(
                "put_api_key", r.pipeline(transaction=False).sadd(prefix(t) + "keys", record.key_id)
            )
        last = "" if record.last_used_at is None else repr(float(record.last_used_at))
        await self._script(
            "put_api_key",
            PUT_API_KEY,
            [f"cp:apikey:{record.key_id}"],
            [dumps(record.to_dict()), last],
            safe=True,  # the same fields again; last_used_at only moves forward
        )

    async def get_api_key(self, key_id: str) -> ApiKeyRecord | None:
        with self._guard("get_api_key", safe=True) as r:
            d, u = await r.hmget(f"cp:apikey:{key_id}", ["d", "u"])
        return _api_key(d, u)

    async def list_api_keys(self, tenant_id: str) -> list[ApiKeyRecord]:
        if not ID_RE.match(tenant_id):
            return []
        with self._guard("list_api_keys", safe=True) as r:
            ids = list(await r.smembers(prefix(tenant_id) + "keys"))
            pipe = r.pipeline(transaction=False)
            for key_id in ids:
                pipe.hmget(f"cp:apikey:{key_id}", ["d", "u"])
            rows = await pipe.execute() if ids else []
        keys = [k for k in (_api_key(d, u) for d, u in rows) if k is not None and k.tenant_id == tenant_id]
        return sorted(keys, key=lambda k: (k.created_at, k.key_id))

    async def touch_api_keys(self, last_used: dict[str, float]) -> None:
        if not last_used:
            return
        with self._guard("touch_api_keys", safe=True) as r:
            pipe = r.pipeline(transaction=False)
            for key_id, ts in last_used.items():
                queue_script(pipe, TOUCH_API_KEY, [f"cp:apikey:{key_id}"], [repr(float(ts))])
            await self._confirm("touch_api_keys", pipe)


def _api_key(d: str | None, u: str | None) -> ApiKeyRecord | None:
    if d is None:
        return None
    return ApiKeyRecord.from_dict({**loads(d), "last_used_at": float(u) if u else None})
