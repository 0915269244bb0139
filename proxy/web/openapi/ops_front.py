"""The operations of the data plane and the public routes: the Connection Service (under its
configurable prefix), the proxy's path mode, Runtara's envelope, the connect pages and the OAuth
callback, and the operations endpoints.

Why it exists: one table per audience (``proxy.web.openapi.ops_admin`` holds the admin API's).
The Connection Service's ``getConnection`` is the seed contract's operation, word for word
(operation id, parameters, the 200/404/429 descriptions), with the errors it also really gives
added. Pure module: no aiohttp.
"""

from __future__ import annotations

from typing import Any, Final

from proxy.shapes import ID_PATTERN
from proxy.web.openapi.declare import (
    Operation,
    errors,
    header,
    json_body,
    ok,
    path_param,
    query_param,
    ref,
)

__all__ = ["FRONT_OPERATIONS", "OBSERVATION_FIELDS", "page_errors"]

_ID: Final = {"type": "string", "pattern": ID_PATTERN}
_CALLER: Final = ("tenantKey", "adminToken", "trustedNetwork")
_RUNTIME_USER: Final = header(
    "X-Runtime-User-Id", "use this runtime user's connection overriding the requested default", schema=_ID
)


def page_errors(*statuses: int) -> dict[str, Any]:
    """Errors the connect pages show as an HTML page for the end user (with X-Proxy-Error)."""
    return {
        str(s): {
            "description": "an error page for the end user",
            "headers": {"X-Proxy-Error": {"description": "the error code", "schema": {"type": "string"}}},
            "content": {"text/html": {"schema": {"type": "string"}}},
        }
        for s in statuses
    }


_PAGE_ERRORS: Final = (400, 403, 404, 410, 422, 424, 500, 502, 503, 504)
_HTML: Final = {"type": "string"}

# The observation report (proxy.web.ratelimits.report_observation checks it by hand).
OBSERVATION_FIELDS: Final[dict[str, Any]] = {
    "status": {"type": "integer", "minimum": 100, "maximum": 599, "description": "the status you received"},
    "headers": {
        "description": 'the response headers: {"name": "value"} or [["name", "value"], ...] (at most 100)',
        "anyOf": [
            {"type": "object", "additionalProperties": {"type": "string"}, "maxProperties": 100},
            {
                "type": "array",
                "maxItems": 100,
                "items": {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 2},
            },
        ],
    },
    "observed_at": {"type": "number", "description": "Unix time the response arrived (within the last hour)"},
}

_CONNSVC_PARAMS: Final = [
    {"name": "tenant_id", "in": "path", "required": True, "schema": {"type": "string"}},
    {"name": "connection_id", "in": "path", "required": True, "schema": {"type": "string"}},
]


def _connsvc(path_tail: str, op_id: str, summary: str, found: dict[str, Any]) -> Operation:
    return Operation(
        method="GET",
        route="{prefix}/{tail:.*}",
        path="{prefix}/{tenant_id}/{connection_id}" + path_tail,
        tags=("connection-service",),
        security=_CALLER,
        spec={
            "summary": summary,
            "operationId": op_id,
            "parameters": [
                *_CONNSVC_PARAMS,
                _RUNTIME_USER,
                query_param("runtime_user_id", "as X-Runtime-User-Id", _ID),
            ],
            "responses": {
                "200": found,
                "404": {
                    "description": "Connection not found",
                    "headers": {"X-Proxy-Error": {"schema": {"type": "string"}}},
                    "content": {"application/json": {"schema": ref("Error")}},
                },
                "429": {
                    "description": "Rate limited",
                    "headers": {
                        "Retry-After": {"schema": {"type": "integer"}},
                        "Retry-After-Ms": {"schema": {"type": "integer"}},
                    },
                    "content": {"application/json": {"schema": ref("Error")}},
                },
                **errors(401, 422, 424, 503),
            },
        },
    )


_PROXY_ERRORS: Final = (400, 401, 403, 404, 405, 407, 413, 422, 424, 429, 502, 503, 504)
_PROXY_HEADERS: Final = [
    header("X-Connection-Id", "the connection whose credentials are injected", required=True, schema=_ID),
    _RUNTIME_USER,
    header("X-Tenant-Id", "the tenant, when the caller's key is not bound to one", schema=_ID),
    header(
        "X-Proxy-Max-Wait-Ms",
        "wait up to this long for the rate limit instead of answering 429",
        schema={"type": "string", "pattern": "^[0-9]{1,9}$"},
    ),
]


def _proxy(route: str, with_path: bool) -> Operation:
    params = [path_param("path", "joined to the connection's base URL, with the query")] if with_path else []
    return Operation(
        method="*",
        route=route,
        path="/proxy/{path}" if with_path else "/proxy",
        tags=("proxy",),
        security=("tenantKey", "adminToken", "proxyAuthorization"),
        spec={
            "summary": "Call the connection's upstream with its credentials injected",
            "description": "Any method; the body and the answer stream through. The answer is the "
            "upstream's, passed through; the service's own errors carry X-Proxy-Error. The same "
            "calls work as a forward proxy (absolute-form requests and CONNECT), which OpenAPI "
            "cannot describe: see the README.",
            "parameters": [*params, *_PROXY_HEADERS],
            "responses": {"default": ok("the upstream's answer, passed through"), **errors(_PROXY_ERRORS)},
        },
    )


_ENVELOPE_REQUEST: Final = {
    "type": "object",
    "required": ["connection_id", "url"],
    "properties": {
        "connection_id": _ID,
        "method": {"type": ["string", "null"], "maxLength": 32, "description": "default GET"},
        "url": {
            "type": "string",
            "description": "a path joined to the base URL, or an absolute URL of a bound host",
        },
        "headers": {"type": ["object", "null"], "additionalProperties": {"type": ["string", "null"]}},
        "body": {"description": "a string sent as is, or any JSON value sent as JSON"},
        "body_raw": {
            "type": ["string", "null"],
            "contentEncoding": "base64",
            "description": "wins over body",
        },
        "timeout_ms": {"type": ["number", "null"], "maximum": 3600000},
        "runtime_user_id": {"type": ["string", "null"]},
    },
}
_ENVELOPE_ANSWER: Final = {
    "type": "object",
    "required": ["status", "headers", "body", "body_raw"],
    "properties": {
        "status": {"type": "integer", "description": "the upstream's status"},
        "headers": {"type": "object", "additionalProperties": {"type": "string"}},
        "body": {"description": "JSON as JSON, text as a string, binary as null"},
        "body_raw": {"type": "string", "contentEncoding": "base64"},
    },
}


def _public(method: str, route: str, tag: str, spec: dict[str, Any], path: str | None = None) -> Operation:
    return Operation(method=method, route=route, path=path, tags=(tag,), spec=spec)


_TOKEN: Final = path_param("token", "the connect link's token")

FRONT_OPERATIONS: Final = (
    _connsvc(
        "",
        "getConnection",
        "Runtara Connection Service: the connection's parameters and rate-limit state",
        {
            "description": "Connection found",
            "content": {"application/json": {"schema": ref("ConnectionResponse")}},
        },
    ),
    _connsvc(
        "/metadata",
        "getConnectionMetadata",
        "Runtara's camelCase status view",
        ok("the status", ref("ConnectionMetadata")),
    ),
    Operation(
        method="POST",
        route="{prefix}/{tenant_id}/{connection_id}/observations",
        tags=("connection-service",),
        security=_CALLER,
        spec={
            "summary": "Report the rate-limit headers of a call made directly",
            "operationId": "reportObservation",
            "parameters": [
                path_param("tenant_id", "the tenant", _ID),
                path_param("connection_id", "the connection", _ID),
                _RUNTIME_USER,
            ],
            "requestBody": json_body(
                {
                    "type": "object",
                    "required": ["status"],
                    "properties": OBSERVATION_FIELDS,
                    "additionalProperties": False,
                }
            ),
            "responses": {
                "202": ok(
                    "merged into the shared state",
                    {
                        "type": "object",
                        "required": ["accepted", "styles", "blocked_until", "policies", "rate_limit"],
                        "properties": {
                            "accepted": {"type": "boolean"},
                            "styles": {"type": "array", "items": {"type": "string"}},
                            "blocked_until": {"type": ["number", "null"]},
                            "policies": {"type": "integer"},
                            "rate_limit": ref("RateLimitState"),
                        },
                    },
                ),
                **errors(401, 403, 404, 413, 422, 503),
            },
        },
    ),
    _proxy("/proxy", with_path=False),
    _proxy("/proxy/{path:.*}", with_path=True),
    Operation(
        method="*",
        route="/_decide",
        tags=("proxy",),
        security=("decisionToken",),
        spec={
            "summary": "nginx in front: the decision for one call (proxy.web.decide)",
            "description": "For nginx's auth_request (and Envoy's ext_authz): the caller's "
            "headers plus X-Original-Method and X-Original-URI; the 200 answer's X-CP-* headers "
            "name the checked upstream address, Host/SNI, the upstream URI and the credential to "
            "set. Off (404) unless decision_token is set; only its holder is answered. With "
            "X-CP-Front: nginx a refusal is a 403 carrying the real status in X-CP-Status.",
            "parameters": [
                header("X-Original-Method", "the call's method", required=True),
                header("X-Original-URI", "the call's raw URI, /proxy/{path}?{query}", required=True),
                *_PROXY_HEADERS,
            ],
            "responses": {
                "200": ok("the decision, in X-CP-* headers (no body)"),
                **errors(_PROXY_ERRORS),
            },
        },
    ),
    Operation(
        method="POST",
        route="/api/internal/proxy",
        tags=("proxy",),
        security=_CALLER,
        spec={
            "summary": "Runtara's proxy envelope: the call described in JSON, the answer in JSON",
            "operationId": "proxyEnvelope",
            "parameters": [
                header("X-Org-Id", "the tenant (organisation) of the call", required=True, schema=_ID),
                _RUNTIME_USER,
            ],
            "requestBody": json_body(_ENVELOPE_REQUEST),
            "responses": {
                "200": ok("the upstream's answer, whatever its status", _ENVELOPE_ANSWER),
                **errors(400, 401, 403, 404, 413, 422, 424, 429, 502, 503, 504),
            },
        },
    ),
    _public(
        "GET",
        "/connect/{token}",
        "connect",
        {
            "summary": "The connect page: a form, or a button that starts the OAuth sign-in",
            "operationId": "connectPage",
            "parameters": [_TOKEN],
            "responses": {"200": ok("the page", _HTML, media="text/html"), **page_errors(*_PAGE_ERRORS)},
        },
    ),
    _public(
        "POST",
        "/connect/{token}",
        "connect",
        {
            "summary": "Submit the connect form",
            "operationId": "connectSubmit",
            "parameters": [_TOKEN],
            "requestBody": {
                "required": True,
                "content": {"application/x-www-form-urlencoded": {"schema": {"type": "object"}}},
            },
            "responses": {"200": ok("connected", _HTML, media="text/html"), **page_errors(*_PAGE_ERRORS)},
        },
    ),
    _public(
        "GET",
        "/connect/{token}/oauth/start",
        "connect",
        {
            "summary": "Start the OAuth2 sign-in (authorization code + PKCE)",
            "operationId": "connectOAuthStart",
            "parameters": [_TOKEN],
            "responses": {
                "302": ok("to the provider", headers={"Location": {"schema": {"type": "string"}}}),
                **page_errors(*_PAGE_ERRORS),
            },
        },
    ),
    _public(
        "GET",
        "/connect/{token}/status",
        "connect",
        {
            "summary": "Whether the link has been used",
            "operationId": "connectStatus",
            "parameters": [_TOKEN],
            "responses": {
                "200": ok(
                    "pending or connected",
                    {
                        "type": "object",
                        "required": ["status", "connection_id"],
                        "properties": {
                            "status": {"enum": ["pending", "connected"]},
                            "connection_id": {"type": ["string", "null"]},
                        },
                    },
                ),
                "404": ok(
                    "no such link",
                    {
                        "type": "object",
                        "required": ["status"],
                        "properties": {"status": {"const": "unknown"}, "connection_id": {"type": "null"}},
                    },
                ),
                **errors(503),
            },
        },
    ),
    _public(
        "GET",
        "/oauth/callback",
        "connect",
        {
            "summary": "The OAuth2 redirect URI ({public_url}/oauth/callback)",
            "operationId": "oauthCallback",
            "parameters": [
                query_param("state", "the sign-in's state"),
                query_param("code", "the authorization code"),
                query_param("error", "the provider's error, when it refused"),
                query_param("iss", "the authorization server (RFC 9207)"),
            ],
            "responses": {
                "200": ok("connected", _HTML, media="text/html"),
                "302": ok(
                    "back to the application's return URL",
                    headers={"Location": {"schema": {"type": "string"}}},
                ),
                **page_errors(*_PAGE_ERRORS),
            },
        },
    ),
    _public(
        "GET",
        "/healthz",
        "operations",
        {
            "summary": "Alive",
            "operationId": "healthz",
            "responses": {
                "200": ok(
                    "alive",
                    {"type": "object", "required": ["status"], "properties": {"status": {"const": "ok"}}},
                )
            },
        },
    ),
    _public(
        "GET",
        "/readyz",
        "operations",
        {
            "summary": "Ready: the store (and Redis) reachable, and still the store this replica opened",
            "description": "While the store is unreachable but cached credentials may still serve "
            "(stale_if_error_s), 200 with status degraded and the reason; 503 after that.",
            "operationId": "readyz",
            "responses": {
                "200": ok(
                    "ready, or degraded (the store unreachable, cached credentials serving)",
                    {
                        "type": "object",
                        "required": ["status"],
                        "properties": {
                            "status": {"enum": ["ready", "degraded"]},
                            "store": {"type": "string"},
                            "store_id": {"type": ["string", "null"]},
                            "reason": {"type": "string"},
                            "down_for_s": {"type": "number"},
                            "stale_if_error_s": {"type": "number"},
                            "stale_serving_left_s": {"type": "number"},
                        },
                    },
                ),
                **errors(503),
            },
        },
    ),
    _public(
        "GET",
        "/metrics",
        "operations",
        {
            "summary": "Prometheus metrics",
            "operationId": "metrics",
            "responses": {"200": ok("the text exposition format", {"type": "string"}, media="text/plain")},
        },
    ),
    _public(
        "GET",
        "/ca.pem",
        "operations",
        {
            "summary": "The CA certificates forward-proxy clients must trust (never the key)",
            "operationId": "caCertificate",
            "responses": {"200": ok("PEM", {"type": "string"}, media="application/x-pem-file")},
        },
    ),
    _public(
        "GET",
        "/openapi.json",
        "operations",
        {
            "summary": "This document",
            "operationId": "openapi",
            "responses": {"200": ok("OpenAPI 3.1", {"type": "object"})},
        },
    ),
)
