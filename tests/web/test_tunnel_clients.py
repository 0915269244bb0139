"""Real, unmodified HTTPS clients through ``HTTPS_PROXY``: CONNECT interception end to end.

Each client runs as a subprocess configured only by environment variables (the proxy URL with
``CONNECTION_ID:API_KEY`` and the CA bundle variables), calls a TLS upstream with a private CA
the service trusts, and must show: the upstream saw the injected credential and never the
caller's own ``Authorization`` or the proxy credential; a host the connection is not bound to is
refused (403); the calls are in the audit trail; a learned ``Retry-After`` and a configured limit
apply inside the tunnel; requests share a kept-alive tunnel where the client keeps connections.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from proxy.web.tunnel import TUNNELS
from tests.support.tlsupstream import UNBOUND_HOST, TlsSetup, tls_setup

pytestmark = pytest.mark.system  # client processes, one per call sequence

CLIENTS_DIR = Path(__file__).resolve().parents[1] / "clients"
PY_CLIENT = CLIENTS_DIR / "py_client.py"
NODE_CLIENT = CLIENTS_DIR / "node_client.mjs"
CLIENTS = ["requests", "httpx", "urllib", "aiohttp", "curl", "node"]
# Clients that keep connections alive: all their calls of one run share one tunnel.
KEEPS_ALIVE = {"requests", "httpx", "aiohttp", "curl"}


def _node_ready() -> None:
    # `make check-system` installs node and npm; a missing one is a failure, never a skip.
    assert shutil.which("node") is not None, "node is not installed: apt-get install nodejs"
    if not (CLIENTS_DIR / "node_modules" / "undici").is_dir():
        assert shutil.which("npm") is not None, (
            "npm is not installed (needed once for undici): apt-get install npm"
        )
        subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund", "--silent"], cwd=CLIENTS_DIR, check=True, timeout=300
        )


async def _proc(argv: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    p = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=CLIENTS_DIR
    )
    out, err = await asyncio.wait_for(p.communicate(), 90)
    return p.returncode or 0, out.decode(), err.decode()


async def _curl(urls: list[str], env: dict[str, str]) -> list[dict[str, Any]]:
    argv = ["curl", "-sS", "-m", "20"]
    if env.get("HTTPS_PROXY", "").startswith("https://"):
        # curl reads no environment variable for the proxy's own CA (CURL_CA_BUNDLE is for the
        # origin): the one option an https:// proxy URL needs (README, "https:// proxy URLs").
        argv += ["--proxy-cacert", env["CURL_CA_BUNDLE"]]
    for url in urls:
        argv += [
            "-H",
            "Authorization: Bearer caller-own",
            "-w",
            "\n@@CURL %{http_code} %header{x-proxy-error}\n",
            url,
        ]
    code, out, err = await _proc(argv, env)
    results: list[dict[str, Any]] = []
    parts = out.split("\n@@CURL ")
    body = parts[0]
    for part in parts[1:]:
        status_line, _, rest = part.partition("\n")
        status, _, xpe = status_line.partition(" ")
        if status == "000":
            results.append({"error": f"curl exit {code}: {err.strip()}"})
        else:
            results.append({"status": int(status), "proxy_error": xpe.strip() or None, "body": body})
        body = rest
    return results


async def run_client(kind: str, urls: list[str], env: dict[str, str]) -> list[dict[str, Any]]:
    if kind == "curl":
        results: list[dict[str, Any]] = []
        batch: list[str] = []
        for url in [*urls, "sleep:0"]:
            if url.startswith("sleep:"):
                if batch:
                    results += await _curl(batch, env)
                batch = []
                await asyncio.sleep(float(url[6:]))
            else:
                batch.append(url)
        return results
    if kind == "node":
        argv = ["node", str(NODE_CLIENT), *urls]
    else:
        argv = [sys.executable, str(PY_CLIENT), kind, *urls]
    code, out, err = await _proc(argv, env)
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


@pytest.fixture
async def tls(tmp_path: Path) -> AsyncIterator[TlsSetup]:
    limited = {"rate_limits": [{"limit": 1, "window": "1h"}]}
    async with tls_setup(tmp_path, {"c1": {}, "lim": limited}) as setup:
        yield setup


@pytest.mark.parametrize("kind", CLIENTS)
async def test_client_through_https_proxy(kind: str, tls: TlsSetup) -> None:
    if kind == "node":
        _node_ready()
    up = tls.up
    env = tls.client_env("c1")
    tunnels = tls.svc.app[TUNNELS]
    results = await run_client(
        kind,
        [
            f"{up.url}/echo/first",
            f"{up.url}/echo/second",
            f"{up.url}/status/429?retry_after=60",  # the upstream says: not for a minute
            "sleep:0.3",
            f"{up.url}/echo/after-learned",
        ],
        env,
    )
    assert len(results) == 4, results
    first, second, told, learned = results
    assert first.get("status") == 200 and second.get("status") == 200, results
    # The upstream saw the injected credential, never the caller's own or the proxy credential.
    echoed = [s for s in up.seen if s.path.startswith("/echo/")]
    assert [s.path for s in echoed] == ["/echo/first", "/echo/second"]
    for seen in echoed:
        assert seen.header("Authorization") == ["Bearer tok"]
        assert "proxy-authorization" not in seen.header_names
        values = " ".join(v for _, v in seen.headers)
        assert "caller-own" not in values and tls.key not in values
    # The upstream's 429 came back as it was; the Retry-After it carried was learned, so the next
    # call inside the tunnel is refused by the proxy without reaching the upstream.
    assert told.get("status") == 429 and told.get("proxy_error") is None, told
    assert learned.get("status") == 429 and learned.get("proxy_error") == "RATE_LIMITED", learned
    assert json.loads(learned["body"])["limit_source"] == "learned"
    assert "/echo/after-learned" not in [s.path for s in up.seen]
    if kind == "node":
        # undici reuses the tunnel, though not for every call (2 for these 4 in practice).
        assert tunnels.opened < 4, f"{tunnels.opened} tunnels for 4 calls"
    elif kind in KEEPS_ALIVE:
        expected = 2 if kind == "curl" else 1  # curl runs twice (before and after the pause)
        assert tunnels.opened == expected, f"{tunnels.opened} tunnels for 4 calls"
    else:
        assert tunnels.opened == 4

    # No blind tunnels: a host the connection is not bound to is refused before any TLS.
    opened = tunnels.opened
    (refused,) = await run_client(kind, [f"https://{UNBOUND_HOST}:{up.port}/x"], env)
    assert "error" in refused, refused
    if kind != "node":  # undici reports only "Request was cancelled" for a refused CONNECT
        assert "403" in refused["error"], refused
    assert tunnels.opened == opened
    assert "/x" not in [s.path for s in up.seen]

    # A configured limit (1 per hour on connection "lim") applies inside the tunnel.
    limited = await run_client(kind, [f"{up.url}/echo/l1", f"{up.url}/echo/l2"], tls.client_env("lim"))
    assert [r.get("status") for r in limited] == [200, 429], limited
    assert limited[1]["proxy_error"] == "RATE_LIMITED"
    assert json.loads(limited[1]["body"])["limit_source"] == "configured"
    assert "/echo/l2" not in [s.path for s in up.seen]

    # Every call is in the audit trail: those that reached the upstream, and those refused.
    await tls.svc.flush_audit()
    status, data = await tls.svc.admin("GET", "/admin/tenants/t1/audit?action=proxy.use")
    assert status == 200, data
    uses: dict[tuple[str, str], int] = {}
    for e in data["items"]:
        if e["action"] == "proxy.use":
            k = (e["connection_id"], e["outcome"])
            uses[k] = uses.get(k, 0) + e["detail"].get("count", 1)
    assert uses == {
        ("c1", "ok"): 2,
        ("c1", "upstream_4xx"): 1,
        ("c1", "RATE_LIMITED"): 1,
        ("lim", "ok"): 1,
        ("lim", "RATE_LIMITED"): 1,
    }, uses


# --- the listener itself over TLS: https:// proxy URLs ------------------------------------------

# Clients that speak TLS to their proxy when HTTPS_PROXY is an https:// URL. urllib (no TLS to
# proxies) and aiohttp's trust_env (ignores https:// proxies) do not; see the README.
HTTPS_PROXY_CLIENTS = ["requests", "httpx", "curl", "node"]


@pytest.fixture
async def tls_listener(tmp_path: Path) -> AsyncIterator[TlsSetup]:
    # The listener's certificate minted from the service's CA: one bundle trusts both.
    async with tls_setup(tmp_path, {"c1": {}}, listen_tls_hostnames=["127.0.0.1"]) as setup:
        yield setup


@pytest.mark.parametrize("kind", HTTPS_PROXY_CLIENTS)
async def test_client_through_https_proxy_url(kind: str, tls_listener: TlsSetup) -> None:
    """TLS inside TLS: the client's TLS to the proxy, the intercepted TLS inside it."""
    if kind == "node":
        _node_ready()
    tls = tls_listener
    env = tls.client_env("c1")
    assert env["HTTPS_PROXY"].startswith("https://c1:"), "the proxy URL must be https://"
    up = tls.up
    results = await run_client(kind, [f"{up.url}/echo/one", f"{up.url}/echo/two"], env)
    assert [r.get("status") for r in results] == [200, 200], results
    echoed = [s for s in up.seen if s.path.startswith("/echo/")]
    assert [s.path for s in echoed] == ["/echo/one", "/echo/two"]
    for seen in echoed:
        assert seen.header("Authorization") == ["Bearer tok"]
        values = " ".join(v for _, v in seen.headers)
        assert "caller-own" not in values and tls.key not in values
    tunnels = tls.svc.app[TUNNELS]
    assert 1 <= tunnels.opened <= 2, tunnels.opened  # kept alive (undici: not always)
    (refused,) = await run_client(kind, [f"https://{UNBOUND_HOST}:{up.port}/x"], env)
    assert "error" in refused, refused
    if kind != "node":
        assert "403" in refused["error"], refused


async def test_https_listener_with_certificate_files_and_plain_http_refused(tmp_path: Path) -> None:
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_file, key_file, listener_ca = tmp_path / "l.pem", tmp_path / "l.key", tmp_path / "l-ca.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    ca.cert_pem.write_to_path(str(listener_ca))
    async with tls_setup(
        tmp_path,
        listener_ca=listener_ca,
        listen_tls_cert_file=str(cert_file),
        listen_tls_key_file=str(key_file),
    ) as tls:
        env = tls.client_env("c1")
        env.update(HTTP_PROXY=env["HTTPS_PROXY"], http_proxy=env["HTTPS_PROXY"])
        plain = tls.up.url.replace("https://", "http://")
        for kind in ("requests", "curl"):
            # An https:// URL goes through CONNECT; an http:// one as an absolute-form request
            # over the TLS connection to the proxy (forward mode, upgraded to the https upstream).
            results = await run_client(kind, [f"{tls.up.url}/echo/{kind}", f"{plain}/echo/{kind}-fwd"], env)
            assert [r.get("status") for r in results] == [200, 200], (kind, results)
        # A client speaking plain HTTP to the TLS port (urllib with an https:// proxy URL) gets
        # no HTTP answer at all: the handshake fails and nothing reaches the pipeline.
        reader, writer = await asyncio.open_connection("127.0.0.1", tls.proxy_port)
        writer.write(f"CONNECT 127.0.0.2:{tls.up.port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert not data.startswith(b"HTTP/"), data
        paths = ["/echo/requests", "/echo/requests-fwd", "/echo/curl", "/echo/curl-fwd"]
        assert [s.path for s in tls.up.seen] == paths
        assert all(s.header("Authorization") == ["Bearer tok"] for s in tls.up.seen)
