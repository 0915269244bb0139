"""Opening and closing the embedded store, and its identity marker and meta records.

- WAL mode and ``busy_timeout`` let several worker processes (``serve --workers N``) share the
  file: readers never block, writers queue.
- The data directory is created 0700 and the database file 0600 (it holds ciphertext and key
  hashes; SQLite gives its -wal/-shm files the same mode).
- The identity marker (``store_id`` in ``meta``) is kept as on Redis and reported by ``/readyz``;
  the check that the file is still the one opened is ``SqliteCore._check_file``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from concurrent.futures import ThreadPoolExecutor

from proxy.errors import ConfigError, StoreUnavailable
from proxy.store.base import FLUSH_ALL, IdentityStore, MetaStore, StoreLifecycle
from proxy.store.common import STORE_ID_KEY, STORE_REPLACES_KEY, deliver, new_identity, reserved_meta
from proxy.store.sqlite.core import Db, SqliteCore, log
from proxy.store.sqlite.schema import migrate


class SqliteLifecycle(SqliteCore, StoreLifecycle, IdentityStore, MetaStore):
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
            self._write(db, lambda d: migrate(d, self.path), durable=True)
            if self._fd is not None:
                os.close(self._fd)
            self._fd = os.open(self.path, os.O_RDONLY)
            st = os.fstat(self._fd)
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
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
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


def _close_db(db: Db) -> None:
    with contextlib.suppress(sqlite3.Error):
        db.execute("PRAGMA optimize")  # keeps planner statistics fresh, as SQLite recommends
    db.close()
