"""How one route is declared for the OpenAPI document: an ``Operation`` and the pieces it is made of.

Why it exists: ``proxy.web.openapi.document`` turns the app's router into the document, and
each route the router holds must have an ``Operation`` here naming it (``route`` is the path
exactly as registered with aiohttp, ``{prefix}`` standing for the Connection Service prefix), or
the document refuses to build. Request bodies come from the ``proxy.shapes`` objects the
handlers validate with (``body(shape)``), error responses from the ``proxy.errors`` tree
(``errors(401, 404)``): nothing is said twice. Pure module: no aiohttp.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from proxy.shapes import Check

__all__ = [
    "ADMIN_ERRORS",
    "HTTP_METHODS",
    "Operation",
    "body",
    "errors",
    "header",
    "json_body",
    "ok",
    "path_param",
    "query_param",
    "ref",
]

_REGEX_PART: Final = re.compile(r"\{(\w+):[^}]*\}")  # aiohttp's {name:regex}

# The methods a "*" route (the proxy's path mode) documents: every method it forwards.
HTTP_METHODS: Final = ("get", "put", "post", "delete", "options", "head", "patch")


def ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


@dataclass(frozen=True)
class Operation:
    """One documented operation. ``route``/``method`` name the aiohttp route it documents (the
    method "*" for a route of every method); ``path`` is the document's path when it differs
    from the route (a catch-all route the handler splits itself); ``spec`` is the operation
    object (summary, parameters, requestBody, responses) as OpenAPI 3.1 says it."""

    method: str
    route: str
    spec: Mapping[str, Any]
    path: str | None = None
    tags: tuple[str, ...] = ()
    security: tuple[str, ...] = ()  # names of components/securitySchemes; () is public
    extra: Mapping[str, Any] = field(default_factory=dict)

    def methods(self) -> tuple[str, ...]:
        return HTTP_METHODS if self.method == "*" else (self.method.lower(),)

    def doc_path(self, prefix: str) -> str:
        return _REGEX_PART.sub(r"{\1}", (self.path or self.route).replace("{prefix}", prefix))

    def route_path(self, prefix: str) -> str:
        return self.route.replace("{prefix}", prefix)


def path_param(name: str, description: str, schema: Mapping[str, Any] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": dict(schema or {"type": "string"}),
    }


def query_param(name: str, description: str, schema: Mapping[str, Any] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "description": description,
        "schema": dict(schema or {"type": "string"}),
    }


def header(
    name: str, description: str, *, required: bool = False, schema: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "name": name,
        "in": "header",
        "required": required,
        "description": description,
        "schema": dict(schema or {"type": "string"}),
    }


def json_body(schema: Mapping[str, Any], *, required: bool = True, description: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {"required": required, "content": {"application/json": {"schema": dict(schema)}}}
    if description:
        out["description"] = description
    return out


def body(shape: Check, *, required: bool = True, description: str = "") -> dict[str, Any]:
    """A JSON request body declared by the ``proxy.shapes`` object its handler parses with."""
    return json_body(shape.to_json_schema(), required=required, description=description)


def ok(
    description: str,
    schema: Mapping[str, Any] | None = None,
    *,
    media: str = "application/json",
    headers: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description}
    if schema is not None:
        out["content"] = {media: {"schema": dict(schema)}}
    if headers:
        out["headers"] = dict(headers)
    return out


def errors(*statuses: int | Iterable[int]) -> dict[str, Any]:
    """The service's own error responses of these statuses (components/responses, built from the
    ``proxy.errors`` tree by ``proxy.web.openapi.components``)."""
    flat: list[int] = []
    for s in statuses:
        flat.extend([s] if isinstance(s, int) else s)
    return {str(s): {"$ref": f"#/components/responses/E{s}"} for s in sorted(set(flat))}


# What every admin endpoint can answer: no or a bad token, a token that is not the admin's, a
# path id that is no identifier, and the store being unreachable.
ADMIN_ERRORS: Final = (401, 403, 422, 503)
