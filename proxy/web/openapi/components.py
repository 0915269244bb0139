"""The document's shared components: the error body and its responses, from ``proxy.errors``;
the Runtara Connection Service schemas; the answers several operations share.

Why it exists: the error shape is the contract's (``{"error", "message"}`` with ``X-Proxy-Error``)
and its codes are the exception tree's, so both are read from ``proxy.errors``: a new error
class is in the document without anyone writing it down. ``ConnectionResponse`` and
``RateLimitState`` are the seed contract's schemas (Runtara's own OpenAPI document) in OpenAPI
3.1 form: its ``nullable: true`` is ``type: [..., "null"]``; ``tests/web/test_openapi.py``
compares them with the seed. Pure module: no aiohttp.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Final

from proxy import errors
from proxy.shapes import ID_PATTERN

__all__ = ["ERROR_STATUSES", "all_codes", "codes_by_status", "error_responses", "schemas"]

# Where a status's error answer is a page for a browser (connect pages), not JSON.
_STATUS_TEXT: Final = {
    400: "Bad request",
    401: "Unauthenticated",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    407: "Proxy authentication required",
    409: "Conflict",
    410: "Gone",
    413: "Payload too large",
    422: "Validation error",
    424: "Connection not authorized",
    429: "Rate limited",
    500: "Internal error",
    501: "Not supported",
    502: "Upstream unreachable",
    503: "Service unavailable",
    504: "Upstream timeout",
}
ERROR_STATUSES: Final = tuple(sorted(_STATUS_TEXT))


def _tree(cls: type[errors.ProxyError]) -> Iterator[type[errors.ProxyError]]:
    yield cls
    for sub in cls.__subclasses__():
        yield from _tree(sub)


def codes_by_status() -> dict[int, list[str]]:
    """Every (status, code) pair a class of the tree answers with; the generic 500's code too."""
    out: dict[int, set[str]] = {}
    for cls in _tree(errors.ProxyError):
        out.setdefault(cls.status, set()).add(cls.code)
    return {s: sorted(c) for s, c in sorted(out.items())}


def all_codes() -> list[str]:
    return sorted({c for codes in codes_by_status().values() for c in codes})


def _error_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "description": "An error the service made itself (not an upstream answer passed through).",
        "required": ["error", "message"],
        "properties": {
            "error": {
                "type": "string",
                "enum": all_codes(),
                "description": "stable code; also X-Proxy-Error",
            },
            "message": {"type": "string", "description": "what happened and what to do"},
            "fields": {
                "type": "object",
                "additionalProperties": {"type": "string"},
                "description": "each offending field (dotted name) and what is wrong with it",
            },
            "request_id": {"type": "string", "description": "quote it when reporting a problem"},
            "retry_after_ms": {"type": "integer", "minimum": 0, "description": "429: when to retry"},
            "limit_source": {"type": "string", "description": "429: which limit refused the call"},
        },
    }


def error_responses() -> dict[str, Any]:
    """``E<status>`` for every status the tree (or the HTTP mapping) answers: the Error body
    with that status's codes only, and ``X-Proxy-Error``."""
    by_status = codes_by_status()
    out: dict[str, Any] = {}
    for status in ERROR_STATUSES:
        codes = by_status.get(status, ["BAD_REQUEST"])  # an unmapped HTTP status is BAD_REQUEST's
        headers: dict[str, Any] = {
            "X-Proxy-Error": {"description": "the error code", "schema": {"type": "string", "enum": codes}},
        }
        if status == 429:
            headers["Retry-After"] = {
                "description": "whole seconds, rounded up",
                "schema": {"type": "integer"},
            }
            headers["Retry-After-Ms"] = {"description": "milliseconds", "schema": {"type": "integer"}}
        if status == 407:
            headers["Proxy-Authenticate"] = {"schema": {"type": "string"}}
        schema = {
            "allOf": [{"$ref": "#/components/schemas/Error"}],
            "properties": {"error": {"enum": codes}},
        }
        out[f"E{status}"] = {
            "description": f"{_STATUS_TEXT[status]}: {', '.join(codes)}",
            "headers": headers,
            "content": {"application/json": {"schema": schema}},
        }
    return out


_STR: Final = {"type": "string"}
_ID: Final = {"type": "string", "pattern": ID_PATTERN}
_OPT_STR: Final = {"type": ["string", "null"]}
_TIME: Final = {"type": "number", "description": "Unix time in seconds"}
_OPT_TIME: Final = {"type": ["number", "null"], "description": "Unix time in seconds"}
_STR_LIST: Final = {"type": "array", "items": {"type": "string"}}


def _object(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {
        "type": "object",
        "required": list(properties) if required is None else required,
        "properties": properties,
    }


def _page(item: str) -> dict[str, Any]:
    return _object(
        {
            "items": {"type": "array", "items": {"$ref": f"#/components/schemas/{item}"}},
            "next_cursor": {"type": ["string", "null"], "description": "pass as ?cursor= for the next page"},
        }
    )


def schemas() -> dict[str, Any]:
    window = _object(
        {
            "limit": {"type": "integer", "minimum": 1},
            "window_s": {"type": "number"},
            "burst": {"type": "integer"},
        },
        required=["limit", "window_s"],
    )
    api_key = _object(
        {
            "key_id": _STR,
            "tenant_id": _STR,
            "name": _OPT_STR,
            "created_at": _TIME,
            "revoked_at": _OPT_TIME,
            "last_used_at": _OPT_TIME,
        }
    )
    return {
        "Error": _error_schema(),
        # --- the seed contract's Connection Service schemas, exactly (3.1 form) ---
        "ConnectionResponse": {
            "type": "object",
            "required": ["parameters", "integration_id"],
            "properties": {
                "parameters": {"type": "object", "additionalProperties": True},
                "integration_id": {"type": "string"},
                "connection_subtype": {"type": ["string", "null"]},
                "rate_limit": {"$ref": "#/components/schemas/RateLimitState"},
            },
        },
        "RateLimitState": {
            "type": "object",
            "required": ["is_limited"],
            "properties": {
                "is_limited": {"type": "boolean"},
                "remaining": {"type": ["integer", "null"]},
                "reset_at": {"type": ["integer", "null"], "format": "int64"},
                "retry_after_ms": {"type": ["integer", "null"], "format": "int64"},
            },
        },
        # --- ours ---
        "ConnectionMetadata": _object(
            {
                "connectionId": _STR,
                "integrationId": _STR,
                "connectionSubtype": _OPT_STR,
                "status": {"enum": ["ACTIVE", "REQUIRES_RECONNECTION", "INVALID_CREDENTIALS", "UNKNOWN"]},
            }
        ),
        "RateWindow": window,
        "Connection": _object(
            {
                "tenant_id": _STR,
                "connection_id": _STR,
                "integration_id": _STR,
                "connection_subtype": _OPT_STR,
                "status": {"enum": ["pending", "active", "needs_reauth", "error"]},
                "status_detail": _OPT_STR,
                "parameters": {
                    "type": "object",
                    "description": "public values; each secret one is the placeholder, never the value",
                },
                "secret_fields_set": _STR_LIST,
                "missing_fields": _STR_LIST,
                "runtime_user_id": _OPT_STR,
                "default_connection_id": _OPT_STR,
                "rate_limits": {"type": "array", "items": {"$ref": "#/components/schemas/RateWindow"}},
                "allowed_hosts": {"type": ["array", "null"], "items": _STR},
                "metadata": {"type": "object"},
                "options": {"type": "object"},
                "created_at": _TIME,
                "updated_at": _TIME,
                "version": {"type": "integer", "description": "for If-Match; also the ETag"},
                "served_by": _STR_LIST,
                "notice": _OPT_STR,
            }
        ),
        "ConnectionPage": _page("Connection"),
        "ApiKey": api_key,
        "ApiKeyMinted": {
            "allOf": [{"$ref": "#/components/schemas/ApiKey"}],
            "required": ["api_key"],
            "properties": {"api_key": {"type": "string", "description": "shown once; only its hash is kept"}},
        },
        "ApiKeyList": _object({"items": {"type": "array", "items": {"$ref": "#/components/schemas/ApiKey"}}}),
        "Tenant": _object(
            {
                "tenant_id": _STR,
                "proxy_only": {"type": "boolean"},
                "proxy_only_effective": {"type": "boolean"},
            }
        ),
        "TenantListItem": _object(
            {
                "tenant_id": _STR,
                "proxy_only": {"type": "boolean"},
                "proxy_only_effective": {"type": "boolean"},
                "created_at": _TIME,
                "data_key_version": {"type": "integer"},
            }
        ),
        "TenantPage": _page("TenantListItem"),
        "AuditEvent": _object(
            {
                "ts": _TIME,
                "tenant_id": _STR,
                "action": _STR,
                "actor": _STR,
                "outcome": _STR,
                "connection_id": _OPT_STR,
                "request_id": _OPT_STR,
                "detail": {"type": "object", "description": "ids and counts only"},
                "seq": {"type": "integer"},
            }
        ),
        "AuditPage": _page("AuditEvent"),
        "Integration": _object(
            {
                "id": _STR,
                "label": _STR,
                "auth": _STR,
                "proxyable": {"type": "boolean"},
                "fields": {
                    "type": "array",
                    "items": _object(
                        {
                            "name": _STR,
                            "type": _STR,
                            "secret": {"type": "boolean"},
                            "required": {"type": "boolean"},
                            "label": _OPT_STR,
                        }
                    ),
                },
            }
        ),
        "IntegrationList": _object(
            {"items": {"type": "array", "items": {"$ref": "#/components/schemas/Integration"}}}
        ),
        "Identifier": _ID,
    }
