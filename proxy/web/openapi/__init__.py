"""``GET /openapi.json``: the OpenAPI 3.1 document of every route this app serves.

Public, like ``/healthz`` and ``/ca.pem``: it describes the HTTP surface (which the README
documents anyway), never a tenant, a connection or a setting beyond the Connection Service
prefix and the public URL, and clients generate their code from it without an admin token.

One source, so it cannot drift: request bodies are the ``proxy.shapes`` declarations the
handlers parse with, error responses and their codes come from the ``proxy.errors`` tree, and
the paths come from the router itself (built once, at start-up, when the router is frozen).

Adding a route (for example a new decision endpoint for nginx): register it as usual, then add
one ``Operation`` to the table of its audience, ``ops_front.FRONT_OPERATIONS`` (data plane,
public routes) or ``ops_admin.ADMIN_OPERATIONS``::

    Operation(
        method="GET",                       # as registered; "*" for a route of every method
        route="/internal/decide",           # exactly the path given to the router
        tags=("proxy",),
        security=("tenantKey",),            # components/securitySchemes names; () is public
        spec={
            "summary": "...",
            "operationId": "decide",
            "parameters": [header("X-Connection-Id", "...", required=True)],
            "requestBody": body(SOME_SHAPE),   # a proxy.shapes declaration, when it takes JSON
            "responses": {"200": ok("...", {"type": "object"}), **errors(401, 404, 429)},
        },
    )

``tests/web/test_openapi.py`` fails while a registered route has no ``Operation`` (the service
still starts; the document lists it under ``x-undeclared-routes``), and the schemathesis test
then checks that the handler answers what the declaration says.
"""

from __future__ import annotations

import json
import logging

from aiohttp import web

from proxy.web.authn import services_of
from proxy.web.openapi.document import build

__all__ = ["DOCUMENT", "setup"]

log = logging.getLogger(__name__)

DOCUMENT = web.AppKey("openapi_document", bytes)


def routes_of(app: web.Application) -> list[tuple[str, str]]:
    """Every (method, canonical path) the app's router holds."""
    return [(r.method, r.resource.canonical) for r in app.router.routes() if r.resource is not None]


async def _build(app: web.Application) -> None:
    settings = services_of(app).settings
    built = build(routes_of(app), prefix=settings.connection_service_prefix, public_url=settings.public_url)
    if built.undeclared:
        log.warning(
            "routes missing from /openapi.json (declare them in proxy.web.openapi): %s",
            ", ".join(f"{m} {p}" for m, p in built.undeclared),
        )
    app[DOCUMENT] = json.dumps(built.document, separators=(",", ":")).encode()


async def openapi_json(request: web.Request) -> web.Response:
    return web.Response(
        body=request.app[DOCUMENT],
        content_type="application/json",
        headers={"Cache-Control": "public, max-age=300"},
    )


def setup(app: web.Application) -> None:
    app.router.add_get("/openapi.json", openapi_json)
    app.on_startup.append(_build)
