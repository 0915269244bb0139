"""One-time tokens (connect sessions, OAuth state) and locks in the embedded store: short-lived
rows with an expiry, read as absent once expired and swept lazily."""

from __future__ import annotations

import secrets
import time
from typing import Any, Final

from proxy.store.base import EphemeralStore, LockStore
from proxy.store.common import dumps, ephemeral_digest
from proxy.store.sqlite.core import Db, SqliteCore, loads

SWEEP_INTERVAL_S: Final = 60.0


class SqliteTokens(SqliteCore, EphemeralStore, LockStore):
    def _sweep(self, db: Db, now: float) -> None:
        """Expired tokens and locks are removed lazily, at most once a minute per process."""
        if now - self._last_sweep >= SWEEP_INTERVAL_S:
            self._last_sweep = now
            db.execute("DELETE FROM ephemeral WHERE expires_at <= ?", (now,))
            db.execute("DELETE FROM locks WHERE expires_at <= ?", (now,))

    async def put_ephemeral(self, namespace: str, key: str, value: dict[str, Any], ttl_s: float) -> None:
        blob, digest = dumps(value), ephemeral_digest(key)

        def tx(db: Db) -> None:
            now = time.time()
            self._sweep(db, now)
            db.execute(
                "INSERT OR REPLACE INTO ephemeral (ns, key, json, expires_at) VALUES (?, ?, ?, ?)",
                (namespace, digest, blob, now + ttl_s),
            )

        await self._run("put_ephemeral", lambda db: self._write(db, tx))

    async def get_ephemeral(self, namespace: str, key: str) -> dict[str, Any] | None:
        digest = ephemeral_digest(key)
        row = await self._run(
            "get_ephemeral",
            lambda db: db.execute(
                "SELECT json FROM ephemeral WHERE ns = ? AND key = ? AND expires_at > ?",
                (namespace, digest, time.time()),
            ).fetchone(),
        )
        return loads(row[0]) if row else None

    async def pop_ephemeral(self, namespace: str, key: str) -> dict[str, Any] | None:
        digest = ephemeral_digest(key)

        def tx(db: Db) -> Any:
            return db.execute(
                "DELETE FROM ephemeral WHERE ns = ? AND key = ? RETURNING json, expires_at",
                (namespace, digest),
            ).fetchone()

        row = await self._run("pop_ephemeral", lambda db: self._write(db, tx))
        if row is None or row[1] <= time.time():
            return None
        return loads(row[0])

    # --- locks ------------------------------------------------------------------------------
    async def acquire_lock(self, name: str, ttl_s: float) -> str | None:
        token = secrets.token_urlsafe(18)

        def tx(db: Db) -> str | None:
            now = time.time()
            self._sweep(db, now)
            row = db.execute("SELECT expires_at FROM locks WHERE name = ?", (name,)).fetchone()
            if row is not None and row[0] > now:
                return None
            db.execute(
                "INSERT OR REPLACE INTO locks (name, token, expires_at) VALUES (?, ?, ?)",
                (name, token, now + ttl_s),
            )
            return token

        return await self._run("acquire_lock", lambda db: self._write(db, tx))

    async def release_lock(self, name: str, token: str) -> bool:
        def tx(db: Db) -> Any:
            return db.execute(
                "DELETE FROM locks WHERE name = ? AND token = ? RETURNING expires_at", (name, token)
            ).fetchone()

        row = await self._run("release_lock", lambda db: self._write(db, tx))
        # An expired lock is no longer owned (same as Redis, where the key is gone).
        return row is not None and row[0] > time.time()
