"""Operations endpoints: liveness, readiness (store and Redis reachable, and still the store this
replica opened: a lost store answers 503 naming what happened and what to do), Prometheus metrics.

Readiness while the store is unreachable (``proxy.stale``): 200 with ``"status": "degraded"``
and the reason for as long as cached credentials may still be served (``stale_if_error_s`` from
the store's last answer), 503 after that or when stale serving is off. Why 200: readiness is a
per-replica signal, and a store outage is shared by every replica; answering 503 would make
Kubernetes remove *all* of them from the Service at once, so callers would get refused
connections instead of the answers the caches can still give. Alerting watches the
``proxy_store_degraded`` gauge and the degraded body instead.
"""

from __future__ import annotations

import asyncio
import time
from typing import Final

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from proxy.errors import ProxyError, ServiceUnavailable, StoreLost, StoreUnavailable
from proxy.observe.metrics import MULTIPROCESS, exposition, flush_tallies, sample_gauges_forever
from proxy.store.common import STORE_ID_KEY
from proxy.web.authn import services_of

# While the store is known down, readiness also reads a record: a ping alone does not prove
# reads work. Bounded, so a hanging store cannot hold the probe past Kubernetes' timeout.
PROBE_TIMEOUT_S: Final = 0.8


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _probe(request: web.Request) -> None:
    svc = services_of(request.app)
    await svc.store.ping()
    if svc.stale.down:
        try:
            await asyncio.wait_for(svc.store.get_meta(STORE_ID_KEY), PROBE_TIMEOUT_S)
        except TimeoutError:
            raise StoreUnavailable(f"the store did not answer a read within {PROBE_TIMEOUT_S} s") from None


async def readyz(request: web.Request) -> web.Response:
    svc = services_of(request.app)
    window = svc.stale
    try:
        await _probe(request)
    except StoreLost as exc:
        raise ServiceUnavailable(f"not ready: {exc.message}") from None
    except StoreUnavailable as exc:
        window.failed(exc)
        down_for = time.monotonic() - (window.down_since or time.monotonic())
        if not window.serving():
            why = (
                "stale serving is off (stale_if_error_s = 0)"
                if window.stale_s <= 0
                else f"cached credentials are past stale_if_error_s ({window.stale_s:g} s) and no longer served"
            )
            raise ServiceUnavailable(f"not ready: {exc.message}; {why}") from None
        return web.json_response(
            {
                "status": "degraded",
                "reason": f"store unreachable: {exc.message}",
                "store": svc.store.name,
                "store_id": svc.store.identity,
                "down_for_s": round(down_for, 1),
                "stale_if_error_s": window.stale_s,
                "stale_serving_left_s": round(window.remaining_s(), 1),
            }
        )
    except ProxyError as exc:
        raise ServiceUnavailable(f"not ready: {exc.message}") from None
    if window.down:
        window.ok()
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
