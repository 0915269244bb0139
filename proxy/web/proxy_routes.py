"""The proxy's streaming front ends, path mode and forward-proxy mode, and the pieces every front end
shares (identity from the headers or a proxy URL, the relay, the disconnect watcher).

All of them run ``proxy.pipeline.pipeline.Pipeline``; this module only reads the call the way each
front end carries it and writes the answer back the way that front end expects:

- ``ANY /proxy/{path}`` (the contract's path mode): streams both ways, constant memory;
- absolute-form requests (``GET http://host/path HTTP/1.1``) to the service: forward-proxy mode,
  dispatched by the error middleware before the routed handler runs; ``CONNECT`` is intercepted
  by ``proxy.web.tunnel`` (TLS terminated here, every request in it relayed like path mode; no
  blind tunnels), and callers authenticate with the proxy URL's Basic credentials or Bearer.

Runtara's envelope (``proxy.web.envelope``) and the admin connection test (``proxy.web.conntest``)
build on the same pieces.

Streaming invariants: a body is never buffered in path or forward mode (except a small, replayable
one when retries are asked for); an upstream that breaks mid-body makes the client connection
abort, so the client sees a broken response rather than a complete-looking one; a client that
goes away cancels the upstream call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from proxy.errors import (
    MethodNotAllowed,
    ProxyAuthenticationRequired,
    ProxyError,
    Unauthenticated,
    UpstreamTimeout,
    UpstreamUnreachable,
    ValidationError,
)
from proxy.model import Caller, check_id
from proxy.observe.outcome import Outcome, of_error, of_status
from proxy.pipeline.exchange import Body, Exchange, parse_control_int, refuse_trace
from proxy.pipeline.headers import clean_response_headers, redact_secrets
from proxy.pipeline.pipeline import MAX_REPLAY_BODY, Pipeline
from proxy.pipeline.plan import MAX_RETRIES
from proxy.security.auth import ProxyUser, proxy_user
from proxy.web.authn import SERVICES, not_found, services_of
from proxy.web.errors import NON_ORIGIN_FORM, Handler, error_response, request_id_of

__all__ = [
    "CONNECT_HANDLER",
    "PIPELINE",
    "WATCHER",
    "DisconnectWatcher",
    "Identity",
    "audit_refusal",
    "forward_caller",
    "forward_target",
    "relay",
    "setup",
]

PIPELINE = web.AppKey("pipeline", Pipeline)
# CONNECT's handler, set by proxy.web.tunnel (which imports this module); unset: refused with 405.
CONNECT_HANDLER: web.AppKey[Handler] = web.AppKey("connect_handler")
CHUNK = 64 * 1024
DISCONNECT_POLL_S = 0.25
SMALL_BODY = 64 * 1024
_NO_BODY = frozenset({204, 304})
_PATH_PREFIX = "/proxy"


# --- shared pieces ----------------------------------------------------------------------------


class DisconnectWatcher:
    """Cancels a proxy handler when its client connection is gone.

    aiohttp runs handlers to completion after a disconnect unless the whole server is built with
    handler_cancellation; a proxied call must not keep an upstream busy for nobody. One timer
    sweeps every in-flight call's transport every ``DISCONNECT_POLL_S`` (registration is a dict
    insert, so the hot path pays nearly nothing); cancelling the handler task aborts the upstream
    request with it.
    """

    __slots__ = ("_active", "_handle")

    def __init__(self) -> None:
        self._active: dict[asyncio.Task[Any], web.BaseRequest] = {}
        self._handle: asyncio.TimerHandle | None = None

    def add(self, request: web.BaseRequest) -> asyncio.Task[Any] | None:
        task = asyncio.current_task()
        if task is not None:
            self._active[task] = request
            if self._handle is None:
                self._handle = asyncio.get_running_loop().call_later(DISCONNECT_POLL_S, self._sweep)
        return task

    def remove(self, task: asyncio.Task[Any] | None) -> None:
        if task is not None:
            self._active.pop(task, None)

    def _sweep(self) -> None:
        self._handle = None
        gone = [
            task
            for task, request in self._active.items()
            if request.transport is None or request.transport.is_closing()
        ]
        for task in gone:
            del self._active[task]
            task.cancel()
        if self._active:
            self._handle = asyncio.get_running_loop().call_later(DISCONNECT_POLL_S, self._sweep)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


WATCHER = web.AppKey("disconnect_watcher", DisconnectWatcher)


def _connection_id(value: str | None) -> str:
    if not value:
        raise ValidationError(
            "X-Connection-Id is required: name the connection whose credentials this call uses",
            fields={"X-Connection-Id": "required"},
        )
    return check_id("X-Connection-Id", value)


def tenant_for(caller: Caller, value: str | None, connection_id: str, header: str) -> str:
    """The tenant of the call: the caller's own, or ``header`` for admin/trusted callers."""
    if caller.tenant_id is None:
        if not value:
            raise ValidationError(
                f"{header} is required for callers not bound to a tenant (admin token, trusted "
                "network); tenant API keys imply their tenant",
                fields={header: "required"},
            )
        return check_id(header, value)
    if value and value != caller.tenant_id:
        raise not_found(value, connection_id)  # a key of tenant A cannot probe tenant B
    return caller.tenant_id


def runtime_user_of(value: str | None) -> str | None:
    return check_id("X-Runtime-User-Id", value) if value else None


async def _body(request: web.BaseRequest, ex: Exchange, idempotency_key: bool) -> Body:
    if not request.body_exists:
        return None
    length = request.content_length
    if ex.may_retry(idempotency_key) and length is not None and length <= MAX_REPLAY_BODY:
        return await request.read()  # small and replayable: the one case worth buffering
    return request.content


def _abort(request: web.BaseRequest) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()


async def _stream_back(
    request: web.BaseRequest, up: aiohttp.ClientResponse, outcome: str, scrub: tuple[str, ...]
) -> tuple[web.StreamResponse, str]:
    """Copy the upstream response to the client; returns it with the outcome to record.

    ``scrub``: the injected secret's forms, redacted from the headers (proxy-only connections).

    The returned response is always handed back to aiohttp as is: after a disconnect or an
    abort its final write fails quietly inside aiohttp, which is what we want.
    """
    length = up.content_length
    if length is not None and length <= SMALL_BODY and up.status not in _NO_BODY and request.method != "HEAD":
        # Small sized bodies (most API answers) go out in one write with the headers, and an
        # upstream that breaks off can still be answered with a clean 502.
        try:
            body = await up.read()
        except TimeoutError:
            raise UpstreamTimeout(
                "the upstream stalled in the middle of its response; raise the connection's "
                "timeouts option if the API is slow"
            ) from None
        except (aiohttp.ClientError, OSError):
            raise UpstreamUnreachable(
                "the upstream broke off its response mid-body; retry the call"
            ) from None
        # web.Response copies the list into its own multidict.
        headers = redact_secrets(clean_response_headers(up.headers.items()), scrub)
        return web.Response(status=up.status, reason=up.reason, body=body, headers=headers), outcome
    resp = web.StreamResponse(status=up.status, reason=up.reason)
    resp.headers.extend(redact_secrets(clean_response_headers(up.headers.items()), scrub))
    try:
        await resp.prepare(request)
    except ConnectionError:
        return resp, Outcome.CLIENT_DISCONNECTED
    content = up.content
    while True:
        try:
            chunk = await content.read(CHUNK)
        except (aiohttp.ClientError, OSError, TimeoutError):
            # Never end the response cleanly: the client must see that it is incomplete.
            _abort(request)
            return resp, "UPSTREAM_BROKEN"
        if not chunk:
            break
        try:
            await resp.write(chunk)
        except ConnectionError:
            return resp, Outcome.CLIENT_DISCONNECTED
    try:
        await resp.write_eof()
    except ConnectionError:
        return resp, Outcome.CLIENT_DISCONNECTED
    up.release()
    return resp, outcome


@dataclass(frozen=True, slots=True)
class Identity:
    """Who calls and with which connection, when the front end knows it before the relay
    (forward mode's Basic proxy user, a CONNECT tunnel); else it comes from the headers."""

    caller: Caller
    tenant_id: str
    connection_id: str
    runtime_user_id: str | None


PROXY_AUTHENTICATE = {"Proxy-Authenticate": 'Basic realm="connection-proxy"'}


def proxy_auth_required(message: str) -> ProxyAuthenticationRequired:
    return ProxyAuthenticationRequired(
        message + "; proxy URL form: http://CONNECTION_ID:API_KEY@host:port "
        "(or TENANT_ID%2FCONNECTION_ID as the user)",
        headers=PROXY_AUTHENTICATE,
    )


def header_target(caller: Caller, h: Mapping[str, str]) -> Identity:
    """The connection an authenticated caller names in its headers (path mode, and an nginx
    decision: the same call seen from nginx); 404 for another tenant's. Callers authenticate
    first, so nothing about the naming headers is told to an unknown caller."""
    cid = _connection_id(h.get("X-Connection-Id"))
    tenant = tenant_for(caller, h.get("X-Tenant-Id"), cid, "X-Tenant-Id")
    return Identity(caller, tenant, cid, runtime_user_of(h.get("X-Runtime-User-Id")))


async def forward_caller(request: web.BaseRequest, app: web.Application) -> tuple[Caller, ProxyUser | None]:
    """The authenticated caller of a forward-proxy request and what its proxy user names; 407."""
    h = request.headers
    try:
        caller = await app[SERVICES].auth.authenticate(h, None, allow_trusted=False)
        return caller, proxy_user(h)
    except Unauthenticated as exc:
        raise proxy_auth_required(exc.message) from None


def forward_target(caller: Caller, who: ProxyUser | None, h: Mapping[str, str]) -> Identity:
    """The connection an authenticated forward-proxy caller names; 404 for another tenant's."""
    if who is None:
        cid = _connection_id(h.get("X-Connection-Id"))
        tenant = tenant_for(caller, h.get("X-Tenant-Id"), cid, "X-Tenant-Id")
        return Identity(caller, tenant, cid, runtime_user_of(h.get("X-Runtime-User-Id")))
    if caller.tenant_id is None and who.tenant_id is None:
        raise proxy_auth_required(
            "this credential is not bound to a tenant: name it in the proxy user, TENANT_ID/CONNECTION_ID"
        )
    tenant = tenant_for(caller, who.tenant_id, who.connection_id, "the proxy user's tenant")
    return Identity(caller, tenant, who.connection_id, who.runtime_user_id)


async def proxy_path(
    request: web.Request, front: str = "path", absolute_url: str | None = None
) -> web.StreamResponse:
    """Path mode (the route's handler) and forward-proxy mode (``front="forward"`` with the
    absolute target): stream the call through and the answer back."""
    return await relay(request, request.app, front, absolute_url)


async def relay(
    request: web.BaseRequest,
    app: web.Application,
    front: str = "path",
    absolute_url: str | None = None,
    identity: Identity | None = None,
    *,
    upgrade_scheme: bool | None = None,
    expect_continue: bool = False,
) -> web.StreamResponse:
    """Stream one call through the pipeline and its answer back (every streaming front end).

    ``expect_continue``: answer ``100 Continue`` once the call is admitted, before its body is
    read (routed requests get that from aiohttp; a tunnel's requests do not)."""
    pipeline = app[PIPELINE]
    ex: Exchange | None = None
    up: aiohttp.ClientResponse | None = None
    outcome: str = Outcome.ERROR
    status: int | None = None
    caller: Caller | None = None if identity is None else identity.caller
    watcher = app[WATCHER]
    watched = watcher.add(request)
    try:
        refuse_trace(request.method)  # before anything else: nothing to authenticate for
        h = request.headers
        if identity is None:
            if front == "forward":
                caller, who = await forward_caller(request, app)
                identity = forward_target(caller, who, h)
            else:
                # The contract's trusted networks cover the Connection Service and the envelope only.
                caller = await app[SERVICES].auth.authenticate(h, None, allow_trusted=False)
                identity = header_target(caller, h)
        path = query = ""
        if absolute_url is None:
            path, _, query = request.raw_path.partition("?")
            if not (path == _PATH_PREFIX or path.startswith(_PATH_PREFIX + "/")):
                # e.g. "/%70roxy/..." matched the route after decoding; only the raw form is joined.
                raise ValidationError(
                    "path mode requests must start with a literal /proxy/", fields={"path": "invalid"}
                )
            path = path[len(_PATH_PREFIX) :]
        ex = await pipeline.prepare(
            caller=identity.caller,
            tenant_id=identity.tenant_id,
            connection_id=identity.connection_id,
            runtime_user_id=identity.runtime_user_id,
            method=request.method,
            caller_headers=h.items(),
            path=path,
            query=query,
            absolute_url=absolute_url,
            upgrade_scheme=absolute_url is not None if upgrade_scheme is None else upgrade_scheme,
            request_id=request_id_of(request),
            max_wait_ms=parse_control_int(h.get("X-Proxy-Max-Wait-Ms"), "X-Proxy-Max-Wait-Ms", 1 << 31),
            retries=parse_control_int(h.get("X-Proxy-Retries"), "X-Proxy-Retries", MAX_RETRIES),
        )
        if expect_continue:
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        idem = "Idempotency-Key" in h
        up = await pipeline.open(ex, await _body(request, ex, idem), idempotency_key=idem)
        status = up.status
        resp, outcome = await _stream_back(request, up, of_status(status), ex.scrub)
        return resp
    except ProxyError as exc:
        outcome = of_error(exc)
        if ex is None:  # refused before it became a use (a use is audited by finish)
            tenant, cid = (identity.tenant_id, identity.connection_id) if identity else (None, None)
            audit_refusal(pipeline, caller, tenant, cid, outcome, request_id_of(request))
        raise
    except asyncio.CancelledError:
        outcome = Outcome.CLIENT_DISCONNECTED
        raise
    finally:
        watcher.remove(watched)
        if up is not None and not up.closed:
            up.close()  # drops an upstream connection that was not released cleanly
        pipeline.finish(ex, front, outcome, status)


def audit_refusal(
    pipeline: Pipeline,
    caller: Caller | None,
    tenant_id: str | None,
    connection_id: str | None,
    outcome: str,
    rid: str,
    action: str = "proxy.use",
) -> None:
    """An authenticated caller's call refused before it became a use, with the error code, in
    the tenant it was resolved to. One refused before that (another tenant's connection named) is
    recorded in the caller's own tenant without the ids it named: never in the named tenant's
    trail, which any key could then fill. Unauthenticated refusals name no tenant but one the
    caller picked: metrics only."""
    if caller is None:
        return
    if tenant_id is None:
        if caller.tenant_id is None:
            return
        tenant_id, connection_id = caller.tenant_id, None
    pipeline.audit.record_use(caller.actor, tenant_id, connection_id, action, outcome, rid)


# --- forward-proxy mode -----------------------------------------------------------------------


async def forward_proxy(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Absolute-form targets are forward-proxy calls, whatever route their path would match
    (called by the error middleware for every request whose target is not a plain path)."""
    raw = request.raw_path
    if request.method == "CONNECT":
        intercept = request.app.get(CONNECT_HANDLER)
        if intercept is not None:
            return await intercept(request)
        error = MethodNotAllowed(
            "CONNECT is not served: no CA is configured for interception (set ca_cert_file and "
            "ca_key_file). Use http:// URLs through the proxy (upgraded to https when the "
            "connection's base URL is https) or path mode: /proxy/{path} with X-Connection-Id"
        )
        request.app[PIPELINE].finish(None, "forward", error.code)
        resp = error_response(error, request_id_of(request))
        resp.force_close()  # the client may already be sending tunnel bytes: never read them
        return resp
    if raw[:7].lower() == "http://" or raw[:8].lower() == "https://":
        return await proxy_path(request, "forward", raw)
    return await handler(request)


# --- wiring -----------------------------------------------------------------------------------


async def _close_pipeline(app: web.Application) -> None:
    app[WATCHER].close()
    await app[PIPELINE].close()


def setup(app: web.Application) -> None:
    svc = services_of(app)
    app[PIPELINE] = Pipeline(
        vault=svc.vault,
        limiter=svc.limiter,
        tokens=svc.tokens,
        tenant_flags=svc.tenant_flags,
        egress=svc.egress,
        settings=svc.settings,
        audit=svc.audit,
        client=lambda: svc.client,
    )
    app[WATCHER] = DisconnectWatcher()
    # Dispatched from inside error_middleware, so forward-proxy errors get the same JSON shape.
    app[NON_ORIGIN_FORM] = forward_proxy
    r = app.router
    r.add_route("*", _PATH_PREFIX, proxy_path)
    r.add_route("*", _PATH_PREFIX + "/{path:.*}", proxy_path)
    app.on_cleanup.append(_close_pipeline)
