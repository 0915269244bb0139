"""Operations endpoints: liveness, readiness (store and Redis reachable), Prometheus metrics."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from proxy.errors import ProxyError, ServiceUnavailable
from proxy.metrics import REGISTRY


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    from proxy.web.app import SERVICES

    svc = request.app[SERVICES]
    try:
        await svc.store.ping()
    except ProxyError as exc:
        raise ServiceUnavailable(f"not ready: {exc.message}") from None
    return web.json_response({"status": "ready", "store": svc.store.name})


async def metrics(request: web.Request) -> web.Response:
    resp = web.Response(body=generate_latest(REGISTRY))
    resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return resp


def setup(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
