"""``/admin/tenants/{t}/audit``: the tenant's audit trail, newest first, filtered and paged.

Why it exists: turning the query string into the store's ``AuditQuery`` is all there is to it,
and the time bounds have rules of their own (Unix seconds or ISO 8601, within what every store
can page by).
"""

from __future__ import annotations

from datetime import datetime
from typing import Final

from aiohttp import web

from proxy.errors import ValidationError
from proxy.store.base import AuditQuery
from proxy.web.admin.common import admin_actor, limit, path_id
from proxy.web.authn import services_of

__all__ = ["query_audit"]

# Year 9999: every bound the stores can turn into a key or a column comparison.
_MAX_TIME: Final = 253402300799.0


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
    await admin_actor(request)
    tid = path_id(request, "tenant_id")
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
            limit=limit(request),
        )
    )
    return web.json_response({"items": [e.to_dict() for e in page.items], "next_cursor": page.next_cursor})
