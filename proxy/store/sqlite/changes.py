"""Cross-process cache invalidation for the embedded store: a change log polled by every process.

Every tenant/connection write appends a row to ``changes`` in the same transaction
(``record_change``); ``subscribe_invalidations`` polls it every 0.25 s and names what changed.
Own writes are delivered too (caches treat flushes idempotently). A subscriber that fell behind
the trimmed log gets ``(FLUSH_ALL, None)``.
"""

from __future__ import annotations

import asyncio
from typing import Any, Final

from proxy.errors import ProxyError
from proxy.store.base import FLUSH_ALL, InvalidationCallback, InvalidationStore
from proxy.store.common import deliver
from proxy.store.sqlite.core import Db, SqliteCore, log

CHANGES_KEPT: Final = 10_000


def record_change(db: Db, tenant_id: str, connection_id: str | None) -> None:
    """Called inside the write's own transaction, so the change is logged exactly when it lands."""
    seq = db.execute(
        "INSERT INTO changes (tenant_id, connection_id) VALUES (?, ?)", (tenant_id, connection_id)
    ).lastrowid
    if seq is not None and seq % 256 == 0:
        db.execute("DELETE FROM changes WHERE seq <= ?", (seq - CHANGES_KEPT,))


class SqliteChanges(SqliteCore, InvalidationStore):
    async def publish_invalidation(self, tenant_id: str, connection_id: str | None) -> None:
        await self._run(
            "publish_invalidation",
            lambda db: self._write(db, lambda d: record_change(d, tenant_id, connection_id)),
        )

    async def subscribe_invalidations(self, callback: InvalidationCallback) -> None:
        self._callbacks.append(callback)
        if self._poller is None:
            start = await self._run(
                "subscribe_invalidations",
                lambda db: int(db.execute("SELECT coalesce(max(seq), 0) FROM changes").fetchone()[0]),
            )
            self._poller = asyncio.create_task(self._poll(start), name="sqlite-invalidations")

    async def _poll(self, last: int) -> None:
        def fetch(db: Db) -> list[Any]:
            return db.execute(
                "SELECT seq, tenant_id, connection_id FROM changes WHERE seq > ? ORDER BY seq LIMIT 1000",
                (last,),
            ).fetchall()

        while True:
            try:
                rows = await self._run("poll invalidations", fetch)
            except ProxyError as exc:
                log.warning("invalidation poll failed, retrying: %s", exc.message)
                await asyncio.sleep(self.poll_interval_s * 4)
                continue
            except Exception:
                log.exception("invalidation poll failed, retrying")
                await asyncio.sleep(self.poll_interval_s * 4)
                continue
            if rows and rows[0][0] > last + 1:
                # The log was trimmed past our position: we cannot name what we missed.
                await deliver(self._callbacks, FLUSH_ALL, None)
            seen: set[tuple[str, str | None]] = set()
            for seq, tenant_id, connection_id in rows:
                last = int(seq)
                if (tenant_id, connection_id) not in seen:
                    seen.add((tenant_id, connection_id))
                    await deliver(self._callbacks, tenant_id, connection_id)
            if len(rows) < 1000:
                await asyncio.sleep(self.poll_interval_s)
