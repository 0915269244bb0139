"""The proxy's front ends: path mode, Runtara's envelope, forward-proxy mode, connection test.

All four run ``proxy.pipeline.pipeline.Pipeline``; this module only reads the call the way each front end
carries it and writes the answer back the way that front end expects:

- ``ANY /proxy/{path}`` (the contract's path mode): streams both ways, constant memory;
- ``POST /api/internal/proxy`` (Runtara's envelope): JSON in, JSON out, success always HTTP 200;
- absolute-form requests (``GET http://host/path HTTP/1.1``) to the service: forward-proxy mode,
  dispatched by the error middleware before the routed handler runs; ``CONNECT`` is intercepted
  by ``proxy.web.tunnel`` (TLS terminated here, every request in it relayed like path mode; no
  blind tunnels), and callers authenticate with the proxy URL's Basic credentials or Bearer;
- ``POST /admin/tenants/{t}/connections/{c}/test``: the integration's test request.

Streaming invariants: a body is never buffered in path or forward mode (except a small, replayable
one when retries are asked for); an upstream that breaks mid-body makes the client connection
abort, so the client sees a broken response rather than a complete-looking one; a client that
goes away cancels the upstream call.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import re
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from proxy import jsonin
from proxy.errors import (
    BadRequest,
    Conflict,
    ConnectionNotFound,
    MethodNotAllowed,
    PayloadTooLarge,
    ProxyAuthenticationRequired,
    ProxyError,
    Unauthenticated,
    UpstreamTimeout,
    UpstreamUnreachable,
    ValidationError,
)
from proxy.model import Caller, ConnectionStatus, check_id
from proxy.observe.outcome import Outcome, of_error, of_status
from proxy.pipeline.headers import clean_response_headers, is_token, redact_secrets, without_framing
from proxy.pipeline.pipeline import (
    MAX_REPLAY_BODY,
    Body,
    Exchange,
    Pipeline,
    parse_control_int,
    refuse_trace,
)
from proxy.pipeline.plan import MAX_RETRIES
from proxy.security.auth import proxy_user
from proxy.web import envelope_answer
from proxy.web.authn import SERVICES, caller_for, not_found, require_admin, services_of
from proxy.web.errors import NON_ORIGIN_FORM, Handler, error_response, request_id_of

__all__ = [
    "CONNECT_HANDLER",
    "PIPELINE",
    "WATCHER",
    "DisconnectWatcher",
    "Identity",
    "forward_identity",
    "relay",
    "setup",
]

PIPELINE = web.AppKey("pipeline", Pipeline)
# CONNECT's handler, set by proxy.web.tunnel (which imports this module); unset: refused with 405.
CONNECT_HANDLER: web.AppKey[Handler] = web.AppKey("connect_handler")
ENVELOPE_GATE = web.AppKey("envelope_gate", envelope_answer.EnvelopeGate)
ENVELOPE_CLASSIFIER = web.AppKey("envelope_classifier", envelope_answer.BodyClassifier)
CHUNK = 64 * 1024
ENVELOPE_MAX_BODY = 32 * 1024 * 1024
# The envelope carries the request body base64-encoded inside JSON: 4/3 of the body plus headers.
ENVELOPE_MAX_REQUEST = ENVELOPE_MAX_BODY * 4 // 3 + 1024 * 1024
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


def _tenant(caller: Caller, value: str | None, connection_id: str, header: str) -> str:
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


def _runtime_user(value: str | None) -> str | None:
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


async def forward_identity(request: web.BaseRequest, app: web.Application) -> Identity:
    """The caller of a forward-proxy request (absolute-form or CONNECT): 407 when it has no or
    bad proxy credentials. A Basic user name names the connection; with Bearer, the headers do."""
    h = request.headers
    try:
        caller = await app[SERVICES].auth.authenticate(h, None, allow_trusted=False)
        who = proxy_user(h)
    except Unauthenticated as exc:
        raise proxy_auth_required(exc.message) from None
    if who is None:
        cid = _connection_id(h.get("X-Connection-Id"))
        tenant = _tenant(caller, h.get("X-Tenant-Id"), cid, "X-Tenant-Id")
        return Identity(caller, tenant, cid, _runtime_user(h.get("X-Runtime-User-Id")))
    if caller.tenant_id is None and who.tenant_id is None:
        raise proxy_auth_required(
            "this credential is not bound to a tenant: name it in the proxy user, TENANT_ID/CONNECTION_ID"
        )
    tenant = _tenant(caller, who.tenant_id, who.connection_id, "the proxy user's tenant")
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
    watcher = app[WATCHER]
    watched = watcher.add(request)
    try:
        refuse_trace(request.method)  # before anything else: nothing to authenticate for
        h = request.headers
        if identity is None:
            if front == "forward":
                identity = await forward_identity(request, app)
            else:
                # The contract's trusted networks cover the Connection Service and the envelope only.
                caller = await app[SERVICES].auth.authenticate(h, None, allow_trusted=False)
                cid = _connection_id(h.get("X-Connection-Id"))
                tenant = _tenant(caller, h.get("X-Tenant-Id"), cid, "X-Tenant-Id")
                identity = Identity(caller, tenant, cid, _runtime_user(h.get("X-Runtime-User-Id")))
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
        raise
    except asyncio.CancelledError:
        outcome = Outcome.CLIENT_DISCONNECTED
        raise
    finally:
        watcher.remove(watched)
        if up is not None and not up.closed:
            up.close()  # drops an upstream connection that was not released cleanly
        pipeline.finish(ex, front, outcome, status)


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


# --- Runtara envelope -------------------------------------------------------------------------


async def _read_capped(stream: aiohttp.StreamReader, cap: int, what: str) -> bytes:
    buf = bytearray()
    while True:
        chunk = await stream.read(CHUNK)
        if not chunk:
            return bytes(buf)
        buf += chunk
        if len(buf) > cap:
            raise PayloadTooLarge(
                f"{what} is larger than the envelope's {cap // (1024 * 1024)} MiB limit; use path "
                "mode (/proxy/{path}), which streams bodies of any size"
            )


def _envelope_field(payload: dict[str, Any], name: str, kind: type | tuple[type, ...], required: bool) -> Any:
    value = payload.get(name)
    if value is None:
        if required:
            raise ValidationError(f"envelope field {name!r} is required", fields={name: "required"})
        return None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValidationError(f"envelope field {name!r} has the wrong type", fields={name: "wrong type"})
    return value


# The longest an envelope call may take: its answer is buffered, so a call longer than the
# service's own longest upstream timeout setting would gain nothing.
ENVELOPE_MAX_TIMEOUT_MS = 3_600_000
# What HTTP/1.1 cannot carry in a field value (RFC 9110 5.5: no controls but HTAB), and lone
# surrogates, which no encoding can write.
_BAD_FIELD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\ud800-\udfff]")


def _check_envelope_call(method: str, url: str, headers: dict[str, str], timeout_ms: float | None) -> None:
    """The envelope's own fields that path mode gets checked by the HTTP parser: the method is
    an RFC 9110 token, header values hold no control characters, ``timeout_ms`` is a finite,
    bounded number and ``url`` can be encoded. (Header names are checked with the rest of the
    caller's headers by ``clean_request_headers``.) Values are never quoted back: a header may
    carry a secret."""
    if not is_token(method) or len(method) > 32:
        raise ValidationError(
            "envelope field 'method' must be an HTTP method such as GET or POST",
            fields={"method": "not an HTTP method token"},
        )
    for name, value in headers.items():
        if not value.isprintable() and _BAD_FIELD_VALUE.search(value):
            raise ValidationError(
                f"envelope header {name[:64]!r} has a value with control characters; remove them",
                fields={"headers": "control character in a header value"},
            )
    if timeout_ms is not None and not 0 <= timeout_ms <= ENVELOPE_MAX_TIMEOUT_MS:  # NaN fails too
        raise ValidationError(
            f"envelope field 'timeout_ms' must be a number of milliseconds from 0 to "
            f"{ENVELOPE_MAX_TIMEOUT_MS} (0: the connection's own timeouts)",
            fields={"timeout_ms": "out of range"},
        )
    if _BAD_FIELD_VALUE.search(url):
        raise ValidationError(
            "envelope field 'url' holds control characters or unpaired surrogates; percent-encode them",
            fields={"url": "invalid characters"},
        )


def _envelope_body(payload: dict[str, Any], headers: dict[str, str]) -> bytes | None:
    raw = payload.get("body_raw")
    if raw is not None:
        if not isinstance(raw, str):
            raise ValidationError("body_raw must be a base64 string", fields={"body_raw": "wrong type"})
        try:
            return base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            raise ValidationError(
                "body_raw is not valid base64", fields={"body_raw": "invalid base64"}
            ) from None
    body = payload.get("body")
    if body is None:
        return None
    if isinstance(body, str):
        try:
            return body.encode()
        except UnicodeEncodeError:  # a lone surrogate ("\ud800" in the JSON)
            raise ValidationError(
                "envelope field 'body' is not valid Unicode (an unpaired surrogate); send body_raw",
                fields={"body": "invalid Unicode"},
            ) from None
    if not any(k.lower() == "content-type" for k in headers):
        headers["Content-Type"] = "application/json"
    return json.dumps(body, separators=(",", ":")).encode()


def _envelope_headers(up_headers: list[tuple[str, str]]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, value in up_headers:
        key = name.lower()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return headers


async def envelope(request: web.Request) -> web.StreamResponse:
    pipeline = request.app[PIPELINE]
    ex: Exchange | None = None
    up: aiohttp.ClientResponse | None = None
    outcome: str = Outcome.ERROR
    status: int | None = None
    watcher = request.app[WATCHER]
    watched = watcher.add(request)
    gate = request.app[ENVELOPE_GATE]
    entered = False
    try:
        caller = await caller_for(request, allow_trusted=True)
        org = request.headers.get("X-Org-Id")
        if not org:
            raise BadRequest("X-Org-Id is required: it names the tenant (organisation) of the call")
        # Before the request body is read: a refused call holds nothing.
        gate.enter()
        entered = True
        raw = await _read_capped(request.content, ENVELOPE_MAX_REQUEST, "the envelope request")
        try:
            payload = jsonin.loads(raw)
        except jsonin.JsonInputError as exc:
            raise BadRequest(f"the envelope body is refused: {exc.reason}") from None
        except ValueError:
            raise BadRequest("the envelope body must be a JSON object") from None
        if not isinstance(payload, dict):
            raise BadRequest("the envelope body must be a JSON object")
        cid = check_id("connection_id", _envelope_field(payload, "connection_id", str, True))
        tenant = _tenant(caller, org, cid, "X-Org-Id")
        method = str(_envelope_field(payload, "method", str, False) or "GET").upper()
        url = _envelope_field(payload, "url", str, True)
        given = _envelope_field(payload, "headers", dict, False) or {}
        # The proxy frames the body it sends: a caller's Content-Length or Transfer-Encoding
        # would truncate it, hang the upstream, or split it into a second request.
        headers = dict(without_framing((str(k), str(v)) for k, v in given.items() if v is not None))
        timeout_ms = _envelope_field(payload, "timeout_ms", (int, float), False)
        _check_envelope_call(method, url, headers, timeout_ms)
        body = _envelope_body(payload, headers)
        absolute = url if url[:7].lower() == "http://" or url[:8].lower() == "https://" else None
        path, _, query = ("" if absolute else url).partition("?")
        ex = await pipeline.prepare(
            caller=caller,
            tenant_id=tenant,
            connection_id=cid,
            runtime_user_id=_runtime_user(
                request.headers.get("X-Runtime-User-Id") or payload.get("runtime_user_id")
            ),
            method=method,
            caller_headers=list(headers.items()),
            path=path,
            query=query,
            absolute_url=absolute,
            request_id=request_id_of(request),
            total_timeout_s=timeout_ms / 1000 if timeout_ms and timeout_ms > 0 else None,
        )
        idem = any(k.lower() == "idempotency-key" for k in headers)
        up = await pipeline.open(ex, body, idempotency_key=idem)
        status = up.status
        try:
            data = await envelope_answer.read_body(
                up, services_of(request.app).settings.envelope_max_response_bytes
            )
        except (aiohttp.ClientError, OSError, TimeoutError):
            raise UpstreamUnreachable(
                "the upstream broke off its response mid-body; retry the call"
            ) from None
        up.release()  # the body is read: the upstream connection goes back to the pool while we encode
        outcome = of_status(status)
        headers_out = _envelope_headers(redact_secrets(clean_response_headers(up.headers.items()), ex.scrub))
        return await envelope_answer.answer(
            request, request.app[ENVELOPE_CLASSIFIER], status, headers_out, data
        )
    except ProxyError as exc:
        outcome = of_error(exc)
        raise
    except asyncio.CancelledError:
        outcome = Outcome.CLIENT_DISCONNECTED
        raise
    finally:
        if entered:
            gate.leave()
        watcher.remove(watched)
        if up is not None:
            up.close()
        pipeline.finish(ex, "envelope", outcome, status)


# --- admin: test a connection ------------------------------------------------------------------


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


# --- wiring -----------------------------------------------------------------------------------


async def _close_pipeline(app: web.Application) -> None:
    app[WATCHER].close()
    app[ENVELOPE_CLASSIFIER].close()
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
    app[ENVELOPE_GATE] = envelope_answer.EnvelopeGate(services_of(app).settings.envelope_max_concurrent)
    app[ENVELOPE_CLASSIFIER] = envelope_answer.BodyClassifier()
    # Dispatched from inside error_middleware, so forward-proxy errors get the same JSON shape.
    app[NON_ORIGIN_FORM] = forward_proxy
    r = app.router
    r.add_route("*", _PATH_PREFIX, proxy_path)
    r.add_route("*", _PATH_PREFIX + "/{path:.*}", proxy_path)
    r.add_post("/api/internal/proxy", envelope)
    r.add_post("/admin/tenants/{tenant_id}/connections/{connection_id}/test", test_connection)
    app.on_cleanup.append(_close_pipeline)
