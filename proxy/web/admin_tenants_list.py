"""``GET /admin/tenants``: the tenants the store knows, paged.

Operators had no way to see which tenants exist (``connection-proxy admin tenants list`` reads
this). A tenant exists once its key record does, which the first connection written for it
creates. Each item is the tenant's public view: its id, the ``proxy_only`` flag (stored and in
effect, as ``GET /admin/tenants/{t}`` answers it), when it was created and which data key
version is current; never the wrapped data keys.

Paging is by tenant id: ``limit`` (1-1000, default 100) and ``cursor``, the last id of the
previous page, so a page stays correct while tenants are added. Its own module (registered by
``proxy.web.app``) so the admin package can change around it.
"""

from __future__ import annotations

from aiohttp import web

from proxy.errors import ValidationError
from proxy.model import check_id
from proxy.web.authn import caller_for, require_admin, services_of

__all__ = ["list_tenants", "setup"]

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000


def _limit(request: web.Request) -> int:
    raw = request.query.get("limit", str(DEFAULT_LIMIT))
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 4) or not 1 <= int(raw) <= MAX_LIMIT:
        raise ValidationError(
            f"limit must be an integer from 1 to {MAX_LIMIT}", fields={"limit": f"must be 1-{MAX_LIMIT}"}
        )
    return int(raw)


async def list_tenants(request: web.Request) -> web.Response:
    require_admin(await caller_for(request, allow_trusted=False))
    svc = services_of(request.app)
    limit = _limit(request)
    cursor = request.query.get("cursor") or None
    if cursor is not None:
        check_id("cursor", cursor)
    configured = set(svc.settings.proxy_only_tenants)
    tenants = sorted(await svc.store.list_tenants(), key=lambda t: t.tenant_id)
    after = [t for t in tenants if cursor is None or t.tenant_id > cursor]
    page = after[:limit]
    items = [
        {
            "tenant_id": t.tenant_id,
            "proxy_only": t.proxy_only,
            "proxy_only_effective": t.proxy_only or t.tenant_id in configured,
            "created_at": t.created_at,
            "data_key_version": t.current_dek_version,
        }
        for t in page
    ]
    next_cursor = page[-1].tenant_id if len(after) > limit else None
    return web.json_response({"items": items, "next_cursor": next_cursor})


def setup(app: web.Application) -> None:
    app.router.add_get("/admin/tenants", list_tenants)
