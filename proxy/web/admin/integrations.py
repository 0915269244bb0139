"""``/admin/integrations``: the catalogue as operators see it, each integration's fields
(names, types, which are secret and required), never a value.

Why it exists: it is what ``integration_id`` errors and notices point operators at.
"""

from __future__ import annotations

from aiohttp import web

from proxy.web.admin.common import admin_actor
from proxy.web.authn import services_of

__all__ = ["list_integrations"]


async def list_integrations(request: web.Request) -> web.Response:
    await admin_actor(request)
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
