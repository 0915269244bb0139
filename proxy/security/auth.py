"""Caller authentication: who is calling, from the request's headers and peer address.

Every front end (admin API, Connection Service, proxy) asks the same ``Authenticator`` so a
credential means the same thing everywhere. Accepted, in ``Authorization`` or
``Proxy-Authorization`` as ``Bearer <x>``:

- the admin token (constant-time comparison) -> ``Caller("admin", "admin", None)``;
- a tenant API key ``<prefix>_<key_id>_<secret>`` -> ``Caller("api_key", key_id, tenant)``;
- a JWT (HS256 with a shared secret, RS256/ES256/EdDSA with configured public keys; ``exp`` and
  the tenant claim required) -> ``Caller("jwt", sub, tenant)``.

Forward-proxy front ends (absolute-form requests, ``CONNECT``) also take ``Proxy-Authorization:
Basic base64(USER:CREDENTIAL)``, what a bare proxy URL (``http://USER:KEY@proxy:8080``) makes
every client send: CREDENTIAL is one of the above, USER names the connection
(``CONNECTION_ID``, ``TENANT_ID/CONNECTION_ID`` or ``TENANT_ID/CONNECTION_ID/RUNTIME_USER_ID``;
``/`` is written ``%2F`` inside a URL, and percent-escapes are decoded here once more for clients
that pass them through). ``proxy_user`` reads USER; ``bearer_token`` returns CREDENTIAL.

With no header at all, a peer inside ``trusted_networks`` is let in as
``Caller("trusted_network", ip, None)`` where the front end allows it (Runtara sends no header).

Hot path: verified API keys are cached in memory for ``KEY_CACHE_TTL_S`` so a busy caller does
not hit the store per request; the secret is still hash-compared on every call. Revocation
through this process drops the cache entry at once; another replica drops it on the tenant's
invalidation message (within the TTL at worst). A key read that was in flight when either
arrived is not cached (``proxy.cache``: the record it read may predate the revocation).
While the store is unreachable, a cached entry (known or unknown key) keeps answering within the
bounds of ``proxy.stale``; a key revoked before the outage was dropped or re-read as revoked, so
it stays refused.
Last-used times are kept in memory and written in batches by ``flush_usage``.

Pure module: no aiohttp, no redis. Error messages never quote the presented credential.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import unquote

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from proxy.cache import BoundedCache
from proxy.errors import ConfigError, ProxyError, Unauthenticated
from proxy.model import ID_RE, ApiKeyRecord, Caller
from proxy.security import crypto
from proxy.settings import Settings
from proxy.stale import StaleWindow
from proxy.store import FLUSH_ALL
from proxy.store.base import Store

if TYPE_CHECKING:
    from jwt.types import Options  # pyjwt >= 2.10; annotations only

log = logging.getLogger("proxy.auth")

KEY_CACHE_TTL_S: Final = 5.0
# Unknown or revoked key ids are remembered briefly so garbage keys cannot hammer the store.
NEGATIVE_TTL_S: Final = 2.0
KEY_CACHE_MAX: Final = 10000
JWT_LEEWAY_S: Final = 30
ADMIN: Final = Caller("admin", "admin", None)
_WWW_AUTH: Final = {"WWW-Authenticate": 'Bearer realm="connection-proxy"'}


def _unauthenticated(message: str) -> Unauthenticated:
    return Unauthenticated(message, headers=_WWW_AUTH)


@dataclass(frozen=True, slots=True)
class ProxyUser:
    """What the user name of a Basic proxy credential names (see the module docstring)."""

    connection_id: str
    tenant_id: str | None = None
    runtime_user_id: str | None = None


def _basic(raw: str) -> tuple[str, str] | None:
    """(user, password) of a ``Basic`` value, percent-decoded; None if it is not Basic."""
    scheme, _, encoded = raw.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode()
    except (binascii.Error, ValueError):
        raise _unauthenticated(
            "the Proxy-Authorization Basic value is not base64 of UTF-8 'user:credential'"
        ) from None
    user, sep, password = decoded.partition(":")
    if not sep or not password:
        raise _unauthenticated(
            "the proxy credential has no password: use http://CONNECTION_ID:API_KEY@host:port as the proxy URL"
        )
    return unquote(user), unquote(password)


def proxy_user(headers: Mapping[str, str]) -> ProxyUser | None:
    """The connection a ``Proxy-Authorization: Basic`` credential names; None without one."""
    raw = headers.get("Proxy-Authorization")
    basic = _basic(raw) if raw is not None else None
    if basic is None:
        return None
    parts = basic[0].split("/")
    if not 1 <= len(parts) <= 3 or not all(ID_RE.match(p) for p in parts):
        raise _unauthenticated(
            "the proxy user name must be CONNECTION_ID, TENANT_ID/CONNECTION_ID or "
            "TENANT_ID/CONNECTION_ID/RUNTIME_USER_ID ('/' written %2F in a URL), each an id"
        )
    if len(parts) == 1:
        return ProxyUser(parts[0])
    return ProxyUser(parts[1], parts[0], parts[2] if len(parts) == 3 else None)


def bearer_token(headers: Mapping[str, str]) -> str | None:
    """The caller's credential, or None when the request carries no auth header at all.

    ``Proxy-Authorization`` wins when both are present: it is addressed to us explicitly, and
    there it may be ``Basic`` (the password is the credential). A header that is present but
    not ``Bearer <token>`` (or proxy Basic) is an error, not an anonymous call.
    """
    raw = headers.get("Proxy-Authorization")
    if raw is not None:
        basic = _basic(raw)
        if basic is not None:
            return _checked(basic[1])
    else:
        raw = headers.get("Authorization")
    if raw is None:
        return None
    scheme, _, token = raw.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise _unauthenticated("the Authorization header must be 'Bearer <api key, admin token or JWT>'")
    if not token.isascii():
        # Header bytes that are not UTF-8 arrive as lone surrogates, which cannot be encoded
        # for the comparisons below: no credential looks like that.
        try:
            token.encode()
        except UnicodeEncodeError:
            raise _unauthenticated(
                "the bearer credential is not valid UTF-8; send the api key, admin token or JWT as issued"
            ) from None
    return token


def _checked(token: str) -> str:
    try:
        token.encode()
    except UnicodeEncodeError:
        raise _unauthenticated("the proxy credential is not valid UTF-8") from None
    return token


def peer_in(peer_ip: str | None, networks: tuple[Any, ...]) -> bool:
    if not peer_ip or not networks:
        return False
    try:
        addr = ipaddress.ip_address(peer_ip.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr.version == net.version and addr in net for net in networks)


@dataclass(frozen=True, slots=True)
class _CachedKey:
    expires: float
    record: ApiKeyRecord | None  # None: unknown or revoked
    caller: Caller | None
    digest: bytes | None  # the stored hash as bytes; None if the stored value is not a hash
    tenant_id: str | None = None  # the key id's tenant, revoked keys included (audit of refusals)


def _digest_of(secret_hash: str) -> bytes | None:
    try:
        return bytes.fromhex(secret_hash)
    except ValueError:  # a damaged record: its key simply does not authenticate
        return None


def _public_key_algorithm(key: Any) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        return "RS256"
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return "EdDSA"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}.get(key.curve.name, "")
    return ""


def load_jwt_keys(paths: tuple[Path, ...]) -> dict[str, list[Any]]:
    """algorithm -> public keys, from PEM files; a bad file stops start-up naming the setting."""
    keys: dict[str, list[Any]] = {}
    for path in paths:
        try:
            key = load_pem_public_key(path.read_bytes())
        except OSError as exc:
            raise ConfigError("jwt_public_key_files", f"cannot read {path}: {exc.strerror}") from None
        except ValueError:
            raise ConfigError("jwt_public_key_files", f"{path} is not a PEM public key") from None
        alg = _public_key_algorithm(key)
        if not alg:
            raise ConfigError("jwt_public_key_files", f"{path}: use an RSA, EC or Ed25519 public key")
        keys.setdefault(alg, []).append(key)
    return keys


class Authenticator:
    def __init__(self, settings: Settings, store: Store, admin_token: str, *, stale: StaleWindow) -> None:
        self.settings = settings
        self.store = store
        # The process's one window (``stale_if_error_s``), shared with the vault and /readyz.
        self.stale = stale
        self._admin_bytes = admin_token.encode()
        self._jwt_keys: dict[str, list[Any]] = load_jwt_keys(settings.jwt_public_key_files)
        if settings.jwt_hs256_secret:
            self._jwt_keys["HS256"] = [settings.jwt_hs256_secret]
        # The expiry lives in each entry (it differs for known and unknown keys).
        self._keys: BoundedCache[str, _CachedKey] = BoundedCache(KEY_CACHE_MAX)
        self._last_used: dict[str, float] = {}

    # --- entry point ---------------------------------------------------------------------------

    async def authenticate(
        self, headers: Mapping[str, str], peer_ip: str | None, *, allow_trusted: bool
    ) -> Caller:
        token = bearer_token(headers)
        if token is None:
            if allow_trusted and peer_in(peer_ip, self.settings.trusted_networks):
                return Caller("trusted_network", peer_ip or "-", None)
            raise _unauthenticated(
                "no credentials: send 'Authorization: Bearer <api key>' (mint one with "
                "POST /admin/tenants/{tenant_id}/api-keys)"
            )
        if hmac.compare_digest(token.encode(), self._admin_bytes):
            return ADMIN
        parts = crypto.split_api_key(token)
        if parts is not None:
            return await self._api_key(token, parts[0])
        if token.count(".") == 2:
            return self._jwt(token)
        raise _unauthenticated("the bearer credential is not a valid admin token, API key or JWT")

    # --- API keys ------------------------------------------------------------------------------

    async def _api_key(self, token: str, key_id: str) -> Caller:
        now = time.monotonic()
        cached = self._keys.get(key_id)
        if cached is None or cached.expires <= now:
            since = self._keys.generation  # a revocation during the read voids it (proxy.cache)
            cached = await self.stale.load(
                "api_key",
                f"API key {key_id}",
                lambda: self._load_key(key_id, now, since),
                lambda: self._entry(key_id),
            )
        record = cached.record
        # Hash compare on every call, cached or not: the cache holds the hash, never the key.
        if (
            record is None
            or cached.caller is None
            or cached.digest is None
            or not hmac.compare_digest(crypto.api_key_digest(token), cached.digest)
        ):
            raise _unauthenticated(
                f"API key {key_id} is unknown or revoked; mint a new one with "
                "POST /admin/tenants/{tenant_id}/api-keys"
            )
        self._last_used[key_id] = time.time()
        return cached.caller

    async def _load_key(self, key_id: str, now: float, since: int) -> _CachedKey:
        """The key's record as an entry, cached unless a revocation (``forget_key``, a tenant's
        invalidation) arrived after ``since``: then the record read may predate it."""
        record = await self.store.get_api_key(key_id)
        owner = record.tenant_id if record is not None else None
        if record is not None and record.revoked_at is not None:
            record = None
        ttl = KEY_CACHE_TTL_S if record is not None else NEGATIVE_TTL_S
        caller = Caller("api_key", key_id, record.tenant_id) if record is not None else None
        digest = _digest_of(record.secret_hash) if record is not None else None
        return self._keys.put(key_id, _CachedKey(now + ttl, record, caller, digest, owner), since=since)

    def _entry(self, key_id: str) -> tuple[_CachedKey, float] | None:
        """The cached entry and when it was loaded, for serving it stale."""
        cached = self._keys.get(key_id)
        if cached is None:
            return None
        return cached, cached.expires - (KEY_CACHE_TTL_S if cached.record is not None else NEGATIVE_TTL_S)

    def refused_key_owner(self, headers: Mapping[str, str]) -> tuple[str, str] | None:
        """(key id, tenant) of the API key a refused request presented, when that key id exists
        (wrong secret or revoked), from the cache ``authenticate`` just filled: no store read.
        The key id is no secret; it lets the audit trail of the key's tenant show the refusal,
        where an unauthenticated caller could otherwise pick any tenant."""
        try:
            token = bearer_token(headers)
        except Unauthenticated:
            return None
        parts = crypto.split_api_key(token) if token else None
        cached = self._keys.get(parts[0]) if parts is not None else None
        if parts is None or cached is None or cached.tenant_id is None:
            return None
        return parts[0], cached.tenant_id

    def forget_key(self, key_id: str) -> None:
        """Drop a cached key at once (after revocation) so the next call re-reads the store."""
        self._keys.discard(key_id)
        self._last_used.pop(key_id, None)

    def on_invalidation(self, tenant_id: str, connection_id: str | None) -> None:
        """A tenant-wide invalidation from any replica (published when a key is revoked) drops
        that tenant's cached keys here, so revocation holds everywhere within the store's
        invalidation latency instead of this cache's lifetime."""
        if connection_id is not None:
            return
        if tenant_id == FLUSH_ALL:
            self._keys.clear()
            return
        self._keys.discard_where(lambda _, c: c.record is not None and c.record.tenant_id == tenant_id)

    async def flush_usage(self) -> None:
        """Write buffered last-used times in one batch; on failure keep them for the next try."""
        if not self._last_used:
            return
        batch, self._last_used = self._last_used, {}
        try:
            await self.store.touch_api_keys(batch)
        except ProxyError as exc:
            for key_id, ts in batch.items():
                if self._last_used.get(key_id, 0.0) < ts:
                    self._last_used[key_id] = ts
            log.warning("could not record API key last-used times (%s); will retry", exc.code)

    # --- JWTs ----------------------------------------------------------------------------------

    def _jwt(self, token: str) -> Caller:
        s = self.settings
        if not self._jwt_keys:
            raise _unauthenticated(
                "JWTs are not accepted here: no jwt_hs256_secret or jwt_public_key_files configured"
            )
        try:
            alg = jwt.get_unverified_header(token).get("alg")
        except jwt.PyJWTError:
            raise _unauthenticated("the bearer JWT is malformed") from None
        keys = self._jwt_keys.get(alg) if isinstance(alg, str) else None
        if not keys or not isinstance(alg, str):
            # Also refuses "none" and HS/RS confusion: only algorithms with a configured key.
            raise _unauthenticated(
                f"JWT algorithm {str(alg)[:20]!r} is not accepted; use one of {sorted(self._jwt_keys)}"
            )
        required = ["exp", s.jwt_tenant_claim, *(["iss"] if s.jwt_issuer else [])]
        options: Options = {"require": required, "verify_aud": bool(s.jwt_audience)}
        claims: dict[str, Any] | None = None
        problem = "its signature does not verify with any configured key"
        for key in keys:
            try:
                claims = jwt.decode(
                    token,
                    key,
                    algorithms=[alg],
                    options=options,
                    audience=s.jwt_audience,
                    issuer=s.jwt_issuer,
                    leeway=JWT_LEEWAY_S,
                )
                break
            except jwt.InvalidSignatureError:
                continue
            except jwt.ExpiredSignatureError:
                raise _unauthenticated("the bearer JWT has expired") from None
            except jwt.MissingRequiredClaimError as exc:
                raise _unauthenticated(f"the bearer JWT lacks the required claim {exc.claim!r}") from None
            except jwt.InvalidAudienceError:
                raise _unauthenticated("the bearer JWT is for another audience") from None
            except jwt.InvalidIssuerError:
                raise _unauthenticated("the bearer JWT comes from an issuer that is not trusted") from None
            except jwt.PyJWTError:
                problem = "it is malformed or not yet valid"
                continue
        if claims is None:
            raise _unauthenticated(f"the bearer JWT is not accepted: {problem}")
        tenant = claims.get(s.jwt_tenant_claim)
        if not isinstance(tenant, str) or not ID_RE.match(tenant):
            raise _unauthenticated(f"the JWT claim {s.jwt_tenant_claim!r} must be a tenant id string")
        sub = claims.get("sub")
        subject = sub if isinstance(sub, str) and sub and len(sub) <= 200 else "unknown"
        return Caller("jwt", subject, tenant)


__all__ = ["ADMIN", "Authenticator", "ProxyUser", "bearer_token", "load_jwt_keys", "peer_in", "proxy_user"]
