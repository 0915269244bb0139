"""The OpenAPI 3.1 document of an app, from its router's routes and the declared operations.

Why it exists: the document must list what the app really serves, so it is built from the
router (a route that is not registered, ``/ca.pem`` without a CA, is not in it) and every route
must match a declared ``Operation`` (``proxy.web.openapi.ops_admin``, ``ops_front``). A route
without one is reported in ``undeclared`` (and ``x-undeclared-routes``): the service still
starts, and ``tests/web/test_openapi.py`` fails. Pure module: no aiohttp.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Final

from proxy.web.openapi.components import error_responses, schemas
from proxy.web.openapi.declare import Operation
from proxy.web.openapi.ops_admin import ADMIN_OPERATIONS
from proxy.web.openapi.ops_front import FRONT_OPERATIONS

__all__ = ["OPERATIONS", "Built", "build", "route_key"]

OPERATIONS: Final[tuple[Operation, ...]] = (*ADMIN_OPERATIONS, *FRONT_OPERATIONS)

_REGEX_PART: Final = re.compile(r"\{(\w+):[^}]*\}")

_SECURITY_SCHEMES: Final = {
    "adminToken": {
        "type": "http",
        "scheme": "bearer",
        "description": "the admin token (PROXY_ADMIN_TOKEN; dev mode writes one into the data dir)",
    },
    "tenantKey": {
        "type": "http",
        "scheme": "bearer",
        "description": "a tenant API key (POST /admin/tenants/{tenant_id}/api-keys) or a JWT",
    },
    "proxyAuthorization": {
        "type": "apiKey",
        "in": "header",
        "name": "Proxy-Authorization",
        "description": "Bearer <key> or Basic base64(CONNECTION_ID:KEY), as forward-proxy clients send it",
    },
    "decisionToken": {
        "type": "apiKey",
        "in": "header",
        "name": "X-CP-Decision-Token",
        "description": "the decision_token setting, which connection-proxy nginx-config puts in nginx's config",
    },
}
# Callers inside trusted_networks need no header: OpenAPI says so with an empty requirement.
_ANONYMOUS: Final = "trustedNetwork"

_TAGS: Final = [
    {"name": "admin", "description": "the admin API (admin token only)"},
    {"name": "connection-service", "description": "the Runtara Connection Service contract"},
    {"name": "proxy", "description": "calls with credentials injected"},
    {"name": "connect", "description": "connect pages for end users, and the OAuth2 callback"},
    {"name": "operations", "description": "health, readiness, metrics, the CA, this document"},
]


def route_key(method: str, path: str) -> tuple[str, str]:
    """A route as the router and the declarations both name it: method, path without regexes."""
    return method.upper(), _REGEX_PART.sub(r"{\1}", path)


@dataclass(frozen=True)
class Built:
    document: dict[str, Any]
    undeclared: tuple[tuple[str, str], ...]  # (method, path) of routes no Operation declares


def _version() -> str:
    try:
        return metadata.version("connection-proxy")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "0"


def _operation(op: Operation) -> dict[str, Any]:
    spec = dict(op.spec)
    if op.tags:
        spec["tags"] = list(op.tags)
    spec["security"] = [{} if s == _ANONYMOUS else {s: []} for s in op.security]
    return {**spec, **op.extra}


def build(
    routes: Iterable[tuple[str, str]],
    *,
    prefix: str,
    public_url: str,
    operations: Sequence[Operation] = OPERATIONS,
) -> Built:
    """The document of an app whose router holds ``routes`` ((method, path) pairs, as
    ``route.method`` and the resource's canonical path), ``prefix`` being its Connection Service
    prefix. HEAD routes aiohttp adds beside each GET are the GET's (HTTP says so)."""
    registered = {route_key(m, p) for m, p in routes}
    gets = {p for m, p in registered if m == "GET"}
    registered = {(m, p) for m, p in registered if not (m == "HEAD" and p in gets)}
    by_route: dict[tuple[str, str], list[Operation]] = {}
    for op in operations:
        by_route.setdefault(route_key(op.method, op.route_path(prefix)), []).append(op)
    paths: dict[str, dict[str, Any]] = {}
    undeclared = []
    for key in sorted(registered):
        ops = by_route.get(key)
        if not ops:
            undeclared.append(key)
            continue
        for op in ops:
            item = paths.setdefault(op.doc_path(prefix), {})
            for method in op.methods():
                item[method] = _operation(op)
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "connection-proxy",
            "version": _version(),
            "description": "A vault of API credentials that proxies calls and injects them, and the "
            "Runtara Connection Service. Errors the service makes itself are JSON "
            '{"error": CODE, "message": ...} with the header X-Proxy-Error.',
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "servers": [{"url": public_url}],
        "tags": _TAGS,
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": schemas(),
            "responses": error_responses(),
            "securitySchemes": _SECURITY_SCHEMES,
        },
    }
    if undeclared:
        document["x-undeclared-routes"] = [f"{m} {p}" for m, p in undeclared]
    return Built(document, tuple(undeclared))
