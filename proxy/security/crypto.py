"""Envelope encryption for stored credentials, plus the small secret helpers the service needs.

Why it exists: connection parameters are stored encrypted per tenant. Each tenant has data keys
(DEKs) that encrypt field values; DEKs are stored only wrapped by a master key (KEK) from a
versioned key ring, so rotating the master key means re-wrapping a few DEKs, not re-encrypting
every credential. Pure module: no I/O beyond the OS random source.

Security invariants:
- Every ciphertext is AES-256-GCM with associated data naming exactly where it belongs (tenant,
  connection, field, key versions), so a value copied to another row, field or tenant fails to
  open instead of silently decrypting into the wrong place.
- Associated data is a JSON array, never a joined string, so ("a|b", "c") and ("a", "b|c") differ.
- Error messages carry ids, field names and version numbers only: never keys, plaintext or the
  text of a key file.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import hmac
import json
import os
import re
import secrets
import string
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from proxy.errors import ConfigError, CryptoError, KeyVersionMissing, ValidationError

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
TOKEN_PREFIX = "cpv1"
_CONFIG_KEY = "master_key"
_FINGERPRINT_LABEL = b"connection-proxy kek fingerprint"
_VERSION_RE = re.compile(r"[1-9][0-9]{0,9}")  # canonical decimal: one text per version
_B64URL_RE = re.compile(r"[A-Za-z0-9_-]+")
_API_KEY_RE = re.compile(r"([A-Za-z0-9]+)_([A-Za-z0-9]{12})_([A-Za-z0-9_-]{43})")
_KEY_ID_ALPHABET = string.ascii_letters + string.digits  # no "_": it separates key parts


def _aad(*parts: str | int) -> bytes:
    return json.dumps(list(parts), ensure_ascii=False, separators=(",", ":")).encode()


def _b64decode_key(text: str) -> bytes:
    """Standard or url-safe base64, padding optional; raises ValueError on anything else."""
    std = text.replace("-", "+").replace("_", "/")
    return base64.b64decode(std + "=" * (-len(std) % 4), validate=True)


class KeyRing:
    """Immutable set of master keys by version; new wraps always use the newest version."""

    __slots__ = ("_keys",)

    def __init__(self, keys: Mapping[int, bytes]) -> None:
        if not keys:
            raise ConfigError(_CONFIG_KEY, "the key ring is empty; give at least one key")
        checked: dict[int, bytes] = {}
        for version, key in keys.items():
            if isinstance(version, bool) or not isinstance(version, int) or version < 1:
                raise ConfigError(_CONFIG_KEY, "key versions must be whole numbers >= 1")
            if not isinstance(key, bytes | bytearray) or len(key) != KEY_BYTES:
                raise ConfigError(_CONFIG_KEY, f"key version {version} must be exactly {KEY_BYTES} bytes")
            checked[version] = bytes(key)
        self._keys: Mapping[int, bytes] = MappingProxyType(dict(sorted(checked.items())))

    @classmethod
    def parse(cls, text: str) -> KeyRing:
        """Parse a bare base64 key (version 1) or "<version>:<base64>" entries.

        Entries are separated by commas and/or newlines; blank lines and ``#`` comments are
        ignored. Errors name the entry by position, never by its text.
        """
        entries = [
            entry.strip()
            for line in text.splitlines()
            for entry in line.split("#", 1)[0].split(",")
            if entry.strip()
        ]
        if not entries:
            raise ConfigError(_CONFIG_KEY, "no key given; generate one with 32 random bytes")
        if len(entries) == 1 and ":" not in entries[0]:
            entries = [f"1:{entries[0]}"]
        keys: dict[int, bytes] = {}
        for n, entry in enumerate(entries, start=1):
            version_text, sep, key_text = (part.strip() for part in entry.partition(":"))
            if not sep:
                raise ConfigError(_CONFIG_KEY, f"entry {n} is not in the form <version>:<base64>")
            if not _VERSION_RE.fullmatch(version_text):
                raise ConfigError(_CONFIG_KEY, f"entry {n}: version is not a whole number >= 1")
            version = int(version_text)
            if version in keys:
                raise ConfigError(_CONFIG_KEY, f"entry {n}: version {version} appears twice")
            try:
                key = _b64decode_key(key_text)
            except (binascii.Error, ValueError):
                raise ConfigError(
                    _CONFIG_KEY, f"entry {n} (version {version}): key is not valid base64"
                ) from None
            if len(key) != KEY_BYTES:
                raise ConfigError(
                    _CONFIG_KEY,
                    f"entry {n} (version {version}): key is {len(key)} bytes, need {KEY_BYTES} random bytes",
                )
            keys[version] = key
        return cls(keys)

    @property
    def newest_version(self) -> int:
        return max(self._keys)

    @property
    def versions(self) -> tuple[int, ...]:
        return tuple(self._keys)

    def get(self, version: int, what: str = "stored data") -> bytes:
        try:
            return self._keys[version]
        except KeyError:
            raise KeyVersionMissing(version, what) from None

    def dump(self) -> str:
        """Key-file text: one "version:base64" line per key, oldest first."""
        return "".join(f"{v}:{base64.b64encode(k).decode()}\n" for v, k in self._keys.items())

    def with_new_key(self) -> KeyRing:
        return KeyRing({**self._keys, self.newest_version + 1: os.urandom(KEY_BYTES)})

    def without(self, version: int) -> KeyRing:
        if version not in self._keys:
            raise ConfigError(_CONFIG_KEY, f"version {version} is not in the key ring")
        if len(self._keys) == 1:
            raise ConfigError(_CONFIG_KEY, f"cannot remove version {version}: it is the only key")
        return KeyRing({v: k for v, k in self._keys.items() if v != version})

    def fingerprint(self, version: int) -> str:
        """Short id that tells keys apart in logs without revealing them."""
        digest = hmac.new(self.get(version), _FINGERPRINT_LABEL, hashlib.sha256).hexdigest()
        return digest[:12]

    def __repr__(self) -> str:
        return f"KeyRing({', '.join(f'{v}:{self.fingerprint(v)}' for v in self._keys)})"


def generate_master_key_text() -> str:
    return KeyRing({1: os.urandom(KEY_BYTES)}).dump()


# --- tenant data keys --------------------------------------------------------------------------


def generate_dek() -> bytes:
    return os.urandom(KEY_BYTES)


@dataclasses.dataclass(frozen=True)
class WrappedKey:
    """A tenant data key encrypted under master key ``kek_version``; blob is nonce||ciphertext."""

    kek_version: int
    dek_version: int
    blob: bytes = dataclasses.field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kek_version": self.kek_version,
            "dek_version": self.dek_version,
            "blob": base64.b64encode(self.blob).decode(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WrappedKey:
        try:
            kek, dek, blob = data["kek_version"], data["dek_version"], data["blob"]
            if not all(type(v) is int and v >= 1 for v in (kek, dek)):
                raise ValueError
            return cls(kek, dek, base64.b64decode(blob, validate=True))
        except (KeyError, TypeError, ValueError, binascii.Error):
            raise CryptoError("wrapped data key record is malformed; restore it from a backup") from None


def _check_key(key: bytes, what: str) -> None:
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        raise CryptoError(f"{what} must be {KEY_BYTES} bytes")


def _check_version(version: int, what: str) -> None:
    if type(version) is not int or version < 1:
        raise CryptoError(f"{what} must be a whole number >= 1")


def wrap_dek(ring: KeyRing, tenant_id: str, dek_version: int, dek: bytes) -> WrappedKey:
    _check_key(dek, "a data key")
    _check_version(dek_version, "a data key version")
    kek_version = ring.newest_version
    nonce = os.urandom(NONCE_BYTES)
    aad = _aad("cp-dek", tenant_id, dek_version, kek_version)
    sealed = AESGCM(ring.get(kek_version)).encrypt(nonce, dek, aad)
    return WrappedKey(kek_version, dek_version, nonce + sealed)


def unwrap_dek(ring: KeyRing, tenant_id: str, wrapped: WrappedKey) -> bytes:
    v = wrapped.kek_version
    kek = ring.get(v, f"the data key of tenant {tenant_id!r}")
    aad = _aad("cp-dek", tenant_id, wrapped.dek_version, v)
    try:
        dek = AESGCM(kek).decrypt(wrapped.blob[:NONCE_BYTES], wrapped.blob[NONCE_BYTES:], aad)
    except (InvalidTag, ValueError):
        dek = b""
    if len(dek) != KEY_BYTES:
        raise CryptoError(
            f"master key version {v} cannot open the data key of tenant {tenant_id!r}: "
            "wrong master key or tampered record"
        )
    return dek


def rewrap_dek(ring: KeyRing, tenant_id: str, wrapped: WrappedKey) -> WrappedKey:
    """Re-wrap under the newest master key; a record already there is verified and returned."""
    dek = unwrap_dek(ring, tenant_id, wrapped)
    if wrapped.kek_version == ring.newest_version:
        return wrapped
    return wrap_dek(ring, tenant_id, wrapped.dek_version, dek)


# --- field values ------------------------------------------------------------------------------


def _field_aad(tenant_id: str, connection_id: str, field_name: str, dek_version: int) -> bytes:
    return _aad(TOKEN_PREFIX, tenant_id, connection_id, field_name, dek_version)


def encrypt_value(
    dek: bytes, dek_version: int, tenant_id: str, connection_id: str, field: str, value: Any
) -> str:
    """Encrypt the JSON encoding of ``value`` as "cpv1.<dek_version>.<base64url(nonce||ct)>"."""
    _check_key(dek, "a data key")
    _check_version(dek_version, "a data key version")
    try:
        plaintext = json.dumps(value, ensure_ascii=False, allow_nan=False).encode()
    except (TypeError, ValueError):
        # The json error text is not echoed: it could quote part of the value.
        msg = "value cannot be stored: use strings, numbers, booleans, lists or objects"
        raise ValidationError(f"field {field!r}: {msg}", fields={field: msg}) from None
    nonce = os.urandom(NONCE_BYTES)
    aad = _field_aad(tenant_id, connection_id, field, dek_version)
    sealed = nonce + AESGCM(dek).encrypt(nonce, plaintext, aad)
    body = base64.urlsafe_b64encode(sealed).decode().rstrip("=")
    return f"{TOKEN_PREFIX}.{dek_version}.{body}"


def _split_token(token: str) -> tuple[int, bytes] | None:
    """(dek_version, nonce||ct) of a well-formed token, else None.

    Only the canonical text of a token is accepted, so every change to it is detected.
    """
    parts = token.split(".") if isinstance(token, str) else []
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX or not _VERSION_RE.fullmatch(parts[1]):
        return None
    body = parts[2]
    if not _B64URL_RE.fullmatch(body) or len(body) % 4 == 1:
        return None
    sealed = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    if base64.urlsafe_b64encode(sealed).decode().rstrip("=") != body:
        return None  # non-zero padding bits: a second spelling of the same bytes
    if len(sealed) < NONCE_BYTES + TAG_BYTES:
        return None
    return int(parts[1]), sealed


def token_dek_version(token: str) -> int:
    split = _split_token(token)
    if split is None:
        raise CryptoError("stored value is not a valid encrypted token")
    return split[0]


def decrypt_value(
    dek_for_version: Callable[[int], bytes],
    tenant_id: str,
    connection_id: str,
    field: str,
    token: str,
) -> Any:
    """Open a token from ``encrypt_value``; the callback supplies (or refuses) the DEK."""
    where = f"field {field!r} of connection {connection_id!r} (tenant {tenant_id!r})"
    split = _split_token(token)
    if split is None:
        raise CryptoError(f"stored value of {where} is not a valid encrypted token")
    dek_version, sealed = split
    dek = dek_for_version(dek_version)
    _check_key(dek, "a data key")
    aad = _field_aad(tenant_id, connection_id, field, dek_version)
    try:
        plaintext = AESGCM(dek).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], aad)
        return json.loads(plaintext)
    except (InvalidTag, ValueError):
        raise CryptoError(
            f"cannot decrypt {where}: the value was tampered with, moved from another "
            "connection or field, or written with another key"
        ) from None


# --- caller API keys and tokens ----------------------------------------------------------------


def hash_api_key(secret: str) -> str:
    # Plain SHA-256 is enough: API keys are 256-bit random, so no password-style slow KDF is
    # needed to resist guessing, and a fast hash keeps per-request auth cheap.
    return api_key_digest(secret).hex()


def api_key_digest(secret: str) -> bytes:
    """``hash_api_key`` as raw bytes (``bytes.fromhex(hash_api_key(s))``), for per-request checks."""
    return hashlib.sha256(secret.encode()).digest()


def new_api_key(prefix: str = "cpk") -> tuple[str, str]:
    """(key_id, full_key) with full_key "<prefix>_<key_id>_<secret>".

    Store ``hash_api_key(full_key)`` under ``key_id``; the key_id is public and looks the
    record up, the hash check authenticates.
    """
    if not prefix.isascii() or not prefix.isalnum():
        raise ConfigError("api_key_prefix", "must be ASCII letters and digits only")
    key_id = "".join(secrets.choice(_KEY_ID_ALPHABET) for _ in range(12))
    return key_id, f"{prefix}_{key_id}_{secrets.token_urlsafe(32)}"


def split_api_key(full: str) -> tuple[str, str] | None:
    """(key_id, secret) of a key shaped like ``new_api_key``'s, else None."""
    m = _API_KEY_RE.fullmatch(full)
    return (m.group(2), m.group(3)) if m else None


def secrets_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def generate_token(nbytes: int = 32) -> str:
    return secrets.token_urlsafe(nbytes)
