"""The one place where errors become HTTP responses.

Every ``ProxyError`` becomes ``{"error": CODE, "message": ...}`` with ``X-Proxy-Error: CODE``.
aiohttp's own HTTP exceptions (unknown route, wrong method, oversized body) are mapped into the
same shape. Anything else is a bug: it is logged with its traceback on the server and answered
as a generic 500 that carries the request id, never the exception text (which could hold a
secret). The connect pages (``/connect/...``, ``/oauth/callback``) are for end users in a
browser: their handlers render a ``ProxyError`` as an HTML page themselves (same status and
``X-Proxy-Error``), see ``proxy.web.connect``.
"""

from __future__ import annotations

import itertools
import json
import logging
import secrets
import traceback
from collections.abc import Awaitable, Callable

from aiohttp import web

from proxy import errors
from proxy.observe import logformat, trace
from proxy.observe.metrics import ERRORS

log = logging.getLogger("proxy.web")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
REQUEST_ID = web.RequestKey("request_id", str)
# Request ids need only be unique, not secret: a random per-process prefix and a counter are
# unique across replicas and restarts, and far cheaper than uuid4 on every request.
_RID_PREFIX = secrets.token_hex(6)
_RID_COUNTER = itertools.count(1)

_HTTP_MAP: dict[int, tuple[type[errors.ProxyError], str]] = {
    400: (errors.BadRequest, "the request is malformed"),
    404: (errors.NotFound, "no such endpoint; see the README for the HTTP surface"),
    405: (errors.MethodNotAllowed, "this endpoint does not accept that method"),
    413: (errors.PayloadTooLarge, "the request body is too large"),
}


def _too_large(request: web.Request) -> str:
    """A 413 names the limit and the setting that changes it (aiohttp's client_max_size)."""
    limit = request.client_max_size
    return (
        f"the request body is larger than the limit of {limit} bytes for this endpoint (setting "
        "max_request_body_bytes, PROXY_MAX_REQUEST_BODY_BYTES); path mode (/proxy/...) streams "
        "bodies of any size"
    )


def error_parts(exc: errors.ProxyError, request_id: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, JSON body) of ``exc``: the mapping every listener answers with."""
    ERRORS.labels(code=exc.code).inc()
    body = exc.to_body()
    if request_id:
        body["request_id"] = request_id
    headers = {"X-Proxy-Error": exc.code, **exc.headers}
    if request_id:
        headers["X-Request-Id"] = request_id
    return exc.status, headers, json.dumps(body).encode()


def error_response(exc: errors.ProxyError, request_id: str | None = None) -> web.Response:
    status, headers, body = error_parts(exc, request_id)
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


def request_id_of(request: web.BaseRequest) -> str:
    """The request's id: set by error_middleware for every request before any handler runs."""
    try:
        return request[REQUEST_ID]
    except KeyError:  # only outside the middleware (a handler called directly)
        return _assign_request_id(request)


def _assign_request_id(request: web.BaseRequest) -> str:
    rid = request_id_from(request.headers.get("X-Request-Id", ""))
    request[REQUEST_ID] = rid
    return rid


def request_id_from(incoming: str) -> str:
    """The caller's ``X-Request-Id`` when short and tame, else one of our own."""
    ok = 0 < len(incoming) <= 64 and all(c.isalnum() or c in "-_.:" for c in incoming)
    return incoming if ok else f"{_RID_PREFIX}{next(_RID_COUNTER):08x}"


# Requests whose target is not origin-form ("GET http://host/x", "CONNECT host:443") are not
# routed by path: the proxy's forward mode registers a dispatcher for them here. It runs inside
# the error mapping below, and ordinary requests pay one character comparison for it (a second
# middleware layer would cost every request a few microseconds).
NonOriginDispatcher = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]
NON_ORIGIN_FORM: web.AppKey[NonOriginDispatcher] = web.AppKey("non_origin_form_dispatcher")


_WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def _is_admin_write(request: web.Request) -> bool:
    return request.method in _WRITE_METHODS and request.path.startswith("/admin/")


def _write_refused(exc: errors.StoreUnavailable) -> errors.StoreUnavailable:
    """An admin change the store could not take, worded as such: while the store is unreachable
    the caches may still serve reads (proxy.stale), but nothing can be changed. A lost store
    (``StoreLost``) keeps its own message: it names the operator's way out."""
    if isinstance(exc, errors.StoreLost):
        return exc
    return errors.StoreUnavailable(
        f"the store is unreachable, so this change cannot be made now ({exc.message}); retry the "
        "request once the store is back (GET /readyz reports it)",
        headers={"Retry-After": "5", **exc.headers},
    )


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    rid = _assign_request_id(request)
    # The request's context (request and trace ids; what a proxied call reports): log records
    # made while it runs name it, and a proxied call gets its access line once answered.
    headers = request.headers
    parent = headers.get("traceparent")
    ctx, token = trace.begin(rid, parent, headers.get("tracestate") if parent else None)
    status: int | None = None
    try:
        resp = await _handle(request, handler, rid)
        status = resp.status
        return resp
    finally:
        if ctx.front is not None:
            logformat.access_line(ctx, status)
        trace.end(token)


async def _handle(request: web.Request, handler: Handler, rid: str) -> web.StreamResponse:
    try:
        if request.raw_path[:1] != "/":
            dispatch = request.app.get(NON_ORIGIN_FORM)
            if dispatch is not None:
                return await dispatch(request, handler)
        return await handler(request)
    except errors.ProxyError as exc:
        if isinstance(exc, errors.StoreUnavailable) and _is_admin_write(request):
            exc = _write_refused(exc)
        if exc.status >= 500:
            log.warning("request %s failed: %s %s", rid, exc.code, exc.message)
        return error_response(exc, rid)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        cls, message = _HTTP_MAP.get(exc.status, (errors.BadRequest, exc.reason))
        if exc.status == 413:
            message = _too_large(request)
        mapped = cls(message)
        if exc.status not in _HTTP_MAP:
            mapped.status = exc.status  # type: ignore[misc]
        return error_response(mapped, rid)
    except (ConnectionResetError, web.HTTPClientError):
        raise
    except Exception as exc:
        # The frames and the exception's type only: an exception's message may quote a value
        # (a URL with a query-string key, say), and logs must never hold a secret.
        log.error(
            "request %s: unexpected %s\n%s",
            rid,
            type(exc).__name__,
            "".join(traceback.format_tb(exc.__traceback__)),
        )
        return error_response(
            errors.ProxyError(f"internal error; quote request id {rid} when reporting it"), rid
        )
