"""Request -> ``Caller``, shared by every front end so they all authenticate the same way.

Handlers call ``caller_for`` first, then one of the ``require_*`` checks:

- ``require_admin``: admin routes. No or bad credential -> 401; a valid non-admin credential
  (tenant key, JWT) -> 403, so a caller can tell "who are you?" from "not allowed".
- ``require_tenant_access``: a tenant-bound caller touching another tenant -> 403, or, with
  ``conceal=True``, the same 404 ``CONNECTION_NOT_FOUND`` an unknown connection gets. The
  Connection Service and the proxy use ``conceal=True`` so a key of tenant A cannot even learn
  which connections tenant B has.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from proxy.errors import ConnectionNotFound, Forbidden
from proxy.model import Caller

if TYPE_CHECKING:
    from proxy.services import Services

# Defined here rather than in proxy.web.app (which re-exports it): app imports every web module,
# and every request looks it up, so it must not cost an import per call.
SERVICES: web.AppKey[Services] = web.AppKey("services")


def services_of(app: web.Application) -> Services:
    return app[SERVICES]


async def caller_for(
    request: web.Request, *, allow_trusted: bool, app: web.Application | None = None
) -> Caller:
    """The authenticated caller; raises Unauthenticated. Each handler asks once per request."""
    auth = (app or request.app)[SERVICES].auth
    # The peer address only matters where trusted networks may stand in for a credential.
    peer = request.remote if allow_trusted else None
    return await auth.authenticate(request.headers, peer, allow_trusted=allow_trusted)


def require_admin(caller: Caller) -> None:
    if caller.kind != "admin":
        raise Forbidden(
            "the admin API needs the admin token (Authorization: Bearer <admin token>); "
            "tenant API keys and JWTs cannot use it"
        )


def not_found(tenant_id: str, connection_id: str) -> ConnectionNotFound:
    return ConnectionNotFound(
        f"connection {connection_id!r} does not exist in tenant {tenant_id!r} or is not visible "
        "to this caller"
    )


def require_tenant_access(
    caller: Caller, tenant_id: str, *, conceal: bool = False, connection_id: str = ""
) -> None:
    if caller.may_access(tenant_id):
        return
    if conceal:
        raise not_found(tenant_id, connection_id)
    raise Forbidden(f"this caller is bound to another tenant and cannot use tenant {tenant_id!r}")


__all__ = ["SERVICES", "caller_for", "not_found", "require_admin", "require_tenant_access", "services_of"]
