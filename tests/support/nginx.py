"""Real nginx in front of a running service, configured by ``connection-proxy nginx-config``'s
generator (``proxy.nginxconf.render``), on a free loopback port, as the current user::

    async with nginx_front(svc, tmp_path) as front:
        async with svc.session.get(front.url + "/proxy/x", headers=...) as r: ...

Debian's ``nginx`` (``/usr/sbin/nginx``, with ``ngx_http_auth_request_module``) is required;
``make check-system`` installs it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from proxy.nginxconf import render
from proxy.pipeline.decision import injectable_headers
from tests.support.app import RunningService, free_port

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
DECISION_TOKEN = "test-decision-token-0123456789abcdefghij"
# Parametrize a proxy test over both fronts: path mode, and real nginx in front (a process).
FRONTS = ["path", pytest.param("nginx", marks=pytest.mark.system)]


def front_settings() -> dict[str, Any]:
    """The settings a service needs to be put behind nginx (every response reported, on a free
    UDP port, so audited uses match path mode's)."""
    return {
        "decision_token": DECISION_TOKEN,
        "nginx_report_listen": f"127.0.0.1:{free_port()}",
        "nginx_report": "all",
        "decision_listen": f"127.0.0.1:{free_port()}",  # the lean listener, as deployed
    }


@contextlib.asynccontextmanager
async def proxied_through(svc: RunningService, tmp_path: Path, mode: str) -> AsyncIterator[RunningService]:
    """``svc`` with ``proxy_url`` pointing at the front ``mode`` names (see ``FRONTS``)."""
    if mode == "path":
        yield svc
        return
    async with nginx_front(svc, tmp_path) as front:
        svc.proxy_base = front.url
        try:
            yield svc
        finally:
            svc.proxy_base = ""


@dataclass
class Front:
    url: str
    prefix: Path
    conf: str
    proc: subprocess.Popen[bytes]
    cache_dir: Path  # the decision cache, on tmpfs (/dev/shm), one per front

    def error_log(self) -> str:
        path = self.prefix / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""


def _wait_port(port: int, proc: subprocess.Popen[bytes], prefix: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = (prefix / "nginx.out").read_text(errors="replace")
            raise AssertionError(f"nginx exited with {proc.returncode}:\n{out}")
        with contextlib.closing(socket.socket()) as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise AssertionError("nginx did not start listening")


@contextlib.asynccontextmanager
async def nginx_front(
    svc: RunningService, tmp_path: Path, *, trusted_ca: Path | None = None, keepalive: tuple[str, ...] = ()
) -> AsyncIterator[Front]:
    prefix = tmp_path / "nginx"
    prefix.mkdir(parents=True, exist_ok=True)
    port = free_port()
    # Each front its own decision cache on tmpfs (two nginx must not share one cache directory).
    cache_dir = Path(tempfile.mkdtemp(prefix="cp-nginx-test-", dir="/dev/shm"))
    settings = dataclasses.replace(svc.settings, nginx_decision_cache_dir=cache_dir)
    names = injectable_headers(svc.services.catalogue, settings.nginx_inject_headers)
    conf = render(
        settings,
        names,
        listen=f"127.0.0.1:{port}",
        service=svc.url,
        prefix=prefix,
        workers="1",
        trusted_ca=trusted_ca,
        keepalive=keepalive,
    )
    conf_path = prefix / "nginx.conf"
    conf_path.write_text(conf)
    # As root nginx would run its worker as nobody, who cannot enter pytest's private dirs.
    globals_ = "daemon off; master_process on;" + (" user root;" if os.geteuid() == 0 else "")
    with open(prefix / "nginx.out", "wb") as out:
        proc = subprocess.Popen(
            [NGINX, "-p", str(prefix), "-c", str(conf_path), "-g", globals_],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_port(port, proc, prefix)
        yield Front(url=f"http://127.0.0.1:{port}", prefix=prefix, conf=conf, proc=proc, cache_dir=cache_dir)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(cache_dir, ignore_errors=True)
