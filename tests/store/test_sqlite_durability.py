"""The embedded store survives restarts and ``kill -9``, refuses newer schemas, and keeps its
file private. Crashes are real: a subprocess writing in a loop is SIGKILLed mid-stream."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from proxy.errors import ConfigError, Conflict, StoreUnavailable
from proxy.model import ApiKeyRecord, AuditEvent, ConnectionRecord, TenantRecord
from proxy.settings import Settings
from proxy.store import open_store
from proxy.store.base import ANY_VERSION, AuditQuery
from proxy.store.sqlite import SCHEMA_VERSION, SqliteStore

REPO = Path(__file__).resolve().parents[2]

# Writes c0, c1, c2 in turn, each a separate transaction, with a payload derived from the
# iteration number, so a reader can tell a complete record from a torn one.
WRITER = """
import asyncio, sys
from pathlib import Path
from proxy.model import ConnectionRecord
from proxy.store.base import ANY_VERSION
from proxy.store.sqlite import SqliteStore

async def main():
    store = SqliteStore(Path(sys.argv[1]))
    await store.open()
    i = 0
    while True:
        i += 1
        for cid in ("c0", "c1", "c2"):
            rec = ConnectionRecord("t", cid, "http_bearer", metadata={"i": i},
                                   public_params={"blob": "x" * (i * 37 % 5000) + "end"})
            await store.put_connection(rec, ANY_VERSION)
        if i == 1:
            print("ready", flush=True)

asyncio.run(main())
"""

# Increments a counter held in one record by CAS, retrying lost races, N times.
INCREMENTER = """
import asyncio, sys
from pathlib import Path
from proxy.errors import Conflict
from proxy.store.sqlite import SqliteStore

async def main():
    store = SqliteStore(Path(sys.argv[1]))
    await store.open()
    done = 0
    while done < int(sys.argv[2]):
        rec = await store.get_connection("t", "counter")
        try:
            await store.put_connection(rec.evolve(metadata={"n": rec.metadata["n"] + 1}), rec.version)
            done += 1
        except Conflict:
            pass
    await store.close()

asyncio.run(main())
"""


def spawn(script: str, *args: str, stdout: int = subprocess.DEVNULL) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", script, *args], cwd=REPO, env=env, stdout=stdout, text=True
    )


async def test_data_survives_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "proxy.sqlite3"
    store = SqliteStore(path)
    await store.open()
    conn = await store.put_connection(
        ConnectionRecord("t", "c", "http_bearer", secret_params={"token": "v1.x"}), None
    )
    tenant = await store.put_tenant(TenantRecord("t", 1, {"1": {"kek": 1}}), None)
    await store.put_api_key(ApiKeyRecord("k", "t", "hash", created_at=1.0))
    await store.append_audit([AuditEvent(ts=1.0, tenant_id="t", action="a", actor="x")])
    await store.set_meta("kek_current", "1")
    await store.close()

    again = SqliteStore(path)
    await again.open()
    try:
        assert await again.get_connection("t", "c") == conn
        assert await again.get_tenant("t") == tenant
        assert await again.get_api_key("k") == ApiKeyRecord("k", "t", "hash", created_at=1.0)
        assert [e.action for e in (await again.query_audit(AuditQuery("t"))).items] == ["a"]
        assert await again.get_meta("kek_current") == "1"
        # Versions continue from the stored one after a restart.
        assert (await again.put_connection(conn, 1)).version == 2
    finally:
        await again.close()


@pytest.mark.system
def test_kill_9_mid_write_leaves_only_complete_records(tmp_path: Path) -> None:
    path = tmp_path / "proxy.sqlite3"
    proc = spawn(WRITER, str(path), stdout=subprocess.PIPE)
    assert proc.stdout is not None
    with proc.stdout:
        try:
            assert proc.stdout.readline().strip() == "ready"
            time.sleep(0.3)
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL

    async def check() -> list[int]:
        store = SqliteStore(path)
        await store.open()
        try:
            versions = []
            for cid in ("c0", "c1", "c2"):
                rec = await store.get_connection("t", cid)
                assert rec is not None
                i = rec.metadata["i"]
                assert rec.version == i, "version and payload come from the same transaction"
                assert rec.public_params["blob"] == "x" * (i * 37 % 5000) + "end"
                versions.append(rec.version)
            return versions
        finally:
            await store.close()

    versions = asyncio.run(check())
    # Writes happen in order c0, c1, c2: the crash can only have cut between two of them.
    assert versions[0] >= versions[1] >= versions[2] >= versions[0] - 1
    assert versions[0] > 3, "the writer should have completed several rounds before the kill"
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


@pytest.mark.system
def test_worker_processes_share_the_file_with_cas(tmp_path: Path) -> None:
    path = tmp_path / "proxy.sqlite3"

    async def seed() -> None:
        store = SqliteStore(path)
        await store.open()
        await store.put_connection(ConnectionRecord("t", "counter", "x", metadata={"n": 0}), None)
        await store.close()

    asyncio.run(seed())
    procs = [spawn(INCREMENTER, str(path), "40") for _ in range(3)]
    for p in procs:
        assert p.wait(timeout=60) == 0

    async def read() -> ConnectionRecord | None:
        store = SqliteStore(path)
        await store.open()
        try:
            return await store.get_connection("t", "counter")
        finally:
            await store.close()

    rec = asyncio.run(read())
    assert rec is not None
    assert rec.metadata["n"] == 120, "no increment may be lost between processes"
    assert rec.version == 121


async def test_a_version_1_store_is_migrated_in_place(tmp_path: Path) -> None:
    path = tmp_path / "proxy.sqlite3"
    store = SqliteStore(path)
    await store.open()
    await store.append_audit([AuditEvent(1000.0, "t1", "connection.read", "api_key:k")])
    await store.close()
    with sqlite3.connect(path) as db:  # as a version-1 release left it
        db.execute("DROP INDEX audit_ts")
        db.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    store = SqliteStore(path)
    await store.open()
    try:
        assert await store.get_meta("schema_version") == str(SCHEMA_VERSION)
        assert len((await store.query_audit(AuditQuery("t1"))).items) == 1  # nothing lost
        assert await store.prune_audit(2000.0) == 1
    finally:
        await store.close()
    with sqlite3.connect(path) as db:
        names = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert "audit_ts" in names


async def test_newer_schema_is_refused_naming_data_dir(tmp_path: Path) -> None:
    path = tmp_path / "proxy.sqlite3"
    store = SqliteStore(path)
    await store.open()
    await store.close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    with pytest.raises(ConfigError) as exc:
        await SqliteStore(path).open()
    assert exc.value.key == "data_dir"
    assert str(SCHEMA_VERSION + 1) in exc.value.message


async def test_a_file_that_is_not_a_database_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "proxy.sqlite3"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ConfigError) as exc:
        await SqliteStore(path).open()
    assert exc.value.key == "data_dir"


async def test_files_are_private(tmp_path: Path) -> None:
    data_dir = tmp_path / "fresh" / "var"
    store = open_store(Settings(data_dir=data_dir))
    assert isinstance(store, SqliteStore) and store.path == data_dir / "proxy.sqlite3"
    await store.open()
    try:
        await store.put_connection(ConnectionRecord("t", "c", "x"), ANY_VERSION)
        assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
        assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
        wal = store.path.with_name(store.path.name + "-wal")
        assert wal.exists() and stat.S_IMODE(wal.stat().st_mode) == 0o600
    finally:
        await store.close()


async def test_closed_store_raises_store_unavailable_and_can_reopen(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "proxy.sqlite3")
    await store.open()
    await store.put_connection(ConnectionRecord("t", "c", "x"), None)
    await store.close()
    with pytest.raises(StoreUnavailable):
        await store.get_connection("t", "c")
    await store.open()
    try:
        with pytest.raises(Conflict):
            await store.put_connection(ConnectionRecord("t", "c", "x"), None)
    finally:
        await store.close()
