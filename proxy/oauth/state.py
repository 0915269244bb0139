"""PKCE and the one-time ``state`` of an authorization-code flow.

Why it exists: the callback URL is public, so anyone can send a browser there with any ``code``
and ``state``. A ``state`` is accepted only if it (1) was minted by us, (2) has not been used
(it lives server-side and is *popped*, so a replay finds nothing), (3) belongs to a connect
session that is still open, and (4) comes back in the same browser that started the flow (a
random binding cookie, one per flow, whose hash is kept with the state) — RFC 6749 §10.12, so an attacker
cannot make a victim's browser finish the attacker's flow or vice versa. PKCE (RFC 7636, S256
only) makes a stolen authorization code useless without the verifier we keep.

Pure module: no aiohttp, no redis; the caller stores ``PendingAuthorization.to_dict()`` with
``store.put_ephemeral(STATE_NAMESPACE, state, ..., ttl)`` and gets it back with ``pop_ephemeral``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import asdict, dataclass, field
from typing import Any, TypeGuard

STATE_NAMESPACE = "oauth-state"
STATE_TTL_S = 900  # time a user may spend on the provider's consent screen
BINDING_COOKIE_PREFIX = "cp_oauth_"
_VERIFIER_RE = re.compile(r"[A-Za-z0-9\-._~]{43,128}")  # RFC 7636 §4.1
_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{32,128}")


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def new_code_verifier() -> str:
    """43 characters of base64url from 32 random bytes: the RFC 7636 §7.1 recommendation."""
    return _b64url(secrets.token_bytes(32))


def code_challenge(verifier: str) -> str:
    """S256: BASE64URL(SHA256(ASCII(verifier))). 'plain' is never offered: it protects nothing."""
    if not _VERIFIER_RE.fullmatch(verifier):
        raise ValueError("a PKCE code verifier is 43-128 characters of [A-Za-z0-9-._~]")
    return _b64url(hashlib.sha256(verifier.encode("ascii")).digest())


def new_state() -> str:
    return secrets.token_urlsafe(32)


def new_browser_binding() -> str:
    return secrets.token_urlsafe(32)


def well_formed(token: str | None) -> TypeGuard[str]:
    """Whether a state or binding value has our shape (cheap rejection before any store call)."""
    return token is not None and _TOKEN_RE.fullmatch(token) is not None


def binding_cookie_name(state: str) -> str:
    """One cookie per flow (named after its state), so parallel sign-ins in one browser coexist."""
    return BINDING_COOKIE_PREFIX + hashlib.sha256(state.encode()).hexdigest()[:16]


def binding_hash(value: str) -> str:
    return hashlib.sha256(b"connection-proxy oauth binding\x00" + value.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class PendingAuthorization:
    """What the callback needs to finish a flow; stored server-side under the ``state`` value."""

    tenant_id: str
    connection_id: str
    session_id: str
    browser_hash: str
    redirect_uri: str
    created_at: float
    code_verifier: str | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PendingAuthorization:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})

    def binding_problem(self, *, browser_value: str | None, session_id: str | None) -> str | None:
        """Why this state may not be used by this browser for this session, or None if it may."""
        if session_id is None or not hmac.compare_digest(session_id, self.session_id):
            return "session"
        if browser_value is None or not well_formed(browser_value):
            return "browser"
        if not hmac.compare_digest(binding_hash(browser_value), self.browser_hash):
            return "browser"
        return None
