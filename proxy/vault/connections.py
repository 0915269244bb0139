"""Connections as an operator changes them: create or replace, merge, read, list, revoke and delete.

Why it exists: these rules sat in the admin HTTP handlers, where nothing else could use them and
no test could reach them without a server. They are the vault's business:

- **checks beyond the body's shape**: parameters against the integration (its own validation,
  OAuth ``auth_params``, the redaction placeholder sent as if it were a secret), an explicit base
  URL, and the runtime user pairing (``runtime_user_id`` with a ``default_connection_id`` that
  names another tenant connection which is itself a default). They join the shape's problems
  (``proxy.vault.inputs``) in one 422.
- **compare-and-set writes**: every write is conditional on the version read. With the caller's
  ``if_match`` a lost race is the caller's 409; without one, a write that lost to another writer
  is redone on the new version (``CAS_ATTEMPTS`` times), while a conflict that is not a race
  (the version did not move) is answered at once.
- **PATCH merge rules**: parameters merge into the stored ones; a secret sent as the redaction
  placeholder keeps the stored secret, null removes a parameter; new parameters let the vault
  recompute the status (a sticky ``needs_reauth`` ends with new credentials).
- **delete**: a default connection with runtime user connections needs ``cascade``; each
  connection's tokens are revoked upstream first where the integration can (never blocking the
  local delete).
- **audit**: every change, naming fields and parameter names, never values.

Reads go through the vault (``find_record``/``get_record``/``list_records``), and writes through
``Vault.save``, which applies the destination rules whoever writes. No aiohttp: the admin edge
(``proxy.web.admin``) turns requests into these calls and their results into answers.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

from proxy.catalogue import AuthKind, Catalogue, Integration
from proxy.errors import Conflict
from proxy.model import ConnectionRecord, parse_rate_limits
from proxy.oauth import flows
from proxy.observe.audit import Actor, AuditLog
from proxy.pipeline.urls import validate_base_url
from proxy.shapes import UNSET, Problems, Unset, raise_problems
from proxy.store.base import ExpectedVersion, Page
from proxy.vault.inputs import ConnectionBody
from proxy.vault.records import REDACTED, Credentials, redacted_view
from proxy.vault.vault import Vault

__all__ = ["CAS_ATTEMPTS", "Connections", "PutPlan", "Revoker", "Written"]

log = logging.getLogger("proxy.admin")

CAS_ATTEMPTS: Final = 3
# Runtime user connections one cascade removes (the store pages them; more are a later delete).
DEPENDENTS_MAX: Final = 1000


class Revoker(Protocol):
    """Upstream token revocation (``proxy.oauth.tokens.TokenManager``): per token kind, what
    happened ("revoked", "failed", "skipped"); it should not raise, and a raise is survived."""

    async def revoke(self, creds: Credentials) -> dict[str, str]: ...


@dataclass(frozen=True, slots=True)
class PutPlan:
    """A PUT body that passed every check: what ``Connections.put`` writes."""

    tenant_id: str
    connection_id: str
    integration: Integration
    parameters: Mapping[str, Any]
    settings: dict[str, Any]  # record fields, rate limits always among them


@dataclass(frozen=True, slots=True)
class Written:
    record: ConnectionRecord
    created: bool


def _given(value: Any) -> Any:
    return None if isinstance(value, Unset) else value


class Connections:
    def __init__(self, vault: Vault, revoker: Revoker, audit: AuditLog) -> None:
        self.vault = vault
        self.revoker = revoker
        self.audit = audit

    @property
    def catalogue(self) -> Catalogue:
        return self.vault.catalogue

    def view(self, record: ConnectionRecord) -> dict[str, Any]:
        """The admin view of a record: redacted, always."""
        return redacted_view(self.catalogue.get(record.integration_id), record)

    # --- reads ---------------------------------------------------------------------------------

    async def get(self, tenant_id: str, connection_id: str) -> ConnectionRecord:
        """The record; ``ConnectionNotFound`` when there is none."""
        return await self.vault.get_record(tenant_id, connection_id)

    async def list(
        self,
        tenant_id: str,
        *,
        runtime_user_id: str | None = None,
        integration_id: str | None = None,
        default_connection_id: str | None = None,
        cursor: str | None = None,
        limit: int = 100,
    ) -> Page:
        return await self.vault.list_records(
            tenant_id,
            runtime_user_id=runtime_user_id,
            integration_id=integration_id,
            default_connection_id=default_connection_id,
            cursor=cursor,
            limit=limit,
        )

    # --- create or replace -----------------------------------------------------------------------

    async def check_put(self, tenant_id: str, connection_id: str, body: ConnectionBody) -> PutPlan:
        """A PUT body checked against the catalogue and the tenant's connections; one
        ``ValidationError`` naming every problem, the body's own included. Separate from ``put``
        so that a caller's version condition is read only for a body worth writing."""
        problems = dict(body.problems)
        integration = None if "integration_id" in problems else self.catalogue.get(body.integration_id)
        params = body.params()
        if integration is not None:
            self._check_params(integration, params, problems, redacted_ok=False)
            self._check_base_url(integration, params, problems)
        await self._check_runtime_user(
            tenant_id,
            connection_id,
            _given(body.runtime_user_id),
            _given(body.default_connection_id),
            problems,
        )
        raise_problems(problems)
        assert integration is not None
        settings = body.settings()
        if "rate_limits" not in settings:
            settings["rate_limits"] = parse_rate_limits(list(integration.default_rate_limits))
        return PutPlan(tenant_id, connection_id, integration, params, settings)

    async def put(self, plan: PutPlan, if_match: int | None, actor: Actor) -> Written:
        """Creates or replaces the connection (``if_match``: only over that version)."""
        tid, cid, integration = plan.tenant_id, plan.connection_id, plan.integration
        public, secret = await self.vault.encrypt_params(tid, cid, integration, plan.parameters)
        for _ in range(CAS_ATTEMPTS):
            existing = await self.vault.find_record(tid, cid)
            expected: ExpectedVersion = (
                if_match if if_match is not None else (existing.version if existing else None)
            )
            record = ConnectionRecord(
                tenant_id=tid,
                connection_id=cid,
                integration_id=integration.id,
                public_params=public,
                secret_params=secret,
                created_at=existing.created_at if existing else 0.0,
                **plan.settings,
            )
            try:
                stored = await self.vault.save(record, expected)
            except Conflict:
                if if_match is not None or not await self._version_moved(tid, cid, existing):
                    raise  # a CAS the caller asked for, or a uniqueness conflict: not a race to retry
                continue
            created = existing is None
            self.audit.change(
                actor,
                tid,
                "connection.create" if created else "connection.replace",
                cid,
                version=stored.version,
                integration_id=integration.id,
                parameters=sorted(plan.parameters),
            )
            return Written(stored, created)
        raise Conflict(f"connection {cid!r} kept changing while it was being written; retry")

    # --- merge -------------------------------------------------------------------------------------

    async def patch(
        self, tenant_id: str, connection_id: str, body: ConnectionBody, if_match: int | None, actor: Actor
    ) -> ConnectionRecord:
        """Merges the body into the stored connection (``if_match``: only into that version)."""
        tid, cid = tenant_id, connection_id
        for _ in range(CAS_ATTEMPTS):
            current = await self.vault.get_record(tid, cid)
            problems = dict(body.problems)
            if body.integration_id is not UNSET and body.integration_id != current.integration_id:
                problems["integration_id"] = "cannot change with PATCH; replace the connection with PUT"
            integration = self.catalogue.get(current.integration_id)
            changes = body.params()
            self._check_params(
                integration, {k: v for k, v in changes.items() if v is not None}, problems, redacted_ok=True
            )
            public = dict(current.public_params)
            secret = dict(current.secret_params)
            updates = {}
            for name, value in changes.items():
                if value is None:
                    public.pop(name, None)
                    secret.pop(name, None)
                elif not (value == REDACTED and integration.is_secret(name)):
                    updates[name] = value
            self._check_base_url(integration, {**public, **updates}, problems)
            settings = body.settings()
            if "runtime_user_id" in settings or "default_connection_id" in settings:
                runtime_user = settings.get("runtime_user_id", current.runtime_user_id)
                default = settings.get("default_connection_id", current.default_connection_id)
                await self._check_runtime_user(tid, cid, runtime_user, default, problems)
            raise_problems(problems)
            new_public, new_secret = await self.vault.encrypt_params(tid, cid, integration, updates)
            public.update(new_public)
            secret.update(new_secret)
            for name in new_public:
                secret.pop(name, None)
            if body.parameters is not UNSET:
                # New credentials clear a sticky needs_reauth/error: the vault recomputes the status.
                settings.update(public_params=public, secret_params=secret, status="pending")
            expected = if_match if if_match is not None else current.version
            try:
                stored = await self.vault.save(current.evolve(**settings), expected)
            except Conflict:
                if if_match is not None or not await self._version_moved(tid, cid, current):
                    raise
                continue
            self.audit.change(
                actor,
                tid,
                "connection.update",
                cid,
                version=stored.version,
                fields=body.sent(),
                parameters=sorted(changes),
            )
            return stored
        raise Conflict(f"connection {cid!r} kept changing while it was being updated; retry")

    # --- delete --------------------------------------------------------------------------------------

    async def delete(self, tenant_id: str, connection_id: str, *, cascade: bool, actor: Actor) -> None:
        """Revokes and removes the connection, and with ``cascade`` its runtime user connections."""
        record = await self.vault.get_record(tenant_id, connection_id)
        # Runtime user connections of this default would silently fall back to nothing: refuse
        # unless the caller asks for them to go too.
        page = await self.vault.list_records(
            tenant_id, default_connection_id=connection_id, limit=DEPENDENTS_MAX
        )
        dependents: list[ConnectionRecord] = page.items
        if dependents and not cascade:
            raise Conflict(
                f"connection {connection_id!r} is the default of {len(dependents)} runtime user "
                f"connection(s) (e.g. {dependents[0].connection_id!r}); delete those first, or repeat "
                "with ?cascade=true to revoke and delete them too",
                fields={"connection_id": "has runtime user connections"},
            )
        for dependent in dependents:
            await self._revoke_and_delete(dependent, actor)
        await self._revoke_and_delete(record, actor)

    async def _revoke_and_delete(self, record: ConnectionRecord, actor: Actor) -> None:
        tid, cid = record.tenant_id, record.connection_id
        revocation: Any = None
        if record.secret_params:
            try:
                # Per token kind: revoked / failed / skipped (the token manager never raises here).
                revocation = await self.revoker.revoke(await self.vault.decrypt(record))
            except Exception as exc:  # the local delete must not depend on the upstream answering
                log.warning(
                    "upstream revocation of %s/%s failed (%s); deleting anyway", tid, cid, type(exc).__name__
                )
                revocation = {"error": type(exc).__name__}
        await self.vault.delete(tid, cid)
        self.audit.change(
            actor,
            tid,
            "connection.delete",
            cid,
            version=record.version,
            upstream_revocation=revocation or None,
        )

    # --- rules -----------------------------------------------------------------------------------------

    async def _version_moved(self, tid: str, cid: str, seen: ConnectionRecord | None) -> bool:
        now = await self.vault.find_record(tid, cid)
        return (now.version if now else None) != (seen.version if seen else None)

    @staticmethod
    def _check_params(
        integration: Integration, params: Mapping[str, Any], problems: Problems, *, redacted_ok: bool
    ) -> None:
        for key, problem in integration.validate_params(params).items():
            problems[key] = problem
        if (
            integration.auth == AuthKind.OAUTH2_AUTHORIZATION_CODE
            and params.get(flows.AUTH_PARAMS) is not None
        ):
            problems.update(flows.auth_params_problems(params[flows.AUTH_PARAMS]))
        for name, value in params.items():
            if not isinstance(name, str) or not name or len(name) > 200:
                problems["parameters"] = "parameter names must be non-empty strings"
            elif value == REDACTED and integration.is_secret(name) and not redacted_ok:
                problems[f"parameters.{name}"] = (
                    "is the redaction placeholder, not a value: send the real secret, or use PATCH "
                    "and leave the field out to keep it"
                )

    @staticmethod
    def _check_base_url(integration: Integration, public: Mapping[str, Any], problems: Problems) -> None:
        url = public.get("base_url")
        if integration.proxyable and integration.base_url is None and isinstance(url, str):
            problem = validate_base_url(url)
            if problem:
                problems["parameters.base_url"] = problem

    async def _check_runtime_user(
        self, tid: str, cid: str, runtime_user: Any, default: Any, problems: Problems
    ) -> None:
        if (runtime_user is None) != (default is None):
            problems["runtime_user_id" if runtime_user is None else "default_connection_id"] = (
                "runtime_user_id and default_connection_id must be given together"
            )
            return
        if default is None or "default_connection_id" in problems or "runtime_user_id" in problems:
            return
        if default == cid:
            problems["default_connection_id"] = "must name another connection"
            return
        target = await self.vault.find_record(tid, default)
        if target is None:
            problems["default_connection_id"] = "no such connection in this tenant"
        elif target.runtime_user_id is not None:
            problems["default_connection_id"] = "must name a default connection, not another runtime user's"
