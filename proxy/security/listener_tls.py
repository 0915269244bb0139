"""The listening socket over TLS, so ``https://`` proxy URLs work (``HTTPS_PROXY=https://...``).

Why: with a plain-HTTP listener every client sends its ``Proxy-Authorization`` (the caller's key)
in clear to the proxy. Clients that speak TLS to their proxy (curl ``--proxy https://``, urllib3
2 / requests, httpx, aiohttp, Node's undici) keep it encrypted; a ``CONNECT`` through such a
listener is TLS inside TLS: the tunnel's TLS runs on top of the listener's (``loop.start_tls`` on
an SSL transport, supported since Python 3.11).

Two ways to get the listener's certificate, chosen by settings:

- ``listen_tls_cert_file`` + ``listen_tls_key_file``: a chain and key you provide (a public CA,
  cert-manager, your internal PKI). Clients trust it through their usual roots or a CA file.
- ``listen_tls_hostnames``: certificates minted from the deployment's own CA
  (``proxy.security.ca``) for those names or IPs, one per name chosen by SNI, the first when the
  client sends none (a client connecting to an IP literal sends no SNI). Clients already trust
  that CA for the intercepted tunnels, so one bundle (``/ca.pem``, ``connection-proxy run``)
  covers both, and the certificates are short-lived and renewed like every leaf.

The context handed to the event loop never changes; its ``sni_callback`` switches every
handshake to the *current* context, which ``reload`` replaces (SIGHUP) without a restart:
re-read files, or (minted) the CA's own reload, which drops its leaf cache.

Loading the files never prompts: a password-protected key is refused (a service has no one at
its TTY, and OpenSSL's default is to ask there and wait), and every way the files can fail
(missing, unreadable, a directory, not PEM, a key of another certificate) is a ``ConfigError``
naming the setting of the file at fault. Each load reads the files once; only a failed one looks
at them again, to say which is wrong.

Pure module: no aiohttp, no redis.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

from cryptography import x509

from proxy.errors import ConfigError
from proxy.security.ca import ALPN, CertificateAuthority
from proxy.settings import Settings

log = logging.getLogger("proxy.listener_tls")

__all__ = ["ListenerTLS", "listener_tls"]


def _base_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(list(ALPN))
    return ctx


CERT_SETTING = "listen_tls_cert_file"
KEY_SETTING = "listen_tls_key_file"


class _EncryptedKey(Exception):
    """Raised from the password callback: OpenSSL asks for one only for an encrypted key."""


def _no_password() -> str:
    raise _EncryptedKey


def _file_context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = _base_context()
    try:
        ctx.load_cert_chain(str(cert), str(key), password=_no_password)
    except _EncryptedKey:
        raise ConfigError(
            KEY_SETTING,
            f"{key} is encrypted (password-protected) and the service cannot ask for a password: "
            "give it the key unencrypted (openssl pkey -in ENCRYPTED -out KEY), readable by the "
            "service's user only",
        ) from None
    except ssl.SSLError as exc:  # before OSError, which it is a subclass of
        raise _unusable(cert, key, exc) from None
    except OSError as exc:  # missing, unreadable, a directory: OpenSSL does not say which file
        setting, path = _unopenable(cert, key)
        reason = (exc.strerror or type(exc).__name__).lower()
        raise ConfigError(setting, f"cannot read {path}: {reason}") from None
    except ValueError:  # e.g. a NUL character in the path
        raise ConfigError(CERT_SETTING, f"{str(cert)!r} or {str(key)!r} is not a usable file path") from None
    return ctx


def _unopenable(cert: Path, key: Path) -> tuple[str, Path]:
    """Which file could not be opened (after a failed load; opening reads nothing)."""
    for setting, path in ((CERT_SETTING, cert), (KEY_SETTING, key)):
        try:
            with path.open("rb"):
                pass
        except OSError:
            return setting, path
    return CERT_SETTING, cert


def _unusable(cert: Path, key: Path, exc: ssl.SSLError) -> ConfigError:
    """The error for files that open but do not load, naming the file at fault."""
    if exc.reason == "KEY_VALUES_MISMATCH":
        return ConfigError(KEY_SETTING, f"{key} is not the private key of the certificate in {cert}")
    # OpenSSL says "PEM lib" for either file: look at the chain (only now that loading failed).
    try:
        x509.load_pem_x509_certificates(cert.read_bytes())
    except (OSError, ValueError):
        return ConfigError(
            CERT_SETTING, f"{cert} holds no PEM certificate chain (-----BEGIN CERTIFICATE-----)"
        )
    return ConfigError(
        KEY_SETTING, f"{key} holds no PEM private key (-----BEGIN PRIVATE KEY----- or an RSA/EC key)"
    )


class ListenerTLS:
    """The listener's TLS context (fixed) and the certificate it presents (replaceable)."""

    def __init__(self, settings: Settings, ca: CertificateAuthority | None) -> None:
        self.settings = settings
        self.hostnames = settings.listen_tls_hostnames
        self._ca = ca
        if self.hostnames and ca is None:
            raise ConfigError(
                "listen_tls_hostnames",
                "minting the listener's certificate needs the CA: set ca_cert_file/ca_key_file "
                "(or dev_mode), or give listen_tls_cert_file/listen_tls_key_file instead",
            )
        self._current = self._load()
        # The fixed context needs a certificate of its own for OpenSSL to start a handshake;
        # ``_pick`` switches every handshake to the current one before it is used. From files,
        # the first load is that context (the files are read once, with its checks).
        if self.hostnames:
            assert ca is not None
            self.context = _base_context()
            ca.load_leaf_into(self.context, self.hostnames[0])
        else:
            self.context = self._current
        self.context.sni_callback = self._pick

    @property
    def mode(self) -> str:
        return "minted" if self.hostnames else "files"

    def _load(self) -> ssl.SSLContext:
        if self.hostnames:
            assert self._ca is not None
            return self._ca.server_context(self.hostnames[0])
        cert, key = self.settings.listen_tls_cert_file, self.settings.listen_tls_key_file
        assert cert is not None and key is not None
        return _file_context(cert, key)

    def _pick(
        self, sslobj: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: ssl.SSLContext
    ) -> None:
        """Every handshake: the current certificate; minted mode: the one for the SNI name."""
        if self.hostnames:
            assert self._ca is not None
            name = (server_name or "").lower().rstrip(".")
            sslobj.context = self._ca.server_context(name if name in self.hostnames else self.hostnames[0])
        else:
            sslobj.context = self._current

    def reload(self) -> bool:
        """Re-read the certificate files (minted mode follows the CA by itself). On an error the
        current certificate stays and ``ConfigError`` is raised."""
        if self.hostnames:
            return False
        self._current = self._load()
        return True


def listener_tls(settings: Settings, ca: CertificateAuthority | None) -> ListenerTLS | None:
    """The listener's TLS, or None for a plain-HTTP listener."""
    return ListenerTLS(settings, ca) if settings.listen_tls else None
