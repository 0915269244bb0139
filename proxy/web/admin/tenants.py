"""``/admin/tenants/{t}``: a tenant's settings (``proxy_only``), read and written.

Why it exists: the HTTP side of ``proxy.vault.tenants``.
"""

from __future__ import annotations

from aiohttp import web

from proxy.shapes import raise_problems
from proxy.vault.tenants import Tenants, tenant_body
from proxy.web.admin.common import admin_actor, path_id
from proxy.web.authn import services_of
from proxy.web.bodies import read_json_object

__all__ = ["get_tenant", "put_tenant"]


def _tenants(request: web.Request) -> Tenants:
    svc = services_of(request.app)
    return Tenants(svc.vault, svc.tenant_flags, svc.audit)


async def put_tenant(request: web.Request) -> web.Response:
    actor = await admin_actor(request)
    tid = path_id(request, "tenant_id")
    body = tenant_body(await read_json_object(request))
    raise_problems(body.problems)
    view = await _tenants(request).set_proxy_only(tid, body.proxy_only, actor)
    return web.json_response(view.to_dict())


async def get_tenant(request: web.Request) -> web.Response:
    await admin_actor(request)
    tid = path_id(request, "tenant_id")
    return web.json_response((await _tenants(request).get(tid)).to_dict())
