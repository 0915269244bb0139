"""``/admin/tenants/{t}/api-keys``: mint (the key shown once), list, revoke.

Why it exists: the HTTP side of ``proxy.security.api_keys``; an empty body mints an unnamed key.
"""

from __future__ import annotations

from aiohttp import web

from proxy.security.api_keys import ApiKeys, api_key_body
from proxy.shapes import raise_problems
from proxy.web.admin.common import admin_actor, path_id
from proxy.web.authn import services_of
from proxy.web.bodies import read_json_object

__all__ = ["create_api_key", "list_api_keys", "revoke_api_key"]


def _api_keys(request: web.Request) -> ApiKeys:
    svc = services_of(request.app)
    return ApiKeys(svc.store, svc.auth, svc.audit)


async def create_api_key(request: web.Request) -> web.Response:
    actor = await admin_actor(request)
    tid = path_id(request, "tenant_id")
    body = api_key_body(await read_json_object(request) if await request.read() else {})
    raise_problems(body.problems)
    record, full = await _api_keys(request).mint(tid, body.name, actor)
    # The full key is in this answer only; the store keeps its hash.
    resp = web.json_response({**record.public_view(), "api_key": full}, status=201)
    resp.headers["Cache-Control"] = "no-store"
    return resp


async def list_api_keys(request: web.Request) -> web.Response:
    await admin_actor(request)
    tid = path_id(request, "tenant_id")
    keys = await _api_keys(request).list(tid)
    return web.json_response({"items": [k.public_view() for k in keys]})


async def revoke_api_key(request: web.Request) -> web.Response:
    actor = await admin_actor(request)
    tid, key_id = path_id(request, "tenant_id"), request.match_info["key_id"]
    await _api_keys(request).revoke(tid, key_id, actor)
    return web.Response(status=204)
