"""The connect flow over the store and vault, without HTTP: sessions in, connections out.

Why it exists: ``proxy.web.connect`` renders pages; the decisions behind them live here so they
read in one place: the Workato-style pre-checks before a session is offered (the default
connection exists, is active and is of the same integration; a runtime user has at most one
connection per default), opening a link (unknown / used / expired), consuming it atomically,
starting an authorization-code flow (state + PKCE + browser binding), and writing the user's
parameters or tokens into the connection (the admin's shell if there is one).

Where a connection's secrets go is never the link holder's choice: destination fields come from
the session's preset, the connection already stored, the default connection (runtime users) or
the integration, and the page at most shows the host. ``FormScope`` says, per session, what the
end user may enter (``proxy.security.destinations`` holds the rules).
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from proxy.catalogue import Catalogue, Integration
from proxy.connect import sessions
from proxy.connect.sessions import ConnectSession, SessionRequest
from proxy.errors import ValidationError
from proxy.model import ConnectionRecord, ConnectionStatus, parse_rate_limits
from proxy.oauth import flows
from proxy.oauth import state as oauth_state
from proxy.oauth.flows import ClientConfig, OAuthConfigError
from proxy.oauth.tokens import TokenManager
from proxy.pipeline.urls import validate_base_url
from proxy.security import destinations
from proxy.settings import Settings
from proxy.store.base import Store
from proxy.vault.vault import Vault

EXPIRED_GRACE_S = 3600  # an expired session is kept this long to say "expired" rather than "unknown"
LinkProblem = Literal["unknown", "used", "expired"]


@dataclass(frozen=True, slots=True)
class FormScope:
    """What one session's page shows and what the end user may change."""

    values: dict[str, Any]  # public values shown in inputs
    secrets_set: set[str]  # stored secrets a blank input keeps
    hidden: frozenset[str]  # never inputs: the operator's destinations and presets
    settable: dict[str, tuple[str, ...] | None]  # destinations the user may enter, with bounds
    locked: dict[str, Any]  # the operator's values written with the user's
    host: str | None  # where the credentials will go, shown read only


def generated_id(integration_id: str, runtime_user_id: str | None) -> str:
    suffix = runtime_user_id or secrets.token_hex(4)
    candidate = f"{integration_id}-{suffix}"
    if len(candidate) > 200:
        candidate = f"{integration_id[:150]}-{hashlib.sha256(suffix.encode()).hexdigest()[:16]}"
    return candidate


class Connector:
    def __init__(self, store: Store, vault: Vault, tokens: TokenManager, settings: Settings) -> None:
        self.store = store
        self.vault = vault
        self.tokens = tokens
        self.settings = settings

    @property
    def catalogue(self) -> Catalogue:
        return self.vault.catalogue

    # --- creating a session ----------------------------------------------------------------------

    async def create(self, tenant_id: str, req: SessionRequest, actor: str) -> tuple[ConnectSession, str]:
        """Checks, stores and returns a new session with its link token."""
        if not self.catalogue.known(req.integration_id):
            raise ValidationError(
                f"integration {req.integration_id!r} is unknown; GET /admin/integrations lists them",
                fields={"integration_id": "unknown integration"},
            )
        integration = self.catalogue.get(req.integration_id)
        cid, existing = await self._precheck(tenant_id, req)
        await self._check_destinations(tenant_id, integration, req, existing)
        if sessions.uses_oauth_redirect(integration):
            client = await self.oauth_client(tenant_id, integration, existing, req.default_connection_id)
            try:
                client.require("authorization_code")
            except OAuthConfigError as exc:
                missing = ", ".join(exc.missing)
                raise ValidationError(
                    f"the OAuth app is not configured: missing {missing}; set them on the connection "
                    f"(PUT /admin/tenants/{tenant_id}/connections/{cid}), on its default connection, "
                    "or in the integration's [oauth2] table",
                    fields={"oauth2": f"missing {missing}"},
                ) from None
        now = time.time()
        ttl = self.settings.connect_session_ttl_s
        sid, token = sessions.new_session_token()
        session = ConnectSession(
            session_id=sid,
            secret_hash=sessions.secret_hash(token.split(".", 1)[1]),
            tenant_id=tenant_id,
            integration_id=req.integration_id,
            connection_id=cid,
            created_at=now,
            expires_at=now + ttl,
            created_by=actor,
            runtime_user_id=req.runtime_user_id,
            default_connection_id=req.default_connection_id,
            return_url=req.return_url,
            allowed_origins=req.allowed_origins,
            csrf_key=sessions.new_csrf_key(),
            parameters=dict(req.parameters),
            display_name=req.display_name,
            logo_url=req.logo_url,
            user_settable=dict(req.user_settable),
        )
        await self.store.put_ephemeral(
            sessions.SESSION_NAMESPACE, sid, session.to_dict(), ttl + EXPIRED_GRACE_S
        )
        return session, token

    async def _check_destinations(
        self, tid: str, integration: Integration, req: SessionRequest, existing: ConnectionRecord | None
    ) -> None:
        """The preset carries no secret and valid values; every destination the connection needs
        comes from someone with authority, or is one the end user may enter within bounds."""
        problems: dict[str, str] = {}
        for name in req.parameters:
            spec = integration.field(name)
            if spec is None:
                problems[f"parameters.{name}"] = f"is not a parameter of integration {integration.id!r}"
            elif spec.secret:
                problems[f"parameters.{name}"] = (
                    "is a secret: a connect session carries none; the end user enters it on the page"
                )
        for key, problem in integration.validate_params(req.parameters).items():
            problems.setdefault(key, problem)
        base_url = req.parameters.get("base_url")
        if (
            integration.base_url is None
            and isinstance(base_url, str)
            and "parameters.base_url" not in problems
        ):
            url_problem = validate_base_url(base_url)
            if url_problem:
                problems["parameters.base_url"] = url_problem
        for name in req.user_settable:
            if not integration.is_destination(name):
                problems[f"user_settable.{name}"] = (
                    "is not a destination field of this integration; only destinations are bounded"
                )
        default = None
        if req.default_connection_id:
            default = await self.store.get_connection(tid, req.default_connection_id)
        settable = destinations.user_settable_fields(
            integration, req.user_settable, default, bool(req.runtime_user_id)
        )
        if req.runtime_user_id and default is not None:
            for name in req.parameters:
                if integration.is_destination(name) and not destinations.users_choose(default):
                    problems[f"parameters.{name}"] = (
                        "is a destination: runtime user connections take theirs from the default "
                        "connection; change it there"
                    )
        known: set[str] = set(req.parameters)
        if existing is not None:
            known |= set(existing.public_params)
        if default is not None:
            known |= set(default.public_params)
        for spec in integration.fields:
            needed = spec.required and spec.default is None and integration.is_destination(spec.name)
            if needed and spec.name not in known and spec.name not in settable:
                problems[f"parameters.{spec.name}"] = (
                    "is where the credentials go and nobody set it: give it in the session's "
                    "parameters (end users cannot choose a destination), or allow a bounded choice "
                    f'with "user_settable": {{"{spec.name}": ["*.example.com"]}}'
                )
        if problems:
            raise ValidationError(
                "cannot create the connect session: " + "; ".join(f"{k} {v}" for k, v in problems.items()),
                fields=problems,
            )

    async def _precheck(self, tid: str, req: SessionRequest) -> tuple[str, ConnectionRecord | None]:
        """The pre-checks; returns the connection id the session will write and its record now."""
        problems: dict[str, str] = {}
        if req.default_connection_id:
            default = await self.store.get_connection(tid, req.default_connection_id)
            if default is None:
                problems["default_connection_id"] = (
                    "does not exist: create and connect the default connection before offering "
                    "runtime user connections"
                )
            elif default.integration_id != req.integration_id:
                problems["default_connection_id"] = (
                    f"is a connection of integration {default.integration_id!r}"
                )
            elif default.runtime_user_id:
                problems["default_connection_id"] = "is itself a runtime user connection"
            elif default.status != ConnectionStatus.ACTIVE.value:
                problems["default_connection_id"] = (
                    f"is {default.status}: connect the default connection first; end users cannot "
                    "use runtime user connections until it is active"
                )
        cid = req.connection_id
        if req.runtime_user_id and req.default_connection_id and not problems:
            mine = await self.store.find_user_connection(tid, req.default_connection_id, req.runtime_user_id)
            if mine is not None and cid not in (None, mine.connection_id):
                problems["connection_id"] = (
                    f"runtime user {req.runtime_user_id!r} already has connection {mine.connection_id!r} "
                    "for this default connection; omit connection_id to reconnect it"
                )
            elif mine is not None:
                cid = mine.connection_id
        if cid is None:
            cid = generated_id(req.integration_id, req.runtime_user_id)
            existing = await self.store.get_connection(tid, cid)
            if existing is not None:  # taken: a random suffix instead
                cid = generated_id(req.integration_id, f"{req.runtime_user_id or 'c'}-{secrets.token_hex(3)}")
                existing = await self.store.get_connection(tid, cid)
        else:
            existing = await self.store.get_connection(tid, cid)
        if existing is not None and existing.integration_id != req.integration_id:
            problems["connection_id"] = f"is a connection of integration {existing.integration_id!r}"
        elif (
            existing is not None
            and req.runtime_user_id
            and (
                existing.runtime_user_id != req.runtime_user_id
                or existing.default_connection_id != req.default_connection_id
            )
        ):
            problems["connection_id"] = (
                "exists and is not this runtime user's connection for that default connection"
            )
        if problems:
            raise ValidationError(
                "cannot create the connect session: " + "; ".join(f"{k} {v}" for k, v in problems.items()),
                fields=problems,
            )
        return cid, existing

    # --- opening and ending a session --------------------------------------------------------------

    async def open(self, token: str) -> tuple[ConnectSession | None, LinkProblem | None]:
        """The open session of a link, or why there is none. Expired sessions are returned too
        (with "expired"), so the page can still offer the way back to the application."""
        parts = sessions.split_session_token(token)
        if parts is None:
            return None, "unknown"
        sid, secret = parts
        data = await self.store.get_ephemeral(sessions.SESSION_NAMESPACE, sid)
        if data is None:
            used = await self.store.get_ephemeral(sessions.USED_NAMESPACE, sid)
            if used is not None and used.get("secret_hash") == sessions.secret_hash(secret):
                return None, "used"
            return None, "unknown"
        session = ConnectSession.from_dict(data)
        if not session.opens_with(secret):
            return None, "unknown"
        if session.expires_at <= time.time():
            return session, "expired"
        return session, None

    async def status(self, token: str) -> tuple[str, str | None]:
        """("connected", connection id) once the link was used; else "pending" or "unknown"."""
        parts = sessions.split_session_token(token)
        if parts is None:
            return "unknown", None
        used = await self.store.get_ephemeral(sessions.USED_NAMESPACE, parts[0])
        if used is not None and used.get("secret_hash") == sessions.secret_hash(parts[1]):
            return "connected", used.get("connection_id")
        session, problem = await self.open(token)
        return ("pending", None) if session is not None and problem is None else ("unknown", None)

    async def consume(self, session: ConnectSession) -> bool:
        """Atomically ends the session; False when another request ended it first."""
        if await self.store.pop_ephemeral(sessions.SESSION_NAMESPACE, session.session_id) is None:
            return False
        await self.store.put_ephemeral(
            sessions.USED_NAMESPACE,
            session.session_id,
            {"secret_hash": session.secret_hash, "connection_id": session.connection_id, "at": time.time()},
            sessions.USED_TTL_S,
        )
        return True

    async def restore(self, session: ConnectSession) -> None:
        """Puts a consumed session back after a failed save, so the user can retry the link."""
        await self.store.pop_ephemeral(sessions.USED_NAMESPACE, session.session_id)
        ttl = session.expires_at - time.time() + EXPIRED_GRACE_S
        if ttl > 0:
            await self.store.put_ephemeral(
                sessions.SESSION_NAMESPACE, session.session_id, session.to_dict(), ttl
            )

    # --- the form ------------------------------------------------------------------------------------

    async def form_scope(self, session: ConnectSession, integration: Integration) -> FormScope:
        """What the page shows and accepts: public values (the connection's, else its default's),
        stored secret names, and which fields are the operator's."""
        tid = session.tenant_id
        default = None
        if session.default_connection_id:
            default = await self.store.get_connection(tid, session.default_connection_id)
        existing = await self.store.get_connection(tid, session.connection_id)
        settable = destinations.user_settable_fields(
            integration, session.user_settable, default, bool(session.runtime_user_id)
        )
        values: dict[str, Any] = {}
        if default is not None:
            values.update(default.public_params)
        if existing is not None:
            values.update(existing.public_params)
        # The operator's destination values, in order of authority: the preset, then (runtime
        # users) the default connection, then what the connection already holds.
        locked: dict[str, Any] = {}
        for name in integration.destination_names - set(settable):
            if session.runtime_user_id and default is not None and name in default.public_params:
                locked[name] = default.public_params[name]
            elif existing is not None and name in existing.public_params:
                locked[name] = existing.public_params[name]
        locked.update(session.parameters)
        values.update(locked)
        secrets_set: set[str] = set(existing.secret_params) if existing is not None else set()
        if existing is not None and any(
            existing.public_params.get(n) != v for n, v in locked.items() if integration.is_destination(n)
        ):
            secrets_set = set()  # a new destination: the stored secrets must be entered again
        hidden = frozenset((integration.destination_names - set(settable)) | set(session.parameters))
        defaults = {f.name: f.default for f in integration.fields if f.default is not None}
        host = destinations.destination_host(integration, {**defaults, **values})
        return FormScope(values, secrets_set, hidden, settable, locked, host)

    async def save(
        self,
        session: ConnectSession,
        integration: Integration,
        params: dict[str, Any],
        tokens: flows.TokenSet | None = None,
    ) -> ConnectionRecord:
        """Writes the user's parameters (or tokens) into the connection: the shell an admin made,
        or a new one, with the operator's destination values (``FormScope.locked``) over
        anything else. A destination the user chose within bounds becomes the connection's
        host binding. ``None`` values clear a public parameter."""
        tid, cid = session.tenant_id, session.connection_id
        scope = await self.form_scope(session, integration)
        chosen = {n for n in scope.settable if params.get(n) is not None}
        params = {**params, **scope.locked}
        existing = await self.store.get_connection(tid, cid)
        binding: tuple[str, ...] | None = existing.allowed_hosts if existing is not None else None
        if chosen:
            defaults = {f.name: f.default for f in integration.fields if f.default is not None}
            public_now = dict(existing.public_params) if existing is not None else {}
            host = destinations.destination_host(integration, {**defaults, **public_now, **params})
            if host is None:
                raise ValidationError(
                    "the destination you entered does not make a valid address",
                    fields={n: "does not make a valid address" for n in chosen},
                )
            binding = (host,)
        given = {k: v for k, v in params.items() if v is not None}
        public, secret = await self.vault.encrypt_params(tid, cid, integration, given)
        if existing is not None:
            new_public = {**existing.public_params, **public}
            for name, value in params.items():
                if value is None:
                    new_public.pop(name, None)
            record = existing.evolve(
                public_params=new_public,
                secret_params={**existing.secret_params, **secret},
                status=ConnectionStatus.ACTIVE.value,  # recomputed by the vault from what is present
                status_detail=None,
                runtime_user_id=session.runtime_user_id or existing.runtime_user_id,
                default_connection_id=session.default_connection_id or existing.default_connection_id,
                allowed_hosts=binding,
            )
        else:
            record = ConnectionRecord(
                tenant_id=tid,
                connection_id=cid,
                integration_id=integration.id,
                public_params=public,
                secret_params=secret,
                runtime_user_id=session.runtime_user_id,
                default_connection_id=session.default_connection_id,
                rate_limits=parse_rate_limits(list(integration.default_rate_limits)),
                allowed_hosts=binding,
                metadata={"created_via": "connect"},
            )
        if tokens is not None:
            record = await self.tokens.merge_tokens(record, tokens)
        return await self.vault.save(record, existing.version if existing else None)

    # --- OAuth2 --------------------------------------------------------------------------------------

    async def oauth_client(
        self, tid: str, integration: Integration, existing: ConnectionRecord | None, default_id: str | None
    ) -> ClientConfig:
        params: dict[str, Any] = {}
        if existing is not None:
            params = dict((await self.vault.decrypt(existing)).params)
            default_id = default_id or existing.default_connection_id
        return await self.tokens.client_config(
            integration.id, params, tenant_id=tid, default_connection_id=default_id
        )

    async def begin_oauth(self, session: ConnectSession, integration: Integration) -> tuple[str, str, str]:
        """Stores a single-use state for this session and a new browser binding; returns the
        provider URL and the binding cookie (name, value) the browser must bring back.
        Raises ``OAuthConfigError`` (not set up) or ``HostNotAllowed`` (plain-http endpoint)."""
        existing = await self.store.get_connection(session.tenant_id, session.connection_id)
        client = await self.oauth_client(
            session.tenant_id, integration, existing, session.default_connection_id
        )
        client.require("authorization_code")
        assert client.auth_url is not None
        self.tokens.check_endpoint(client.auth_url)
        now = time.time()
        verifier = oauth_state.new_code_verifier() if client.pkce else None
        state, browser = oauth_state.new_state(), oauth_state.new_browser_binding()
        pending = oauth_state.PendingAuthorization(
            tenant_id=session.tenant_id,
            connection_id=session.connection_id,
            session_id=session.session_id,
            browser_hash=oauth_state.binding_hash(browser),
            redirect_uri=f"{self.settings.public_url}/oauth/callback",
            created_at=now,
            code_verifier=verifier,
        )
        ttl = min(oauth_state.STATE_TTL_S, session.expires_at - now)
        await self.store.put_ephemeral(oauth_state.STATE_NAMESPACE, state, pending.to_dict(), ttl)
        url = flows.authorization_url(
            client,
            redirect_uri=pending.redirect_uri,
            state=state,
            code_challenge=oauth_state.code_challenge(verifier) if verifier else None,
        )
        return url, oauth_state.binding_cookie_name(state), browser

    async def take_state(
        self, value: str | None, cookies: Mapping[str, str]
    ) -> tuple[oauth_state.PendingAuthorization | None, ConnectSession | None, str | None]:
        """Pops the state (single use, even when refused) and checks its bindings.

        Returns (pending, session, problem) with problem one of "state" (unknown, expired or
        used), "used" / "expired" (the session ended meanwhile), "session" or "browser" (bound
        elsewhere).
        """
        if not oauth_state.well_formed(value):
            return None, None, "state"
        data = await self.store.pop_ephemeral(oauth_state.STATE_NAMESPACE, value)
        if data is None:
            return None, None, "state"
        pending = oauth_state.PendingAuthorization.from_dict(data)
        raw = await self.store.get_ephemeral(sessions.SESSION_NAMESPACE, pending.session_id)
        session = ConnectSession.from_dict(raw) if raw is not None else None
        if session is None and await self.store.get_ephemeral(sessions.USED_NAMESPACE, pending.session_id):
            return pending, None, "used"
        if session is None or session.expires_at <= time.time():
            return pending, None, "expired"
        browser = cookies.get(oauth_state.binding_cookie_name(value))
        problem = pending.binding_problem(browser_value=browser, session_id=session.session_id)
        if problem is None and (session.tenant_id, session.connection_id) != (
            pending.tenant_id,
            pending.connection_id,
        ):
            problem = "session"
        return pending, session, problem

    async def issuer_problem(self, session: ConnectSession, iss: str | None) -> str | None:
        """Why the callback's ``iss`` (RFC 9207) must be refused, or None (``flows.issuer_problem``)."""
        integration = self.catalogue.get(session.integration_id)
        existing = await self.store.get_connection(session.tenant_id, session.connection_id)
        client = await self.oauth_client(
            session.tenant_id, integration, existing, session.default_connection_id
        )
        return flows.issuer_problem(client, iss)

    async def finish_oauth(
        self, session: ConnectSession, pending: oauth_state.PendingAuthorization, code: str
    ) -> flows.TokenSet:
        integration = self.catalogue.get(session.integration_id)
        existing = await self.store.get_connection(session.tenant_id, session.connection_id)
        client = await self.oauth_client(
            session.tenant_id, integration, existing, session.default_connection_id
        )
        return await self.tokens.exchange_code(
            client, code=code, redirect_uri=pending.redirect_uri, code_verifier=pending.code_verifier
        )
