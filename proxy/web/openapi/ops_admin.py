"""The admin API's operations (``/admin/...``), one ``Operation`` per registered route.

Why it exists: the declarations of the admin routes in one table, next to nothing else. Bodies
are the ``proxy.shapes`` objects the handlers parse with (``PUT_SHAPE``, ``PATCH_SHAPE``,
``TENANT_SHAPE``, ``API_KEY_SHAPE``); where a handler validates by hand (connect sessions, the
store-loss confirmation) the schema is written here and a test holds its property names to
the handler's. Pure module: no aiohttp.
"""

from __future__ import annotations

from typing import Any, Final

from proxy.security.api_keys import API_KEY_SHAPE
from proxy.shapes import ID_PATTERN
from proxy.vault.inputs import PATCH_SHAPE, PUT_SHAPE
from proxy.vault.tenants import TENANT_SHAPE
from proxy.web.openapi.declare import (
    ADMIN_ERRORS,
    Operation,
    body,
    errors,
    header,
    json_body,
    ok,
    path_param,
    query_param,
    ref,
)

__all__ = ["ADMIN_OPERATIONS", "CONNECT_SESSION_FIELDS"]

_ID: Final = {"type": "string", "pattern": ID_PATTERN}
_TENANT: Final = path_param("tenant_id", "the tenant", _ID)
_CONN: Final = path_param("connection_id", "the connection", _ID)
_LIMIT: Final = query_param(
    "limit", "page size (default 100)", {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}
)
_CURSOR: Final = query_param("cursor", "next_cursor of the previous page")
_IF_MATCH: Final = header(
    "If-Match",
    "the version the write is conditional on (the ETag of the last read or write); a lost race is a 409",
    schema={"type": "string", "pattern": '^(W/)?"?[0-9]{1,18}"?$'},
)
_NO_STORE: Final = {"Cache-Control": {"schema": {"type": "string"}}}
_ETAG: Final = {"ETag": {"description": "the version, quoted", "schema": {"type": "string"}}, **_NO_STORE}
_ADMIN: Final = ("admin",)

_CONN_PATH: Final = "/admin/tenants/{tenant_id}/connections/{connection_id}"

# The connect-session request (proxy.connect.sessions.parse_session_request checks it by hand;
# a test holds these names to SessionRequest's fields).
CONNECT_SESSION_FIELDS: Final[dict[str, Any]] = {
    "integration_id": {**_ID, "description": "required: the integration to connect"},
    "connection_id": {"type": ["string", "null"], "pattern": ID_PATTERN},
    "runtime_user_id": {
        "type": ["string", "null"],
        "pattern": ID_PATTERN,
        "description": "with default_connection_id",
    },
    "default_connection_id": {
        "type": ["string", "null"],
        "pattern": ID_PATTERN,
        "description": "with runtime_user_id",
    },
    "return_url": {"type": ["string", "null"], "description": "absolute http(s) URL the user returns to"},
    "allowed_origins": {
        "type": ["array", "null"],
        "maxItems": 20,
        "items": {"type": "string"},
        "description": "origins that may embed the page, like https://app.example.com",
    },
    "parameters": {"type": ["object", "null"], "maxProperties": 50, "description": "non-secret presets"},
    "display_name": {"type": ["string", "null"], "minLength": 1, "maxLength": 100},
    "logo_url": {"type": ["string", "null"], "description": "absolute https URL"},
    "user_settable": {
        "type": ["object", "null"],
        "description": 'fields the user may set and their allowed patterns, like {"base_url": ["*.example.com"]}',
    },
}


def _op(
    method: str, route: str, summary: str, op_id: str, responses: dict[str, Any], **spec: Any
) -> Operation:
    return Operation(
        method=method,
        route=route,
        tags=("admin",),
        security=_ADMIN,
        spec={"summary": summary, "operationId": op_id, "responses": responses, **spec},
    )


ADMIN_OPERATIONS: Final = (
    _op(
        "PUT",
        _CONN_PATH,
        "Create or replace a connection",
        "putConnection",
        {
            "200": ok("replaced", ref("Connection"), headers=_ETAG),
            "201": ok("created", ref("Connection"), headers=_ETAG),
            **errors(ADMIN_ERRORS, 409, 413),
        },
        parameters=[_TENANT, _CONN, _IF_MATCH],
        requestBody=body(
            PUT_SHAPE,
            description="only integration_id is required; no credentials yet makes a pending connection",
        ),
    ),
    _op(
        "PATCH",
        _CONN_PATH,
        "Merge changes into a connection",
        "patchConnection",
        {"200": ok("updated", ref("Connection"), headers=_ETAG), **errors(ADMIN_ERRORS, 404, 409, 413)},
        parameters=[_TENANT, _CONN, _IF_MATCH],
        requestBody=body(
            PATCH_SHAPE, description="the keys sent replace the stored ones; integration_id cannot change"
        ),
    ),
    _op(
        "GET",
        _CONN_PATH,
        "Read a connection (redacted)",
        "getAdminConnection",
        {"200": ok("the redacted view", ref("Connection"), headers=_ETAG), **errors(ADMIN_ERRORS, 404)},
        parameters=[_TENANT, _CONN],
    ),
    _op(
        "DELETE",
        _CONN_PATH,
        "Revoke and delete a connection",
        "deleteConnection",
        {"204": ok("deleted"), **errors(ADMIN_ERRORS, 404, 409)},
        parameters=[
            _TENANT,
            _CONN,
            query_param(
                "cascade", "true: also delete this default's runtime user connections", {"type": "string"}
            ),
        ],
    ),
    _op(
        "GET",
        "/admin/tenants/{tenant_id}/connections",
        "List a tenant's connections",
        "listConnections",
        {"200": ok("a page", ref("ConnectionPage")), **errors(ADMIN_ERRORS)},
        parameters=[
            _TENANT,
            query_param("runtime_user_id", "only this runtime user's", _ID),
            query_param("integration_id", "only this integration's", _ID),
            query_param("default_connection_id", "only the overrides of this default", _ID),
            _CURSOR,
            _LIMIT,
        ],
    ),
    _op(
        "POST",
        "/admin/tenants/{tenant_id}/connections/{connection_id}/test",
        "Send the integration's test request with the stored credentials",
        "testConnection",
        {
            "200": ok(
                "the outcome; a 401/403 from the upstream marks the connection error",
                {
                    "type": "object",
                    "required": ["ok", "status", "latency_ms", "error"],
                    "properties": {
                        "ok": {"type": "boolean"},
                        "status": {"type": ["integer", "null"]},
                        "latency_ms": {"type": "number"},
                        "error": {"type": ["string", "null"]},
                        "message": {"type": "string"},
                    },
                },
            ),
            **errors(ADMIN_ERRORS, 404),
        },
        parameters=[_TENANT, _CONN],
    ),
    _op(
        "GET",
        "/admin/tenants/{tenant_id}/connections/{connection_id}/rate-limits",
        "Rate-limit state: configured windows, learned policies, the group share",
        "describeRateLimits",
        {
            "200": ok(
                "the state",
                {
                    "type": "object",
                    "required": ["rate_limit"],
                    "properties": {"rate_limit": ref("RateLimitState")},
                },
            ),
            **errors(ADMIN_ERRORS, 404),
        },
        parameters=[
            _TENANT,
            _CONN,
            header("X-Runtime-User-Id", "resolve this runtime user's connection", schema=_ID),
        ],
    ),
    _op(
        "DELETE",
        "/admin/tenants/{tenant_id}/connections/{connection_id}/rate-limits",
        "Forget learned rate-limit state",
        "resetRateLimits",
        {"204": ok("reset"), **errors(ADMIN_ERRORS, 404)},
        parameters=[
            _TENANT,
            _CONN,
            header("X-Runtime-User-Id", "resolve this runtime user's connection", schema=_ID),
        ],
    ),
    _op(
        "POST",
        "/admin/tenants/{tenant_id}/api-keys",
        "Mint a caller key bound to the tenant (shown once)",
        "mintApiKey",
        {"201": ok("the key, once", ref("ApiKeyMinted"), headers=_NO_STORE), **errors(ADMIN_ERRORS, 413)},
        parameters=[_TENANT],
        requestBody=body(
            API_KEY_SHAPE, required=False, description="optional; an empty body mints an unnamed key"
        ),
    ),
    _op(
        "GET",
        "/admin/tenants/{tenant_id}/api-keys",
        "List the tenant's keys (never the keys themselves)",
        "listApiKeys",
        {"200": ok("the keys", ref("ApiKeyList")), **errors(ADMIN_ERRORS)},
        parameters=[_TENANT],
    ),
    _op(
        "DELETE",
        "/admin/tenants/{tenant_id}/api-keys/{key_id}",
        "Revoke a key",
        "revokeApiKey",
        {"204": ok("revoked"), **errors(ADMIN_ERRORS, 404)},
        parameters=[_TENANT, path_param("key_id", "the key's id (key_id)")],
    ),
    _op(
        "GET",
        "/admin/tenants/{tenant_id}/audit",
        "The tenant's audit trail, newest first",
        "queryAudit",
        {"200": ok("a page", ref("AuditPage")), **errors(ADMIN_ERRORS)},
        parameters=[
            _TENANT,
            query_param("connection_id", "only this connection's"),
            query_param("action", "only this action, e.g. credential.read"),
            query_param("actor", "only this actor's"),
            query_param("outcome", "only this outcome"),
            query_param("since", "Unix seconds or ISO 8601"),
            query_param("until", "Unix seconds or ISO 8601"),
            _CURSOR,
            _LIMIT,
        ],
    ),
    _op(
        "PUT",
        "/admin/tenants/{tenant_id}",
        "Set the tenant's settings",
        "putTenant",
        {"200": ok("the settings", ref("Tenant")), **errors(ADMIN_ERRORS, 413)},
        parameters=[_TENANT],
        requestBody=body(TENANT_SHAPE),
    ),
    _op(
        "GET",
        "/admin/tenants/{tenant_id}",
        "Read the tenant's settings",
        "getTenant",
        {"200": ok("the settings", ref("Tenant")), **errors(ADMIN_ERRORS)},
        parameters=[_TENANT],
    ),
    _op(
        "GET",
        "/admin/tenants",
        "List the tenants, paged by id",
        "listTenants",
        {"200": ok("a page", ref("TenantPage")), **errors(ADMIN_ERRORS)},
        parameters=[_LIMIT, {**_CURSOR, "schema": _ID}],
    ),
    _op(
        "GET",
        "/admin/integrations",
        "The integration catalogue (field names and kinds, never a value)",
        "listIntegrations",
        {"200": ok("the catalogue", ref("IntegrationList")), **errors(401, 403, 503)},
    ),
    _op(
        "POST",
        "/admin/store/accept-loss",
        "Carry on with a store that lost its data (no backup to restore)",
        "acceptStoreLoss",
        {
            "200": ok(
                "accepted: the store has a new identity",
                {
                    "type": "object",
                    "required": ["status", "store_id", "tenants"],
                    "properties": {
                        "status": {"const": "accepted"},
                        "store_id": {"type": "string"},
                        "tenants": {"type": "integer"},
                    },
                },
            ),
            **errors(ADMIN_ERRORS, 413),
        },
        requestBody=json_body(
            {"type": "object", "required": ["confirm"], "properties": {"confirm": {"const": True}}},
            description='{"confirm": true}: what the lost store held stays lost',
        ),
    ),
    _op(
        "POST",
        "/admin/tenants/{tenant_id}/connect-sessions",
        "Create a connect link for an end user",
        "createConnectSession",
        {
            "201": ok(
                "the link",
                {
                    "type": "object",
                    "required": ["token", "url", "expires_at", "session_id"],
                    "properties": {
                        "token": {"type": "string"},
                        "url": {"type": "string", "description": "absolute URL of the connect page"},
                        "expires_at": {"type": "integer", "description": "Unix time in seconds"},
                        "connection_id": {"type": ["string", "null"]},
                        "session_id": {"type": "string"},
                    },
                },
                headers=_NO_STORE,
            ),
            **errors(ADMIN_ERRORS, 404, 413),
        },
        parameters=[_TENANT],
        requestBody=json_body(
            {
                "type": "object",
                "required": ["integration_id"],
                "properties": CONNECT_SESSION_FIELDS,
                "additionalProperties": False,
            }
        ),
    ),
)
