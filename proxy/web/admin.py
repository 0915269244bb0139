"""The admin API: connections, tenant API keys, tenant settings, the audit trail, the catalogue.

Admin-token only (401 without a valid credential, 403 for tenant keys and JWTs). Secrets are
write-only: every answer, list and error carries the redacted view (``vault.redacted_view``),
and validation errors name fields, never values. Every change is audited. Writes are
compare-and-set on the record version: ``If-Match: <version>`` makes a lost race a 409 instead
of a silent overwrite.
"""

from __future__ import annotations

import logging
from datetime import datetime

from aiohttp import web

from proxy.errors import ValidationError
from proxy.model import ConnectionRecord, check_id
from proxy.observe.audit import Actor
from proxy.security.api_keys import ApiKeys, api_key_body
from proxy.shapes import raise_problems
from proxy.store.base import AuditQuery
from proxy.vault.connections import Connections
from proxy.vault.inputs import patch_body, put_body
from proxy.vault.tenants import Tenants, tenant_body
from proxy.web.authn import caller_for, require_admin, services_of
from proxy.web.bodies import read_json_object
from proxy.web.errors import request_id_of

log = logging.getLogger("proxy.admin")


# --- request helpers ---------------------------------------------------------------------------


async def _admin(request: web.Request) -> Actor:
    """The admin caller, as the audit trail names it; 401/403 for anyone else."""
    caller = await caller_for(request, allow_trusted=False)
    require_admin(caller)
    return Actor(caller.actor, request_id_of(request))


def _connections(request: web.Request) -> Connections:
    svc = services_of(request.app)
    return Connections(svc.vault, svc.tokens, svc.audit)


def _path_id(request: web.Request, name: str) -> str:
    return check_id(name, request.match_info[name])


def _if_match(request: web.Request) -> int | None:
    raw = request.headers.get("If-Match")
    if raw is None:
        return None
    text = raw.strip().removeprefix("W/").strip('"')
    if not (text.isascii() and text.isdigit() and len(text) <= 18):  # "²".isdigit() is True
        raise ValidationError(
            "If-Match must be the connection's version number (from GET or the last write)",
            fields={"If-Match": "must be a version number"},
        )
    return int(text)


def _view(connections: Connections, record: ConnectionRecord, status: int = 200) -> web.Response:
    resp = web.json_response(connections.view(record), status=status)
    resp.headers["ETag"] = f'"{record.version}"'
    resp.headers["Cache-Control"] = "no-store"
    return resp


# --- connections -------------------------------------------------------------------------------


async def put_connection(request: web.Request) -> web.Response:
    actor = await _admin(request)
    tid, cid = _path_id(request, "tenant_id"), _path_id(request, "connection_id")
    body = put_body(await read_json_object(request))
    connections = _connections(request)
    plan = await connections.check_put(tid, cid, body)  # a bad body is answered before If-Match is read
    written = await connections.put(plan, _if_match(request), actor)
    return _view(connections, written.record, 201 if written.created else 200)


async def patch_connection(request: web.Request) -> web.Response:
    actor = await _admin(request)
    tid, cid = _path_id(request, "tenant_id"), _path_id(request, "connection_id")
    body = patch_body(await read_json_object(request))
    connections = _connections(request)
    record = await connections.patch(tid, cid, body, _if_match(request), actor)
    return _view(connections, record)


async def get_connection(request: web.Request) -> web.Response:
    await _admin(request)
    tid, cid = _path_id(request, "tenant_id"), _path_id(request, "connection_id")
    connections = _connections(request)
    return _view(connections, await connections.get(tid, cid))


async def delete_connection(request: web.Request) -> web.Response:
    actor = await _admin(request)
    tid, cid = _path_id(request, "tenant_id"), _path_id(request, "connection_id")
    cascade = request.query.get("cascade", "").lower() in ("1", "true", "yes")
    await _connections(request).delete(tid, cid, cascade=cascade, actor=actor)
    return web.Response(status=204)


def _limit(request: web.Request) -> int:
    raw = request.query.get("limit", "100")
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 4) or not 1 <= int(raw) <= 1000:
        raise ValidationError("limit must be an integer from 1 to 1000", fields={"limit": "must be 1-1000"})
    return int(raw)


def _query_id(request: web.Request, name: str) -> str | None:
    value = request.query.get(name)
    return check_id(name, value) if value else None


async def list_connections(request: web.Request) -> web.Response:
    await _admin(request)
    tid = _path_id(request, "tenant_id")
    connections = _connections(request)
    page = await connections.list(
        tid,
        runtime_user_id=_query_id(request, "runtime_user_id"),
        integration_id=_query_id(request, "integration_id"),
        default_connection_id=_query_id(request, "default_connection_id"),
        cursor=request.query.get("cursor") or None,
        limit=_limit(request),
    )
    items = [connections.view(r) for r in page.items]
    return web.json_response({"items": items, "next_cursor": page.next_cursor})


# --- API keys ----------------------------------------------------------------------------------


def _api_keys(request: web.Request) -> ApiKeys:
    svc = services_of(request.app)
    return ApiKeys(svc.store, svc.auth, svc.audit)


async def create_api_key(request: web.Request) -> web.Response:
    actor = await _admin(request)
    tid = _path_id(request, "tenant_id")
    body = api_key_body(await read_json_object(request) if await request.read() else {})
    raise_problems(body.problems)
    record, full = await _api_keys(request).mint(tid, body.name, actor)
    # The full key is in this answer only; the store keeps its hash.
    resp = web.json_response({**record.public_view(), "api_key": full}, status=201)
    resp.headers["Cache-Control"] = "no-store"
    return resp


async def list_api_keys(request: web.Request) -> web.Response:
    await _admin(request)
    tid = _path_id(request, "tenant_id")
    keys = await _api_keys(request).list(tid)
    return web.json_response({"items": [k.public_view() for k in keys]})


async def revoke_api_key(request: web.Request) -> web.Response:
    actor = await _admin(request)
    tid, key_id = _path_id(request, "tenant_id"), request.match_info["key_id"]
    await _api_keys(request).revoke(tid, key_id, actor)
    return web.Response(status=204)


# --- tenants -----------------------------------------------------------------------------------


def _tenants(request: web.Request) -> Tenants:
    svc = services_of(request.app)
    return Tenants(svc.vault, svc.tenant_flags, svc.audit)


async def put_tenant(request: web.Request) -> web.Response:
    actor = await _admin(request)
    tid = _path_id(request, "tenant_id")
    body = tenant_body(await read_json_object(request))
    raise_problems(body.problems)
    view = await _tenants(request).set_proxy_only(tid, body.proxy_only, actor)
    return web.json_response(view.to_dict())


async def get_tenant(request: web.Request) -> web.Response:
    await _admin(request)
    tid = _path_id(request, "tenant_id")
    return web.json_response((await _tenants(request).get(tid)).to_dict())


# --- audit and catalogue -----------------------------------------------------------------------


# Year 9999: every bound the stores can turn into a key or a column comparison.
_MAX_TIME = 253402300799.0


def _time(request: web.Request, name: str) -> float | None:
    raw = request.query.get(name)
    if not raw:
        return None
    value: float | None
    try:
        value = float(raw)
    except ValueError:
        try:
            value = datetime.fromisoformat(raw.replace("Z", "+00:00")).timestamp()
        except (ValueError, OverflowError):
            value = None
    # float() also reads "nan", "inf" and "1e400" (inf): no store can page by those.
    if value is None or not 0.0 <= value <= _MAX_TIME:
        raise ValidationError(
            f"{name} must be a Unix time in seconds (0 to year 9999) or an ISO 8601 time",
            fields={name: "invalid time"},
        )
    return value


async def query_audit(request: web.Request) -> web.Response:
    await _admin(request)
    tid = _path_id(request, "tenant_id")
    q = request.query
    page = await services_of(request.app).store.query_audit(
        AuditQuery(
            tenant_id=tid,
            connection_id=q.get("connection_id") or None,
            action=q.get("action") or None,
            actor=q.get("actor") or None,
            outcome=q.get("outcome") or None,
            since=_time(request, "since"),
            until=_time(request, "until"),
            cursor=q.get("cursor") or None,
            limit=_limit(request),
        )
    )
    return web.json_response({"items": [e.to_dict() for e in page.items], "next_cursor": page.next_cursor})


async def list_integrations(request: web.Request) -> web.Response:
    await _admin(request)
    items = [
        {
            "id": i.id,
            "label": i.label,
            "auth": i.auth,
            "proxyable": i.proxyable,
            "fields": [
                {"name": f.name, "type": f.type, "secret": f.secret, "required": f.required, "label": f.label}
                for f in i.fields
            ],
        }
        for i in sorted(services_of(request.app).catalogue, key=lambda i: i.id)
    ]
    return web.json_response({"items": items})


async def accept_store_loss(request: web.Request) -> web.Response:
    """The operator's way out of a detected store loss without a backup: carry on with the store
    as it is now. Every replica that opened the lost store adopts the new identity."""
    await _admin(request)
    body = await read_json_object(request)
    if body.get("confirm") is not True:
        raise ValidationError(
            "accepting the store as it is now makes every replica serve from it again, and what it "
            "lost stays lost: connections, API keys and tenant keys must be created anew. Restore "
            'the backup instead if there is one; otherwise send {"confirm": true}',
            fields={"confirm": "required: true"},
        )
    svc = services_of(request.app)
    identity = await svc.store.accept_loss()
    # Re-records the key ring's fingerprints (lost with the rest) and proves it opens what is left.
    tenants = await svc.vault.verify_keys()
    return web.json_response({"status": "accepted", "store_id": identity, "tenants": tenants})


def setup(app: web.Application) -> None:
    conn = "/admin/tenants/{tenant_id}/connections/{connection_id}"
    r = app.router
    r.add_put(conn, put_connection)
    r.add_patch(conn, patch_connection)
    r.add_get(conn, get_connection)
    r.add_delete(conn, delete_connection)
    r.add_get("/admin/tenants/{tenant_id}/connections", list_connections)
    r.add_post("/admin/tenants/{tenant_id}/api-keys", create_api_key)
    r.add_get("/admin/tenants/{tenant_id}/api-keys", list_api_keys)
    r.add_delete("/admin/tenants/{tenant_id}/api-keys/{key_id}", revoke_api_key)
    r.add_get("/admin/tenants/{tenant_id}/audit", query_audit)
    r.add_put("/admin/tenants/{tenant_id}", put_tenant)
    r.add_get("/admin/tenants/{tenant_id}", get_tenant)
    r.add_get("/admin/integrations", list_integrations)
    r.add_post("/admin/store/accept-loss", accept_store_loss)
