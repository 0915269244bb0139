"""The web edge: a built ``Services`` in, a runnable aiohttp application out.

Handlers only translate HTTP to calls of the core and back; the services themselves are built,
started and stopped by ``proxy.services`` (the composition root), which this module hooks into
aiohttp's start-up and clean-up signals.
"""

from __future__ import annotations

from aiohttp import web

from proxy import services as services_mod
from proxy.services import Services, build_services
from proxy.settings import Settings
from proxy.web import (
    admin,
    admin_tenants_list,
    connect,
    connsvc,
    conntest,
    decide,
    envelope,
    openapi,
    ops,
    proxy_routes,
    ratelimits,
    tunnel,
)
from proxy.web.authn import SERVICES as SERVICES
from proxy.web.errors import error_middleware

__all__ = ["SERVICES", "Services", "build_app", "build_services"]


async def _startup(app: web.Application) -> None:
    await services_mod.start(app[SERVICES])


async def _cleanup(app: web.Application) -> None:
    await services_mod.stop(app[SERVICES])


def build_app(settings: Settings, services: Services | None = None) -> web.Application:
    svc = services or build_services(settings)
    app = web.Application(middlewares=[error_middleware], client_max_size=settings.max_request_body_bytes)
    # Admin/JSON bodies are small; the proxy streams its bodies and is not bound by this. A 413
    # names the limit and the setting (proxy.web.errors).
    app[SERVICES] = svc
    # The forward-proxy front end inspects absolute-form targets before routing.
    proxy_routes.setup(app)
    decide.setup(app)  # /_decide for nginx in front, on the same pipeline
    envelope.setup(app)  # Runtara's envelope front end, on the same pipeline
    conntest.setup(app)
    tunnel.setup(app)  # CONNECT interception and GET /ca.pem
    ops.setup(app)
    admin.setup(app)
    admin_tenants_list.setup(app)
    ratelimits.setup(app)
    connsvc.setup(app)
    connect.setup(app)
    openapi.setup(app)  # GET /openapi.json: built from the routes above at start-up
    app.on_startup.append(_startup)
    decide.setup_listener(app)  # after the services start: it answers at once
    app.on_cleanup.append(_cleanup)
    return app
