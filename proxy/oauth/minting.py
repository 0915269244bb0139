"""Client-credentials tokens: minted on demand, cached in process memory until shortly before expiry.

Why it exists: a client-credentials connection has no grant to keep, only a client id and secret
to mint short-lived tokens with, so its rules differ from the authorization-code refresh in
``proxy.oauth.tokens``:

- a token is minted once per process at a time (the rest await it) and reused until a minute
  before it expires (halfway through for very short-lived ones);
- it is never written to the store: each replica minting its own token is harmless (no rotation
  is involved) and keeps bearer tokens out of storage;
- a changed client configuration (a new secret, scope, endpoint) mints afresh, and so does a
  token an upstream refused (``refused``, the token manager's record of 401s).

Failures are the caller's to interpret: this raises ``OAuthConfigError`` (not configured),
``TokenEndpointError`` (the endpoint refused) or the endpoint's HTTP errors.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from dataclasses import dataclass

from proxy.oauth import flows
from proxy.oauth.endpoint import TokenEndpoint
from proxy.oauth.flows import ClientConfig, TokenEndpointError
from proxy.observe.metrics import OAUTH_REFRESH

REFRESH_SKEW_S = 60.0
MINTED_DEFAULT_LIFETIME_S = 3600.0  # client-credentials token without expires_in

Key = tuple[str, str]  # (tenant id, connection id)


def fingerprint(*parts: str | None) -> str:
    """A digest of ``parts`` to compare secrets by, without keeping them."""
    h = hashlib.sha256()
    for part in parts:
        h.update((part or "").encode() + b"\x00")
    return h.hexdigest()


@dataclass(frozen=True, slots=True)
class _Minted:
    config: str  # fingerprint of the client config that minted it: a changed secret re-mints
    token: str
    refresh_at: float

    def __repr__(self) -> str:
        return f"_Minted(refresh_at={self.refresh_at})"


class Minter:
    """The minted token of each client-credentials connection of this process."""

    def __init__(self, endpoint: TokenEndpoint, clock: Callable[[], float]) -> None:
        self.endpoint = endpoint
        self.clock = clock
        self._minted: dict[Key, _Minted] = {}
        self._locks: dict[Key, asyncio.Lock] = {}

    def cached(self, key: Key) -> str | None:
        """The token last minted for ``key``, fresh or not."""
        minted = self._minted.get(key)
        return minted.token if minted is not None else None

    def forget(self, key: Key) -> str | None:
        """Drops everything kept for ``key``; returns its last token (to revoke it)."""
        self._locks.pop(key, None)
        minted = self._minted.pop(key, None)
        return minted.token if minted is not None else None

    async def token(
        self, key: Key, client: ClientConfig, *, force: bool, refused: Callable[[Key, str], bool]
    ) -> str:
        """A fresh token for ``key``: the cached one, or one minted now (``force``: always)."""
        config = fingerprint(
            client.client_id,
            client.client_secret,
            client.token_url,
            client.scope,
            client.audience,
            client.token_auth,
        )
        cached = self._fresh(key, config, force, refused)
        if cached is not None:
            return cached
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            cached = self._fresh(key, config, False, refused)
            if cached is not None and not force:
                return cached
            req = flows.client_credentials_request(client)
            now = self.clock()
            try:
                tokens = await self.endpoint.tokens(req, clock=self.clock, requested_scope=client.scope)
            except TokenEndpointError as exc:
                OAUTH_REFRESH.labels(outcome=exc.kind).inc()
                raise
            OAUTH_REFRESH.labels(outcome="minted").inc()
            lifetime = (
                (tokens.expires_at - now) if tokens.expires_at is not None else MINTED_DEFAULT_LIFETIME_S
            )
            # Renew a minute early, or halfway through for very short-lived tokens.
            refresh_at = now + lifetime - min(REFRESH_SKEW_S, lifetime / 2)
            self._minted[key] = _Minted(config, tokens.access_token, refresh_at)
            return tokens.access_token

    def _fresh(self, key: Key, config: str, force: bool, refused: Callable[[Key, str], bool]) -> str | None:
        cached = self._minted.get(key)
        if cached is None or force or cached.config != config or refused(key, cached.token):
            return None
        return cached.token if self.clock() < cached.refresh_at else None
