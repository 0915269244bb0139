"""Runtara's proxy envelope, ``POST /api/internal/proxy``: JSON in, JSON out, success always HTTP 200.

The call it describes runs the same ``Pipeline`` as every front end (``proxy.web.proxy_routes``
holds the shared pieces); this module reads the envelope (method, URL, headers, body, timeout, all
validated: a bad field is a 422, never a 500), drops caller framing headers, and builds the answer
with ``proxy.web.envelope_answer`` (bounded size, bounded concurrency, encoded off the loop).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
from typing import Any

import aiohttp
from aiohttp import web

from proxy import jsonin
from proxy.errors import BadRequest, PayloadTooLarge, ProxyError, UpstreamUnreachable, ValidationError
from proxy.model import Caller, check_id
from proxy.observe.outcome import Outcome, of_error, of_status
from proxy.pipeline.exchange import Exchange
from proxy.pipeline.headers import clean_response_headers, is_token, redact_secrets, without_framing
from proxy.web import envelope_answer
from proxy.web.authn import caller_for, services_of
from proxy.web.errors import request_id_of
from proxy.web.proxy_routes import CHUNK, PIPELINE, WATCHER, audit_refusal, runtime_user_of, tenant_for

ENVELOPE_GATE = web.AppKey("envelope_gate", envelope_answer.EnvelopeGate)
ENVELOPE_CLASSIFIER = web.AppKey("envelope_classifier", envelope_answer.BodyClassifier)


def envelope_request_cap(max_body: int) -> int:
    """The envelope carries the request body base64-encoded inside JSON: 4/3 of the body plus
    1 MiB for the other fields."""
    return max_body * 4 // 3 + 1024 * 1024


async def _read_capped(stream: aiohttp.StreamReader, max_body: int) -> bytes:
    cap = envelope_request_cap(max_body)
    buf = bytearray()
    while True:
        chunk = await stream.read(CHUNK)
        if not chunk:
            return bytes(buf)
        buf += chunk
        if len(buf) > cap:
            raise PayloadTooLarge(
                f"the envelope request is larger than its limit of {cap} bytes (a body of at most "
                f"{max_body} bytes, base64 in JSON; setting envelope_max_request_bytes, "
                "PROXY_ENVELOPE_MAX_REQUEST_BYTES); use path mode (/proxy/{path}), which streams "
                "bodies of any size"
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
    caller: Caller | None = None
    tenant: str | None = None
    cid: str | None = None
    try:
        caller = await caller_for(request, allow_trusted=True)
        org = request.headers.get("X-Org-Id")
        if not org:
            raise BadRequest("X-Org-Id is required: it names the tenant (organisation) of the call")
        # Before the request body is read: a refused call holds nothing.
        gate.enter()
        entered = True
        raw = await _read_capped(
            request.content, services_of(request.app).settings.envelope_max_request_bytes
        )
        try:
            payload = jsonin.loads(raw)
        except jsonin.JsonInputError as exc:
            raise BadRequest(f"the envelope body is refused: {exc.reason}") from None
        except ValueError:
            raise BadRequest("the envelope body must be a JSON object") from None
        if not isinstance(payload, dict):
            raise BadRequest("the envelope body must be a JSON object")
        cid = check_id("connection_id", _envelope_field(payload, "connection_id", str, True))
        tenant = tenant_for(caller, org, cid, "X-Org-Id")
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
            runtime_user_id=runtime_user_of(
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
        if ex is None:  # refused before it became a use (a use is audited by finish)
            audit_refusal(pipeline, caller, tenant, cid, outcome, request_id_of(request))
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


async def _close(app: web.Application) -> None:
    app[ENVELOPE_CLASSIFIER].close()


def setup(app: web.Application) -> None:
    app[ENVELOPE_GATE] = envelope_answer.EnvelopeGate(services_of(app).settings.envelope_max_concurrent)
    app[ENVELOPE_CLASSIFIER] = envelope_answer.BodyClassifier()
    app.router.add_post("/api/internal/proxy", envelope)
    app.on_cleanup.append(_close)
