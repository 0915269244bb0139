"""The embedded store: one SQLite file, so a single machine needs no Redis.

Why it looks like this:

- stdlib ``sqlite3`` runs in ONE dedicated worker thread that owns the connection; coroutines
  hand it closures via ``run_in_executor``, so the event loop never blocks on disk I/O.
- WAL mode and ``busy_timeout`` let several worker processes (``serve --workers N``) share the
  file: readers never block, writers queue. Every write is one ``BEGIN IMMEDIATE`` transaction,
  so a ``kill -9`` mid-write leaves each record either old or new, never torn.
- ``synchronous=NORMAL`` is crash-safe for process crashes and keeps a consistent prefix of
  commits across power loss. Writes whose loss after an acknowledged success would hurt run
  with ``synchronous=FULL``: meta and tenant records (key-ring bookkeeping: an operator may
  retire an old master key once a rewrap reported success), connections (a rotated OAuth
  refresh token cannot be recovered) and API keys (shown once to the user). High-volume
  writes (audit, last-used touches, one-time tokens, locks, change log) stay NORMAL.
- Cross-process cache invalidation: every tenant/connection write appends a row to
  ``changes`` in the same transaction; ``subscribe_invalidations`` polls it every 0.25 s and
  names what changed. Own writes are delivered too (caches treat flushes idempotently). A
  subscriber that fell behind the trimmed log gets ``(FLUSH_ALL, None)``.
- Lost data: a database file deleted or replaced while the service runs leaves this process
  writing into an unlinked inode, lost at the next start. Every operation first compares the
  path's (device, inode) with the file opened (one ``stat``, about a microsecond) and, when it
  differs, refuses with ``StoreLost``; ``accept_loss`` reopens whatever file is there now. The
  identity marker (``store_id`` in ``meta``) is kept as on Redis and reported by ``/readyz``.
- The data directory is created 0700 and the database file 0600 (it holds ciphertext and key
  hashes; SQLite gives its -wal/-shm files the same mode).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, Final, TypeVar

from proxy.errors import ConfigError, ProxyError, StoreLost, StoreUnavailable
from proxy.model import ApiKeyRecord, AuditEvent, ConnectionRecord, TenantRecord, check_id
from proxy.store.base import FLUSH_ALL, AuditQuery, ExpectedVersion, InvalidationCallback, Page, Store
from proxy.store.common import (
    SCHEMA_VERSION_KEY,
    STORE_ID_KEY,
    STORE_REPLACES_KEY,
    audit_json,
    bad_cursor,
    check_connection_ids,
    deliver,
    dumps,
    ephemeral_digest,
    key_check_holds,
    key_record_changed,
    new_identity,
    next_version,
    page_limit,
    reserved_meta,
    runtime_user_taken,
    store_lost,
)

log = logging.getLogger("proxy.store.sqlite")
T = TypeVar("T")
Db = sqlite3.Connection

SCHEMA_VERSION: Final = 2
PRUNE_BATCH: Final = 5000
CHANGES_KEPT: Final = 10_000
SWEEP_INTERVAL_S: Final = 60.0

# version -> statements bringing the previous version up to it; run in one transaction at open.
MIGRATIONS: Final[dict[int, tuple[str, ...]]] = {
    1: (
        """CREATE TABLE tenants (
            tenant_id TEXT PRIMARY KEY, version INTEGER NOT NULL, json TEXT NOT NULL
        ) WITHOUT ROWID""",
        """CREATE TABLE connections (
            tenant_id TEXT NOT NULL, connection_id TEXT NOT NULL, version INTEGER NOT NULL,
            runtime_user_id TEXT, default_connection_id TEXT, integration_id TEXT NOT NULL,
            json TEXT NOT NULL, PRIMARY KEY (tenant_id, connection_id)
        ) WITHOUT ROWID""",
        # One runtime-user connection per (default connection, user): find_user_connection.
        """CREATE UNIQUE INDEX connections_runtime_user
            ON connections (tenant_id, default_connection_id, runtime_user_id)
            WHERE default_connection_id IS NOT NULL AND runtime_user_id IS NOT NULL""",
        """CREATE INDEX connections_by_user ON connections (tenant_id, runtime_user_id, connection_id)
            WHERE runtime_user_id IS NOT NULL""",
        """CREATE TABLE api_keys (
            key_id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL, created_at REAL NOT NULL,
            last_used_at REAL, json TEXT NOT NULL
        ) WITHOUT ROWID""",
        "CREATE INDEX api_keys_tenant ON api_keys (tenant_id, created_at, key_id)",
        """CREATE TABLE audit (
            seq INTEGER PRIMARY KEY AUTOINCREMENT, tenant_id TEXT NOT NULL, ts REAL NOT NULL,
            action TEXT NOT NULL, actor TEXT NOT NULL, outcome TEXT NOT NULL,
            connection_id TEXT, json TEXT NOT NULL
        )""",
        "CREATE INDEX audit_tenant_seq ON audit (tenant_id, seq)",
        """CREATE TABLE ephemeral (
            ns TEXT NOT NULL, key TEXT NOT NULL, json TEXT NOT NULL, expires_at REAL NOT NULL,
            PRIMARY KEY (ns, key)
        ) WITHOUT ROWID""",
        """CREATE TABLE locks (
            name TEXT PRIMARY KEY, token TEXT NOT NULL, expires_at REAL NOT NULL
        ) WITHOUT ROWID""",
        """CREATE TABLE changes (
            seq INTEGER PRIMARY KEY AUTOINCREMENT, tenant_id TEXT NOT NULL, connection_id TEXT
        )""",
    ),
    # Audit retention deletes by age.
    2: ("CREATE INDEX audit_ts ON audit (ts)",),
}


class SqliteStore(Store):
    name = "sqlite"

    def __init__(self, path: Path, *, poll_interval_s: float = 0.25, busy_timeout_s: float = 5.0) -> None:
        self.path = Path(path)
        self.poll_interval_s = poll_interval_s
        self.busy_timeout_s = busy_timeout_s
        self._executor: ThreadPoolExecutor | None = None
        self._db: Db | None = None
        self._callbacks: list[InvalidationCallback] = []
        self._poller: asyncio.Task[None] | None = None
        self._last_sweep = 0.0
        self._file: tuple[int, int] | None = None  # (st_dev, st_ino) of the file opened
        self._lost: StoreLost | None = None

    # --- plumbing ---------------------------------------------------------------------------
    async def _run(self, op: str, fn: Callable[[Db], T]) -> T:
        if self._executor is None:
            raise StoreUnavailable(f"embedded store is closed ({op}); open it first")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._call, op, fn)

    def _call(self, op: str, fn: Callable[[Db], T]) -> T:
        db = self._db
        if db is None:
            raise StoreUnavailable(f"embedded store is closed ({op}); open it first")
        self._check_file()
        try:
            return fn(db)
        except sqlite3.Error as exc:
            # SQLite messages name tables/columns and conditions, never bound values.
            raise StoreUnavailable(
                f"embedded store failed during {op}: {exc}; check the disk and {self.path}"
            ) from exc

    @staticmethod
    def _write(db: Db, fn: Callable[[Db], T], *, durable: bool = False) -> T:
        if durable:
            db.execute("PRAGMA synchronous=FULL")
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                result = fn(db)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            return result
        finally:
            if durable:
                db.execute("PRAGMA synchronous=NORMAL")

    def _check_file(self) -> None:
        """The file at ``path`` must still be the one opened (see the module docstring)."""
        if self._lost is None:
            try:
                st = os.stat(self.path)
                now: tuple[int, int] | None = (st.st_dev, st.st_ino)
            except FileNotFoundError:
                now = None
            if now == self._file:
                return
            what = "its file was deleted" if now is None else "its file was replaced by another one"
            self._lost = store_lost(
                "embedded",
                self.identity or "?",
                f"{what} at {self.path} while the service ran",
                "Put the backup back at that path and restart the service, or accept the file "
                "there now with POST /admin/store/accept-loss",
            )
            log.error("%s", self._lost.message)
        raise self._lost

    # --- lifecycle --------------------------------------------------------------------------
    async def open(self) -> None:
        if self._executor is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-store")
        loop = asyncio.get_running_loop()
        try:
            self._db = await loop.run_in_executor(self._executor, self._connect)
            self.identity = await self.get_meta(STORE_ID_KEY)
        except BaseException:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise

    def _connect(self) -> Db:
        directory = self.path.parent
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Created 0600 before SQLite sees it: the file never exists with wider permissions.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            os.close(fd)
        except OSError as exc:
            raise ConfigError(
                "data_dir", f"cannot create the store at {self.path}: {exc.strerror}; fix permissions"
            ) from None
        try:
            db = sqlite3.connect(
                self.path, timeout=self.busy_timeout_s, isolation_level=None, check_same_thread=True
            )
        except sqlite3.Error as exc:
            raise ConfigError("data_dir", f"cannot open the store at {self.path}: {exc}") from None
        try:
            db.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_s * 1000)}")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            self._write(db, self._migrate, durable=True)
            st = os.stat(self.path)
            self._file = (st.st_dev, st.st_ino)
        except ConfigError:
            db.close()
            raise
        except sqlite3.OperationalError as exc:  # locked, I/O: transient, not a bad setting
            db.close()
            raise StoreUnavailable(f"embedded store at {self.path} cannot be opened: {exc}") from exc
        except sqlite3.DatabaseError as exc:
            db.close()
            raise ConfigError(
                "data_dir",
                f"{self.path} cannot be used as the store ({exc}); restore it from a backup or "
                "point PROXY_DATA_DIR at another folder",
            ) from None
        return db

    def _migrate(self, db: Db) -> None:
        db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        row = db.execute("SELECT value FROM meta WHERE key = ?", (SCHEMA_VERSION_KEY,)).fetchone()
        try:
            current = int(row[0]) if row else 0
        except ValueError:
            current = -1
        if current < 0 or current > SCHEMA_VERSION:
            raise ConfigError(
                "data_dir",
                f"{self.path} has schema version {row[0] if row else '?'} but this connection-proxy "
                f"knows up to {SCHEMA_VERSION}; upgrade connection-proxy or use another data_dir",
            )
        for version in range(current + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[version]:
                db.execute(statement)
        db.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
            (SCHEMA_VERSION_KEY, str(SCHEMA_VERSION)),
        )
        db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)", (STORE_ID_KEY, new_identity()))

    async def accept_loss(self) -> str:
        """Reopens the file now at ``path`` (creating it if gone) and marks it anew."""
        if self._executor is None:
            raise StoreUnavailable("embedded store is closed (accept_loss); open it first")
        old = self.identity or ""

        def reopen() -> str:
            if self._db is not None:
                _close_db(self._db)
            self._db = self._connect()
            new = new_identity()
            self._write(
                self._db,
                lambda db: db.executemany(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                    [(STORE_ID_KEY, new), (STORE_REPLACES_KEY, old)],
                ),
                durable=True,
            )
            return new

        new = await asyncio.get_running_loop().run_in_executor(self._executor, reopen)
        log.warning("embedded store accepted as it is now: new identity %s replaces %s", new, old)
        self.identity, self._lost = new, None
        await deliver(self._callbacks, FLUSH_ALL, None)
        return new

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        self._callbacks.clear()
        executor, self._executor = self._executor, None
        if executor is None:
            return
        db, self._db = self._db, None
        if db is not None:
            await asyncio.get_running_loop().run_in_executor(executor, _close_db, db)
        executor.shutdown(wait=False)

    async def ping(self) -> None:
        await self._run("ping", lambda db: db.execute("SELECT 1").fetchone())

    # --- meta -------------------------------------------------------------------------------
    async def get_meta(self, key: str) -> str | None:
        row = await self._run(
            "get_meta", lambda db: db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        )
        return str(row[0]) if row else None

    async def set_meta(self, key: str, value: str) -> None:
        reserved_meta(key)

        def tx(db: Db) -> None:
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

        await self._run("set_meta", lambda db: self._write(db, tx, durable=True))

    # --- change log (cross-process invalidation) --------------------------------------------
    @staticmethod
    def _changed(db: Db, tenant_id: str, connection_id: str | None) -> None:
        seq = db.execute(
            "INSERT INTO changes (tenant_id, connection_id) VALUES (?, ?)", (tenant_id, connection_id)
        ).lastrowid
        if seq is not None and seq % 256 == 0:
            db.execute("DELETE FROM changes WHERE seq <= ?", (seq - CHANGES_KEPT,))

    # --- tenants ----------------------------------------------------------------------------
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
            self._changed(db, record.tenant_id, None)
            return stored

        return await self._run("put_tenant", lambda db: self._write(db, tx, durable=True))

    async def list_tenants(self) -> list[TenantRecord]:
        rows = await self._run(
            "list_tenants",
            lambda db: db.execute("SELECT json, version FROM tenants ORDER BY tenant_id").fetchall(),
        )
        return [_tenant(r) for r in rows]

    # --- connections ------------------------------------------------------------------------
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
                if not key_check_holds(_loads(tenant[0]) if tenant else None, key_check):
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
            self._changed(db, t, c)
            return stored

        return await self._run("put_connection", lambda db: self._write(db, tx, durable=True))

    async def delete_connection(self, tenant_id: str, connection_id: str) -> bool:
        def tx(db: Db) -> bool:
            n = db.execute(
                "DELETE FROM connections WHERE tenant_id = ? AND connection_id = ?",
                (tenant_id, connection_id),
            ).rowcount
            if n:
                self._changed(db, tenant_id, connection_id)
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

    # --- audit ------------------------------------------------------------------------------
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
        items = [AuditEvent.from_dict({**_loads(j), "seq": int(seq)}) for seq, j in rows[:limit]]
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

    # --- one-time tokens --------------------------------------------------------------------
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
        return _loads(row[0]) if row else None

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
        return _loads(row[0])

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

    # --- invalidation -----------------------------------------------------------------------
    async def publish_invalidation(self, tenant_id: str, connection_id: str | None) -> None:
        await self._run(
            "publish_invalidation",
            lambda db: self._write(db, lambda d: self._changed(d, tenant_id, connection_id)),
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


def _close_db(db: Db) -> None:
    with contextlib.suppress(sqlite3.Error):
        db.execute("PRAGMA optimize")  # keeps planner statistics fresh, as SQLite recommends
    db.close()


def _loads(text: str) -> dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise StoreUnavailable("embedded store holds a malformed record; restore it from a backup")
    return value


def _tenant(row: Sequence[Any]) -> TenantRecord:
    return TenantRecord.from_dict({**_loads(row[0]), "version": int(row[1])})


def _connection(row: Sequence[Any]) -> ConnectionRecord:
    return ConnectionRecord.from_dict({**_loads(row[0]), "version": int(row[1])})


def _api_key(row: Sequence[Any]) -> ApiKeyRecord:
    return ApiKeyRecord.from_dict({**_loads(row[0]), "last_used_at": row[1]})
