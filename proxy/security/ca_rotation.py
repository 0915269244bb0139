"""Rotating the deployment's CA (``connection-proxy ca rotate`` and ``ca rotate --finish``).

Why a module of its own: a CA rotation must never leave a client that trusted the old CA
unable to connect mid-window, and the file edits must be safe against a service re-reading the
files (SIGHUP) at any moment.

- ``rotate`` generates a new key and a self-signed CA certificate **with the old CA's subject
  name**, plus a *cross certificate*: the new CA's name and key, signed by the old key. The
  certificate file then holds ``new root, cross, old root``; the key file only the new key.
  After a reload the service signs leaves with the new key and sends the cross certificate
  after each leaf: a client that trusts only the old root verifies leaf -> cross -> old root, a
  client that trusts only the new root stops at the new root (OpenSSL, Go and browsers look for
  a trusted issuer first). ``/ca.pem`` and ``ca export`` publish both roots. The old CA's
  ``pathLenConstraint`` of 0 still holds, since the cross certificate is self-issued (same
  subject and issuer name; RFC 5280 6.1.4 does not count it).
- ``finish`` drops every certificate but the signer's own root: clients that still trust only
  the old root fail from the next reload on.

Writes: the certificate file first, then the key file, each replaced atomically (private temp
file, ``rename``). Every intermediate state is a consistent CA: after the first write the old key
still matches the old root (the new root is exported, the cross certificate unused); after the
second the new key signs. The old key is not kept: once the cross certificate exists nothing
needs it. Pure module: no aiohttp, no redis.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from proxy.errors import ConfigError
from proxy.security import ca as ca_mod
from proxy.settings import Settings

__all__ = ["Rotation", "finish", "rotate"]


@dataclass(frozen=True, slots=True)
class Rotation:
    """What a rotation step did (fingerprints only: nothing here is secret)."""

    cert_file: Path
    signer: str  # sha256 fingerprint of the signing root after the step
    trusted: tuple[str, ...]  # fingerprints of every root exported after the step


def _fp(c: x509.Certificate) -> str:
    return c.fingerprint(hashes.SHA256()).hex(":")


def _pem(certs: list[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _replace(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` atomically with ``data`` (a private temp file in the same folder, renamed)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.rotate")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ConfigError("ca_cert_file", f"cannot write {path}: {exc.strerror}") from None


def _files(settings: Settings) -> tuple[Path, Path, ca_mod.CertificateAuthority]:
    files = ca_mod.ca_files(settings)
    ca = ca_mod.load_ca(settings)
    if files is None or ca is None:
        raise ConfigError(
            "ca_cert_file", "no CA to rotate: dev_mode is off and ca_cert_file/ca_key_file are not set"
        )
    return files[0], files[1], ca


def rotate(settings: Settings) -> Rotation:
    """A new signing CA, cross-signed by the current one; both roots exported (the overlap)."""
    cert_path, key_path, current = _files(settings)
    if current.cross or len(current.trusted) > 1:
        raise ConfigError(
            "ca_cert_file",
            f"{cert_path} still holds an earlier rotation's overlap; end it first with "
            "`connection-proxy ca rotate --finish` (clients trusting only the older CA then fail)",
        )
    old = current.signing_cert
    old_key = current._signing_key
    key = ec.generate_private_key(ec.SECP256R1())
    new_root = ca_mod.ca_certificate(
        old.subject, key.public_key(), old.subject, key, ca_mod._now() + ca_mod.CA_LIFETIME
    )
    # The cross certificate cannot outlive the old root it chains to.
    cross = ca_mod.ca_certificate(
        old.subject, key.public_key(), old.subject, old_key, old.not_valid_after_utc
    )
    _replace(cert_path, _pem([new_root, cross, old]), 0o644)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _replace(key_path, key_pem, 0o600)
    return Rotation(cert_path, _fp(new_root), (_fp(new_root), _fp(old)))


def finish(settings: Settings) -> Rotation:
    """End the overlap: only the signing root stays in the certificate file."""
    cert_path, _, current = _files(settings)
    signer = current.signing_cert
    _replace(cert_path, _pem([signer]), 0o644)
    return Rotation(cert_path, _fp(signer), (_fp(signer),))
