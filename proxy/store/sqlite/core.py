"""What every SQLite operation goes through: one worker thread, one transaction shape, one check
that the file is still the one opened.

- stdlib ``sqlite3`` runs in ONE dedicated worker thread that owns the connection; coroutines
  hand it closures via ``run_in_executor``, so the event loop never blocks on disk I/O.
- Every write is one ``BEGIN IMMEDIATE`` transaction, so a ``kill -9`` mid-write leaves each
  record either old or new, never torn.
- ``synchronous=NORMAL`` is crash-safe for process crashes and keeps a consistent prefix of
  commits across power loss. Writes whose loss after an acknowledged success would hurt run
  with ``synchronous=FULL`` (``durable=True``): meta and tenant records (key-ring bookkeeping: an
  operator may retire an old master key once a rewrap reported success), connections (a rotated
  OAuth refresh token cannot be recovered) and API keys (shown once to the user). High-volume
  writes (audit, last-used touches, one-time tokens, locks, change log) stay NORMAL.
- Lost data: a database file deleted or replaced while the service runs leaves this process
  writing into an unlinked inode, lost at the next start. Every operation first compares the
  path's (device, inode) with the file opened (one ``stat``, about a microsecond) and, when it
  differs, refuses with ``StoreLost``; ``accept_loss`` reopens whatever file is there now.
  A file *moved away* (its data directory renamed or unmounted: the path is gone but the file
  opened still has a link) is an outage, not a loss: refused with ``StoreUnavailable`` while it
  is away, and served again once it is back at the path.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from proxy.errors import StoreLost, StoreUnavailable
from proxy.store.base import InvalidationCallback
from proxy.store.common import store_lost

log = logging.getLogger("proxy.store.sqlite")
T = TypeVar("T")
Db = sqlite3.Connection


class SqliteCore:
    """The state and plumbing the concern mixins of ``SqliteStore`` share."""

    identity: str | None = None

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
        self._fd: int | None = None  # the file opened, read-only: tells "moved away" from "deleted"
        self._lost: StoreLost | None = None

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
            if now is None and self._fd is not None and os.fstat(self._fd).st_nlink > 0:
                raise StoreUnavailable(
                    f"the embedded store's file is not at {self.path} any more but still exists "
                    "elsewhere (its data directory was moved or unmounted); put it back at that path"
                )
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


def loads(text: str) -> dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise StoreUnavailable("embedded store holds a malformed record; restore it from a backup")
    return value
