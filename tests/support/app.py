"""The shared test harness: the real service on a free loopback port, in-process or as a process.

``running_service`` builds the real application (``build_app``) with a temporary data dir, dev
mode, a fixed admin token and ``127.0.0.1/32`` allowed for egress (so test upstreams on loopback
are reachable), serves it with aiohttp's own runner on a socket bound before start-up (no port
race), and tears it down cleanly (so the audit buffer is flushed like on a graceful stop)::

    async with running_service(tmp_path, redis_url=None, trusted_networks=["127.0.0.1/32"]) as svc:
        await svc.put_connection("t1", "c1", {"integration_id": "http_bearer", ...})
        key = await svc.mint_key("t1")
        async with svc.session.get(svc.url + "/connections/t1/c1", headers=bearer(key)) as r: ...

``start_service_process`` runs ``python -m proxy serve`` as a real subprocess (for boot, restart,
SIGTERM and kill tests), with ``PROXY_*`` variables only from the arguments, and waits for
``/healthz``. Its stderr is kept in a file so tests can assert on log output.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from proxy.settings import Settings, load_settings
from proxy.web.app import SERVICES, Services, build_app
from proxy.web.connguard import ConnectionGuard, start_guarded
from tests.support.wait import wait_until_sync

ADMIN_TOKEN = "test-admin-token-0123456789abcdef"
REPO_ROOT = Path(__file__).resolve().parents[2]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _bound_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def free_port() -> int:
    with contextlib.closing(_bound_socket()) as s:
        return int(s.getsockname()[1])


HARNESS_REDIS_TIMEOUT_S = 5.0


def harness_settings(data_dir: Path, port: int, redis_url: str | None = None, **overrides: Any) -> Settings:
    """Settings as the harness uses them; ``overrides`` use setting names (lists for list settings)."""
    values: dict[str, Any] = {
        "data_dir": str(data_dir),
        "listen": f"127.0.0.1:{port}",
        "dev_mode": True,
        "admin_token": ADMIN_TOKEN,
        "egress_allow": ["127.0.0.1/32"],
        "public_url": f"http://127.0.0.1:{port}",
        "audit_flush_interval_s": 0.05,
        "log_level": "info",
        # A loaded test machine can stall a healthy Redis reply past the 0.25 s default; then
        # limits fall back to the local limiter and store calls answer 503. Tests of an
        # unreachable Redis meet refused connections (immediate) or set their own bound.
        "redis_timeout_s": HARNESS_REDIS_TIMEOUT_S,
    }
    if redis_url:
        values["redis_url"] = redis_url
    if overrides.get("listen_tls_hostnames") or overrides.get("listen_tls_cert_file"):
        values["public_url"] = f"https://127.0.0.1:{port}"
    values.update(overrides)
    return load_settings(env={}, overrides=values)


@dataclass
class RunningService:
    url: str
    app: web.Application
    session: aiohttp.ClientSession
    guard: ConnectionGuard | None = None
    admin_token: str = ADMIN_TOKEN
    # Where proxied calls go: the service itself, or nginx in front of it (tests.support.nginx).
    proxy_base: str = ""

    @property
    def proxy_url(self) -> str:
        return self.proxy_base or self.url

    @property
    def services(self) -> Services:
        return self.app[SERVICES]

    @property
    def settings(self) -> Settings:
        return self.services.settings

    @property
    def admin_headers(self) -> dict[str, str]:
        return bearer(self.admin_token)

    async def admin(self, method: str, path: str, json: Any = None, **kw: Any) -> tuple[int, Any]:
        """One admin call: (status, parsed JSON body or None)."""
        headers = {**self.admin_headers, **kw.pop("headers", {})}
        async with self.session.request(method, self.url + path, json=json, headers=headers, **kw) as r:
            text = await r.text()
            return r.status, (await r.json() if text else None)

    async def put_connection(self, tenant: str, cid: str, body: Mapping[str, Any]) -> dict[str, Any]:
        status, data = await self.admin("PUT", f"/admin/tenants/{tenant}/connections/{cid}", json=dict(body))
        if status not in (200, 201):
            raise AssertionError(f"PUT connection {tenant}/{cid} answered {status}: {data}")
        assert isinstance(data, dict)
        return data

    async def mint_key(self, tenant: str, name: str | None = None) -> str:
        status, data = await self.admin(
            "POST", f"/admin/tenants/{tenant}/api-keys", json={"name": name or "test"}
        )
        if status != 201:
            raise AssertionError(f"minting an API key for {tenant} answered {status}: {data}")
        return str(data["api_key"])

    async def flush_audit(self) -> None:
        await self.services.audit.flush()


def _client_ssl(app: web.Application, listener_ca: Path | None) -> ssl.SSLContext:
    """What the harness's own session trusts for an https listener: the service's CA bundle
    (a minted listener certificate) and ``listener_ca`` (a certificate from files)."""
    from proxy.web.tunnel import TUNNEL_CA

    ctx = ssl.create_default_context()
    if TUNNEL_CA in app:
        ctx.load_verify_locations(cadata=app[TUNNEL_CA].bundle_pem)
    if listener_ca is not None:
        ctx.load_verify_locations(cafile=str(listener_ca))
    return ctx


@contextlib.asynccontextmanager
async def running_service(
    tmp_path: Path, redis_url: str | None = None, listener_ca: Path | None = None, **setting_overrides: Any
) -> AsyncIterator[RunningService]:
    """``listener_ca``: with ``listen_tls_cert_file``, the CA the harness's session trusts."""
    sock = _bound_socket()
    port = int(sock.getsockname()[1])
    settings = harness_settings(tmp_path, port, redis_url, **setting_overrides)
    app = build_app(settings)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    server: asyncio.Server | None = None
    guard: ConnectionGuard | None = None
    try:
        # Served like `serve` does: through the connection guard (cap, request-head deadline).
        guard, server = await start_guarded(runner, settings, sock=sock)
        scheme = "https" if settings.listen_tls else "http"
        connector = aiohttp.TCPConnector(ssl=_client_ssl(app, listener_ca)) if settings.listen_tls else None
        async with aiohttp.ClientSession(connector=connector) as session:
            yield RunningService(url=f"{scheme}://127.0.0.1:{port}", app=app, session=session, guard=guard)
    finally:
        if server is not None:
            server.close()
        if guard is not None:
            guard.close()
        await runner.cleanup()
        sock.close()


# --- a real process ----------------------------------------------------------------------------


@dataclass
class ServiceProcess:
    proc: subprocess.Popen[bytes]
    url: str
    data_dir: Path
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    admin_token: str = ADMIN_TOKEN

    @property
    def admin_headers(self) -> dict[str, str]:
        return bearer(self.admin_token)

    def output(self) -> str:
        """Everything the process wrote to stdout and stderr so far."""
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 20.0) -> None:
        def healthy() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"service exited with {self.proc.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1) as r:
                    return bool(r.status == 200)
            except (urllib.error.URLError, OSError):
                return False

        wait_until_sync(healthy, timeout, 0.05, message=lambda: f"service not ready:\n{self.output()}")

    def wait_exit(self, timeout: float = 20.0) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send ``sig`` (SIGTERM: graceful; SIGKILL: crash) and wait for the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def __enter__(self) -> ServiceProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.stop()


def start_service_process(
    data_dir: Path,
    *,
    env: Mapping[str, str] | None = None,
    port: int | None = None,
    redis_url: str | None = None,
    wait: bool = True,
    timeout: float = 20.0,
    args: tuple[str, ...] = (),
) -> ServiceProcess:
    """``python -m proxy serve`` with only harness + given ``PROXY_*`` variables; waits for /healthz.

    Pass ``env={"PROXY_ADMIN_TOKEN": ""}``-style values to override harness defaults; a value of
    ``None`` is not allowed, drop keys by passing an empty string (settings treat it as unset).
    """
    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PROXY_")}
    full_env.update(
        {
            "PROXY_DATA_DIR": str(data_dir),
            "PROXY_LISTEN": f"127.0.0.1:{port}",
            "PROXY_ADMIN_TOKEN": ADMIN_TOKEN,
            "PROXY_EGRESS_ALLOW": "127.0.0.1/32",
            "PROXY_PUBLIC_URL": f"http://127.0.0.1:{port}",
            "PROXY_AUDIT_FLUSH_INTERVAL_S": "0.05",
            "PROXY_REDIS_TIMEOUT_S": str(HARNESS_REDIS_TIMEOUT_S),  # see harness_settings
            # Tests read this output as text; JSON logs are tested by asking for them.
            "PROXY_LOG_FORMAT": "text",
            "PYTHONUNBUFFERED": "1",
        }
    )
    if redis_url:
        full_env["PROXY_REDIS_URL"] = redis_url
    full_env.update(env or {})
    log_path = data_dir.parent / f"{data_dir.name}-service-{port}.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", *args],
            cwd=REPO_ROOT,
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    sp = ServiceProcess(
        proc=proc,
        url=f"http://127.0.0.1:{port}",
        data_dir=data_dir,
        log_path=log_path,
        env=full_env,
        admin_token=full_env.get("PROXY_ADMIN_TOKEN") or ADMIN_TOKEN,
    )
    if wait:
        try:
            sp.wait_ready(timeout)
        except BaseException:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            raise
    return sp


__all__ = [
    "ADMIN_TOKEN",
    "RunningService",
    "ServiceProcess",
    "bearer",
    "free_port",
    "harness_settings",
    "running_service",
    "start_service_process",
]
