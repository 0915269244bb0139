"""``connection-proxy backup FILE``: a consistent copy of the embedded SQLite store, online.

Copying the database file with ``cp`` while the service runs can catch a write half done, and
misses what still sits in the write-ahead log. SQLite's online backup API copies a consistent
snapshot instead (it reads under a shared lock, WAL included) while the service keeps serving.
The copy is written to a private temporary file beside FILE, checked with ``PRAGMA
integrity_check``, synced and renamed into place, so FILE is either a whole, checked copy or
absent. FILE is created mode 0600 and never overwritten: it holds the wrapped tenant keys, the
ciphertexts and the API key hashes (useless without the master key, which is backed up apart).

To restore: stop the service, put the copy at ``$PROXY_DATA_DIR/proxy.sqlite3`` (removing any
``-wal`` and ``-shm`` files beside it), start it with the same master key ring. With
``PROXY_REDIS_URL`` set the store lives in Redis, which is backed up with its own RDB/AOF
files (see the README); this command then refuses and says so.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path

from proxy.errors import ConfigError, ProxyError
from proxy.settings import Settings

__all__ = ["BackupFailed", "backup_sqlite"]


class BackupFailed(ProxyError):
    """The backup could not be made; nothing was left at the target path."""

    code = "BACKUP_FAILED"


def backup_sqlite(settings: Settings, target: Path) -> int:
    """Copy the store to ``target``; returns its size in bytes. Raises ConfigError or BackupFailed."""
    if settings.redis_url:
        raise ConfigError(
            "redis_url",
            "the store is in Redis: back it up with Redis itself (BGSAVE and copy dump.rdb, or the "
            "AOF directory); see the README's backup section",
        )
    source = settings.store_path
    if not source.is_file():
        raise ConfigError("data_dir", f"no store at {source}: nothing to back up (is PROXY_DATA_DIR right?)")
    if target.exists():
        raise BackupFailed(f"{target} exists; name a new file (a backup is never overwritten)")
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    try:
        # Read-only: the backup must never change (or create) the live store.
        src = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=10)
        try:
            dst = sqlite3.connect(partial)
            try:
                src.backup(dst)
                (verdict,) = dst.execute("PRAGMA integrity_check").fetchone()
                if verdict != "ok":
                    raise BackupFailed(f"the copy failed SQLite's integrity check: {verdict}")
                dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
            finally:
                dst.close()
        finally:
            src.close()
        with open(partial, "rb+") as fh:
            os.fsync(fh.fileno())
        os.rename(partial, target)
        with contextlib.suppress(OSError):
            dirfd = os.open(target.parent, os.O_RDONLY)
            try:
                os.fsync(dirfd)
            finally:
                os.close(dirfd)
    except sqlite3.Error as exc:
        raise BackupFailed(f"could not copy {source}: {exc}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
    return target.stat().st_size
