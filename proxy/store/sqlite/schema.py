"""The tables of the embedded store and how an older file is brought up to date.

Migrations run in one durable transaction when the file is opened; a file from a newer
connection-proxy is refused rather than written to by code that does not know its layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from proxy.errors import ConfigError
from proxy.store.common import SCHEMA_VERSION_KEY, STORE_ID_KEY, new_identity
from proxy.store.sqlite.core import Db

SCHEMA_VERSION: Final = 2

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


def migrate(db: Db, path: Path) -> None:
    db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    row = db.execute("SELECT value FROM meta WHERE key = ?", (SCHEMA_VERSION_KEY,)).fetchone()
    try:
        current = int(row[0]) if row else 0
    except ValueError:
        current = -1
    if current < 0 or current > SCHEMA_VERSION:
        raise ConfigError(
            "data_dir",
            f"{path} has schema version {row[0] if row else '?'} but this connection-proxy "
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
