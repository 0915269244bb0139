"""CONNECT interception details: proxy auth (407, Basic user forms), uploads with
``Expect: 100-continue``, WebSocket refusal, ``/ca.pem``, and ``connection-proxy run`` end to end.

Real parts only: the service on a loopback port, a trustme-CA TLS upstream, curl and Python as
subprocesses, raw sockets for what no client sends.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy.web.tunnel import TUNNEL_CA, TUNNELS
from tests.support.app import ADMIN_TOKEN, REPO_ROOT
from tests.support.tlsupstream import TlsSetup, tls_setup


@pytest.fixture
async def tls(tmp_path: Path) -> AsyncIterator[TlsSetup]:
    async with tls_setup(tmp_path) as setup:
        yield setup


async def connect_head(tls: TlsSetup, auth: str | None) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", tls.proxy_port)
    try:
        target = f"127.0.0.2:{tls.up.port}"
        head = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
        if auth is not None:
            head += f"Proxy-Authorization: {auth}\r\n"
        writer.write((head + "\r\n").encode())
        data = await asyncio.wait_for(reader.read(65536), 10)
    finally:
        writer.close()
    head_raw, _, body = data.partition(b"\r\n\r\n")
    lines = head_raw.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


async def test_connect_without_or_with_bad_credentials_gets_407(tls: TlsSetup) -> None:
    for auth in (None, basic("c1", "cpk_nope_nope"), "Basic !!!", basic("c1", "")):
        status, headers, body = await connect_head(tls, auth)
        assert status == 407, (auth, body)
        assert headers["proxy-authenticate"] == 'Basic realm="connection-proxy"'
        assert headers["x-proxy-error"] == "UNAUTHENTICATED"
        assert "CONNECTION_ID:API_KEY" in json.loads(body)["message"]
    assert tls.svc.app[TUNNELS].opened == 0


async def test_basic_user_forms(tls: TlsSetup) -> None:
    # A tenant key names just the connection; the admin token must name the tenant too.
    assert (await connect_head(tls, basic("c1", tls.key)))[0] == 200
    assert (await connect_head(tls, basic("t1%2Fc1", tls.key)))[0] == 200
    assert (await connect_head(tls, basic("t1/c1", ADMIN_TOKEN)))[0] == 200
    status, _, body = await connect_head(tls, basic("c1", ADMIN_TOKEN))
    assert status == 407 and "TENANT_ID/CONNECTION_ID" in json.loads(body)["message"]
    # A key of tenant t1 naming another tenant learns nothing about it.
    status, headers, _ = await connect_head(tls, basic("t2/c1", tls.key))
    assert (status, headers["x-proxy-error"]) == (404, "CONNECTION_NOT_FOUND")
    status, headers, _ = await connect_head(tls, basic("nope", tls.key))
    assert (status, headers["x-proxy-error"]) == (404, "CONNECTION_NOT_FOUND")


async def curl(tls: TlsSetup, *args: str) -> tuple[int, str, str]:
    p = await asyncio.create_subprocess_exec(
        "curl", "-sS", "-m", "30", *args, env=tls.client_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await asyncio.wait_for(p.communicate(), 60)
    return p.returncode or 0, out.decode(), err.decode()


async def test_streaming_upload_with_expect_100_continue(tls: TlsSetup) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    path = tls.tmp / "upload.bin"
    path.write_bytes(data)
    # curl sends "Expect: 100-continue" for a body this size and waits for the 100.
    code, out, err = await curl(tls, "-v", "-T", str(path), f"{tls.up.url}/upload")
    assert code == 0, err
    assert "Expect: 100-continue" in err and "HTTP/1.1 100 Continue" in err
    assert json.loads(out) == {"len": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    seen = tls.up.seen[-1]
    assert seen.header("Authorization") == ["Bearer tok"] and "expect" not in seen.header_names


async def test_websocket_upgrade_refused_clearly(tls: TlsSetup) -> None:
    code, out, err = await curl(
        tls,
        "-i",
        "-H", "Connection: Upgrade",
        "-H", "Upgrade: websocket",
        "-H", "Sec-WebSocket-Version: 13",
        "-H", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        f"{tls.up.url}/ws",
    )  # fmt: skip
    assert code == 0, err
    inner = out.split("HTTP/1.1 200 Connection Established\r\n", 1)[1].split("\r\n\r\n", 1)[1]
    assert inner.startswith("HTTP/1.1 501"), out
    body = json.loads(inner.split("\r\n\r\n", 1)[1])
    assert body["error"] == "NOT_SUPPORTED" and "upgrade" in body["message"]
    assert "/ws" not in [s.path for s in tls.up.seen]


async def test_ca_pem_is_public_and_holds_no_key(tls: TlsSetup) -> None:
    async with tls.svc.session.get(tls.svc.url + "/ca.pem") as r:
        text = await r.text()
    assert r.status == 200 and text.startswith("-----BEGIN CERTIFICATE-----")
    assert "PRIVATE" not in text


@pytest.mark.system
async def test_connection_proxy_run_end_to_end(tls: TlsSetup) -> None:
    script = (
        "import json, os, requests, urllib.request\n"
        f"url = {tls.up.url + '/echo/run'!r}\n"
        "r = requests.get(url, headers={'Authorization': 'Bearer caller-own'}, timeout=20)\n"
        "u = urllib.request.urlopen(url, timeout=20).status\n"
        "names = ['HTTPS_PROXY','https_proxy','HTTP_PROXY','http_proxy','NO_PROXY','SSL_CERT_FILE',"
        "'REQUESTS_CA_BUNDLE','CURL_CA_BUNDLE','NODE_EXTRA_CA_CERTS','GIT_SSL_CAINFO','NODE_USE_ENV_PROXY']\n"
        "print(json.dumps({'status': r.status_code, 'urllib': u, 'set': [n for n in names if os.environ.get(n)],"
        " 'key_env': 'PROXY_CALLER_KEY' in os.environ, 'no_proxy': os.environ['NO_PROXY'],"
        " 'bundle': open(os.environ['SSL_CERT_FILE']).read().count('BEGIN CERTIFICATE')}))\n"
    )
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["PROXY_CALLER_KEY"] = tls.key
    argv = [sys.executable, "-m", "proxy", "run", "--connection", "c1", "--proxy", tls.svc.url]
    p = await asyncio.create_subprocess_exec(
        *argv, "--", sys.executable, "-c", script,
        env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(p.communicate(), 60)
    assert p.returncode == 0, err.decode()
    result = json.loads(out.decode().strip().splitlines()[-1])
    assert result["status"] == 200 and result["urllib"] == 200
    assert len(result["set"]) == 11, result["set"]
    assert result["key_env"] is False and "127.0.0.1" in result["no_proxy"]
    assert result["bundle"] > 1  # system roots plus the proxy's CA
    runs = [s for s in tls.up.seen if s.path == "/echo/run"]
    assert len(runs) == 2 and all(s.header("Authorization") == ["Bearer tok"] for s in runs)
    assert tls.key.encode() not in out + err


@pytest.mark.system
async def test_run_refuses_without_a_credential(tls: TlsSetup) -> None:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    p = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "run", "--connection", "c1", "--proxy", tls.svc.url, "--", "true",
        env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(p.communicate(), 60)
    assert p.returncode == 2 and b"PROXY_CALLER_KEY" in err


async def test_key_revoked_mid_tunnel_stops_working_inside_it(tls: TlsSetup) -> None:
    import ssl

    import aiohttp

    from proxy.security import crypto

    ctx = ssl.create_default_context(cafile=str(tls.client_ca))
    proxy = tls.proxy_url()
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{tls.up.url}/echo/before", proxy=proxy, ssl=ctx) as r:
            assert r.status == 200
        key_id = crypto.split_api_key(tls.key)[0]  # type: ignore[index]
        status, _ = await tls.svc.admin("DELETE", f"/admin/tenants/t1/api-keys/{key_id}")
        assert status in (200, 204)
        async with s.get(f"{tls.up.url}/echo/after", proxy=proxy, ssl=ctx) as r:
            assert r.status == 407 and r.headers["X-Proxy-Error"] == "UNAUTHENTICATED"
    assert tls.svc.app[TUNNELS].opened == 1  # the second call was inside the same tunnel
    assert "/echo/after" not in [s.path for s in tls.up.seen]


async def test_client_not_trusting_the_ca_fails_its_handshake_and_nothing_is_sent(tls: TlsSetup) -> None:
    env = tls.client_env()
    env["CURL_CA_BUNDLE"] = "/etc/ssl/certs/ca-certificates.crt"  # system roots only
    p = await asyncio.create_subprocess_exec(
        "curl", "-sS", "-m", "20", f"{tls.up.url}/echo/untrusted",
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(p.communicate(), 60)
    assert p.returncode == 60, err  # curl: peer certificate cannot be authenticated
    assert tls.up.seen == []
    assert tls.svc.app[TUNNELS].opened == 0


async def test_each_call_in_a_tunnel_gets_its_own_access_line(
    tls: TlsSetup, caplog: pytest.LogCaptureFixture
) -> None:
    import logging
    import ssl

    import aiohttp

    ctx = ssl.create_default_context(cafile=str(tls.client_ca))
    with caplog.at_level(logging.INFO, logger="proxy.access"):
        async with aiohttp.ClientSession() as s:
            for n in range(2):
                async with s.get(f"{tls.up.url}/echo/{n}", proxy=tls.proxy_url(), ssl=ctx) as r:
                    assert r.status == 200
    lines = [r.getMessage() for r in caplog.records if r.name == "proxy.access"]
    tunnel_lines = [m for m in lines if m.startswith("tunnel t1/c1 -> 127.0.0.2")]
    assert len(tunnel_lines) == 2, lines
    assert len({m.rsplit("request ", 1)[1] for m in tunnel_lines}) == 2  # distinct request ids
    assert tls.key not in " ".join(lines)


@pytest.mark.system
async def test_connection_proxy_run_with_an_https_proxy_url(tmp_path: Path) -> None:
    """``run --proxy https://...``: the listener's CA (here: minted from the service's CA, given
    as --proxy-cacert from `ca export`) verifies the /ca.pem fetch and is in the bundle, so
    requests and (with its one option) curl speak TLS to the proxy and through the tunnel."""
    async with tls_setup(tmp_path, listen_tls_hostnames=["127.0.0.1"]) as tls:
        assert tls.svc.url.startswith("https://")
        exported = tmp_path / "exported-ca.pem"
        exported.write_text(tls.svc.app[TUNNEL_CA].bundle_pem)
        url = tls.up.url + "/echo/run-https"
        script = (
            "import json, os, requests, subprocess\n"
            f"r = requests.get({url!r}, timeout=20)\n"
            "c = subprocess.run(['curl', '-sS', '-m', '20', '-o', '/dev/null', '-w', '%{http_code}',"
            f" '--proxy-cacert', os.environ['CURL_CA_BUNDLE'], {url!r}], capture_output=True, text=True)\n"
            # git through the https proxy: the upstream is no git server, so git fails after the
            # call; what counts is that the call got there, through TLS to the proxy and the tunnel.
            f"g = subprocess.run(['git', 'ls-remote', {url + '/repo'!r}], capture_output=True, text=True)\n"
            "print(json.dumps({'requests': r.status_code, 'curl': c.stdout, 'curl_err': c.stderr,"
            " 'proxy': os.environ['HTTPS_PROXY'].split(':', 1)[0],"
            " 'git_tls_ok': 'SSL' not in g.stderr and 'certificate' not in g.stderr}))\n"
        )
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        env["PROXY_CALLER_KEY"] = tls.key
        argv = [sys.executable, "-m", "proxy", "run", "--connection", "c1", "--proxy", tls.svc.url]
        p = await asyncio.create_subprocess_exec(
            *argv, "--proxy-cacert", str(exported), "--", sys.executable, "-c", script,
            env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(p.communicate(), 60)
        assert p.returncode == 0, err.decode()
        result = json.loads(out.decode().strip().splitlines()[-1])
        assert result == {
            "requests": 200,
            "curl": "200",
            "curl_err": "",
            "proxy": "https",
            "git_tls_ok": True,
        }
        runs = [s for s in tls.up.seen if s.path == "/echo/run-https"]
        assert len(runs) == 2 and all(s.header("Authorization") == ["Bearer tok"] for s in runs)
        git = [s for s in tls.up.seen if s.path.startswith("/echo/run-https/repo/info/refs")]
        assert git and all(s.header("Authorization") == ["Bearer tok"] for s in git), tls.up.seen


async def _connect_audit(tls: TlsSetup) -> list[dict[str, object]]:
    await tls.svc.flush_audit()
    status, data = await tls.svc.admin("GET", "/admin/tenants/t1/audit?action=proxy.connect")
    assert status == 200, data
    return list(data["items"])


async def test_refused_connects_are_audited_without_secrets(tls: TlsSetup) -> None:
    from proxy.security import crypto

    key_id = crypto.split_api_key(tls.key)[0]  # type: ignore[index]
    # Authenticated, but a host the connection is not bound to: 403, in the caller's tenant.
    reader, writer = await asyncio.open_connection("127.0.0.1", tls.proxy_port)
    writer.write(
        f"CONNECT 127.0.0.3:443 HTTP/1.1\r\nHost: x\r\nProxy-Authorization: {basic('c1', tls.key)}\r\n\r\n".encode()
    )
    assert (await asyncio.wait_for(reader.read(), 10)).startswith(b"HTTP/1.1 403")
    writer.close()
    # No credential, or one naming no existing key: 407, on no tenant's record (it could pick any).
    for auth in (None, basic("t1%2Fc1", "cpk_nope_nope"), basic("t1/c1", "not-a-key")):
        assert (await connect_head(tls, auth))[0] == 407
    (refused,) = await _connect_audit(tls)
    assert refused["outcome"] == "HOST_NOT_ALLOWED" and refused["actor"] == f"api_key:{key_id}"
    assert refused["connection_id"] == "c1" and refused["request_id"]
    # A revoked key's id still names its tenant: that 407 is on t1's record.
    status, _ = await tls.svc.admin("DELETE", f"/admin/tenants/t1/api-keys/{key_id}")
    assert status in (200, 204)
    for _ in range(2):  # folded per flush interval into events with a count
        assert (await connect_head(tls, basic("c1", tls.key)))[0] == 407
    events = await _connect_audit(tls)
    unauth = [e for e in events if e["outcome"] == "UNAUTHENTICATED"]
    assert {(e["actor"], e["connection_id"]) for e in unauth} == {(f"api_key:{key_id}", None)}
    assert sum(e["detail"]["count"] for e in unauth) == 2  # type: ignore[index, misc]
    assert tls.key not in json.dumps(events) and key_id in json.dumps(events)


async def test_a_connect_to_another_tenants_connection_is_audited_in_the_callers_tenant_only(
    tls: TlsSetup,
) -> None:
    """A key of t1 naming t2's connection (proxy user ``t2/c1``, or Bearer with X-Tenant-Id:
    t2) gets the same 404 as an unknown connection, and the refusal is on t1's record (actor,
    outcome, no connection id), never on t2's: any key could otherwise write into any trail."""
    from proxy.security import crypto

    key_id = crypto.split_api_key(tls.key)[0]  # type: ignore[index]
    await tls.svc.put_connection(
        "t2",
        "c1",
        {"integration_id": "http_bearer", "parameters": {"token": "t2-tok", "base_url": tls.up.url}},
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", tls.proxy_port)
    target = f"127.0.0.2:{tls.up.port}"
    writer.write(
        f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: Bearer {tls.key}\r\n"
        "X-Connection-Id: c1\r\nX-Tenant-Id: t2\r\n\r\n".encode()
    )
    assert (await asyncio.wait_for(reader.read(), 10)).startswith(b"HTTP/1.1 404")
    writer.close()
    for user in ("t2%2Fc1", "t2/c1"):
        status, headers, body = await connect_head(tls, basic(user, tls.key))
        assert status == 404 and headers["x-proxy-error"] == "CONNECTION_NOT_FOUND", body
    events = await _connect_audit(tls)
    assert [(e["actor"], e["outcome"], e["connection_id"]) for e in events] == [
        (f"api_key:{key_id}", "CONNECTION_NOT_FOUND", None)
    ], events
    assert events[0]["detail"]["count"] == 3  # type: ignore[index]
    status, data = await tls.svc.admin("GET", "/admin/tenants/t2/audit?action=proxy.connect")
    assert status == 200 and data["items"] == [], data
    assert tls.key not in json.dumps(events)
    assert tls.up.seen == []


async def test_open_tunnel_gauge_on_live_metrics(tls: TlsSetup) -> None:
    import ssl

    def gauge(text: str) -> float:
        (line,) = [ln for ln in text.splitlines() if ln.startswith("proxy_tunnels_open ")]
        return float(line.split()[1])

    async def scrape() -> float:
        async with tls.svc.session.get(tls.svc.url + "/metrics") as r:
            assert r.status == 200
            return gauge(await r.text())

    base = await scrape()  # other tests' tunnels in this process are closed by now
    ctx = ssl.create_default_context(cafile=str(tls.client_ca))
    reader, writer = await asyncio.open_connection("127.0.0.1", tls.proxy_port)
    target = f"127.0.0.2:{tls.up.port}"
    writer.write(
        f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: {basic('c1', tls.key)}\r\n\r\n".encode()
    )
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    await writer.start_tls(ctx, server_hostname="127.0.0.2")
    writer.write(f"GET /echo/g HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    assert await scrape() == base + 1  # open while the client keeps it
    writer.close()
    for _ in range(100):
        if await scrape() == base:
            break
        await asyncio.sleep(0.02)
    assert await scrape() == base
    assert tls.svc.app[TUNNELS].open == 0


async def test_reload_tls_reloads_each_part_on_its_own(tmp_path: Path) -> None:
    """SIGHUP's reload: a broken CA file keeps the current CA, and the listener's certificate
    files are still re-read; the error is raised after both were tried."""
    import trustme

    from proxy.errors import ConfigError
    from proxy.security.ca import CA_CERT_NAME
    from proxy.web.tunnel import LISTENER_TLS, reload_tls

    test_ca = trustme.CA()
    cert_file, key_file, listener_ca = tmp_path / "l.pem", tmp_path / "l.key", tmp_path / "l-ca.pem"
    test_ca.cert_pem.write_to_path(str(listener_ca))

    def issue() -> None:
        leaf = test_ca.issue_cert("127.0.0.1")
        leaf.cert_chain_pems[0].write_to_path(str(cert_file))
        leaf.private_key_pem.write_to_path(str(key_file))

    issue()
    async with tls_setup(
        tmp_path,
        listener_ca=listener_ca,
        listen_tls_cert_file=str(cert_file),
        listen_tls_key_file=str(key_file),
    ) as tls:
        app = tls.svc.app
        assert reload_tls(app) == ["CA unchanged", "listener certificate reloaded"]
        before = app[LISTENER_TLS]._current
        fingerprint = app[TUNNEL_CA].fingerprint
        issue()
        (tmp_path / CA_CERT_NAME).write_text("broken")
        with pytest.raises(ConfigError, match="no PEM certificates"):
            reload_tls(app)
        assert app[TUNNEL_CA].fingerprint == fingerprint
        assert app[LISTENER_TLS]._current is not before  # re-read although the CA failed
        async with tls.svc.session.get(tls.svc.url + "/healthz") as r:
            assert r.status == 200
