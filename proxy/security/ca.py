"""The deployment's own certificate authority, for intercepting ``CONNECT`` tunnels.

Why: an unmodified HTTPS client (anything honouring ``HTTPS_PROXY``) opens a TLS tunnel through
the proxy; the only way to inject the credential into requests inside it is to terminate that
TLS here, with a certificate for the upstream host that the client trusts. The client trusts this
CA (``connection-proxy ca export``, ``GET /ca.pem``, ``connection-proxy run``); the proxy mints a
leaf per host from it.

- **Dev mode** generates a CA into the data dir (``ca.pem``, key ``ca.key`` mode 0600, published
  atomically the way the dev master key is, so concurrent workers end up with the same CA).
- **Production** reads ``ca_cert_file`` + ``ca_key_file``. Rotation with overlap
  (``proxy.security.ca_rotation``, ``connection-proxy ca rotate``): the certificate file may hold
  several certificates. The self-signed one matching the key signs; every other unexpired
  self-signed one is still exported (``bundle_pem``), so clients trusting the bundle accept both.
  A certificate for the signing key issued by an *older* CA (a cross certificate) is sent after
  each leaf, so a client that still trusts only the old CA verifies leaf -> cross -> old root
  while one that trusts the new CA stops at the new root. ``adopt`` swaps in a re-read CA while
  serving (SIGHUP) and drops the leaf cache.
- **Leaves** carry what strict verifiers (Python 3.13's ``VERIFY_X509_STRICT``, Go, browsers)
  require: SAN (DNS or IP), SKI and AKI, critical key usage (digitalSignature), EKU serverAuth,
  critical ``basicConstraints CA:false``. They live ``LEAF_LIFETIME`` (clamped to the CA's own
  expiry) and are cached in memory per host as ready ``ssl.SSLContext`` objects. Their keys are
  generated in memory and handed to OpenSSL through an anonymous memory file (``memfd``): they
  never touch a disk.
- The CA private key is never part of anything this module returns except ``_signing_key``
  (private); ``bundle_pem`` holds certificates only.

Pure module: no aiohttp, no redis.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import ssl
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proxy.errors import ConfigError
from proxy.settings import Settings

log = logging.getLogger("proxy.ca")

__all__ = [
    "CA_CERT_NAME",
    "CA_KEY_NAME",
    "LEAF_LIFETIME",
    "CertificateAuthority",
    "ca_files",
    "from_parts",
    "generate_ca",
    "load_ca",
    "self_signed",
]

CA_CERT_NAME: Final = "ca.pem"
CA_KEY_NAME: Final = "ca.key"
CA_LIFETIME: Final = dt.timedelta(days=825)
LEAF_LIFETIME: Final = dt.timedelta(hours=24)
# A cached leaf is replaced this long before it expires, so no handshake gets one about to lapse.
LEAF_RENEW_BEFORE: Final = dt.timedelta(hours=1)
# Clocks of clients may run a little behind ours.
BACKDATE: Final = dt.timedelta(minutes=5)
LEAF_CACHE_MAX: Final = 4096
ALPN: Final = ("http/1.1",)

_PrivateKey = ec.EllipticCurvePrivateKey


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _ski(key: _PrivateKey) -> x509.SubjectKeyIdentifier:
    return x509.SubjectKeyIdentifier.from_public_key(key.public_key())


def generate_ca(common_name: str = "connection-proxy local CA") -> tuple[bytes, bytes]:
    """A new CA: (certificate PEM, private key PEM, unencrypted PKCS#8)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "connection-proxy"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{common_name} {int(time.time())}"),
        ]
    )
    cert = ca_certificate(name, key.public_key(), name, key, _now() + CA_LIFETIME)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def ca_certificate(
    subject: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    issuer: x509.Name,
    issuer_key: _PrivateKey,
    not_after: dt.datetime,
) -> x509.Certificate:
    """A CA certificate (self-signed when ``issuer_key`` is the subject's own key, else a cross
    certificate): basicConstraints CA pathlen 0, keyCertSign, SKI, and AKI when cross-signed."""
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    if _spki(issuer_key) != _spki_of_public(public_key):
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


@dataclass(frozen=True, slots=True)
class _Leaf:
    context: ssl.SSLContext
    renew_at: float  # time.time() after which a new leaf is minted


@dataclass
class CertificateAuthority:
    """The signing CA plus every CA certificate clients should trust; mints cached leaves.

    Mutable on purpose: ``adopt`` replaces the signer in place (SIGHUP reload), so every holder
    of this object (the tunnel handler, the listener's TLS) uses the new CA at once."""

    signing_cert: x509.Certificate
    _signing_key: _PrivateKey = field(repr=False)
    trusted: tuple[x509.Certificate, ...]  # signing first, then older ones still in their window
    source: str  # for logs: a path, never key material
    # Certificates for the signing key issued by older CAs, sent after each leaf (rotation).
    cross: tuple[x509.Certificate, ...] = ()
    minted: int = 0  # leaves minted (not served from the cache)
    _leaves: OrderedDict[str, _Leaf] = field(default_factory=OrderedDict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _generation: int = 0  # bumped by adopt: a leaf minted from the previous signer is not cached

    @property
    def bundle_pem(self) -> str:
        """The PEM bundle clients must trust: certificates only, never the key."""
        return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in self.trusted)

    @property
    def fingerprint(self) -> str:
        return self.signing_cert.fingerprint(hashes.SHA256()).hex(":")

    # --- leaves --------------------------------------------------------------------------------

    def server_context(self, host: str) -> ssl.SSLContext:
        """A TLS server context presenting a leaf for ``host`` (cached until near expiry)."""
        host = host.lower().rstrip(".")
        now = time.time()
        with self._lock:
            leaf = self._leaves.get(host)
            if leaf is not None and leaf.renew_at > now:
                self._leaves.move_to_end(host)
                return leaf.context
        with self._lock:
            generation = self._generation
        leaf = self._mint(host)
        with self._lock:
            if generation != self._generation:  # adopt() ran meanwhile: use, do not keep
                return leaf.context
            self._leaves[host] = leaf
            self._leaves.move_to_end(host)
            while len(self._leaves) > LEAF_CACHE_MAX:
                self._leaves.popitem(last=False)
        return leaf.context

    def forget_leaves(self) -> None:
        with self._lock:
            self._leaves.clear()

    def adopt(self, other: CertificateAuthority) -> bool:
        """Take ``other``'s signer, trust list and chain; drop every cached leaf. False (and
        nothing dropped) when ``other`` is the same CA as this one."""
        with self._lock:
            same = (
                other.signing_cert == self.signing_cert
                and other.trusted == self.trusted
                and other.cross == self.cross
            )
            if same:
                return False
            self.signing_cert, self._signing_key = other.signing_cert, other._signing_key
            self.trusted, self.cross, self.source = other.trusted, other.cross, other.source
            self._generation += 1
            self._leaves.clear()
            return True

    def leaf_pem(self, host: str) -> bytes:
        """A freshly minted leaf certificate (PEM) for ``host``; for tests and inspection."""
        cert, _ = self._leaf_cert(host)
        return cert.public_bytes(serialization.Encoding.PEM)

    def _leaf_cert(self, host: str) -> tuple[x509.Certificate, _PrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        with self._lock:  # one consistent signer, even while adopt() swaps it
            ca, ca_key = self.signing_cert, self._signing_key
        now = _now()
        not_after = min(now + LEAF_LIFETIME, ca.not_valid_after_utc)
        san: x509.GeneralName
        try:
            san = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            san = x509.DNSName(host)
        cn = host if len(host) <= 64 else host[:64]
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName([san]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(_ski(key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        return cert, key

    def chain_after_leaf(self) -> list[x509.Certificate]:
        """What a server sends after a leaf of this CA: the cross certificates during a rotation
        (old-CA clients build leaf -> cross -> old root; new-CA clients stop at the new root),
        else the signing certificate."""
        with self._lock:
            return list(self.cross) if self.cross else [self.signing_cert]

    def _mint(self, host: str) -> _Leaf:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols(list(ALPN))
        cert = self.load_leaf_into(ctx, host)
        self.minted += 1
        renew = min(cert.not_valid_after_utc - LEAF_RENEW_BEFORE, _now() + LEAF_LIFETIME - LEAF_RENEW_BEFORE)
        return _Leaf(ctx, renew.timestamp())

    def load_leaf_into(self, ctx: ssl.SSLContext, host: str) -> x509.Certificate:
        """Mint a leaf for ``host`` and load it, with its chain, into ``ctx`` (key in memory only)."""
        cert, key = self._leaf_cert(host)
        chain = cert.public_bytes(serialization.Encoding.PEM) + b"".join(
            c.public_bytes(serialization.Encoding.PEM) for c in self.chain_after_leaf()
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        _load_chain_in_memory(ctx, chain, key_pem)
        return cert


def _load_chain_in_memory(ctx: ssl.SSLContext, chain: bytes, key_pem: bytes) -> None:
    """``load_cert_chain`` reads only files: hand it anonymous memory files, never the disk."""
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is None:
        raise ConfigError(
            "ca_cert_file", "intercepting CONNECT needs os.memfd_create (Linux) to keep leaf keys off disk"
        )
    fds = [memfd_create("leaf-chain", os.MFD_CLOEXEC), memfd_create("leaf-key", os.MFD_CLOEXEC)]
    try:
        for fd, data in zip(fds, (chain, key_pem), strict=True):
            os.write(fd, data)
        ctx.load_cert_chain(f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}")
    finally:
        for fd in fds:
            os.close(fd)


# --- loading -----------------------------------------------------------------------------------


def _read_certs(path: Path, key: str) -> list[x509.Certificate]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror}") from None
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ConfigError(key, f"{path} holds no PEM certificates") from None
    return certs


def _read_key(path: Path, key: str, group_readable: bool) -> _PrivateKey:
    try:
        with open(path, "rb") as fh:
            mode = os.fstat(fh.fileno()).st_mode & 0o077
            if mode & ~(0o040 if group_readable else 0):
                raise ConfigError(
                    key, f"{path} is readable by group or others: the CA key must be private (chmod 600)"
                )
            data = fh.read()
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror}") from None
    try:
        loaded = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise ConfigError(key, f"{path} is not an unencrypted PEM private key") from None
    if not isinstance(loaded, ec.EllipticCurvePrivateKey):
        raise ConfigError(key, f"{path}: the CA key must be an EC key (P-256 or P-384)")
    return loaded


def _publish(path: Path, data: bytes, mode: int) -> bool:
    """Create ``path`` complete or not at all (hard link of a private temp file); False if it exists."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def _dev_files(settings: Settings) -> tuple[Path, Path]:
    """The dev-mode CA in the data dir, generated on first use (key first: the pair is only
    complete once the certificate exists, and a reader waits for it)."""
    cert_path, key_path = settings.data_dir / CA_CERT_NAME, settings.data_dir / CA_KEY_NAME
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    cert_pem, key_pem = generate_ca()
    if _publish(key_path, key_pem, 0o600):
        if not _publish(cert_path, cert_pem, 0o644):
            raise ConfigError("ca_cert_file", f"{cert_path} exists without its key; remove both files")
        log.warning(
            "DEV MODE: generated a CA for intercepting HTTPS_PROXY tunnels at %s (key %s). Clients "
            "that trust it accept any certificate this service mints; set ca_cert_file/ca_key_file "
            "in production.",
            cert_path,
            key_path,
        )
        return cert_path, key_path
    for _ in range(100):  # another process published the key: wait for its certificate
        if cert_path.exists():
            break
        time.sleep(0.02)
    return cert_path, key_path


def ca_files(settings: Settings) -> tuple[Path, Path] | None:
    """(certificate file, key file) of the CA: configured, or dev mode's (generated on first
    use); None when neither."""
    if settings.ca_cert_file is not None or settings.ca_key_file is not None:
        if settings.ca_cert_file is None or settings.ca_key_file is None:
            raise ConfigError("ca_cert_file", "set both ca_cert_file and ca_key_file, or neither")
        return settings.ca_cert_file, settings.ca_key_file
    if settings.dev_mode:
        return _dev_files(settings)
    return None


def load_ca(settings: Settings) -> CertificateAuthority | None:
    """The CA from settings (production) or the data dir (dev mode); None when neither (CONNECT
    is then refused); ``ConfigError`` for a CA that is configured but unusable."""
    files = ca_files(settings)
    if files is None:
        return None
    cert_path, key_path = files
    key = _read_key(key_path, "ca_key_file", settings.master_key_file_group_readable)
    return from_parts(_read_certs(cert_path, "ca_cert_file"), key, str(cert_path))


def _spki(c: x509.Certificate | _PrivateKey) -> bytes:
    return _spki_of_public(c.public_key())


def _spki_of_public(public: object) -> bytes:
    # Any key type: a CA bundle may also hold an RSA root (only the signing CA must be EC).
    if not hasattr(public, "public_bytes"):
        raise ConfigError("ca_cert_file", "holds a certificate whose public key cannot be read")
    der: bytes = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


def self_signed(c: x509.Certificate) -> bool:
    return c.issuer == c.subject and _aki(c) in (None, _ski_of(c))


def _ski_of(c: x509.Certificate) -> bytes | None:
    try:
        return c.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        return None


def _aki(c: x509.Certificate) -> bytes | None:
    try:
        return c.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    except x509.ExtensionNotFound:
        return None


def from_parts(certs: list[x509.Certificate], key: _PrivateKey, source: str) -> CertificateAuthority:
    """The CA whose self-signed certificate matches ``key``, trusting every other unexpired
    self-signed one of ``certs``; certificates for ``key`` issued by another CA are its cross
    certificates (a rotation's overlap, see ``proxy.security.ca_rotation``)."""
    public = _spki(key)
    now = _now()
    mine = [c for c in certs if _spki(c) == public]
    signing = [c for c in mine if self_signed(c)]
    if not signing:
        raise ConfigError(
            "ca_key_file", f"the CA key matches no certificate in {source} (none self-signed for it)"
        )
    # The newest certificate of the key signs (a renewed CA certificate for the same key).
    signer = max(signing, key=lambda c: c.not_valid_after_utc)
    try:
        constraints = signer.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise ConfigError(
            "ca_cert_file", f"the certificate in {source} is not a CA (basicConstraints CA:true)"
        )
    if signer.not_valid_after_utc <= now:
        raise ConfigError("ca_cert_file", f"the CA certificate in {source} has expired; rotate it")
    live = [c for c in certs if c.not_valid_after_utc > now]
    others = tuple(c for c in live if c is not signer and self_signed(c) and _spki(c) != public)
    cross = tuple(c for c in live if _spki(c) == public and not self_signed(c))
    return CertificateAuthority(signer, key, (signer, *others), source, cross)
