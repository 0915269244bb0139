"""The audit trail in the embedded store: appended in batches, read newest first by sequence
number (the cursor), pruned by age in small transactions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from proxy.model import AuditEvent
from proxy.store.base import AuditQuery, AuditStore, Page
from proxy.store.common import audit_json, bad_cursor, page_limit
from proxy.store.sqlite.core import Db, SqliteCore, loads

PRUNE_BATCH: Final = 5000


class SqliteAudit(SqliteCore, AuditStore):
    async def append_audit(self, events: Sequence[AuditEvent]) -> None:
        if not events:
            return
        rows = [
            (e.tenant_id, e.ts, e.action, e.actor, e.outcome, e.connection_id, audit_json(e)) for e in events
        ]

        def tx(db: Db) -> None:
            db.executemany(
                """INSERT INTO audit (tenant_id, ts, action, actor, outcome, connection_id, json)
                VALUES (?, ?, ?, ?, ?, ?, ?)""",
                rows,
            )

        await self._run("append_audit", lambda db: self._write(db, tx))

    async def query_audit(self, query: AuditQuery) -> Page:
        limit = page_limit(query.limit)
        sql = "SELECT seq, json FROM audit WHERE tenant_id = ?"
        args: list[Any] = [query.tenant_id]
        if query.cursor is not None:
            # ASCII digits that fit SQLite's 64-bit integer ("²".isdigit() is True)
            if not (query.cursor.isascii() and query.cursor.isdigit() and len(query.cursor) <= 18):
                raise bad_cursor()
            sql += " AND seq < ?"
            args.append(int(query.cursor))
        for column, value in (
            ("connection_id =", query.connection_id),
            ("action =", query.action),
            ("actor =", query.actor),
            ("outcome =", query.outcome),
            ("ts >=", query.since),
            ("ts <", query.until),
        ):
            if value is not None:
                sql += f" AND {column} ?"
                args.append(value)
        sql += " ORDER BY seq DESC LIMIT ?"
        args.append(limit + 1)
        rows = await self._run("query_audit", lambda db: db.execute(sql, args).fetchall())
        items = [AuditEvent.from_dict({**loads(j), "seq": int(seq)}) for seq, j in rows[:limit]]
        return Page(items, str(items[-1].seq) if len(rows) > limit else None)

    async def prune_audit(self, before_ts: float) -> int:
        # Small transactions, so the writer lock is never held for long by a large backlog.
        def batch(db: Db) -> int:
            cur = db.execute(
                "DELETE FROM audit WHERE seq IN (SELECT seq FROM audit WHERE ts < ? LIMIT ?)",
                (before_ts, PRUNE_BATCH),
            )
            return int(cur.rowcount)

        total = 0
        while True:
            n = await self._run("prune_audit", lambda db: self._write(db, batch))
            total += n
            if n < PRUNE_BATCH:
                return total
