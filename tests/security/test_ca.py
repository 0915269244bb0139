"""The deployment CA (proxy.security.ca): what strict verifiers require of a leaf, a real TLS
handshake under VERIFY_X509_STRICT, the leaf cache, dev-mode files, and rotation overlap."""

from __future__ import annotations

import datetime as dt
import os
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from proxy.errors import ConfigError
from proxy.security import ca as ca_mod
from proxy.settings import load_settings


def dev_ca(tmp_path: Path) -> ca_mod.CertificateAuthority:
    ca = ca_mod.load_ca(load_settings(env={}, overrides={"data_dir": str(tmp_path)}))
    assert ca is not None
    return ca


def test_leaf_carries_what_strict_verifiers_need(tmp_path: Path) -> None:
    ca = dev_ca(tmp_path)
    for host, san_type in (("api.example.com", x509.DNSName), ("127.0.0.2", x509.IPAddress)):
        leaf = x509.load_pem_x509_certificate(ca.leaf_pem(host))
        ext = leaf.extensions
        san = ext.get_extension_for_class(x509.SubjectAlternativeName).value
        assert [str(v) for v in san.get_values_for_type(san_type)] == [host]
        bc = ext.get_extension_for_class(x509.BasicConstraints)
        assert bc.critical and bc.value.ca is False
        ku = ext.get_extension_for_class(x509.KeyUsage)
        assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
        eku = ext.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
        ski = ext.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        ca_ski = ca.signing_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        assert aki.key_identifier == ca_ski.digest and ski.digest != ca_ski.digest
        life = leaf.not_valid_after_utc - leaf.not_valid_before_utc
        assert life <= ca_mod.LEAF_LIFETIME + ca_mod.BACKDATE
        assert leaf.issuer == ca.signing_cert.subject


def test_strict_handshake_alpn_and_cache(tmp_path: Path) -> None:
    ca = dev_ca(tmp_path)
    ctx = ca.server_context("api.example.com")
    assert ca.server_context("API.example.com.") is ctx and ca.minted == 1  # cached, normalised
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()

    def serve() -> None:
        conn, _ = srv.accept()
        with ctx.wrap_socket(conn, server_side=True) as tls:
            tls.sendall(b"ok")

    thread = threading.Thread(target=serve)
    thread.start()
    client = ssl.create_default_context(cadata=ca.bundle_pem)
    client.verify_flags |= ssl.VERIFY_X509_STRICT  # what Python 3.13 turns on by default
    client.set_alpn_protocols(["h2", "http/1.1"])
    with (
        socket.create_connection(srv.getsockname()) as raw,
        client.wrap_socket(raw, server_hostname="api.example.com") as tls,
    ):
        assert tls.recv(2) == b"ok"
        assert tls.selected_alpn_protocol() == "http/1.1"  # never h2: the relay speaks HTTP/1.1
    thread.join(5)
    srv.close()


def test_dev_ca_files_private_and_stable(tmp_path: Path) -> None:
    first = dev_ca(tmp_path)
    assert stat.S_IMODE(os.stat(tmp_path / "ca.key").st_mode) == 0o600
    again = dev_ca(tmp_path)  # another worker, a restart: the same CA
    assert again.fingerprint == first.fingerprint
    assert "PRIVATE" not in first.bundle_pem and "PRIVATE" not in repr(first)


def test_rotation_overlap_exports_old_and_new(tmp_path: Path) -> None:
    old_cert, _ = ca_mod.generate_ca("old")
    new_cert, new_key = ca_mod.generate_ca("new")
    (tmp_path / "bundle.pem").write_bytes(old_cert + new_cert)
    key = tmp_path / "ca.key"
    key.write_bytes(new_key)
    key.chmod(0o600)
    settings = load_settings(
        env={}, overrides={"dev_mode": False, "master_key": "x" * 44, "admin_token": "a" * 16,
                           "ca_cert_file": str(tmp_path / "bundle.pem"), "ca_key_file": str(key)}
    )  # fmt: skip
    ca = ca_mod.load_ca(settings)
    assert ca is not None
    assert ca.signing_cert == x509.load_pem_x509_certificate(new_cert)  # the key's certificate signs
    assert ca.bundle_pem.count("BEGIN CERTIFICATE") == 2  # the old one is still trusted
    leaf = x509.load_pem_x509_certificate(ca.leaf_pem("h.example"))
    assert leaf.issuer == ca.signing_cert.subject


def test_bad_ca_configuration_stops_start_up(tmp_path: Path) -> None:
    cert, key_pem = ca_mod.generate_ca()
    (tmp_path / "ca.pem").write_bytes(cert)
    key = tmp_path / "ca.key"
    key.write_bytes(key_pem)
    key.chmod(0o644)
    base = {"dev_mode": False, "master_key": "x" * 44, "admin_token": "a" * 16}
    with pytest.raises(ConfigError, match="readable by group or others"):
        ca_mod.load_ca(
            load_settings(
                env={}, overrides={**base, "ca_cert_file": str(tmp_path / "ca.pem"), "ca_key_file": str(key)}
            )
        )
    with pytest.raises(ConfigError, match="both"):
        ca_mod.load_ca(load_settings(env={}, overrides={**base, "ca_cert_file": str(tmp_path / "ca.pem")}))
    other_cert, _ = ca_mod.generate_ca()
    (tmp_path / "other.pem").write_bytes(other_cert)
    key.chmod(0o600)
    with pytest.raises(ConfigError, match="matches no certificate"):
        ca_mod.load_ca(
            load_settings(
                env={},
                overrides={**base, "ca_cert_file": str(tmp_path / "other.pem"), "ca_key_file": str(key)},
            )
        )
    # Production without a CA: no interception (CONNECT is refused), not a start-up failure.
    assert ca_mod.load_ca(load_settings(env={}, overrides=base)) is None


def test_leaf_never_outlives_the_ca(tmp_path: Path) -> None:
    ca = dev_ca(tmp_path)
    leaf = x509.load_pem_x509_certificate(ca.leaf_pem("x.example"))
    assert leaf.not_valid_after_utc <= ca.signing_cert.not_valid_after_utc
    assert leaf.not_valid_after_utc > dt.datetime.now(dt.UTC)


@pytest.mark.system
def test_ca_export_prints_the_bundle_and_no_key(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.support.app import REPO_ROOT

    env = {k: v for k, v in os.environ.items() if not k.startswith("PROXY_")}
    env["PROXY_DATA_DIR"] = str(tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "proxy", "ca", "export"],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.decode() == dev_ca(tmp_path).bundle_pem  # the CA the service will use
    assert b"PRIVATE" not in out.stdout + out.stderr
