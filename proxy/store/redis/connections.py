"""Connection records in Redis: each write is one script that keeps the record, its indexes
(list filters, the unique runtime-user key) and the invalidation in step, in the tenant's slot."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from proxy.model import ID_RE, ConnectionRecord
from proxy.store.base import ConnectionStore, ExpectedVersion, Page
from proxy.store.common import (
    check_connection_ids,
    dumps,
    key_record_changed,
    page_limit,
    runtime_user_taken,
)
from proxy.store.redis.core import MAX_BATCH, RedisCore, cas_args, conflict, loads, lua
from proxy.store.redis.keys import CHANNEL, conn_key, prefix

PUT_CONNECTION: Final = lua("put_connection.lua")
DELETE_CONNECTION: Final = lua("delete_connection.lua")
FIND_USER_CONNECTION: Final = lua("find_user_connection.lua")


class RedisConnections(RedisCore, ConnectionStore):
    async def get_connection(self, tenant_id: str, connection_id: str) -> ConnectionRecord | None:
        if not ID_RE.match(tenant_id):
            return None
        with self._guard("get_connection", safe=True) as r:
            v, d = await r.hmget(conn_key(tenant_id, connection_id), ["v", "d"])
        return _connection(v, d)

    async def put_connection(
        self,
        record: ConnectionRecord,
        expected_version: ExpectedVersion,
        *,
        key_check: Mapping[str, str] | None = None,
    ) -> ConnectionRecord:
        check_connection_ids(record)
        t, c = record.tenant_id, record.connection_id
        mode, expected = cas_args(expected_version)
        status, value = await self._script(
            "put_connection",
            PUT_CONNECTION,
            [conn_key(t, c), prefix(t) + "cidx"],
            [
                mode,
                expected,
                dumps(record.to_dict()),
                c,
                record.runtime_user_id or "",
                record.default_connection_id or "",
                record.integration_id or "",
                prefix(t),
                CHANNEL,
                dumps({"t": t, "c": c}),
                dumps(dict(key_check)) if key_check else "",
            ],
        )
        if status == "nokeys":
            raise key_record_changed(t)
        if status == "taken":
            raise runtime_user_taken(t, record.default_connection_id or "", record.runtime_user_id or "")
        if status != "ok":
            conflict("connection", c, expected_version, int(value))
        return record.evolve(version=int(value))

    async def delete_connection(self, tenant_id: str, connection_id: str) -> bool:
        if not ID_RE.match(tenant_id):
            return False
        deleted = await self._script(
            "delete_connection",
            DELETE_CONNECTION,
            [conn_key(tenant_id, connection_id), prefix(tenant_id) + "cidx"],
            [connection_id, prefix(tenant_id), CHANNEL, dumps({"t": tenant_id, "c": connection_id})],
        )
        return bool(deleted)

    async def list_connections(
        self,
        tenant_id: str,
        *,
        runtime_user_id: str | None = None,
        integration_id: str | None = None,
        default_connection_id: str | None = None,
        cursor: str | None = None,
        limit: int = 100,
    ) -> Page:
        limit = page_limit(limit)
        if not ID_RE.match(tenant_id):
            return Page([], None)
        p = prefix(tenant_id)
        # Walk the narrowest index; the record itself is authoritative for every filter.
        if runtime_user_id is not None:
            index = f"{p}ru/{runtime_user_id}"
        elif default_connection_id is not None:
            index = f"{p}dc/{default_connection_id}"
        elif integration_id is not None:
            index = f"{p}in/{integration_id}"
        else:
            index = f"{p}cidx"
        start = "-" if cursor is None else f"({cursor}"
        batch = min(max(limit + 1, 50), MAX_BATCH)
        items: list[ConnectionRecord] = []
        with self._guard("list_connections", safe=True) as r:
            while len(items) <= limit:
                ids = await r.zrangebylex(index, start, "+", start=0, num=batch)
                if not ids:
                    break
                pipe = r.pipeline(transaction=False)
                for cid in ids:
                    pipe.hmget(p + "c:" + cid, ["v", "d"])
                for v, d in await pipe.execute():
                    rec = _connection(v, d)
                    if rec is not None and (
                        (runtime_user_id is None or rec.runtime_user_id == runtime_user_id)
                        and (integration_id is None or rec.integration_id == integration_id)
                        and (
                            default_connection_id is None
                            or rec.default_connection_id == default_connection_id
                        )
                    ):
                        items.append(rec)
                if len(ids) < batch:
                    break
                start = "(" + ids[-1]
        more = len(items) > limit
        items = items[:limit]
        return Page(items, items[-1].connection_id if more else None)

    async def find_user_connection(
        self, tenant_id: str, default_connection_id: str, runtime_user_id: str
    ) -> ConnectionRecord | None:
        if not ID_RE.match(tenant_id):
            return None
        p = prefix(tenant_id)
        row = await self._script(
            "find_user_connection",
            FIND_USER_CONNECTION,
            [f"{p}ruc/{default_connection_id}/{runtime_user_id}"],
            [p],
            safe=True,
            write=False,
        )
        return _connection(row[0], row[1]) if row else None


def _connection(v: str | None, d: str | None) -> ConnectionRecord | None:
    if v is None or d is None:
        return None
    return ConnectionRecord.from_dict({**loads(d), "version": int(v)})
