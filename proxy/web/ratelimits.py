"""Rate-limit state as a resource: the admin view, an admin reset, and caller reports.

Workflows that call an API directly (an SFTP agent, a client outside the proxy) can report the
status and rate-limit headers they saw; the report is parsed and merged exactly like the proxy's
own observations, so every replica and every later ``rate_limit`` answer reflects it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from aiohttp import web

from proxy.errors import ValidationError
from proxy.model import check_id
from proxy.observe.metrics import RATELIMIT_OBSERVATIONS
from proxy.ratelimit.signals import core as signals
from proxy.ratelimit.targets import limit_target
from proxy.vault.records import Credentials
from proxy.web.authn import caller_for, require_admin, require_tenant_access, services_of
from proxy.web.bodies import read_json_object

MAX_REPORTED_HEADERS = 100


def _headers(raw: Any) -> list[tuple[str, str]]:
    """Accepts {"name": "value"} or [["name", "value"], ...] (repeated headers)."""
    pairs: Iterable[Any]
    if isinstance(raw, dict):
        pairs = raw.items()
    elif isinstance(raw, list):
        pairs = raw
    else:
        raise ValidationError(
            "headers must be an object or a list of [name, value] pairs", fields={"headers": "wrong type"}
        )
    out = []
    for item in pairs:
        if not isinstance(item, list | tuple) or len(item) != 2 or not all(isinstance(x, str) for x in item):
            raise ValidationError(
                "each header must be a [name, value] pair of strings", fields={"headers": "bad pair"}
            )
        out.append((item[0], item[1]))
    if len(out) > MAX_REPORTED_HEADERS:
        raise ValidationError(
            f"at most {MAX_REPORTED_HEADERS} headers per report", fields={"headers": "too many"}
        )
    return out


async def _credentials(request: web.Request, tenant_id: str, connection_id: str, admin: bool) -> Credentials:
    svc = services_of(request.app)
    caller = await caller_for(request, allow_trusted=not admin)
    if admin:
        require_admin(caller)
    else:
        require_tenant_access(caller, tenant_id, conceal=True, connection_id=connection_id)
    check_id("tenant_id", tenant_id)
    check_id("connection_id", connection_id)
    runtime_user = request.headers.get("X-Runtime-User-Id") or request.query.get("runtime_user_id")
    if runtime_user:
        check_id("runtime_user_id", runtime_user)
    resolved = await svc.vault.resolve(tenant_id, connection_id, runtime_user or None)
    record = await svc.vault.get_record(tenant_id, resolved)
    return Credentials(record=record, integration=svc.catalogue.get(record.integration_id), params={})


async def report_observation(request: web.Request) -> web.Response:
    """POST {prefix}/{tenant_id}/{connection_id}/observations"""
    tid, cid = request.match_info["tenant_id"], request.match_info["connection_id"]
    creds = await _credentials(request, tid, cid, admin=False)
    body = await read_json_object(request)
    unknown = sorted(set(body) - {"status", "headers", "observed_at"})
    if unknown:
        raise ValidationError(
            f"unknown fields: {', '.join(unknown)}", fields={k: "unknown field" for k in unknown}
        )
    status = body.get("status")
    if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599:
        raise ValidationError(
            "status must be the HTTP status code you received (100-599)", fields={"status": "invalid"}
        )
    headers = _headers(body.get("headers", {}))
    now = time.time()
    observed_at = body.get("observed_at", now)
    if (
        isinstance(observed_at, bool)
        or not isinstance(observed_at, int | float)
        or not now - 3600 <= observed_at <= now + 60
    ):
        raise ValidationError(
            "observed_at must be the epoch seconds when the response arrived (within the last hour)",
            fields={"observed_at": "invalid"},
        )
    obs = signals.parse_response(
        status, headers, now=float(observed_at), styles=creds.integration.ratelimit_styles
    )
    svc = services_of(request.app)
    target = limit_target(creds.record, creds.integration)
    if not obs.is_empty():
        await svc.limiter.observe(target.scope, obs, quota_key=target.quota_key)
    else:
        RATELIMIT_OBSERVATIONS.labels(style="none").inc()
    state = await svc.limiter.peek(target)
    return web.json_response(
        {
            "accepted": not obs.is_empty(),
            "styles": list(obs.styles),
            "blocked_until": obs.blocked_until,
            "policies": len(obs.policies),
            "rate_limit": state.to_contract(),
        },
        status=202,
    )


async def describe(request: web.Request) -> web.Response:
    """GET /admin/tenants/{tenant_id}/connections/{connection_id}/rate-limits"""
    tid, cid = request.match_info["tenant_id"], request.match_info["connection_id"]
    creds = await _credentials(request, tid, cid, admin=True)
    svc = services_of(request.app)
    target = limit_target(creds.record, creds.integration)
    view = await svc.limiter.describe(target)
    # The contract's rate_limit object is the described state without its source (one read).
    rate_limit = {k: v for k, v in view["state"].items() if k != "source"}
    return web.json_response({"rate_limit": rate_limit, **view})


async def reset(request: web.Request) -> web.Response:
    """DELETE /admin/tenants/{tenant_id}/connections/{connection_id}/rate-limits: forget learned state."""
    tid, cid = request.match_info["tenant_id"], request.match_info["connection_id"]
    creds = await _credentials(request, tid, cid, admin=True)
    svc = services_of(request.app)
    target = limit_target(creds.record, creds.integration)
    await svc.limiter.reset(target.scope, quota_key=target.quota_key)
    return web.Response(status=204)


def setup(app: web.Application) -> None:
    prefix = services_of(app).settings.connection_service_prefix
    r = app.router
    r.add_post(prefix + "/{tenant_id}/{connection_id}/observations", report_observation)
    path = "/admin/tenants/{tenant_id}/connections/{connection_id}/rate-limits"
    r.add_get(path, describe)
    r.add_delete(path, reset)
