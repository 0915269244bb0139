"""Operations endpoints: liveness, readiness (store and Redis reachable, and still the store this
replica opened: a lost store answers 503 naming what happened and what to do), Prometheus metrics."""

from __future__ import annotations

import asyncio

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from proxy.errors import ProxyError, ServiceUnavailable
from proxy.observe.metrics import MULTIPROCESS, exposition, flush_tallies, sample_gauges_forever
from proxy.web.authn import services_of


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    svc = services_of(request.app)
    try:
        await svc.store.ping()
    except ProxyError as exc:
        raise ServiceUnavailable(f"not ready: {exc.message}") from None
    return web.json_response({"status": "ready", "store": svc.store.name, "store_id": svc.store.identity})


async def metrics(request: web.Request) -> web.Response:
    resp = web.Response(body=exposition())
    resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return resp


_SAMPLER = web.AppKey("gauge_sampler", asyncio.Task[None])


async def _start_sampler(app: web.Application) -> None:
    app[_SAMPLER] = asyncio.create_task(sample_gauges_forever(), name="gauge-sampler")


async def _stop_sampler(app: web.Application) -> None:
    app[_SAMPLER].cancel()
    flush_tallies()  # a stopping worker's last counts still reach the shared files


def setup(app: web.Application) -> None:
    if MULTIPROCESS:
        app.on_startup.append(_start_sampler)
        app.on_cleanup.append(_stop_sampler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
