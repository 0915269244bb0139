"""The Runtara Connection Service: ``GET {prefix}/{tenant_id}/{connection_id}`` (+ ``/metadata``).

Runtara workflows fetch a connection before every external call and accept only exactly 200 with
``parameters`` and a non-null string ``integration_id``; anything else fails the step. Hence:

- Unknown connection, invalid id, or a connection of another tenant (for a tenant-bound key or
  JWT): the same 404 ``CONNECTION_NOT_FOUND``, so a key of tenant A learns nothing about B.
- A *pending* or *needs_reauth* connection has no usable credentials: 424
  ``CONNECTION_NOT_AUTHORIZED`` with how to connect it, rather than a 200 with empty parameters
  the agent would misuse. A connection in *error* still answers 200: its credentials exist, and
  ``/metadata`` reports ``INVALID_CREDENTIALS``.
- Proxy-only connections (the connection's ``options.proxy_only``, its tenant's flag, or
  ``proxy_only_tenants``) answer only their non-secret parameters: secrets stay in the service.
- ``rate_limit``: Runtara calls the upstream directly after a fetch that says "not limited", so
  for a connection with configured windows each successful fetch *is* one call and is counted
  (``acquire``); a denied fetch consumes nothing and answers ``is_limited: true`` with
  ``retry_after_ms``. Proxy-only connections are counted by the proxy itself, so their fetches
  only ``peek``. The key is omitted when nothing limits the connection.
- The service's own per-caller quota (``service_quota_per_minute``) answers 429 with an integer
  ``Retry-After``, as the seed contract says.

URL tolerance: ids may be raw or percent-encoded (``tenant%3A1``), the prefix may carry a path,
and the ``//`` a client makes from a base URL with a trailing slash is accepted. The path is
split on its raw form, so an encoded ``%2F`` can never shift the segments.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import unquote

from aiohttp import web

from proxy.cache import BoundedCache
from proxy.catalogue import AuthKind, Integration
from proxy.errors import ConnectionNotFound, ProxyError, RateLimited, ValidationError
from proxy.model import ID_RE, AuditEvent, Caller, ConnectionRecord, RateWindow, not_authorized
from proxy.observe.metrics import CONNECTION_SERVICE
from proxy.observe.outcome import Outcome, of_error
from proxy.ratelimit.limiter import Limiter, LimitTarget
from proxy.ratelimit.targets import limit_target
from proxy.vault.records import Credentials
from proxy.web.authn import not_found, services_of
from proxy.web.errors import request_id_of

if TYPE_CHECKING:
    from proxy.services import Services

STATUS_MAP: Final = {
    "active": "ACTIVE",
    "needs_reauth": "REQUIRES_RECONNECTION",
    "error": "INVALID_CREDENTIALS",
    # A pending shell has never held credentials; what the caller must do is the same as for an
    # expired grant: (re)connect it. UNKNOWN would hide that actionable fact.
    "pending": "REQUIRES_RECONNECTION",
}
READ: Final = "credential.read"
UNLIMITED_TTL_S: Final = 0.25
METADATA: Final = "connection.metadata"


def _parse_path(request: web.Request, prefix: str) -> tuple[str, str, bool] | None:
    """(tenant, connection, is_metadata) from the raw path, or None when it is no such URL."""
    raw = request.raw_path.split("?", 1)[0]
    if not raw.startswith(prefix):
        return None
    segments = [unquote(s) for s in raw[len(prefix) :].split("/") if s]
    metadata = len(segments) == 3 and segments[2] == "metadata"
    if len(segments) != 2 and not metadata:
        return None
    tid, cid = segments[0], segments[1]
    if not ID_RE.match(tid) or not ID_RE.match(cid):
        return None
    return tid, cid, metadata


def _runtime_user(request: web.Request) -> str | None:
    value = request.headers.get("X-Runtime-User-Id")
    if not value and request.query_string:
        value = request.query.get("runtime_user_id")
    if not value:
        return None
    if not ID_RE.match(value):
        raise ValidationError(
            "X-Runtime-User-Id must be an identifier (letters, digits and . _ : @ + = ~ -)",
            fields={"runtime_user_id": "invalid identifier"},
        )
    return value


class _Targets:
    """Limit targets built once per connection version: building and hashing them per request
    costs more than the limiter's own arithmetic."""

    MAX = 10000

    def __init__(self) -> None:
        self._conn: BoundedCache[tuple[str, str, int], LimitTarget] = BoundedCache(self.MAX)
        # scope -> until when it is known to be unlimited (the value is the expiry itself).
        self._unlimited: BoundedCache[str, float] = BoundedCache(self.MAX)

    def known_unlimited(self, scope: str) -> bool:
        until = self._unlimited.get(scope)
        return until is not None and until > time.monotonic()

    def mark_unlimited(self, scope: str) -> None:
        # Only "nothing limits this connection" is cached, and briefly: a limit learned by the
        # proxy shows here within UNLIMITED_TTL_S, and a limited state is never served stale.
        self._unlimited.put(scope, time.monotonic() + UNLIMITED_TTL_S)

    def connection(self, record: ConnectionRecord, integration: Integration) -> LimitTarget:
        key = (record.tenant_id, record.connection_id, record.version)
        target = self._conn.get(key)
        if target is None:
            # The same target the proxy enforces, so rate_limit reports the state it acts on.
            target = self._conn.put(key, limit_target(record, integration))
        return target


class _Quota:
    """The service's own per-caller quota, enforced by the shared limiter in small leases.

    Asking the limiter (a Redis round trip when shared) on every request would cost more than
    the rest of the request. Instead a process takes ``lease`` units at once and spends them
    locally; near the limit it falls back to single units, so a caller is refused exactly when
    the quota is spent, give or take one unspent lease per process (at most 1% of the quota,
    and nothing at all for quotas under 200/min).
    """

    MAX = 10000

    def __init__(self, limiter: Limiter, per_minute: int) -> None:
        self.limiter = limiter
        self.per_minute = per_minute
        self.window = (RateWindow(per_minute, 60.0),)
        self.lease = max(1, min(50, per_minute // 100))
        self._targets: BoundedCache[str, LimitTarget] = BoundedCache(self.MAX)
        # Unspent lease units per caller; cleared with _targets, which bounds the callers seen.
        self._left: dict[str, int] = {}

    async def check(self, actor: str) -> None:
        left = self._left.get(actor, 0)
        if left > 0:
            self._left[actor] = left - 1
            return
        target = self._targets.get(actor)
        if target is None:
            if len(self._targets) >= self.MAX:
                self._left.clear()  # unspent leases are forgotten with the targets they came from
            target = self._targets.put(actor, LimitTarget(scope=f"_svc/{actor}", windows=self.window))
        if self.lease > 1:
            decision = await self.limiter.acquire(target, self.lease)
            if decision.allowed:
                self._left[actor] = self._left.get(actor, 0) + self.lease - 1
                return
        decision = await self.limiter.acquire(target, 1)
        if not decision.allowed:
            raise RateLimited(
                f"this caller exceeded the Connection Service quota of {self.per_minute} requests "
                "per minute; retry after Retry-After seconds",
                retry_after_ms=decision.retry_after_ms,
                source="service_quota",
            )


async def _rate_limit(
    svc: Services, targets: _Targets, creds: Credentials, proxy_only: bool
) -> dict[str, Any] | None:
    target = targets.connection(creds.record, creds.integration)
    if target.windows and not proxy_only:
        decision = await svc.limiter.acquire(target)
        state = decision.state
        # This fetch is the grant for the caller's next call: is_limited answers "may I call
        # now?", not "would one more call pass?" (which is what the post-consume state says).
        return {
            "is_limited": not decision.allowed,
            "remaining": state.remaining,
            "reset_at": state.reset_at,
            "retry_after_ms": None if decision.allowed else decision.retry_after_ms,
        }
    if targets.known_unlimited(target.scope):
        return None
    state = await svc.limiter.peek(target)
    if not target.windows and state.source is None and not state.is_limited:
        targets.mark_unlimited(target.scope)
        return None
    return state.to_contract()


async def _fresh(svc: Services, creds: Credentials) -> tuple[Credentials, dict[str, Any]]:
    """OAuth2 authorization-code connections hand out a current access token (refreshed here,
    single-flight, when it is about to expire), so agents never need the refresh token flow."""
    if creds.integration.auth != AuthKind.OAUTH2_AUTHORIZATION_CODE:
        return creds, dict(creds.params)
    token = await svc.tokens.access_token(creds)
    if token != creds.params.get("access_token"):
        record = creds.record
        creds = await svc.vault.credentials(record.tenant_id, record.connection_id)
    params = dict(creds.params)
    params["access_token"] = token
    return creds, params


def _json(body: dict[str, Any]) -> web.Response:
    return web.Response(
        body=json.dumps(body, separators=(",", ":")).encode(),
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


class _ConnectionService:
    """Per-app state of the front end, bound once so the hot path does no lookups."""

    def __init__(self, svc: Services) -> None:
        self.svc = svc
        self.prefix = svc.settings.connection_service_prefix
        self.flags = svc.tenant_flags
        self.targets = _Targets()
        self.quota = _Quota(svc.limiter, svc.settings.service_quota_per_minute)
        self.ok = CONNECTION_SERVICE.labels(outcome=Outcome.OK)

    async def handle(self, request: web.Request) -> web.Response:
        try:
            resp = await self._handle(request)
        except ProxyError as exc:
            CONNECTION_SERVICE.labels(outcome=of_error(exc)).inc()
            raise
        self.ok.inc()
        return resp

    async def _handle(self, request: web.Request) -> web.Response:
        svc = self.svc
        caller = await svc.auth.authenticate(request.headers, request.remote, allow_trusted=True)
        parsed = _parse_path(request, self.prefix)
        if parsed is None:
            raise ConnectionNotFound(
                f"no such Connection Service URL: use {self.prefix}/{{tenant_id}}/{{connection_id}} "
                "or .../metadata with valid ids"
            )
        tid, cid, metadata = parsed
        rid = request_id_of(request)
        action = METADATA if metadata else READ
        audit = svc.audit
        try:
            await self.quota.check(caller.actor)
        except RateLimited as exc:
            audit.record_use(caller.actor, tid, cid, action, of_error(exc), rid)
            raise
        if not caller.may_access(tid):
            # In the caller's own trail, as every front end records a cross-tenant refusal: the
            # named tenant and connection are the caller's choice, and writing them into that
            # tenant's trail would let any key fill another tenant's audit history.
            if caller.tenant_id is not None:
                audit.record_use(caller.actor, caller.tenant_id, None, action, Outcome.DENIED, rid)
            raise not_found(tid, cid)
        resolved = await svc.vault.resolve(tid, cid, _runtime_user(request))
        try:
            creds = await svc.vault.credentials(tid, resolved)
        except ProxyError as exc:
            audit.record_use(caller.actor, tid, resolved, action, of_error(exc), rid)
            if exc.status == 404:
                raise not_found(tid, cid) from None
            raise
        record = creds.record
        if metadata:
            audit.record_use(caller.actor, tid, resolved, action, Outcome.OK, rid)
            return _json(
                {
                    "connectionId": record.connection_id,
                    "integrationId": record.integration_id,
                    "connectionSubtype": record.connection_subtype,
                    "status": STATUS_MAP.get(record.status, "UNKNOWN"),
                }
            )
        if record.needs_connecting:
            refusal = not_authorized(record)
            audit.record_use(caller.actor, tid, resolved, action, of_error(refusal), rid)
            raise refusal
        proxy_only = record.proxy_only or await self.flags.proxy_only(tid)
        if proxy_only:
            params = creds.public_params()
        else:
            creds, params = await _fresh(svc, creds)
        body: dict[str, Any] = {
            "parameters": params,
            "integration_id": record.integration_id,
            "connection_subtype": record.connection_subtype,
        }
        rate_limit = await _rate_limit(svc, self.targets, creds, proxy_only)
        if rate_limit is not None:
            body["rate_limit"] = rate_limit
        await _audit_release(svc, caller, creds, proxy_only, rid)
        return _json(body)


async def _audit_release(
    svc: Services, caller: Caller, creds: Credentials, proxy_only: bool, rid: str
) -> None:
    record = creds.record
    outcome = Outcome.OK_PUBLIC_ONLY if proxy_only else Outcome.OK
    if svc.settings.audit_required and not proxy_only:
        # The credential leaves only once its release is on record.
        await svc.audit.record_required(
            AuditEvent(
                ts=time.time(),
                tenant_id=record.tenant_id,
                action=READ,
                actor=caller.actor,
                outcome=outcome,
                connection_id=record.connection_id,
                request_id=rid,
                detail={"count": 1},
            )
        )
    else:
        svc.audit.record_use(caller.actor, record.tenant_id, record.connection_id, READ, outcome, rid)


def setup(app: web.Application) -> None:
    front = _ConnectionService(services_of(app))
    # One catch-all route: the handler splits the raw path itself (see the module docstring).
    # GET only: a HEAD would count against the connection's limits without a body to use.
    app.router.add_get(front.prefix + "/{tail:.*}", front.handle, allow_head=False)
