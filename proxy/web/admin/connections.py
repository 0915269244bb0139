"""``/admin/tenants/{t}/connections[/{c}]``: create or replace (PUT), merge (PATCH), read, list,
revoke and delete.

Why it exists: the HTTP side of ``proxy.vault.connections``: bodies become the declared
``ConnectionBody`` (``proxy.vault.inputs``), ``If-Match`` the version a write is conditional on,
``?cascade=true`` the consent to delete a default's runtime user connections; answers are the
redacted view with the version as ``ETag``, never cached.
"""

from __future__ import annotations

from aiohttp import web

from proxy.model import ConnectionRecord
from proxy.vault.connections import Connections
from proxy.vault.inputs import patch_body, put_body
from proxy.web.admin.common import admin_actor, if_match, limit, path_id, query_id
from proxy.web.authn import services_of
from proxy.web.bodies import read_json_object

__all__ = ["delete_connection", "get_connection", "list_connections", "patch_connection", "put_connection"]


def _connections(request: web.Request) -> Connections:
    svc = services_of(request.app)
    return Connections(svc.vault, svc.tokens, svc.audit)


def _view(connections: Connections, record: ConnectionRecord, status: int = 200) -> web.Response:
    resp = web.json_response(connections.view(record), status=status)
    resp.headers["ETag"] = f'"{record.version}"'
    resp.headers["Cache-Control"] = "no-store"
    return resp


async def put_connection(request: web.Request) -> web.Response:
    actor = await admin_actor(request)
    tid, cid = path_id(request, "tenant_id"), path_id(request, "connection_id")
    body = put_body(await read_json_object(request))
    connections = _connections(request)
    plan = await connections.check_put(tid, cid, body)  # a bad body is answered before If-Match is read
    written = await connections.put(plan, if_match(request), actor)
    return _view(connections, written.record, 201 if written.created else 200)


async def patch_connection(request: web.Request) -> web.Response:
    actor = await admin_actor(request)
    tid, cid = path_id(request, "tenant_id"), path_id(request, "connection_id")
    body = patch_body(await read_json_object(request))
    connections = _connections(request)
    record = await connections.patch(tid, cid, body, if_match(request), actor)
    return _view(connections, record)


async def get_connection(request: web.Request) -> web.Response:
    await admin_actor(request)
    tid, cid = path_id(request, "tenant_id"), path_id(request, "connection_id")
    connections = _connections(request)
    return _view(connections, await connections.get(tid, cid))


async def delete_connection(request: web.Request) -> web.Response:
    actor = await admin_actor(request)
    tid, cid = path_id(request, "tenant_id"), path_id(request, "connection_id")
    cascade = request.query.get("cascade", "").lower() in ("1", "true", "yes")
    await _connections(request).delete(tid, cid, cascade=cascade, actor=actor)
    return web.Response(status=204)


async def list_connections(request: web.Request) -> web.Response:
    await admin_actor(request)
    tid = path_id(request, "tenant_id")
    connections = _connections(request)
    page = await connections.list(
        tid,
        runtime_user_id=query_id(request, "runtime_user_id"),
        integration_id=query_id(request, "integration_id"),
        default_connection_id=query_id(request, "default_connection_id"),
        cursor=request.query.get("cursor") or None,
        limit=limit(request),
    )
    items = [connections.view(r) for r in page.items]
    return web.json_response({"items": items, "next_cursor": page.next_cursor})
