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

Pure module: no aiohttp, no redis.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

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


def _file_context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = _base_context()
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except FileNotFoundError as exc:
        raise ConfigError("listen_tls_cert_file", f"cannot read {exc.filename}: no such file") from None
    except PermissionError as exc:
        raise ConfigError("listen_tls_key_file", f"cannot read {exc.filename}: permission denied") from None
    except ssl.SSLError:
        raise ConfigError(
            "listen_tls_cert_file",
            f"{cert} and {key} are not a matching PEM certificate chain and unencrypted private key",
        ) from None
    return ctx


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
        self.context = _base_context()
        # The fixed context needs a certificate of its own for OpenSSL to start a handshake;
        # ``_pick`` switches every handshake to the current one before it is used.
        if self.hostnames:
            assert ca is not None
            ca.load_leaf_into(self.context, self.hostnames[0])
        else:
            assert settings.listen_tls_cert_file is not None and settings.listen_tls_key_file is not None
            self.context.load_cert_chain(
                str(settings.listen_tls_cert_file), str(settings.listen_tls_key_file)
            )
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
