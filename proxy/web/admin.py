"""The admin API: connections, tenant API keys, tenant settings, the audit trail, the catalogue.

Admin-token only (401 without a valid credential, 403 for tenant keys and JWTs). Secrets are
write-only: every answer, list and error carries the redacted view (``vault.redacted_view``),
and validation errors name fields, never values. Every change is audited. Writes are
compare-and-set on the record version: ``If-Match: <version>`` makes a lost race a 409 instead
of a silent overwrite.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime
from typing import Any, Final

from aiohttp import web

from proxy.catalogue import AuthKind, Integration
from proxy.errors import Conflict, NotFound, ValidationError
from proxy.model import ApiKeyRecord, AuditEvent, Caller, ConnectionRecord, check_id, parse_rate_limits
from proxy.oauth import flows
from proxy.pipeline.urls import validate_base_url
from proxy.security import crypto
from proxy.security.destinations import USERS_CHOOSE_OPTION
from proxy.store.base import AuditQuery, ExpectedVersion
from proxy.vault.vault import REDACTED, redacted_view
from proxy.web.authn import caller_for, require_admin, services_of
from proxy.web.bodies import read_json_object
from proxy.web.errors import request_id_of

log = logging.getLogger("proxy.admin")

BODY_KEYS: Final = frozenset(
    {
        "integration_id",
        "connection_subtype",
        "parameters",
        "runtime_user_id",
        "default_connection_id",
        "rate_limits",
        "allowed_hosts",
        "metadata",
        "options",
    }
)
TIMEOUT_KEYS: Final = ("connect_s", "read_s", "total_s")
METADATA_MAX_BYTES: Final = 64 * 1024
CAS_ATTEMPTS: Final = 3
Problems = dict[str, str]


# --- request helpers ---------------------------------------------------------------------------


async def _admin(request: web.Request) -> Caller:
    caller = await caller_for(request, allow_trusted=False)
    require_admin(caller)
    return caller


def _path_id(request: web.Request, name: str) -> str:
    return check_id(name, request.match_info[name])


def _if_match(request: web.Request) -> int | None:
    raw = request.headers.get("If-Match")
    if raw is None:
        return None
    text = raw.strip().removeprefix("W/").strip('"')
    if not (text.isascii() and text.isdigit() and len(text) <= 18):  # "²".isdigit() is True
        raise ValidationError(
            "If-Match must be the connection's version number (from GET or the last write)",
            fields={"If-Match": "must be a version number"},
        )
    return int(text)


def _audit(
    request: web.Request,
    caller: Caller,
    tenant_id: str,
    action: str,
    connection_id: str | None = None,
    **detail: Any,
) -> None:
    services_of(request.app).audit.record(
        AuditEvent(
            ts=time.time(),
            tenant_id=tenant_id,
            action=action,
            actor=caller.actor,
            connection_id=connection_id,
            request_id=request_id_of(request),
            detail=detail,
        )
    )


def _view(request: web.Request, record: ConnectionRecord, status: int = 200) -> web.Response:
    integration = services_of(request.app).catalogue.get(record.integration_id)
    resp = web.json_response(redacted_view(integration, record), status=status)
    resp.headers["ETag"] = f'"{record.version}"'
    resp.headers["Cache-Control"] = "no-store"
    return resp


def _raise(problems: Problems) -> None:
    if problems:
        names = ", ".join(sorted(problems))
        raise ValidationError(f"invalid fields: {names}; see 'fields' for what is wrong", fields=problems)


def _int_in(value: Any, lo: int, hi: int | None = None) -> bool:
    return (
        isinstance(value, int) and not isinstance(value, bool) and value >= lo and (hi is None or value <= hi)
    )


def _positive_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


# --- validation --------------------------------------------------------------------------------


def _check_options(raw: Any, problems: Problems) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        problems["options"] = "must be an object"
        return {}
    checks: dict[str, tuple[Any, str]] = {
        "max_wait_ms": (lambda v: _int_in(v, 0), "must be an integer >= 0"),
        "retries": (lambda v: _int_in(v, 0, 5), "must be an integer from 0 to 5"),
        "quota_key": (lambda v: isinstance(v, str) and bool(_id_ok(v)), "must be an identifier"),
        "quota_weight": (_positive_number, "must be a number > 0"),
        "proxy_only": (lambda v: isinstance(v, bool), "must be true or false"),
        # Lets this default's runtime users pick their own destination, within its host binding.
        USERS_CHOOSE_OPTION: (lambda v: isinstance(v, bool), "must be true or false"),
        "reserve": (lambda v: _int_in(v, 0), "must be an integer >= 0"),
    }
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "timeouts":
            if not isinstance(value, dict):
                problems["options.timeouts"] = "must be an object"
                continue
            for tkey, tval in value.items():
                if tkey not in TIMEOUT_KEYS:
                    problems[f"options.timeouts.{tkey}"] = f"unknown; use {', '.join(TIMEOUT_KEYS)}"
                elif not _positive_number(tval):
                    problems[f"options.timeouts.{tkey}"] = "must be a number of seconds > 0"
            out[key] = value
        elif key == "quota_rate_limits":
            # The budget a quota group shares (e.g. one OAuth app's limit across tenants).
            try:
                out[key] = [w.to_dict() for w in parse_rate_limits(value, "options.quota_rate_limits")]
            except ValidationError as exc:
                problems.update(exc.fields)
        elif key not in checks:
            known = ", ".join(sorted([*checks, "timeouts", "quota_rate_limits"]))
            problems[f"options.{key}"] = f"unknown option; known: {known}"
        elif value is not None:
            ok, message = checks[key]
            if not ok(value):
                problems[f"options.{key}"] = message
            out[key] = value
    return out


def _id_ok(value: str) -> str | None:
    try:
        return check_id("id", value)
    except ValidationError:
        return None


def _check_params(
    integration: Integration, params: dict[str, Any], problems: Problems, *, redacted_ok: bool
) -> None:
    for key, problem in integration.validate_params(params).items():
        problems[key] = problem
    if integration.auth == AuthKind.OAUTH2_AUTHORIZATION_CODE and params.get(flows.AUTH_PARAMS) is not None:
        problems.update(flows.auth_params_problems(params[flows.AUTH_PARAMS]))
    for name, value in params.items():
        if not isinstance(name, str) or not name or len(name) > 200:
            problems["parameters"] = "parameter names must be non-empty strings"
        elif value == REDACTED and integration.is_secret(name) and not redacted_ok:
            problems[f"parameters.{name}"] = (
                "is the redaction placeholder, not a value: send the real secret, or use PATCH "
                "and leave the field out to keep it"
            )


def _check_base_url(integration: Integration, public: dict[str, Any], problems: Problems) -> None:
    url = public.get("base_url")
    if integration.proxyable and integration.base_url is None and isinstance(url, str):
        problem = validate_base_url(url)
        if problem:
            problems["parameters.base_url"] = problem


def _check_common(body: dict[str, Any], problems: Problems) -> dict[str, Any]:
    """Validates every non-parameter key present in ``body``; returns the parsed values."""
    for key in body:
        if key not in BODY_KEYS:
            problems[str(key)] = f"unknown field; known: {', '.join(sorted(BODY_KEYS))}"
    out: dict[str, Any] = {}
    if "connection_subtype" in body:
        sub = body["connection_subtype"]
        if sub is not None and (not isinstance(sub, str) or not 0 < len(sub) <= 200):
            problems["connection_subtype"] = "must be a string of 1-200 characters or null"
        out["connection_subtype"] = sub
    for key in ("runtime_user_id", "default_connection_id"):
        if key in body:
            value = body[key]
            if value is not None and not (isinstance(value, str) and _id_ok(value)):
                problems[key] = "must be an identifier or null"
            out[key] = value
    if "rate_limits" in body:
        try:
            out["rate_limits"] = parse_rate_limits(body["rate_limits"])
        except ValidationError as exc:
            problems.update(exc.fields)
    if "allowed_hosts" in body:
        hosts = body["allowed_hosts"]
        if hosts is not None and not (
            isinstance(hosts, list)
            and len(hosts) <= 100
            and all(isinstance(h, str) and 0 < len(h) <= 255 and h.strip() == h for h in hosts)
        ):
            problems["allowed_hosts"] = "must be null or a list of up to 100 host names or patterns"
        out["allowed_hosts"] = tuple(hosts) if isinstance(hosts, list) else None
    if "metadata" in body:
        meta = body["metadata"]
        if meta is None:
            meta = {}
        if not isinstance(meta, dict):
            problems["metadata"] = "must be an object"
        elif len(json.dumps(meta)) > METADATA_MAX_BYTES:
            problems["metadata"] = f"must be at most {METADATA_MAX_BYTES} bytes of JSON"
        out["metadata"] = meta
    if "options" in body:
        out["options"] = _check_options(body["options"], problems)
    return out


async def _check_runtime_user(
    request: web.Request,
    tenant_id: str,
    connection_id: str,
    runtime_user: Any,
    default: Any,
    problems: Problems,
) -> None:
    if (runtime_user is None) != (default is None):
        problems["runtime_user_id" if runtime_user is None else "default_connection_id"] = (
            "runtime_user_id and default_connection_id must be given together"
        )
        return
    if default is None or "default_connection_id" in problems or "runtime_user_id" in problems:
        return
    if default == connection_id:
        problems["default_connection_id"] = "must name another connection"
        return
    target = await services_of(request.app).store.get_connection(tenant_id, default)
    if target is None:
        problems["default_connection_id"] = "no such connection in this tenant"
    elif target.runtime_user_id is not None:
        problems["default_connection_id"] = "must name a default connection, not another runtime user's"


def _integration(request: web.Request, body: dict[str, Any], problems: Problems) -> Integration | None:
    iid = body.get("integration_id")
    if not isinstance(iid, str) or not _id_ok(iid):
        problems["integration_id"] = (
            "required: an integration id such as http_bearer (GET /admin/integrations)"
        )
        return None
    return services_of(request.app).catalogue.get(iid)


def _params(body: dict[str, Any], problems: Problems) -> dict[str, Any]:
    params = body.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        problems["parameters"] = "must be an object"
        return {}
    return params


# --- connections -------------------------------------------------------------------------------


async def _version_moved(request: web.Request, tid: str, cid: str, seen: ConnectionRecord | None) -> bool:
    now = await services_of(request.app).store.get_connection(tid, cid)
    return (now.version if now else None) != (seen.version if seen else None)


async def put_connection(request: web.Request) -> web.Response:
    caller = await _admin(request)
    svc = services_of(request.app)
    tid, cid = _path_id(request, "tenant_id"), _path_id(request, "connection_id")
    body = await read_json_object(request)
    problems: Problems = {}
    parsed = _check_common(body, problems)
    integration = _integration(request, body, problems)
    params = _params(body, problems)
    if integration is not None:
        _check_params(integration, params, problems, redacted_ok=False)
        _check_base_url(integration, params, problems)
    await _check_runtime_user(
        request, tid, cid, parsed.get("runtime_user_id"), parsed.get("default_connection_id"), problems
    )
    _raise(problems)
    assert integration is not None
    if "rate_limits" not in body:
        parsed["rate_limits"] = parse_rate_limits(list(integration.default_rate_limits))
    if_match = _if_match(request)
    public, secret = await svc.vault.encrypt_params(tid, cid, integration, params)
    for _ in range(CAS_ATTEMPTS):
        existing = await svc.store.get_connection(tid, cid)
        expected: ExpectedVersion = (
            if_match if if_match is not None else (existing.version if existing else None)
        )
        record = ConnectionRecord(
            tenant_id=tid,
            connection_id=cid,
            integration_id=integration.id,
            public_params=public,
            secret_params=secret,
            created_at=existing.created_at if existing else 0.0,
            **parsed,
        )
        try:
            stored = await svc.vault.save(record, expected)
        except Conflict:
            if if_match is not None or not await _version_moved(request, tid, cid, existing):
                raise  # a CAS the caller asked for, or a uniqueness conflict: not a race to retry
            continue
        created = existing is None
        _audit(
            request,
            caller,
            tid,
            "connection.create" if created else "connection.replace",
            cid,
            version=stored.version,
            integration_id=integration.id,
            parameters=sorted(params),
        )
        return _view(request, stored, 201 if created else 200)
    raise Conflict(f"connection {cid!r} kept changing while it was being written; retry")


async def patch_connection(request: web.Request) -> web.Response:
    caller = await _admin(request)
    svc = services_of(request.app)
    tid, cid = _path_id(request, "tenant_id"), _path_id(request, "connection_id")
    body = await read_json_object(request)
    if_match = _if_match(request)
    for _ in range(CAS_ATTEMPTS):
        current = await svc.vault.get_record(tid, cid)
        problems: Problems = {}
        parsed = _check_common(body, problems)
        if "integration_id" in body and body["integration_id"] != current.integration_id:
            problems["integration_id"] = "cannot change with PATCH; replace the connection with PUT"
        integration = svc.catalogue.get(current.integration_id)
        changes = _params(body, problems)
        _check_params(
            integration, {k: v for k, v in changes.items() if v is not None}, problems, redacted_ok=True
        )
        public = dict(current.public_params)
        secret = dict(current.secret_params)
        updates = {}
        for name, value in changes.items():
            if value is None:
                public.pop(name, None)
                secret.pop(name, None)
            elif not (value == REDACTED and integration.is_secret(name)):
                updates[name] = value
        _check_base_url(integration, {**public, **updates}, problems)
        runtime_user = parsed.get("runtime_user_id", current.runtime_user_id)
        default = parsed.get("default_connection_id", current.default_connection_id)
        if "runtime_user_id" in parsed or "default_connection_id" in parsed:
            await _check_runtime_user(request, tid, cid, runtime_user, default, problems)
        _raise(problems)
        new_public, new_secret = await svc.vault.encrypt_params(tid, cid, integration, updates)
        public.update(new_public)
        secret.update(new_secret)
        for name in new_public:
            secret.pop(name, None)
        changes_made: dict[str, Any] = dict(parsed)
        if "parameters" in body:
            changes_made.update(public_params=public, secret_params=secret)
            # New credentials clear a sticky needs_reauth/error: the vault recomputes the status.
            changes_made["status"] = "pending"
        record = current.evolve(**changes_made)
        expected = if_match if if_match is not None else current.version
        try:
            stored = await svc.vault.save(record, expected)
        except Conflict:
            if if_match is not None or not await _version_moved(request, tid, cid, current):
                raise
            continue
        _audit(
            request,
            caller,
            tid,
            "connection.update",
            cid,
            version=stored.version,
            fields=sorted(body),
            parameters=sorted(changes),
        )
        return _view(request, stored)
    raise Conflict(f"connection {cid!r} kept changing while it was being updated; retry")


async def get_connection(request: web.Request) -> web.Response:
    await _admin(request)
    tid, cid = _path_id(request, "tenant_id"), _path_id(request, "connection_id")
    record = await services_of(request.app).vault.get_record(tid, cid)
    return _view(request, record)


async def delete_connection(request: web.Request) -> web.Response:
    caller = await _admin(request)
    svc = services_of(request.app)
    tid, cid = _path_id(request, "tenant_id"), _path_id(request, "connection_id")
    record = await svc.vault.get_record(tid, cid)
    cascade = request.query.get("cascade", "").lower() in ("1", "true", "yes")
    # Runtime user connections of this default would silently fall back to nothing: refuse
    # unless the caller asks for them to go too.
    dependents = (await svc.store.list_connections(tid, default_connection_id=cid, limit=1000)).items
    if dependents and not cascade:
        raise Conflict(
            f"connection {cid!r} is the default of {len(dependents)} runtime user connection(s) "
            f"(e.g. {dependents[0].connection_id!r}); delete those first, or repeat with ?cascade=true "
            "to revoke and delete them too",
            fields={"connection_id": "has runtime user connections"},
        )
    for dependent in dependents:
        await _revoke_and_delete(request, caller, dependent)
    await _revoke_and_delete(request, caller, record)
    return web.Response(status=204)


async def _revoke_and_delete(request: web.Request, caller: Caller, record: ConnectionRecord) -> None:
    svc = services_of(request.app)
    tid, cid = record.tenant_id, record.connection_id
    revocation: Any = None
    if record.secret_params:
        try:
            # Per token kind: revoked / failed / skipped (the token manager never raises here).
            revocation = await svc.tokens.revoke(await svc.vault.decrypt(record))
        except Exception as exc:  # the local delete must not depend on the upstream answering
            log.warning(
                "upstream revocation of %s/%s failed (%s); deleting anyway", tid, cid, type(exc).__name__
            )
            revocation = {"error": type(exc).__name__}
    await svc.vault.delete(tid, cid)
    _audit(
        request,
        caller,
        tid,
        "connection.delete",
        cid,
        version=record.version,
        upstream_revocation=revocation or None,
    )


def _limit(request: web.Request) -> int:
    raw = request.query.get("limit", "100")
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 4) or not 1 <= int(raw) <= 1000:
        raise ValidationError("limit must be an integer from 1 to 1000", fields={"limit": "must be 1-1000"})
    return int(raw)


def _query_id(request: web.Request, name: str) -> str | None:
    value = request.query.get(name)
    return check_id(name, value) if value else None


async def list_connections(request: web.Request) -> web.Response:
    await _admin(request)
    svc = services_of(request.app)
    tid = _path_id(request, "tenant_id")
    page = await svc.store.list_connections(
        tid,
        runtime_user_id=_query_id(request, "runtime_user_id"),
        integration_id=_query_id(request, "integration_id"),
        default_connection_id=_query_id(request, "default_connection_id"),
        cursor=request.query.get("cursor") or None,
        limit=_limit(request),
    )
    items = [redacted_view(svc.catalogue.get(r.integration_id), r) for r in page.items]
    return web.json_response({"items": items, "next_cursor": page.next_cursor})


# --- API keys ----------------------------------------------------------------------------------


async def create_api_key(request: web.Request) -> web.Response:
    caller = await _admin(request)
    svc = services_of(request.app)
    tid = _path_id(request, "tenant_id")
    body = await read_json_object(request) if await request.read() else {}
    unknown = [k for k in body if k != "name"]
    name = body.get("name")
    problems: Problems = {k: "unknown field; known: name" for k in unknown}
    if name is not None and (not isinstance(name, str) or not 0 < len(name) <= 200):
        problems["name"] = "must be a string of 1-200 characters"
    _raise(problems)
    key_id, full = crypto.new_api_key()
    record = ApiKeyRecord(
        key_id=key_id, tenant_id=tid, secret_hash=crypto.hash_api_key(full), name=name, created_at=time.time()
    )
    await svc.store.put_api_key(record)
    _audit(request, caller, tid, "api_key.create", None, key_id=key_id)
    # The full key is in this answer only; the store keeps its hash.
    resp = web.json_response({**record.public_view(), "api_key": full}, status=201)
    resp.headers["Cache-Control"] = "no-store"
    return resp


async def list_api_keys(request: web.Request) -> web.Response:
    await _admin(request)
    tid = _path_id(request, "tenant_id")
    keys = await services_of(request.app).store.list_api_keys(tid)
    return web.json_response({"items": [k.public_view() for k in keys]})


async def revoke_api_key(request: web.Request) -> web.Response:
    caller = await _admin(request)
    svc = services_of(request.app)
    tid, key_id = _path_id(request, "tenant_id"), request.match_info["key_id"]
    record = await svc.store.get_api_key(key_id)
    if record is None or record.tenant_id != tid:
        raise NotFound(f"API key {key_id[:40]!r} does not exist in tenant {tid!r}")
    if record.revoked_at is None:
        await svc.store.put_api_key(ApiKeyRecord(**{**record.to_dict(), "revoked_at": time.time()}))
        _audit(request, caller, tid, "api_key.revoke", None, key_id=key_id)
    svc.auth.forget_key(key_id)
    # Other replicas cache verified keys too: a tenant-wide invalidation makes them re-read.
    await svc.store.publish_invalidation(tid, None)
    return web.Response(status=204)


# --- tenants -----------------------------------------------------------------------------------


def _tenant_view(request: web.Request, tid: str, proxy_only: bool) -> web.Response:
    configured = tid in services_of(request.app).settings.proxy_only_tenants
    return web.json_response(
        {"tenant_id": tid, "proxy_only": proxy_only, "proxy_only_effective": proxy_only or configured}
    )


async def put_tenant(request: web.Request) -> web.Response:
    caller = await _admin(request)
    svc = services_of(request.app)
    tid = _path_id(request, "tenant_id")
    body = await read_json_object(request)
    problems: Problems = {str(k): "unknown field; known: proxy_only" for k in body if k != "proxy_only"}
    if not isinstance(body.get("proxy_only"), bool):
        problems["proxy_only"] = "required: true or false"
    _raise(problems)
    await svc.vault.ensure_tenant(tid)
    for _ in range(CAS_ATTEMPTS):
        tenant = await svc.store.get_tenant(tid)
        assert tenant is not None
        try:
            await svc.store.put_tenant(
                type(tenant).from_dict({**tenant.to_dict(), "proxy_only": body["proxy_only"]}), tenant.version
            )
            break
        except Conflict:
            continue
    else:
        raise Conflict(f"tenant {tid!r} kept changing while it was being updated; retry")
    svc.tenant_flags.forget(tid)
    _audit(request, caller, tid, "tenant.update", None, proxy_only=body["proxy_only"])
    return _tenant_view(request, tid, body["proxy_only"])


async def get_tenant(request: web.Request) -> web.Response:
    await _admin(request)
    tid = _path_id(request, "tenant_id")
    tenant = await services_of(request.app).store.get_tenant(tid)
    return _tenant_view(request, tid, bool(tenant and tenant.proxy_only))


# --- audit and catalogue -----------------------------------------------------------------------


# Year 9999: every bound the stores can turn into a key or a column comparison.
_MAX_TIME = 253402300799.0


def _time(request: web.Request, name: str) -> float | None:
    raw = request.query.get(name)
    if not raw:
        return None
    value: float | None
    try:
        value = float(raw)
    except ValueError:
        try:
            value = datetime.fromisoformat(raw.replace("Z", "+00:00")).timestamp()
        except (ValueError, OverflowError):
            value = None
    # float() also reads "nan", "inf" and "1e400" (inf): no store can page by those.
    if value is None or not 0.0 <= value <= _MAX_TIME:
        raise ValidationError(
            f"{name} must be a Unix time in seconds (0 to year 9999) or an ISO 8601 time",
            fields={name: "invalid time"},
        )
    return value


async def query_audit(request: web.Request) -> web.Response:
    await _admin(request)
    tid = _path_id(request, "tenant_id")
    q = request.query
    page = await services_of(request.app).store.query_audit(
        AuditQuery(
            tenant_id=tid,
            connection_id=q.get("connection_id") or None,
            action=q.get("action") or None,
            actor=q.get("actor") or None,
            outcome=q.get("outcome") or None,
            since=_time(request, "since"),
            until=_time(request, "until"),
            cursor=q.get("cursor") or None,
            limit=_limit(request),
        )
    )
    return web.json_response({"items": [e.to_dict() for e in page.items], "next_cursor": page.next_cursor})


async def list_integrations(request: web.Request) -> web.Response:
    await _admin(request)
    items = [
        {
            "id": i.id,
            "label": i.label,
            "auth": i.auth,
            "proxyable": i.proxyable,
            "fields": [
                {"name": f.name, "type": f.type, "secret": f.secret, "required": f.required, "label": f.label}
                for f in i.fields
            ],
        }
        for i in sorted(services_of(request.app).catalogue, key=lambda i: i.id)
    ]
    return web.json_response({"items": items})


async def accept_store_loss(request: web.Request) -> web.Response:
    """The operator's way out of a detected store loss without a backup: carry on with the store
    as it is now. Every replica that opened the lost store adopts the new identity."""
    await _admin(request)
    body = await read_json_object(request)
    if body.get("confirm") is not True:
        raise ValidationError(
            "accepting the store as it is now makes every replica serve from it again, and what it "
            "lost stays lost: connections, API keys and tenant keys must be created anew. Restore "
            'the backup instead if there is one; otherwise send {"confirm": true}',
            fields={"confirm": "required: true"},
        )
    svc = services_of(request.app)
    identity = await svc.store.accept_loss()
    # Re-records the key ring's fingerprints (lost with the rest) and proves it opens what is left.
    tenants = await svc.vault.verify_keys()
    return web.json_response({"status": "accepted", "store_id": identity, "tenants": tenants})


def setup(app: web.Application) -> None:
    conn = "/admin/tenants/{tenant_id}/connections/{connection_id}"
    r = app.router
    r.add_put(conn, put_connection)
    r.add_patch(conn, patch_connection)
    r.add_get(conn, get_connection)
    r.add_delete(conn, delete_connection)
    r.add_get("/admin/tenants/{tenant_id}/connections", list_connections)
    r.add_post("/admin/tenants/{tenant_id}/api-keys", create_api_key)
    r.add_get("/admin/tenants/{tenant_id}/api-keys", list_api_keys)
    r.add_delete("/admin/tenants/{tenant_id}/api-keys/{key_id}", revoke_api_key)
    r.add_get("/admin/tenants/{tenant_id}/audit", query_audit)
    r.add_put("/admin/tenants/{tenant_id}", put_tenant)
    r.add_get("/admin/tenants/{tenant_id}", get_tenant)
    r.add_get("/admin/integrations", list_integrations)
    r.add_post("/admin/store/accept-loss", accept_store_loss)
