"""The listener's own TLS (proxy.security.listener_tls): which certificate a handshake gets (SNI
in minted mode, files otherwise), reload without a restart, and settings that cannot work
stopping start-up with the key named. Real handshakes over loopback sockets.
"""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509

from proxy.errors import ConfigError
from proxy.security import ca as ca_mod
from proxy.security.listener_tls import ListenerTLS, listener_tls
from proxy.settings import load_settings


def _settings(tmp_path: Path, **overrides: Any) -> Any:
    return load_settings(env={}, overrides={"data_dir": str(tmp_path), **overrides})


def _handshake(server: ssl.SSLContext, trust: str, server_hostname: str | None) -> x509.Certificate:
    """The certificate a strict client sees from ``server`` (``server_hostname=None``: no SNI)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()

    def serve() -> None:
        conn, _ = srv.accept()
        try:
            with server.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"ok")
        except (ssl.SSLError, OSError):
            pass

    thread = threading.Thread(target=serve)
    thread.start()
    client = ssl.create_default_context(cadata=trust)
    client.verify_flags |= ssl.VERIFY_X509_STRICT
    if server_hostname is None:
        client.check_hostname = False  # an IP literal: the client sends no SNI
    try:
        with (
            socket.create_connection(srv.getsockname()) as raw,
            client.wrap_socket(raw, server_hostname=server_hostname) as tls,
        ):
            assert tls.recv(2) == b"ok"
            der = tls.getpeercert(binary_form=True)
            assert tls.selected_alpn_protocol() in (None, "http/1.1")
    finally:
        thread.join(5)
        srv.close()
    assert der is not None
    return x509.load_der_x509_certificate(der)


def _san(cert: x509.Certificate) -> list[str]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(v) for v in ext.get_values_for_type(x509.DNSName)] + [
        str(v) for v in ext.get_values_for_type(x509.IPAddress)
    ]


def test_plain_listener_by_default(tmp_path: Path) -> None:
    s = _settings(tmp_path)
    assert listener_tls(s, ca_mod.load_ca(s)) is None
    assert s.public_url.startswith("http://")


def test_minted_certificate_per_sni_name(tmp_path: Path) -> None:
    s = _settings(tmp_path, listen_tls_hostnames=["127.0.0.1", "Proxy.Example.com."], listen="0.0.0.0:9443")
    assert s.listen_tls_hostnames == ("127.0.0.1", "proxy.example.com")
    assert s.public_url == "https://127.0.0.1:9443"  # the default public URL follows the listener
    ca = ca_mod.load_ca(s)
    assert ca is not None
    tls = listener_tls(s, ca)
    assert tls is not None and tls.mode == "minted"
    assert _san(_handshake(tls.context, ca.bundle_pem, "proxy.example.com")) == ["proxy.example.com"]
    assert _san(_handshake(tls.context, ca.bundle_pem, None)) == ["127.0.0.1"]  # no SNI: the first
    # A name the listener is not configured for gets the first one (the client's check fails).
    assert _san(_handshake(tls.context, ca.bundle_pem, "127.0.0.1")) == ["127.0.0.1"]
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(tls.context, ca.bundle_pem, "other.example.com")


def test_certificate_files_and_reload(tmp_path: Path) -> None:
    test_ca = trustme.CA()
    cert_file, key_file = tmp_path / "l.pem", tmp_path / "l.key"

    def issue(name: str) -> None:
        leaf = test_ca.issue_cert(name)
        leaf.cert_chain_pems[0].write_to_path(str(cert_file))
        leaf.private_key_pem.write_to_path(str(key_file))

    issue("proxy.example.com")
    s = _settings(tmp_path, listen_tls_cert_file=str(cert_file), listen_tls_key_file=str(key_file))
    tls = ListenerTLS(s, None)  # no CA needed for a certificate from files
    trust = test_ca.cert_pem.bytes().decode()
    assert _san(_handshake(tls.context, trust, "proxy.example.com")) == ["proxy.example.com"]
    issue("proxy2.example.com")
    assert tls.reload() is True
    assert _san(_handshake(tls.context, trust, "proxy2.example.com")) == ["proxy2.example.com"]
    # A broken file on reload: the error names the key, the current certificate stays.
    cert_file.write_text("garbage")
    with pytest.raises(ConfigError) as err:
        tls.reload()
    assert err.value.key == "listen_tls_cert_file"
    assert _san(_handshake(tls.context, trust, "proxy2.example.com")) == ["proxy2.example.com"]


def test_settings_that_cannot_work_stop_start_up(tmp_path: Path) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"listen_tls_cert_file": "/x.pem"}, "listen_tls_cert_file"),
        ({"listen_tls_key_file": "/x.key"}, "listen_tls_cert_file"),
        (
            {"listen_tls_cert_file": "/x", "listen_tls_key_file": "/y", "listen_tls_hostnames": "a"},
            "listen_tls_hostnames",
        ),
    ]
    for overrides, key in cases:
        with pytest.raises(ConfigError) as err:
            _settings(tmp_path, **overrides)
        assert err.value.key == key, overrides
    missing = _settings(
        tmp_path, listen_tls_cert_file=str(tmp_path / "no.pem"), listen_tls_key_file="/no.key"
    )
    with pytest.raises(ConfigError, match="no such file") as err:
        ListenerTLS(missing, None)
    assert err.value.key == "listen_tls_cert_file"
    # Minting needs the CA: with dev mode off and no CA files there is none.
    prod = load_settings(
        env={},
        overrides={
            "data_dir": str(tmp_path),
            "dev_mode": False,
            "master_key": "A" * 43 + "=",
            "admin_token": "x" * 32,
            "listen_tls_hostnames": "proxy.example.com",
        },
    )
    with pytest.raises(ConfigError) as err:
        listener_tls(prod, ca_mod.load_ca(prod))
    assert err.value.key == "listen_tls_hostnames" and "ca_cert_file" in err.value.message
