"""Tenant records (which hold each tenant's wrapped data keys) and the tenant's caller API keys,
in the embedded store. Both are durable writes (see ``proxy.store.sqlite.core``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from proxy.model import ApiKeyRecord, TenantRecord, check_id
from proxy.store.base import ApiKeyStore, ExpectedVersion, TenantStore
from proxy.store.common import dumps, next_version
from proxy.store.sqlite.changes import record_change
from proxy.store.sqlite.core import Db, SqliteCore, loads


class SqliteTenants(SqliteCore, TenantStore, ApiKeyStore):
    async def get_tenant(self, tenant_id: str) -> TenantRecord | None:
        row = await self._run(
            "get_tenant",
            lambda db: db.execute(
                "SELECT json, version FROM tenants WHERE tenant_id = ?", (tenant_id,)
            ).fetchone(),
        )
        return _tenant(row) if row else None

    async def put_tenant(self, record: TenantRecord, expected_version: ExpectedVersion) -> TenantRecord:
        check_id("tenant_id", record.tenant_id)

        def tx(db: Db) -> TenantRecord:
            row = db.execute(
                "SELECT version FROM tenants WHERE tenant_id = ?", (record.tenant_id,)
            ).fetchone()
            current = int(row[0]) if row else None
            version = next_version("tenant", record.tenant_id, expected_version, current)
            stored = replace(record, version=version)
            if current is None:
                db.execute(
                    "INSERT INTO tenants (tenant_id, version, json) VALUES (?, ?, ?)",
                    (record.tenant_id, version, dumps(stored.to_dict())),
                )
            else:
                db.execute(
                    "UPDATE tenants SET version = ?, json = ? WHERE tenant_id = ? AND version = ?",
                    (version, dumps(stored.to_dict()), record.tenant_id, current),
                )
            record_change(db, record.tenant_id, None)
            return stored

        return await self._run("put_tenant", lambda db: self._write(db, tx, durable=True))

    async def list_tenants(self) -> list[TenantRecord]:
        rows = await self._run(
            "list_tenants",
            lambda db: db.execute("SELECT json, version FROM tenants ORDER BY tenant_id").fetchall(),
        )
        return [_tenant(r) for r in rows]

    # --- API keys ---------------------------------------------------------------------------
    async def put_api_key(self, record: ApiKeyRecord) -> None:
        def tx(db: Db) -> None:
            # last_used_at only moves forward, even when a stale copy is written back.
            db.execute(
                """INSERT INTO api_keys (key_id, tenant_id, created_at, last_used_at, json)
                VALUES (?, ?, ?, ?, ?) ON CONFLICT (key_id) DO UPDATE SET
                tenant_id = excluded.tenant_id, created_at = excluded.created_at, json = excluded.json,
                last_used_at = max(coalesce(last_used_at, excluded.last_used_at),
                                   coalesce(excluded.last_used_at, last_used_at))""",
                (
                    record.key_id,
                    record.tenant_id,
                    record.created_at,
                    record.last_used_at,
                    dumps(record.to_dict()),
                ),
            )

        await self._run("put_api_key", lambda db: self._write(db, tx, durable=True))

    async def get_api_key(self, key_id: str) -> ApiKeyRecord | None:
        row = await self._run(
            "get_api_key",
            lambda db: db.execute(
                "SELECT json, last_used_at FROM api_keys WHERE key_id = ?", (key_id,)
            ).fetchone(),
        )
        return _api_key(row) if row else None

    async def list_api_keys(self, tenant_id: str) -> list[ApiKeyRecord]:
        rows = await self._run(
            "list_api_keys",
            lambda db: db.execute(
                "SELECT json, last_used_at FROM api_keys WHERE tenant_id = ? ORDER BY created_at, key_id",
                (tenant_id,),
            ).fetchall(),
        )
        return [_api_key(r) for r in rows]

    async def touch_api_keys(self, last_used: dict[str, float]) -> None:
        if not last_used:
            return
        pairs = [(float(ts), key_id, float(ts)) for key_id, ts in last_used.items()]

        def tx(db: Db) -> None:
            db.executemany(
                """UPDATE api_keys SET last_used_at = ?
                WHERE key_id = ? AND (last_used_at IS NULL OR last_used_at < ?)""",
                pairs,
            )

        await self._run("touch_api_keys", lambda db: self._write(db, tx))


def _tenant(row: Sequence[Any]) -> TenantRecord:
    return TenantRecord.from_dict({**loads(row[0]), "version": int(row[1])})


def _api_key(row: Sequence[Any]) -> ApiKeyRecord:
    return ApiKeyRecord.from_dict({**loads(row[0]), "last_used_at": row[1]})
