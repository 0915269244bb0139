"""The listener's own TLS (proxy.security.listener_tls): which certificate a handshake gets (SNI
in minted mode, files otherwise), reload without a restart, and settings that cannot work
stopping start-up with the key named. Real handshakes over loopback sockets.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
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


def _leaf_files(tmp_path: Path) -> tuple[trustme.CA, Path, Path]:
    test_ca = trustme.CA()
    leaf = test_ca.issue_cert("proxy.example.com")
    cert_file, key_file = tmp_path / "l.pem", tmp_path / "l.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert_file))
    leaf.private_key_pem.write_to_path(str(key_file))
    return test_ca, cert_file, key_file


def _encrypted_key(key_file: Path, out: Path) -> Path:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(key_file.read_bytes(), None)
    out.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret-pass-phrase"),
        )
    )
    return out


def _bad_pairs(tmp_path: Path) -> dict[str, tuple[Path, Path, str, str]]:
    """case -> (cert file, key file, setting named, words in the message)."""
    _, cert, key = _leaf_files(tmp_path)
    (tmp_path / "other").mkdir()
    _, _, other_key = _leaf_files(tmp_path / "other")
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"\x00\xff not pem at all")
    missing = tmp_path / "missing.pem"
    return {
        "cert missing": (missing, key, "listen_tls_cert_file", "no such file"),
        "key missing": (cert, missing, "listen_tls_key_file", "no such file"),
        "cert is a directory": (tmp_path, key, "listen_tls_cert_file", "is a directory"),
        "key is a directory": (cert, tmp_path, "listen_tls_key_file", "is a directory"),
        "cert not pem": (garbage, key, "listen_tls_cert_file", "no PEM certificate"),
        "key not pem": (cert, garbage, "listen_tls_key_file", "no PEM private key"),
        "key is the certificate": (cert, cert, "listen_tls_key_file", "no PEM private key"),
        "another certificate's key": (cert, other_key, "listen_tls_key_file", "not the private key of"),
        "encrypted key": (
            cert,
            _encrypted_key(key, tmp_path / "enc.key"),
            "listen_tls_key_file",
            "encrypted (password-protected)",
        ),
    }


def test_certificate_files_that_cannot_load_name_their_setting(tmp_path: Path) -> None:
    for case, (cert, key, setting, words) in _bad_pairs(tmp_path).items():
        s = _settings(tmp_path, listen_tls_cert_file=str(cert), listen_tls_key_file=str(key))
        with pytest.raises(ConfigError) as err:
            ListenerTLS(s, None)
        assert err.value.key == setting, (case, err.value.message)
        assert words in err.value.message, (case, err.value.message)
        assert "secret-pass-phrase" not in err.value.message


def test_an_encrypted_key_never_prompts_on_the_terminal(tmp_path: Path) -> None:
    """``serve`` with a password-protected listener key, on a real terminal (a pty): it stops
    with the error naming the setting and status 2; OpenSSL's default would ask
    'Enter PEM pass phrase:' there and wait for someone to type it."""
    import os
    import pty
    import select
    import subprocess
    import sys

    from tests.support.app import REPO_ROOT, free_port

    _, cert, key = _leaf_files(tmp_path)
    encrypted = _encrypted_key(key, tmp_path / "enc.key")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROXY_")}
    env.update(
        PROXY_DATA_DIR=str(tmp_path / "data"),
        PROXY_LISTEN=f"127.0.0.1:{free_port()}",
        PROXY_LISTEN_TLS_CERT_FILE=str(cert),
        PROXY_LISTEN_TLS_KEY_FILE=str(encrypted),
    )
    # The child makes the pty its controlling terminal (what OpenSSL's prompt opens), then serves.
    child = (
        "import fcntl, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
        "from proxy.cli import main; sys.exit(main(['serve']))"
    )
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-c", child],
        stdin=secondary,
        stdout=secondary,
        stderr=secondary,
        cwd=REPO_ROOT,
        env=env,
        start_new_session=True,
    )
    os.close(secondary)
    out = b""
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and b"pass phrase" not in out.lower():
            ready, _, _ = select.select([primary], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(primary, 4096)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
        assert b"pass phrase" not in out.lower(), f"it prompted on the terminal: {out!r}"
        assert proc.wait(timeout=30) == 2, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(primary)
    text = out.decode(errors="replace")
    assert "listen_tls_key_file" in text and "encrypted (password-protected)" in text, text
    assert "Traceback" not in text, text


def test_certificate_files_are_read_once_per_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Building the listener loads the files once (it used to load them a second time for the
    fixed context, unchecked), and so does each reload. A spy around the real loader."""
    test_ca, cert, key = _leaf_files(tmp_path)
    loads: list[tuple[str, str]] = []
    real = ssl.SSLContext.load_cert_chain

    def counting(ctx: ssl.SSLContext, certfile: Any, keyfile: Any = None, password: Any = None) -> None:
        loads.append((str(certfile), str(keyfile)))
        real(ctx, certfile, keyfile, password)

    monkeypatch.setattr(ssl.SSLContext, "load_cert_chain", counting)
    s = _settings(tmp_path, listen_tls_cert_file=str(cert), listen_tls_key_file=str(key))
    tls = ListenerTLS(s, None)
    assert loads == [(str(cert), str(key))]
    assert tls.reload() is True
    assert len(loads) == 2
    trust = test_ca.cert_pem.bytes().decode()
    assert _san(_handshake(tls.context, trust, "proxy.example.com")) == ["proxy.example.com"]
