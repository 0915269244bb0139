"""The token manager: a usable bearer token for every OAuth2 connection, refreshed exactly once.

Why it exists: providers increasingly rotate refresh tokens, so using one twice (two replicas
refreshing at the same moment) kills the grant and the connection with it. Refreshing is
therefore single-flight twice over: one coroutine per process (the rest await its result), and
one process across all replicas (``store.acquire_lock``); losers poll the record until the
winner has saved the new tokens (CAS on the record version) and use those.

Outcomes: ``invalid_grant`` marks the connection ``needs_reauth`` and raises
``ConnectionNotAuthorized`` (424) saying how to reconnect; ``invalid_client`` marks it ``error``;
5xx/timeouts raise ``UpstreamUnreachable``/``UpstreamTimeout`` and change nothing.

This module orchestrates; the parts live beside it: ``proxy.oauth.endpoint`` makes the token
and revocation endpoint calls (https-only, egress-guarded, bounded), ``proxy.oauth.minting``
mints and caches client-credentials tokens, and ``proxy.oauth.flows`` builds and parses the
requests. Here: which token a call uses, refreshing, the code exchange of the connect callback,
revocation on delete, and what each failure does to the connection's status.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

import aiohttp

from proxy.catalogue import AuthKind
from proxy.errors import (
    Conflict,
    ConnectionNotAuthorized,
    ProxyError,
    ServiceUnavailable,
    StoreLost,
    StoreUnavailable,
    UpstreamUnreachable,
)
from proxy.model import ConnectionRecord, ConnectionStatus, not_authorized
from proxy.oauth import flows
from proxy.oauth.endpoint import TokenEndpoint
from proxy.oauth.flows import ClientConfig, OAuthConfigError, TokenEndpointError, TokenRequest, TokenSet
from proxy.oauth.minting import REFRESH_SKEW_S, Key, Minter, fingerprint
from proxy.observe.metrics import OAUTH_REFRESH
from proxy.settings import Settings
from proxy.store.base import Store
from proxy.vault.records import Credentials
from proxy.vault.vault import Vault

log = logging.getLogger("proxy.oauth")


class TokenManager:
    def __init__(
        self, vault: Vault, store: Store, settings: Settings, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.vault = vault
        self.store = store
        self.settings = settings
        self.clock = clock
        self.endpoint = TokenEndpoint(settings)
        # Read through self.clock, so a test may replace the clock after construction.
        self.minter = Minter(self.endpoint, lambda: self.clock())
        # A lock outlives a crashed holder by at most this, then another replica takes over.
        self.lock_ttl_s = min(30.0, settings.upstream_total_timeout_s) + 10.0
        self._flights: dict[Key, asyncio.Future[str]] = {}
        self._forced: dict[Key, str] = {}  # key -> fingerprint of the token an upstream refused

    def bind_client(self, session: aiohttp.ClientSession) -> None:
        self.endpoint.bind_client(session)

    # --- public API ------------------------------------------------------------------------------

    async def access_token(self, creds: Credentials, *, force: bool = False) -> str:
        """A bearer token for an OAuth2 connection, refreshed or minted when needed."""
        key = (creds.record.tenant_id, creds.record.connection_id)
        if creds.integration.auth == AuthKind.OAUTH2_CLIENT_CREDENTIALS:
            return await self._client_credentials(creds, key, force)
        if creds.integration.auth != AuthKind.OAUTH2_AUTHORIZATION_CODE:
            raise ValueError(f"integration {creds.integration.id!r} is not an OAuth2 integration")
        token = creds.params.get("access_token")
        stale = token if (force or self._is_forced(key, token)) else None
        if (usable := self._usable(creds, stale)) is not None:
            return usable
        try:
            return await self._single_flight(key, lambda: self._refresh(key, stale))
        except StoreLost:
            raise
        except StoreUnavailable as exc:
            return self._during_outage(creds, stale, exc)

    def _during_outage(self, creds: Credentials, stale: str | None, exc: StoreUnavailable) -> str:
        """The store is unreachable, so no refreshed token could be saved (and a refresh token
        the provider rotates must never be spent unsaved): the current access token serves
        while it has not actually expired (the refresh margin is skipped); after that, 503."""
        token = creds.params.get("access_token")
        if (
            token
            and token != stale
            and not flows.expires_soon(creds.params.get("expires_at"), self.clock(), 0)
        ):
            return str(token)
        raise ServiceUnavailable(
            f"the access token of connection {creds.record.connection_id!r} has expired and cannot be "
            f"refreshed while the store is unreachable ({exc.message}); retry once the store is back "
            "(GET /readyz reports it)",
            headers={"Retry-After": "5"},
        ) from None

    async def on_unauthorized(self, creds: Credentials, token: str | None = None) -> None:
        """The upstream answered 401 to ``token`` (default: the stored one): the next
        ``access_token`` refreshes, unless someone already replaced that token."""
        key = (creds.record.tenant_id, creds.record.connection_id)
        if token is None:
            token = self.minter.cached(key) or creds.params.get("access_token")
        if token:
            self._forced[key] = fingerprint(str(token))

    async def revoke(self, creds: Credentials) -> dict[str, str]:
        """RFC 7009 revocation of the connection's tokens where the provider supports it.

        Never raises: deleting a connection must not depend on the provider being up. Returns
        what happened per token kind ("revoked", "failed", "skipped") for the audit trail.
        """
        key = (creds.record.tenant_id, creds.record.connection_id)
        outcome: dict[str, str] = {}
        minted = self.minter.forget(key)
        self._forced.pop(key, None)
        if not creds.integration.auth.is_oauth2:
            return outcome
        try:
            client = await self.client_config_for(creds)
        except ProxyError:
            return {"access_token": "skipped"}
        pending: list[tuple[str, Any]] = []
        if creds.integration.auth == AuthKind.OAUTH2_AUTHORIZATION_CODE:
            # The refresh token first: revoking it usually ends the whole grant (RFC 7009 §2.1).
            pending = [("refresh_token", creds.params.get("refresh_token"))]
            pending.append(("access_token", creds.params.get("access_token")))
        elif minted is not None:
            pending = [("access_token", minted)]
        for hint, token in pending:
            if not token:
                continue
            req = flows.revocation_request(client, token=str(token), token_type_hint=hint)  # type: ignore[arg-type]
            if req is None:
                outcome[hint] = "skipped"
                continue
            try:
                await self.endpoint.revoke(req)
                outcome[hint] = "revoked"
            except (ProxyError, TokenEndpointError) as exc:
                log.warning(
                    "revoking the %s of connection %s/%s failed: %s", hint, key[0], key[1], exc.message
                )
                outcome[hint] = "failed"
        return outcome

    async def client_config_for(self, creds: Credentials) -> ClientConfig:
        return await self.client_config(
            creds.integration.id,
            creds.params,
            tenant_id=creds.record.tenant_id,
            default_connection_id=creds.record.default_connection_id,
        )

    async def client_config(
        self,
        integration_id: str,
        params: Any,
        *,
        tenant_id: str,
        default_connection_id: str | None,
    ) -> ClientConfig:
        """The OAuth client of a connection; a runtime user connection without its own client id
        uses its default connection's (the same OAuth app, the end user's own grant)."""
        integration = self.vault.catalogue.get(integration_id)
        fallback = None
        if not params.get("client_id") and default_connection_id:
            try:
                parent = await self.vault.credentials(tenant_id, default_connection_id)
            except ProxyError:
                parent = None
            if parent is not None and parent.integration.id == integration_id:
                fallback = parent.params
        return flows.client_config(params, integration.oauth2, fallback)

    async def exchange_code(
        self, client: ClientConfig, *, code: str, redirect_uri: str, code_verifier: str | None
    ) -> TokenSet:
        """Authorization code -> tokens (the connect callback). Errors say what the user can do."""
        try:
            req = flows.authorization_code_request(
                client, code=code, redirect_uri=redirect_uri, code_verifier=code_verifier
            )
        except OAuthConfigError as exc:
            raise ConnectionNotAuthorized(
                f"{exc}; the administrator must set them on the connection or the integration"
            ) from None
        try:
            return await self._token_call(req, requested_scope=client.scope)
        except TokenEndpointError as exc:
            OAUTH_REFRESH.labels(outcome=f"exchange_{exc.kind}").inc()
            if exc.kind == "reauth":
                raise ConnectionNotAuthorized(
                    f"{exc.message}: the authorization code expired or was already used; start again"
                ) from None
            if exc.kind == "client":
                raise ConnectionNotAuthorized(
                    f"{exc.message}: the OAuth client id or secret is wrong; the administrator must fix them"
                ) from None
            raise UpstreamUnreachable(f"{exc.message}; try again") from None

    # --- authorization code: refresh -----------------------------------------------------------

    def _expiring(self, params: Any) -> bool:
        expires_at = params.get("expires_at")
        # A minute early, or halfway through for short-lived tokens (as minted tokens below).
        margin = flows.refresh_margin(expires_at, params.get("issued_at"), REFRESH_SKEW_S)
        return flows.expires_soon(expires_at, self.clock(), margin)

    def _is_forced(self, key: Key, token: Any) -> bool:
        mark = self._forced.get(key)
        if mark is None or not token:
            return False
        if mark == fingerprint(str(token)):
            return True
        self._forced.pop(key, None)  # that token was replaced already
        return False

    async def _single_flight(self, key: Key, factory: Callable[[], Awaitable[str]]) -> str:
        flight = self._flights.get(key)
        if flight is None:
            flight = asyncio.ensure_future(factory())
            self._flights[key] = flight

            def done(f: asyncio.Future[str], key: Key = key) -> None:
                if self._flights.get(key) is f:
                    del self._flights[key]
                if not f.cancelled():
                    f.exception()  # retrieved: no "never retrieved" noise if every waiter left

            flight.add_done_callback(done)
        # shield: one waiter giving up must not cancel the refresh the others wait for.
        return await asyncio.shield(flight)

    async def _reload(self, key: Key) -> Credentials:
        record = await self.vault.get_record(*key)
        return await self.vault.decrypt(record)

    def _usable(self, creds: Credentials, stale: str | None) -> str | None:
        if creds.record.status not in (ConnectionStatus.ACTIVE.value, ConnectionStatus.PENDING.value):
            raise not_authorized(creds.record)
        token = creds.params.get("access_token")
        if token and token != stale and not self._expiring(creds.params):
            return str(token)
        return None

    async def _refresh(self, key: Key, stale: str | None) -> str:
        lock = f"oauth-refresh:{key[0]}/{key[1]}"
        deadline = time.monotonic() + self.lock_ttl_s + 5.0
        delay = 0.02
        while True:
            creds = await self._reload(key)
            token = self._usable(creds, stale)
            if token is not None:
                return token
            owner = await self.store.acquire_lock(lock, self.lock_ttl_s)
            if owner is not None:
                try:
                    # Re-read under the lock: the previous holder may have just saved new tokens.
                    creds = await self._reload(key)
                    token = self._usable(creds, stale)
                    return token if token is not None else await self._refresh_locked(key, creds, stale)
                finally:
                    try:
                        await self.store.release_lock(lock, owner)
                    except ProxyError as exc:
                        log.warning("releasing %s failed (it expires by itself): %s", lock, exc.message)
            if time.monotonic() > deadline:
                raise ServiceUnavailable(
                    f"another replica is refreshing the token of connection {key[1]!r} and has not "
                    "finished; retry shortly"
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.25)

    async def _refresh_locked(self, key: Key, creds: Credentials, stale: str | None) -> str:
        params = creds.params
        access = params.get("access_token")
        refresh_token = params.get("refresh_token")
        if not refresh_token:
            expires_at = params.get("expires_at")
            still_valid = not flows.expires_soon(expires_at, self.clock(), 0.0)
            if access and access != stale and still_valid:
                return str(access)  # expiring soon but not refreshable: use it while it lasts
            if not access and creds.record.status == ConnectionStatus.PENDING.value:
                raise not_authorized(creds.record)
            why = "the upstream refused the access token" if stale else "the access token expired"
            await self._mark(creds, ConnectionStatus.NEEDS_REAUTH, f"{why} and there is no refresh token")
            raise not_authorized(await self.vault.get_record(*key))
        client = await self.client_config_for(creds)
        try:
            req = flows.refresh_request(client, refresh_token=str(refresh_token))
        except OAuthConfigError as exc:
            await self._mark(creds, ConnectionStatus.ERROR, str(exc))
            raise not_authorized(await self.vault.get_record(*key)) from None
        try:
            tokens = await self._token_call(
                req, previous_refresh_token=str(refresh_token), requested_scope=params.get("scope")
            )
        except TokenEndpointError as exc:
            OAUTH_REFRESH.labels(outcome=exc.kind).inc()
            await self._fail(key, creds, exc)
        OAUTH_REFRESH.labels(outcome="refreshed").inc()
        await self._save_tokens(creds, tokens, str(refresh_token))
        if self._forced.get(key) is not None and stale is not None:
            self._forced.pop(key, None)
        return tokens.access_token

    async def _fail(self, key: Key, creds: Credentials, exc: TokenEndpointError) -> NoReturn:
        if exc.kind == "reauth":
            await self._mark(creds, ConnectionStatus.NEEDS_REAUTH, f"token refresh refused: {exc.error}")
            raise not_authorized(await self.vault.get_record(*key))
        if exc.kind == "client":
            await self._mark(
                creds, ConnectionStatus.ERROR, f"OAuth client refused: {exc.error or exc.status}"
            )
            raise not_authorized(await self.vault.get_record(*key))
        raise UpstreamUnreachable(
            f"refreshing the token of connection {key[1]!r} failed: {exc.message}; the connection is "
            "unchanged, retry later"
        )

    async def _mark(self, creds: Credentials, status: ConnectionStatus, detail: str) -> None:
        """Sets a sticky status unless the grant was replaced meanwhile (a reconnect wins)."""
        record = creds.record
        grant = creds.params.get("refresh_token") or creds.params.get("access_token")
        for _ in range(3):
            try:
                await self.vault.save(
                    record.evolve(status=status.value, status_detail=detail), record.version
                )
                log.warning(
                    "connection %s/%s marked %s: %s",
                    record.tenant_id,
                    record.connection_id,
                    status.value,
                    detail,
                )
                return
            except Conflict:
                current = await self._reload((record.tenant_id, record.connection_id))
                now_grant = current.params.get("refresh_token") or current.params.get("access_token")
                if now_grant != grant:
                    return
                record = current.record

    async def _save_tokens(self, creds: Credentials, tokens: TokenSet, used_refresh_token: str) -> None:
        record = creds.record
        for _ in range(5):
            updated = await self.merge_tokens(record, tokens)
            try:
                await self.vault.save(updated, record.version)
                return
            except Conflict:
                # Someone else wrote the record. If they kept the grant we refreshed (an admin
                # edit), our tokens still belong in it; if they replaced it (a reconnect), theirs win.
                current = await self._reload((record.tenant_id, record.connection_id))
                if current.params.get("refresh_token") != used_refresh_token:
                    return
                record = current.record
        raise ServiceUnavailable(
            f"could not save refreshed tokens of connection {record.connection_id!r}: it keeps changing"
        )

    async def merge_tokens(self, record: ConnectionRecord, tokens: TokenSet) -> ConnectionRecord:
        """``record`` with ``tokens`` encrypted into it and its status reset to active."""
        integration = self.vault.catalogue.get(record.integration_id)
        unsafe = [n for n in ("access_token", "refresh_token") if not integration.is_secret(n)]
        if unsafe:
            # Storing a token in plaintext is never acceptable: the integration file is wrong.
            raise ServiceUnavailable(
                f"integration {integration.id!r} does not declare {', '.join(unsafe)} as secret "
                "fields; fix its TOML (secret = true) before connecting"
            )
        values = tokens.to_params()
        given = {k: v for k, v in values.items() if v is not None}
        public, secret = await self.vault.encrypt_params(
            record.tenant_id, record.connection_id, integration, given
        )
        new_public = {**record.public_params, **public}
        new_secret = {**record.secret_params, **secret}
        for name, value in values.items():
            if value is None:
                new_public.pop(name, None)
                new_secret.pop(name, None)
        return record.evolve(
            public_params=new_public,
            secret_params=new_secret,
            status=ConnectionStatus.ACTIVE.value,
            status_detail=None,
        )

    # --- client credentials --------------------------------------------------------------------

    async def _client_credentials(self, creds: Credentials, key: Key, force: bool) -> str:
        if creds.record.status == ConnectionStatus.ERROR.value:
            raise not_authorized(creds.record)
        client = await self.client_config_for(creds)
        try:
            token = await self.minter.token(key, client, force=force, refused=self._is_forced)
        except OAuthConfigError as exc:
            raise ConnectionNotAuthorized(
                f"connection {key[1]!r} cannot mint a token: {exc}; set them with "
                f"PUT /admin/tenants/{key[0]}/connections/{key[1]}"
            ) from None
        except TokenEndpointError as exc:
            if exc.kind in ("client", "reauth"):
                await self._mark(
                    creds, ConnectionStatus.ERROR, f"OAuth client refused: {exc.error or exc.status}"
                )
                raise not_authorized(await self.vault.get_record(*key)) from None
            raise UpstreamUnreachable(
                f"minting a token for connection {key[1]!r} failed: {exc.message}"
            ) from None
        self._forced.pop(key, None)
        return token

    # --- HTTP ----------------------------------------------------------------------------------

    def check_endpoint(self, url: str) -> None:
        """Refuses an OAuth endpoint credentials must not be sent to (``TokenEndpoint.check``)."""
        self.endpoint.check(url)

    async def _token_call(
        self, req: TokenRequest, *, previous_refresh_token: str | None = None, requested_scope: Any = None
    ) -> TokenSet:
        return await self.endpoint.tokens(
            req,
            clock=self.clock,
            previous_refresh_token=previous_refresh_token,
            requested_scope=requested_scope,
        )
