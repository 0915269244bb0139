"""``POST /admin/tenants/{t}/connections/{c}/test``: the integration's test request, sent through the
same ``Pipeline`` as every proxied call, with the stored credentials; a 401/403 marks the
connection ``error`` and a later success clears it.
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any

from aiohttp import web

from proxy.errors import Conflict, ConnectionNotFound, ProxyError, Unauthenticated
from proxy.model import ConnectionStatus, check_id
from proxy.observe.outcome import Outcome, of_status
from proxy.pipeline.exchange import Exchange
from proxy.web.authn import caller_for, require_admin, services_of
from proxy.web.errors import request_id_of
from proxy.web.proxy_routes import PIPELINE


async def test_connection(request: web.Request) -> web.Response:
    caller = await caller_for(request, allow_trusted=False)
    require_admin(caller)
    tenant = check_id("tenant_id", request.match_info["tenant_id"])
    cid = check_id("connection_id", request.match_info["connection_id"])
    svc = services_of(request.app)
    pipeline = request.app[PIPELINE]
    record = await svc.vault.get_record(tenant, cid)
    spec = svc.catalogue.get(record.integration_id).test_request or {}
    method = str(spec.get("method") or "GET").upper()
    path, _, query = str(spec.get("path") or "").partition("?")
    spec_headers = spec.get("headers") or {}
    headers = [(str(k), str(v)) for k, v in spec_headers.items()] if isinstance(spec_headers, dict) else []
    body = json.dumps(spec["body"]).encode() if spec.get("body") is not None else None
    if body is not None and not any(k.lower() == "content-type" for k, _ in headers):
        headers.append(("Content-Type", "application/json"))

    ex: Exchange | None = None
    status: int | None = None
    error: str | None = None
    message: str | None = None
    started = time.monotonic()
    try:
        ex = await pipeline.prepare(
            caller=caller,
            tenant_id=tenant,
            connection_id=cid,
            runtime_user_id=None,
            method=method,
            caller_headers=headers,
            path=path,
            query=query,
            request_id=request_id_of(request),
            max_wait_ms=0,
            retries=0,
        )
        up = await pipeline.open(ex, body)
        status = up.status
        up.close()
    except (ConnectionNotFound, Unauthenticated):
        raise
    except ProxyError as exc:
        error, message = exc.code, exc.message
    finally:
        pipeline.finish(ex, "test", error or (of_status(status) if status else Outcome.ERROR), status)
    latency_ms = round((time.monotonic() - started) * 1000, 1)
    ok = status is not None and 200 <= status < 400
    await _record_test_result(request, tenant, cid, status, ok)
    result: dict[str, Any] = {"ok": ok, "status": status, "latency_ms": latency_ms, "error": error}
    if message:
        result["message"] = message
    return web.json_response(result)


async def _record_test_result(
    request: web.Request, tenant: str, cid: str, status: int | None, ok: bool
) -> None:
    """401/403 marks the connection ``error``; a later success clears it. needs_reauth is OAuth's."""
    svc = services_of(request.app)
    record = await svc.vault.get_record(tenant, cid)
    if status in (401, 403) and record.status == ConnectionStatus.ACTIVE.value:
        updated = record.evolve(
            status=ConnectionStatus.ERROR.value,
            status_detail=f"the test request got HTTP {status} from the upstream: the credentials "
            "were refused; update them",
        )
    elif ok and record.status == ConnectionStatus.ERROR.value:
        updated = record.evolve(status=ConnectionStatus.ACTIVE.value, status_detail=None)
    else:
        return
    with contextlib.suppress(Conflict):  # changed meanwhile: the newer write wins
        await svc.vault.save(updated, record.version)


def setup(app: web.Application) -> None:
    app.router.add_post("/admin/tenants/{tenant_id}/connections/{connection_id}/test", test_connection)
