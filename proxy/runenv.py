"""What ``connection-proxy run`` sets for the command it starts, so unmodified code uses the proxy.

Why a module of its own: the variables are the interface between the proxy and every runtime
(Python requests/httpx/urllib/aiohttp, curl, git, Node), and which runtime reads which one is the
knowledge worth keeping in one place:

- ``HTTPS_PROXY``/``HTTP_PROXY`` in both cases (curl reads only lowercase ``http_proxy``), with
  the caller credential as the URL's password and the connection as its user
  (``TENANT%2FCONNECTION`` when a tenant is named);
- ``NO_PROXY`` for loopback, so local services are called directly;
- one CA bundle file, the system roots plus the proxy's CA (fetched from its public
  ``/ca.pem``), so intercepted and all other TLS both verify: ``SSL_CERT_FILE`` (OpenSSL,
  Python's ssl, httpx, aiohttp), ``REQUESTS_CA_BUNDLE``, ``CURL_CA_BUNDLE``, ``GIT_SSL_CAINFO``,
  and ``NODE_EXTRA_CA_CERTS`` (added to Node's own roots);
- ``NODE_USE_ENV_PROXY=1`` (Node 22.21+/24.5+ honour the proxy variables in ``fetch`` with it).

An ``https://`` proxy URL (the listener over TLS) works the same way: the CA that verifies the
listener (``--proxy-cacert FILE``; not needed when the listener's certificate chains to the
system roots) verifies the ``/ca.pem`` fetch and goes into the bundle too, so clients that read
the bundle for their proxy connection (requests/urllib3, httpx, Node) trust both. curl reads no
variable for its proxy's CA: call it with ``--proxy-cacert "$CURL_CA_BUNDLE"``; git has one of
its own, ``GIT_PROXY_SSL_CAINFO``, set to the same bundle.

The bundle lives in a private temporary directory removed when the command ends. The credential
is read from ``PROXY_CALLER_KEY`` or a file; it is never an argument. Pure module: no aiohttp.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import ssl
import tempfile
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from urllib.parse import quote, urlsplit

from proxy.errors import ConfigError

KEY_ENV = "PROXY_CALLER_KEY"
NO_PROXY = "localhost,127.0.0.1,::1"
CA_VARS = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS", "GIT_SSL_CAINFO")
CACERT_MAX_BYTES = 4 << 20  # a CA bundle is a few hundred KiB; more is no CA file (/dev/zero)
_PEM_CERT = re.compile(r"-----BEGIN CERTIFICATE-----[A-Za-z0-9+/=\s]*-----END CERTIFICATE-----")


def caller_key(env: Mapping[str, str], key_file: str | None) -> str:
    if key_file:
        try:
            key = Path(key_file).read_text().strip()
        except OSError as exc:
            raise ConfigError("key_file", f"cannot read {key_file}: {exc.strerror}") from None
    else:
        key = env.get(KEY_ENV, "").strip()
    if not key:
        raise ConfigError(
            "caller_key",
            f"no caller credential: set {KEY_ENV} (a tenant API key or JWT) or pass --key-file FILE",
        )
    return key


def proxy_url_with_credentials(
    proxy_url: str, key: str, connection: str, tenant: str | None, runtime_user: str | None
) -> str:
    parts = urlsplit(proxy_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError("proxy", f"{proxy_url!r} is not an http(s) URL")
    user = "/".join(p for p in (tenant, connection, runtime_user) if p)
    if runtime_user and not tenant:
        raise ConfigError(
            "tenant", "--runtime-user needs --tenant (the proxy user is TENANT/CONNECTION/USER)"
        )
    netloc = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{quote(user, safe='')}:{quote(key, safe='')}@{netloc}"


def listener_ca(path: str) -> str:
    """The PEM certificates of ``--proxy-cacert FILE``, read once and checked: a file that is
    not PEM (binary, DER, a key, text) is refused naming the flag, not met later as a traceback
    from the TLS library or as garbage in the bundle every client reads."""

    def refused(why: str) -> ConfigError:
        return ConfigError("proxy_cacert", f"--proxy-cacert {path}: {why}")

    try:
        with Path(path).open("rb") as f:
            raw = f.read(CACERT_MAX_BYTES + 1)
    except OSError as exc:
        raise refused(f"cannot read it ({exc.strerror or type(exc).__name__})") from None
    if len(raw) > CACERT_MAX_BYTES:
        raise refused(f"larger than {CACERT_MAX_BYTES >> 20} MiB: not a CA certificate file")
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise refused(
            "not a PEM file (it holds binary data; a DER certificate converts with "
            "`openssl x509 -inform der -in FILE -out FILE.pem`)"
        ) from None
    blocks = _PEM_CERT.findall(text)
    if not blocks:
        raise refused(
            "holds no PEM certificate (-----BEGIN CERTIFICATE-----); give the CA that signed the listener's certificate"
        )
    pem = "\n".join(blocks) + "\n"
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=pem)
    except (ssl.SSLError, ValueError):
        raise refused(
            "its PEM certificates do not parse; export the CA again (connection-proxy ca export)"
        ) from None
    return pem


def fetch_ca(proxy_url: str, timeout: float = 10.0, listener_pem: str | None = None) -> str:
    """The proxy's CA bundle from its public ``/ca.pem`` (never through another proxy); over
    https verified with the system roots plus ``listener_pem`` (from ``listener_ca``)."""
    parts = urlsplit(proxy_url)
    url = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}/ca.pem"
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
    if parts.scheme == "https":
        ctx = ssl.create_default_context()
        if listener_pem:
            ctx.load_verify_locations(cadata=listener_pem)
        handlers.append(urllib.request.HTTPSHandler(context=ctx))
    opener = urllib.request.build_opener(*handlers)
    try:
        with opener.open(url, timeout=timeout) as resp:
            pem = str(resp.read().decode())
    except OSError as exc:
        raise ConfigError("proxy", f"cannot fetch {url}: {exc}") from None
    if "BEGIN CERTIFICATE" not in pem:
        raise ConfigError("proxy", f"{url} did not answer with a PEM certificate")
    return pem


def system_roots() -> str:
    paths = ssl.get_default_verify_paths()
    for candidate in (os.environ.get("SSL_CERT_FILE"), paths.cafile, paths.openssl_cafile):
        if candidate and os.path.isfile(candidate):
            with contextlib.suppress(OSError):
                return Path(candidate).read_text()
    return ""


@contextlib.contextmanager
def prepared(
    proxy_url: str,
    key: str,
    connection: str | None,
    tenant: str | None,
    runtime_user: str | None = None,
    proxy_cacert: str | None = None,
) -> Iterator[dict[str, str]]:
    """The variables to set (the CA bundle file exists while the context is open)."""
    if not connection:
        raise ConfigError("connection", "name the connection whose credentials calls use: --connection C")
    url = proxy_url_with_credentials(proxy_url, key, connection, tenant, runtime_user)
    listener_pem = listener_ca(proxy_cacert) if proxy_cacert else ""
    pem = fetch_ca(proxy_url, listener_pem=listener_pem or None)
    if listener_pem.strip() and listener_pem.strip() not in pem:
        pem = pem.rstrip("\n") + "\n" + listener_pem
    tmp = tempfile.mkdtemp(prefix="connection-proxy-run-")
    try:
        bundle = Path(tmp) / "ca-bundle.pem"
        roots = system_roots()
        bundle.write_text(roots + ("\n" if roots and not roots.endswith("\n") else "") + pem)
        env = {name: url for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")}
        env.update(NO_PROXY=NO_PROXY, no_proxy=NO_PROXY, NODE_USE_ENV_PROXY="1")
        env.update({name: str(bundle) for name in CA_VARS})
        if proxy_url.lower().startswith("https://"):
            # git reads the proxy's own CA from a variable of its own (curl has none at all).
            env["GIT_PROXY_SSL_CAINFO"] = str(bundle)
        yield env
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
