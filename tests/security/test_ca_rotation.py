"""CA rotation (proxy.security.ca_rotation, ``connection-proxy ca rotate [--finish]``) and the
SIGHUP reload of a running service: real ``serve`` process, real curl clients each trusting
exactly one CA certificate, a real TLS upstream.

What must hold: during the overlap a client that trusts only the old CA and one that trusts only
the new CA both get through; after ``--finish`` only the new one does; the service never stops.
"""

from __future__ import annotations

import asyncio
import json
import signal
import ssl
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509

from proxy.errors import ConfigError
from proxy.security import ca as ca_mod
from proxy.security import ca_rotation
from proxy.settings import load_settings
from tests.support.app import REPO_ROOT, ServiceProcess, start_service_process
from tests.support.tlsupstream import UPSTREAM_HOST
from tests.support.upstream import running_upstream
from tests.support.wait import wait_until_sync


def _settings(tmp_path: Path) -> Any:
    return load_settings(env={}, overrides={"data_dir": str(tmp_path)})


def test_rotate_cross_signs_and_finish_drops_the_old(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    old = ca_mod.load_ca(settings)
    assert old is not None
    done = ca_rotation.rotate(settings)
    mid = ca_mod.load_ca(settings)
    assert mid is not None
    assert done.signer == mid.fingerprint != old.fingerprint
    assert [c.fingerprint(ca_mod.hashes.SHA256()) for c in mid.trusted] == [
        mid.signing_cert.fingerprint(ca_mod.hashes.SHA256()),
        old.signing_cert.fingerprint(ca_mod.hashes.SHA256()),
    ]
    (cross,) = mid.cross
    # Self-issued (the old CA's pathlen 0 still holds), signed by the old key, for the new key.
    assert cross.subject == cross.issuer == old.signing_cert.subject
    assert cross.public_key() == mid.signing_cert.public_key()
    cross.verify_directly_issued_by(old.signing_cert)
    assert x509.load_pem_x509_certificates(mid.bundle_pem.encode()) == list(mid.trusted)  # no cross
    assert (tmp_path / ca_mod.CA_KEY_NAME).stat().st_mode & 0o077 == 0
    # A second rotation before the first one is finished is refused.
    with pytest.raises(ConfigError, match="rotate --finish"):
        ca_rotation.rotate(settings)
    ca_rotation.finish(settings)
    end = ca_mod.load_ca(settings)
    assert end is not None and end.trusted == (mid.signing_cert,) and end.cross == ()
    assert "PRIVATE" not in end.bundle_pem


def test_adopt_swaps_the_signer_and_drops_cached_leaves(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    ca = ca_mod.load_ca(settings)
    assert ca is not None
    before = ca.server_context("api.example.com")
    assert ca.adopt(ca_mod.load_ca(settings)) is False  # same files: nothing dropped
    assert ca.server_context("api.example.com") is before
    ca_rotation.rotate(settings)
    assert ca.adopt(ca_mod.load_ca(settings)) is True
    assert ca.server_context("api.example.com") is not before
    leaf = x509.load_pem_x509_certificate(ca.leaf_pem("api.example.com"))
    leaf.verify_directly_issued_by(ca.signing_cert)


# --- a running service, SIGHUP, real clients -------------------------------------------------


def _admin(sp: ServiceProcess, method: str, path: str, body: Any = None) -> Any:
    req = urllib.request.Request(
        sp.url + path,
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={**sp.admin_headers, "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read() or b"null")


def _ca_pem(sp: ServiceProcess) -> str:
    with urllib.request.urlopen(sp.url + "/ca.pem", timeout=10) as r:
        return str(r.read().decode())


async def _curl(url: str, proxy: str, trust: Path) -> int:
    p = await asyncio.create_subprocess_exec(
        "curl", "-sS", "-m", "20", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", str(trust),
        "--proxy", proxy, url,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(p.communicate(), 60)
    code = p.returncode or 0
    return int(out.decode() or 0) if code == 0 else -code  # curl's exit code, negated


def _cli(sp: ServiceProcess, *args: str) -> str:
    r = subprocess.run(
        [sys.executable, "-m", "proxy", "ca", *args],
        env=sp.env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.system
async def test_rotation_with_real_clients_and_sighup(tmp_path: Path) -> None:
    test_ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    test_ca.issue_cert(UPSTREAM_HOST).configure_cert(server_ctx)
    up_ca = tmp_path / "upstream-ca.pem"
    test_ca.cert_pem.write_to_path(str(up_ca))
    async with running_upstream(UPSTREAM_HOST, server_ctx) as up:
        env = {"PROXY_EGRESS_ALLOW": "127.0.0.0/8", "PROXY_UPSTREAM_CA_FILE": str(up_ca)}
        with start_service_process(tmp_path / "data", env=env) as sp:
            base = {"integration_id": "http_bearer", "parameters": {"token": "tok", "base_url": up.url + "/"}}
            _admin(sp, "PUT", "/admin/tenants/t1/connections/c1", base)
            key = _admin(sp, "POST", "/admin/tenants/t1/api-keys", {"name": "rot"})["api_key"]
            proxy = f"http://c1:{key}@127.0.0.1:{sp.url.rsplit(':', 1)[1]}"
            old_only = tmp_path / "old.pem"
            old_only.write_text(_ca_pem(sp))
            assert await _curl(f"{up.url}/echo/before", proxy, old_only) == 200

            out = _cli(sp, "rotate")
            assert "cross-signed" in out and key not in out
            sp.proc.send_signal(signal.SIGHUP)
            wait_until_sync(lambda: _ca_pem(sp).count("BEGIN CERTIFICATE") == 2, 10, 0.05)
            new_only = tmp_path / "new.pem"
            new_only.write_text(x509.load_pem_x509_certificates(_ca_pem(sp).encode())[0].public_bytes(
                ca_mod.serialization.Encoding.PEM
            ).decode())  # fmt: skip
            assert new_only.read_text() not in old_only.read_text()
            # The overlap: both clients get through, each trusting one CA only.
            assert await _curl(f"{up.url}/echo/old-mid", proxy, old_only) == 200
            assert await _curl(f"{up.url}/echo/new-mid", proxy, new_only) == 200

            _cli(sp, "rotate", "--finish")
            sp.proc.send_signal(signal.SIGHUP)
            wait_until_sync(lambda: _ca_pem(sp).count("BEGIN CERTIFICATE") == 1, 10, 0.05)
            assert await _curl(f"{up.url}/echo/old-after", proxy, old_only) == -60  # not trusted
            assert await _curl(f"{up.url}/echo/new-after", proxy, new_only) == 200
            assert sp.proc.poll() is None  # served throughout
            # The refused handshake is on the caller's record: who still trusts only the old CA.
            wait_until_sync(
                lambda: any(
                    e["outcome"] == "tls_handshake_failed"
                    for e in _admin(sp, "GET", "/admin/tenants/t1/audit?action=proxy.connect")["items"]
                ),
                10,
                0.05,
            )
            paths = [s.path for s in up.seen]
            assert paths == ["/echo/before", "/echo/old-mid", "/echo/new-mid", "/echo/new-after"]
            # A broken CA file on SIGHUP: the error is logged, the current CA keeps serving.
            bundle = _ca_pem(sp)
            (sp.data_dir / ca_mod.CA_CERT_NAME).write_text("not a certificate")
            sp.proc.send_signal(signal.SIGHUP)
            wait_until_sync(lambda: "CA or listener certificate not reloaded" in sp.output(), 10, 0.05)
            assert _ca_pem(sp) == bundle
            assert await _curl(f"{up.url}/echo/still", proxy, new_only) == 200
            log = sp.output()
            assert "SIGHUP: CA reloaded" in log and "PRIVATE KEY" not in log and key not in log
