"""What every admin handler does first: authenticate, read path ids, and a few query and header
forms shared by several resources (``limit``, an id filter, ``If-Match``).

Why it exists: the admin resources answer these the same way (same status, same field name,
same message), so they are written once.
"""

from __future__ import annotations

from aiohttp import web

from proxy.errors import ValidationError
from proxy.model import check_id
from proxy.observe.audit import Actor
from proxy.web.authn import caller_for, require_admin
from proxy.web.errors import request_id_of

__all__ = ["admin_actor", "if_match", "limit", "path_id", "query_id"]


async def admin_actor(request: web.Request) -> Actor:
    """The admin caller, as the audit trail names it; 401/403 for anyone else."""
    caller = await caller_for(request, allow_trusted=False)
    require_admin(caller)
    return Actor(caller.actor, request_id_of(request))


def path_id(request: web.Request, name: str) -> str:
    return check_id(name, request.match_info[name])


def query_id(request: web.Request, name: str) -> str | None:
    value = request.query.get(name)
    return check_id(name, value) if value else None


def limit(request: web.Request) -> int:
    raw = request.query.get("limit", "100")
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 4) or not 1 <= int(raw) <= 1000:
        raise ValidationError("limit must be an integer from 1 to 1000", fields={"limit": "must be 1-1000"})
    return int(raw)


def if_match(request: web.Request) -> int | None:
    """The version an ``If-Match`` header names (``"3"``, ``W/"3"`` or ``3``), or None."""
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
