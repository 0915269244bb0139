"""``connection-proxy admin ...`` and ``backup`` against a real running ``serve`` process, and
``GET /admin/tenants`` paging against the real application."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import urllib.request
from collections.abc import Mapping
from pathlib import Path

import pytest

from tests.support.app import (
    ADMIN_TOKEN,
    REPO_ROOT,
    ServiceProcess,
    bearer,
    free_port,
    running_service,
    start_service_process,
)

SECRET = "cli-secret-0123456789-token"


def cli(
    *args: str, env: Mapping[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("PROXY_")}
    full.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        cwd=REPO_ROOT,
        env=full,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def admin(sp: ServiceProcess, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return cli("admin", *args, env={"PROXY_URL": sp.url, "PROXY_ADMIN_TOKEN": ADMIN_TOKEN}, stdin=stdin)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return result.stdout


def connection_service(sp: ServiceProcess, tenant: str, cid: str, key: str) -> tuple[int, dict[str, object]]:
    req = urllib.request.Request(f"{sp.url}/connections/{tenant}/{cid}", headers=bearer(key))
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture
def service(tmp_path: Path) -> ServiceProcess:
    with start_service_process(tmp_path / "data") as sp:
        yield sp


@pytest.mark.system
def test_connections_keys_sessions_and_tenants(service: ServiceProcess) -> None:
    sp = service
    body = json.dumps(
        {
            "integration_id": "http_bearer",
            "parameters": {"token": SECRET, "base_url": "https://api.example.com"},
            "rate_limits": [{"limit": 100, "window": "1m"}],
        }
    )
    # Secrets travel on stdin, never on the command line.
    put = ok(admin(sp, "connections", "put", "acme", "github", "--body", "-", stdin=body))
    assert "status" in put and "active" in put and SECRET not in put
    ok(admin(sp, "connections", "put", "acme", "pending-one", "--integration", "http_api_key"))
    ok(admin(sp, "connections", "put", "beta", "crm", "--integration", "http_bearer", "--param", "token=t"))

    got = ok(admin(sp, "connections", "get", "acme", "github"))
    assert "********" in got and SECRET not in got and "api.example.com" in got
    table = ok(admin(sp, "connections", "list", "acme")).splitlines()
    assert table[0].split() == [
        "CONNECTION_ID",
        "INTEGRATION_ID",
        "STATUS",
        "RUNTIME_USER_ID",
        "DEFAULT_CONNECTION_ID",
    ]
    assert [line.split()[:3] for line in table[1:]] == [
        ["github", "http_bearer", "active"],
        ["pending-one", "http_api_key", "pending"],
    ]
    as_json = json.loads(
        ok(admin(sp, "connections", "list", "acme", "--json", "--integration-id", "http_bearer"))
    )
    assert [c["connection_id"] for c in as_json] == ["github"]

    minted = json.loads(ok(admin(sp, "api-keys", "mint", "acme", "--name", "workflows", "--json")))
    key, key_id = minted["api_key"], minted["key_id"]
    status, answer = connection_service(sp, "acme", "github", key)
    assert status == 200 and answer["parameters"] == {"token": SECRET, "base_url": "https://api.example.com"}
    listed = ok(admin(sp, "api-keys", "list", "acme"))
    assert key_id in listed and "workflows" in listed and key not in listed
    assert f"revoked API key {key_id}" in ok(admin(sp, "api-keys", "revoke", "acme", key_id))
    assert connection_service(sp, "acme", "github", key)[0] == 401
    revoked = json.loads(ok(admin(sp, "api-keys", "list", "acme", "--json")))
    assert revoked[0]["revoked_at"] is not None

    session = ok(
        admin(
            sp,
            "connect-sessions",
            "create",
            "acme",
            "--integration",
            "http_api_key",
            "--connection-id",
            "crm",
            "--param",
            "base_url=https://crm.example.com",
        )
    )
    url = next(line.split()[1] for line in session.splitlines() if line.startswith("url"))
    assert url.startswith(sp.url + "/connect/")
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.status == 200 and "text/html" in r.headers["Content-Type"]

    tenants = ok(admin(sp, "tenants", "list")).splitlines()
    assert tenants[0].split()[0] == "TENANT_ID"
    assert [line.split()[0] for line in tenants[1:]] == ["acme", "beta"]
    assert [
        t["tenant_id"] for t in json.loads(ok(admin(sp, "tenants", "list", "--json", "--limit", "1")))
    ] == ["acme"]

    assert "deleted" in ok(admin(sp, "connections", "delete", "acme", "pending-one"))
    gone = admin(sp, "connections", "get", "acme", "pending-one")
    assert gone.returncode == 1 and gone.stdout == ""
    assert "CONNECTION_NOT_FOUND (HTTP 404)" in gone.stderr and "pending-one" in gone.stderr


@pytest.mark.system
def test_errors_are_one_line_with_an_exit_status(service: ServiceProcess, tmp_path: Path) -> None:
    sp = service
    bad = admin(
        sp,
        "connections",
        "put",
        "acme",
        "c1",
        "--body",
        "-",
        stdin='{"integration_id": "http_bearer", "bogus": 1}',
    )
    assert bad.returncode == 1 and "VALIDATION_ERROR (HTTP 422)" in bad.stderr and "bogus" in bad.stderr
    wrong = cli(
        "admin",
        "tenants",
        "list",
        env={"PROXY_URL": sp.url, "PROXY_ADMIN_TOKEN": "not-the-admin-token-at-all"},
    )
    assert wrong.returncode == 1 and "UNAUTHENTICATED (HTTP 401)" in wrong.stderr
    assert "not-the-admin-token-at-all" not in wrong.stderr
    dead = cli(
        "admin",
        "tenants",
        "list",
        env={"PROXY_URL": f"http://127.0.0.1:{free_port()}", "PROXY_ADMIN_TOKEN": ADMIN_TOKEN},
    )
    assert dead.returncode == 3 and "cannot reach the service" in dead.stderr
    missing = cli(
        "admin", "tenants", "list", env={"PROXY_URL": sp.url, "PROXY_DATA_DIR": str(tmp_path / "none")}
    )
    assert missing.returncode == 2 and "no admin token" in missing.stderr
    usage = admin(sp, "connections", "put", "acme", "c1")
    assert usage.returncode == 2 and "--integration" in usage.stderr


@pytest.mark.system
def test_dev_token_file_and_listen_address_are_found(tmp_path: Path) -> None:
    data = tmp_path / "data"
    port = free_port()
    # No admin token configured: dev mode writes one into the data dir.
    env = {"PROXY_ADMIN_TOKEN": "", "PROXY_PUBLIC_URL": ""}
    with start_service_process(data, env=env, port=port):
        result = cli(
            "admin", "tenants", "list", env={"PROXY_DATA_DIR": str(data), "PROXY_LISTEN": f"0.0.0.0:{port}"}
        )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [
        "TENANT_ID",
        "PROXY_ONLY",
        "PROXY_ONLY_EFFECTIVE",
        "DATA_KEY_VERSION",
        "CREATED_AT",
    ]


async def test_admin_tenants_pages(tmp_path: Path) -> None:
    async with running_service(tmp_path, proxy_only_tenants=["t3"]) as svc:
        for t in ("t4", "t1", "t3", "t2", "t5"):
            await svc.put_connection(t, "c", {"integration_id": "http_bearer", "parameters": {"token": "x"}})
        status, first = await svc.admin("GET", "/admin/tenants?limit=2")
        assert status == 200 and [i["tenant_id"] for i in first["items"]] == ["t1", "t2"]
        assert first["next_cursor"] == "t2" and "wrapped_deks" not in first["items"][0]
        _, second = await svc.admin("GET", f"/admin/tenants?limit=2&cursor={first['next_cursor']}")
        assert [i["tenant_id"] for i in second["items"]] == ["t3", "t4"]
        assert (
            second["items"][0]["proxy_only_effective"] is True and second["items"][0]["proxy_only"] is False
        )
        _, last = await svc.admin("GET", f"/admin/tenants?limit=2&cursor={second['next_cursor']}")
        assert [i["tenant_id"] for i in last["items"]] == ["t5"] and last["next_cursor"] is None
        status, refused = await svc.admin("GET", "/admin/tenants?limit=0")
        assert status == 422 and refused["error"] == "VALIDATION_ERROR"
        key = await svc.mint_key("t1")
        async with svc.session.get(svc.url + "/admin/tenants", headers=bearer(key)) as r:
            assert r.status == 403 and (await r.json())["error"] == "FORBIDDEN"


@pytest.mark.system
def test_backup_is_consistent_online_and_restores(tmp_path: Path) -> None:
    data = tmp_path / "data"
    copy = tmp_path / "backup.sqlite3"
    with start_service_process(data) as sp:
        body = json.dumps(
            {
                "integration_id": "http_bearer",
                "parameters": {"token": SECRET, "base_url": "https://a.example"},
            }
        )
        ok(admin(sp, "connections", "put", "acme", "github", "--body", "-", stdin=body))
        key = json.loads(ok(admin(sp, "api-keys", "mint", "acme", "--json")))["api_key"]
        # Online: the service keeps running (and holding the store open) while it is copied.
        done = cli("backup", str(copy), env={"PROXY_DATA_DIR": str(data)})
        assert done.returncode == 0, done.stderr
        assert f"backed up {data / 'proxy.sqlite3'} to {copy}" in done.stdout
        # Written after the backup: not in the copy.
        ok(admin(sp, "connections", "put", "acme", "later", "--integration", "http_bearer"))
        again = cli("backup", str(copy), env={"PROXY_DATA_DIR": str(data)})
        assert again.returncode == 2 and "exists" in again.stderr
        assert sp.stop(signal.SIGTERM) == 0
    assert copy.stat().st_mode & 0o777 == 0o600
    with sqlite3.connect(copy) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert not list(tmp_path.glob(".backup.sqlite3.partial-*"))

    # Restore: the copy and the same master key ring into a fresh data dir.
    restored = tmp_path / "restored"
    restored.mkdir()
    shutil.copy(copy, restored / "proxy.sqlite3")
    shutil.copy(data / "master.key", restored / "master.key")
    with start_service_process(restored) as sp2:
        status, answer = connection_service(sp2, "acme", "github", key)
        assert status == 200 and answer["parameters"]["token"] == SECRET
        assert connection_service(sp2, "acme", "later", key)[0] == 404


@pytest.mark.system
def test_backup_refuses_a_redis_store(tmp_path: Path) -> None:
    result = cli("backup", str(tmp_path / "b"), env={"PROXY_REDIS_URL": "redis://127.0.0.1:1/0"})
    assert result.returncode == 2 and "BGSAVE" in result.stderr and not (tmp_path / "b").exists()
