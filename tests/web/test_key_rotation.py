"""Online master-key rotation with real ``connection-proxy serve`` processes, following the
README's runbook: a running service keeps answering through ``keys rotate --generate`` and
``keys reencrypt`` with no restart; replicas take up a new version on SIGHUP or by themselves;
``keys retire`` removes the version from the file and keeps a private backup; key files are
written private and a key file readable by group or others stops ``serve`` with status 2.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.security import crypto
from tests.support.app import REPO_ROOT, ServiceProcess, bearer, start_service_process
from tests.support.wait import wait_until

CANARY = "rotation-canary-51e0c2"
CONN = {
    "integration_id": "http_bearer",
    "parameters": {"token": CANARY, "base_url": "https://api.example.com"},
}


def keys(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "keys", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def new_key_file(path: Path) -> Path:
    out = keys(dict(os.environ), "generate", "--out", str(path))
    assert out.returncode == 0, out.stderr
    return path


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def versions(path: Path) -> tuple[int, ...]:
    return crypto.KeyRing.parse(path.read_text()).versions


def serve(data: Path, key_file: Path, redis_url: str | None = None, **env: str) -> ServiceProcess:
    return start_service_process(
        data,
        redis_url=redis_url,
        env={"PROXY_DEV_MODE": "false", "PROXY_MASTER_KEY_FILE": str(key_file), **env},
    )


async def call(session: aiohttp.ClientSession, sp: ServiceProcess, method: str, path: str, **kw: Any) -> Any:
    kw.setdefault("headers", sp.admin_headers)
    async with session.request(method, sp.url + path, **kw) as r:
        return r.status, await r.json()


async def read_token(session: aiohttp.ClientSession, sp: ServiceProcess, key: str, tenant: str = "t1") -> str:
    status, body = await call(session, sp, "GET", f"/connections/{tenant}/c1", headers=bearer(key))
    assert status == 200, body
    return str(body["parameters"]["token"])


async def keep_answering(
    session: aiohttp.ClientSession, sps: list[ServiceProcess], key: str, seconds: float
) -> int:
    """Reads through every replica for ``seconds``; every single read must succeed."""
    n = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for sp in sps:
            assert await read_token(session, sp, key) == CANARY
            n += 1
        await asyncio.sleep(0.02)
    return n


async def wait_for_output(sp: ServiceProcess, text: str, timeout: float = 10.0, count: int = 1) -> None:
    await wait_until(
        lambda: sp.output().count(text) >= count,
        timeout=timeout,
        interval=0.05,
        message=lambda: f"{text!r} not logged:\n{sp.output()[-3000:]}",
    )


@pytest.mark.system
async def test_rotate_reencrypt_retire_on_a_running_service_without_restart(tmp_path: Path) -> None:
    key_file = new_key_file(tmp_path / "master.key")
    assert mode(key_file) == 0o600
    with serve(tmp_path / "data", key_file) as sp:
        async with aiohttp.ClientSession() as session:
            assert (await call(session, sp, "PUT", "/admin/tenants/t1/connections/c1", json=CONN))[0] == 201
            key = (await call(session, sp, "POST", "/admin/tenants/t1/api-keys", json={"name": "n"}))[1][
                "api_key"
            ]
            assert await read_token(session, sp, key) == CANARY

            rotated = keys(sp.env, "rotate", "--generate")
            assert rotated.returncode == 0 and "re-wrapped 1" in rotated.stdout, rotated.stderr
            assert versions(key_file) == (1, 2) and mode(key_file) == 0o600
            reenc = keys(sp.env, "reencrypt")
            assert reenc.returncode == 0 and "1 record(s) re-encrypted" in reenc.stdout, reenc.stderr
            # The service learns of the new data key (wrapped by version 2) and re-reads the file.
            assert await keep_answering(session, [sp], key, 1.5) > 10
            await wait_for_output(sp, "master key ring re-read: versions [1, 2] (was [1])")
            status, _ = await call(session, sp, "PUT", "/admin/tenants/t2/connections/c1", json=CONN)
            assert status == 201

            assert keys(sp.env, "status").stdout.count("unused") == 1  # v1 wraps nothing now
            retired = keys(sp.env, "retire", "1")
            assert retired.returncode == 0 and "removed it from the key file" in retired.stdout, (
                retired.stderr
            )
            assert versions(key_file) == (2,) and mode(key_file) == 0o600
            (backup,) = tmp_path.glob("master.key.*.bak")
            assert versions(backup) == (1, 2) and mode(backup) == 0o600
            sp.proc.send_signal(1)  # SIGHUP: take up the smaller ring
            await wait_for_output(sp, "master key ring re-read: versions [2] (was [1, 2])")
            assert await keep_answering(session, [sp], key, 0.3) > 0

            newest = keys(sp.env, "retire", "2")
            assert newest.returncode == 2 and "is the newest master key" in newest.stderr
            assert "keys add" in newest.stderr and "keys rotate" in newest.stderr
            assert versions(key_file) == (2,)
            assert sp.stop() == 0
    assert CANARY not in sp.output()


@pytest.mark.system
async def test_replicas_take_up_a_new_version_on_sighup_or_when_they_meet_it(
    tmp_path: Path, redis_url: str
) -> None:
    """The README's N-replica runbook, each replica with its own copy of the key file."""
    file_a = new_key_file(tmp_path / "a.key")
    file_b = tmp_path / "b.key"
    shutil.copy(file_a, file_b)
    os.chmod(file_b, 0o600)
    with serve(tmp_path / "ra", file_a, redis_url) as a, serve(tmp_path / "rb", file_b, redis_url) as b:
        async with aiohttp.ClientSession() as session:
            assert (await call(session, a, "PUT", "/admin/tenants/t1/connections/c1", json=CONN))[0] == 201
            key = (await call(session, a, "POST", "/admin/tenants/t1/api-keys", json={"name": "n"}))[1][
                "api_key"
            ]
            await keep_answering(session, [a, b], key, 0.2)

            # 1. Add a version (no store change) and give every replica the new file.
            added = keys(a.env, "add")
            assert added.returncode == 0 and "added master key version 2" in added.stdout, added.stderr
            # 2. Replica B's copy is still old: after rotation B re-reads once and fails, with advice.
            assert keys(a.env, "rotate").returncode == 0
            assert keys(a.env, "reencrypt").returncode == 0
            await asyncio.sleep(0.5)
            status, body = await call(session, b, "GET", "/connections/t1/c1", headers=bearer(key))
            assert status == 503 and body["error"] == "SERVICE_UNAVAILABLE"
            assert "PROXY_MASTER_KEY_FILE" in body["message"] and "SIGHUP" in body["message"]
            assert str(file_b) not in body["message"]
            # 3. Copy the file: B takes it up on SIGHUP, without a restart; A re-read it by itself.
            shutil.copy(file_a, file_b)
            b.proc.send_signal(1)
            await wait_for_output(b, "master key ring re-read: versions [1, 2] (was [1])")
            assert await keep_answering(session, [a, b], key, 0.5) > 4
            await wait_for_output(a, "master key ring re-read: versions [1, 2] (was [1])")
            # 4. A third version reached B's file but no SIGHUP: B re-reads when it meets it.
            assert keys(a.env, "rotate", "--generate").returncode == 0
            shutil.copy(file_a, file_b)
            assert keys(a.env, "reencrypt").returncode == 0
            assert await keep_answering(session, [b, a], key, 1.0) > 4
            await wait_for_output(b, "versions [1, 2, 3] (was [1, 2])")
            for sp in (a, b):
                assert sp.stop() == 0
    assert CANARY not in a.output() + b.output()


@pytest.mark.system
async def test_serve_refuses_a_key_file_readable_by_group_or_others(tmp_path: Path) -> None:
    key_file = new_key_file(tmp_path / "master.key")
    for bad in (0o644, 0o640, 0o604):
        os.chmod(key_file, bad)
        sp = start_service_process(
            tmp_path / "data",
            env={"PROXY_DEV_MODE": "false", "PROXY_MASTER_KEY_FILE": str(key_file)},
            wait=False,
        )
        assert sp.wait_exit() == 2
        assert f"has mode {bad:04o}" in sp.output() and "'master_key_file'" in sp.output()
        assert f"chmod 600 {key_file}" in sp.output()
        sp.log_path.unlink()
    # Kubernetes secret volumes with an fsGroup are 0440: accepted only when asked for, and
    # "others" never.
    os.chmod(key_file, 0o440)
    group_ok = {"PROXY_MASTER_KEY_FILE_GROUP_READABLE": "true"}
    with serve(tmp_path / "data", key_file, **group_ok) as sp:
        assert sp.stop() == 0
    os.chmod(key_file, 0o444)
    sp = start_service_process(
        tmp_path / "data",
        env={"PROXY_DEV_MODE": "false", "PROXY_MASTER_KEY_FILE": str(key_file), **group_ok},
        wait=False,
    )
    assert sp.wait_exit() == 2 and "has mode 0444" in sp.output() and "readable by others" in sp.output()


@pytest.mark.system
def test_keys_generate_writes_private_files(tmp_path: Path) -> None:
    out = tmp_path / "master.key"
    out.touch(mode=0o644)
    os.chmod(out, 0o644)  # what `> master.key` makes under the usual umask
    with open(out, "w") as fh:
        done = subprocess.run(
            [sys.executable, "-m", "proxy", "keys", "generate"], cwd=REPO_ROOT, stdout=fh, timeout=60
        )
    assert done.returncode == 0 and mode(out) == 0o600 and versions(out) == (1,)
    again = keys(dict(os.environ), "generate", "--out", str(out))
    assert again.returncode == 2 and "already exists" in again.stderr
    assert versions(out) == (1,)


@pytest.mark.system
async def test_sighup_to_a_workers_parent_reloads_every_worker(tmp_path: Path) -> None:
    key_file = new_key_file(tmp_path / "master.key")
    sp = start_service_process(
        tmp_path / "data",
        env={"PROXY_DEV_MODE": "false", "PROXY_MASTER_KEY_FILE": str(key_file)},
        args=("--workers", "2"),
    )
    with sp:
        # Both workers up and past start-up (the first answering /healthz is not enough).
        await wait_for_output(sp, "Running on", count=2)
        added = keys(sp.env, "add")
        assert added.returncode == 0, added.stderr
        sp.proc.send_signal(1)
        await wait_for_output(sp, "master key ring re-read: versions [1, 2] (was [1])", count=2)
        assert sp.proc.poll() is None  # SIGHUP reloads; it does not stop anything
        assert sp.stop() == 0
