"""Connection records in the embedded store: compare-and-set writes that keep the runtime-user
index (a unique index on the table) and the change log in step, in one durable transaction."""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence
from typing import Any

from proxy.model import ConnectionRecord
from proxy.store.base import ConnectionStore, ExpectedVersion, Page
from proxy.store.common import (
    check_connection_ids,
    dumps,
    key_check_holds,
    key_record_changed,
    next_version,
    page_limit,
    runtime_user_taken,
)
from proxy.store.sqlite.changes import record_change
from proxy.store.sqlite.core import Db, SqliteCore, loads


class SqliteConnections(SqliteCore, ConnectionStore):
    async def get_connection(self, tenant_id: str, connection_id: str) -> ConnectionRecord | None:
        row = await self._run(
            "get_connection",
            lambda db: db.execute(
                "SELECT json, version FROM connections WHERE tenant_id = ? AND connection_id = ?",
                (tenant_id, connection_id),
            ).fetchone(),
        )
        return _connection(row) if row else None

    async def put_connection(
        self,
        record: ConnectionRecord,
        expected_version: ExpectedVersion,
        *,
        key_check: Mapping[str, str] | None = None,
    ) -> ConnectionRecord:
        check_connection_ids(record)
        t, c = record.tenant_id, record.connection_id

        def tx(db: Db) -> ConnectionRecord:
            if key_check:
                # In the write's own transaction: the key record cannot change in between.
                tenant = db.execute("SELECT json FROM tenants WHERE tenant_id = ?", (t,)).fetchone()
                if not key_check_holds(loads(tenant[0]) if tenant else None, key_check):
                    raise key_record_changed(t)
            row = db.execute(
                "SELECT version FROM connections WHERE tenant_id = ? AND connection_id = ?", (t, c)
            ).fetchone()
            current = int(row[0]) if row else None
            version = next_version("connection", c, expected_version, current)
            stored = record.evolve(version=version)
            values = (
                version,
                record.runtime_user_id,
                record.default_connection_id,
                record.integration_id,
                dumps(stored.to_dict()),
            )
            try:
                if current is None:
                    db.execute(
                        """INSERT INTO connections (version, runtime_user_id, default_connection_id,
                        integration_id, json, tenant_id, connection_id) VALUES (?, ?, ?, ?, ?, ?, ?)""",
                        (*values, t, c),
                    )
                else:
                    db.execute(
                        """UPDATE connections SET version = ?, runtime_user_id = ?,
                        default_connection_id = ?, integration_id = ?, json = ?
                        WHERE tenant_id = ? AND connection_id = ? AND version = ?""",
                        (*values, t, c, current),
                    )
            except sqlite3.IntegrityError:
                if not (record.default_connection_id and record.runtime_user_id):
                    raise
                raise runtime_user_taken(t, record.default_connection_id, record.runtime_user_id) from None
            record_change(db, t, c)
            return stored

        return await self._run("put_connection", lambda db: self._write(db, tx, durable=True))

    async def delete_connection(self, tenant_id: str, connection_id: str) -> bool:
        def tx(db: Db) -> bool:
            n = db.execute(
                "DELETE FROM connections WHERE tenant_id = ? AND connection_id = ?",
                (tenant_id, connection_id),
            ).rowcount
            if n:
                record_change(db, tenant_id, connection_id)
            return n > 0

        return await self._run("delete_connection", lambda db: self._write(db, tx, durable=True))

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
        sql = "SELECT json, version FROM connections WHERE tenant_id = ?"
        args: list[Any] = [tenant_id]
        for column, value in (
            ("connection_id >", cursor),
            ("runtime_user_id =", runtime_user_id),
            ("integration_id =", integration_id),
            ("default_connection_id =", default_connection_id),
        ):
            if value is not None:
                sql += f" AND {column} ?"
                args.append(value)
        sql += " ORDER BY connection_id LIMIT ?"
        args.append(limit + 1)
        rows = await self._run("list_connections", lambda db: db.execute(sql, args).fetchall())
        items = [_connection(r) for r in rows[:limit]]
        more = len(rows) > limit
        return Page(items, items[-1].connection_id if more else None)

    async def find_user_connection(
        self, tenant_id: str, default_connection_id: str, runtime_user_id: str
    ) -> ConnectionRecord | None:
        row = await self._run(
            "find_user_connection",
            lambda db: db.execute(
                """SELECT json, version FROM connections WHERE tenant_id = ?
                AND default_connection_id = ? AND runtime_user_id = ?""",
                (tenant_id, default_connection_id, runtime_user_id),
            ).fetchone(),
        )
        return _connection(row) if row else None


def _connection(row: Sequence[Any]) -> ConnectionRecord:
    return ConnectionRecord.from_dict({**loads(row[0]), "version": int(row[1])})
