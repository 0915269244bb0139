"""Connect pages: where an end user connects one integration through a link an admin created.

Why it exists: partners must not collect their users' credentials themselves. The admin API
creates a short-lived connect session (``POST /admin/tenants/{t}/connect-sessions``); the user
opens its URL (directly or in an iframe of the partner's app) and either fills in a form (API
key, basic, bearer, custom fields) or is sent through the provider's OAuth2 consent
(authorization code + PKCE), after which the connection is saved encrypted and active. The
decisions live in ``proxy.connect.flow``; this module is HTTP and rendering.

Security, page by page:
- HTML rendered with autoescaping; secret inputs are always empty, tokens never shown.
  ``Referrer-Policy: no-referrer`` (the link token is in the URL), ``Cache-Control: no-store``,
  a nonce-based CSP, and ``frame-ancestors`` limited to the session's ``allowed_origins``
  (``'none'`` plus ``X-Frame-Options: DENY`` without any). ``postMessage`` targets only those.
- The form carries a per-page CSRF value keyed to the session, and a cross-origin ``Origin`` is
  refused. A session is consumed by its first success (atomic pop); a tombstone answers 410.
- The OAuth ``state`` is single use, bound to the session and to the browser (cookie).
- Errors are pages too (with ``X-Proxy-Error``), never JSON, except on the admin endpoint: the
  handlers raise ``ProxyError``s (the connect-specific ones are ``ConnectPageError``s of
  ``proxy.errors``) and ``_pages``, the routes' one error handling, renders them.
"""

from __future__ import annotations

import functools
import logging
import secrets
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp_jinja2
import jinja2
from aiohttp import web

from proxy.catalogue import Integration
from proxy.connect import sessions
from proxy.connect.flow import Connector, LinkProblem
from proxy.connect.sessions import ConnectSession
from proxy.errors import (
    AuthorizationCodeMissing,
    BadRequest,
    ConnectFormUnverified,
    ConnectLinkExpired,
    ConnectLinkUnknown,
    ConnectLinkUsed,
    ConnectPageError,
    ConnectsAnotherWay,
    OAuthAccessDenied,
    OAuthIssuerMismatch,
    OAuthProviderError,
    ProxyError,
    SignInElsewhere,
    SignInNotSetUp,
    SignInUnknown,
)
from proxy.model import AuditEvent, check_id
from proxy.oauth import state as oauth_state
from proxy.oauth.flows import OAuthConfigError, error_code
from proxy.observe.metrics import ERRORS
from proxy.observe.outcome import Outcome
from proxy.pipeline.urls import validate_base_url
from proxy.web.authn import caller_for, require_admin, services_of
from proxy.web.bodies import read_json_object
from proxy.web.errors import Handler, request_id_of

log = logging.getLogger("proxy.connect")

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
TEMPLATES = web.AppKey("connect_templates", jinja2.Environment)
MESSAGE_TYPE = "connection-proxy:connected"

# The session a page belongs to, once the link opened (an expired one too): error pages then
# offer its way back to the application and may be framed by its origins.
_SESSION = web.RequestKey("connect_session", ConnectSession)
_LINK_ERRORS: dict[LinkProblem, type[ConnectPageError]] = {
    "unknown": ConnectLinkUnknown,
    "used": ConnectLinkUsed,
    "expired": ConnectLinkExpired,
}


# --- rendering -----------------------------------------------------------------------------------


def _security_headers(
    resp: web.StreamResponse, nonce: str | None, origins: tuple[str, ...], image_origin: str | None = None
) -> None:
    ancestors = " ".join(origins) if origins else "'none'"
    src = f"'nonce-{nonce}'" if nonce else "'none'"
    images = f"data: {image_origin}" if image_origin else "data:"
    resp.headers["Content-Security-Policy"] = (
        f"default-src 'none'; script-src {src}; style-src {src}; img-src {images}; connect-src 'self'; "
        f"form-action 'self'; base-uri 'none'; frame-ancestors {ancestors}"
    )
    if not origins:
        resp.headers["X-Frame-Options"] = "DENY"
    resp.headers["Referrer-Policy"] = "no-referrer"
    resp.headers["Cache-Control"] = "no-store"
    resp.headers["X-Content-Type-Options"] = "nosniff"


def _page(
    request: web.Request,
    template: str,
    context: dict[str, Any],
    *,
    status: int = 200,
    origins: tuple[str, ...] = (),
    error_code: str | None = None,
    image_origin: str | None = None,
) -> web.Response:
    nonce = secrets.token_urlsafe(16)
    html = aiohttp_jinja2.render_string(template, request, {**context, "nonce": nonce}, app_key=TEMPLATES)
    resp = web.Response(text=html, content_type="text/html", status=status)
    _security_headers(resp, nonce, origins, image_origin)
    if error_code is not None:
        ERRORS.labels(code=error_code).inc()
        resp.headers["X-Proxy-Error"] = error_code
        resp.headers["X-Request-Id"] = request_id_of(request)
    return resp


def _error_page(request: web.Request, exc: ProxyError, session: ConnectSession | None) -> web.Response:
    if exc.status >= 500:
        log.warning("connect request %s failed: %s %s", request_id_of(request), exc.code, exc.message)
    if isinstance(exc, ConnectPageError):
        title, error = exc.title, exc.return_error
    else:
        title, error = ("Could not connect" if exc.status < 500 else "Something went wrong"), "error"
    back = None
    if session is not None and session.return_url:
        back = sessions.return_url_with(
            session.return_url, connection_id=session.connection_id, status="error", error=error
        )
    context = {"title": title, "message": exc.message, "back_url": back, "request_id": request_id_of(request)}
    origins = session.allowed_origins if session else ()
    return _page(
        request, "connect_error.html", context, status=exc.status, origins=origins, error_code=exc.code
    )


def _pages(handler: Handler) -> Handler:
    """The connect routes' one error handling: a ``ProxyError`` becomes the error page, with
    ``X-Proxy-Error`` and, when the page belongs to a session, its way back and frame origins."""

    @functools.wraps(handler)
    async def pages(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except ProxyError as exc:
            return _error_page(request, exc, request.get(_SESSION))

    return pages


def _link_used(request: web.Request) -> ConnectLinkUsed:
    """Another request ended the session first: the page no longer belongs to it."""
    request.pop(_SESSION, None)
    return ConnectLinkUsed()


def _success_page(request: web.Request, session: ConnectSession, label: str) -> web.Response:
    back = None
    if session.return_url:
        back = sessions.return_url_with(
            session.return_url, connection_id=session.connection_id, status="active"
        )
    context = {
        "label": label,
        "back_url": back,
        "message": {"type": MESSAGE_TYPE, "connectionId": session.connection_id, "status": "active"},
        "origins": list(session.allowed_origins),
    }
    return _page(request, "connect_done.html", context, origins=session.allowed_origins)


def _render_form(
    request: web.Request,
    session: ConnectSession,
    integration: Integration,
    fields: list[sessions.FormField],
    *,
    status: int = 200,
    error_code: str | None = None,
    host: str | None = None,
) -> web.Response:
    base = request.path.rstrip("/")
    context = {
        "label": session.display_name or integration.label,
        "custom_name": session.display_name is not None,
        "logo_url": session.logo_url,
        "host": host,
        "oauth": sessions.uses_oauth_redirect(integration),
        "fields": [f for f in fields if not f.advanced],
        "advanced": [f for f in fields if f.advanced],
        "open_advanced": any(f.error for f in fields if f.advanced),
        "has_errors": any(f.error for f in fields),
        "csrf": session.csrf_value(time.time()),
        "action": request.path,
        "start_url": base + "/oauth/start",
        "status_url": base + "/status",
        "origins": list(session.allowed_origins),
        "message_type": MESSAGE_TYPE,
    }
    origins = session.allowed_origins
    return _page(
        request,
        "connect_form.html",
        context,
        status=status,
        origins=origins,
        error_code=error_code,
        image_origin=sessions.normalize_origin(_origin_of(session.logo_url)) if session.logo_url else None,
    )


def _origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


def _audit(
    request: web.Request, session: ConnectSession, action: str, outcome: str = Outcome.OK, **detail: Any
) -> None:
    services_of(request.app).audit.record(
        AuditEvent(
            ts=time.time(),
            tenant_id=session.tenant_id,
            action=action,
            actor=f"connect:{session.session_id}",
            outcome=outcome,
            connection_id=session.connection_id,
            request_id=request_id_of(request),
            detail={"integration_id": session.integration_id, **detail},
        )
    )


def _connector(request: web.Request) -> Connector:
    svc = services_of(request.app)
    return Connector(svc.store, svc.vault, svc.tokens, svc.settings)


async def _open(request: web.Request) -> ConnectSession:
    """The link's open session; raises the page saying why it cannot be used."""
    session, problem = await _connector(request).open(request.match_info["token"])
    if session is not None:
        request[_SESSION] = session
    if problem is not None or session is None:
        raise _LINK_ERRORS[problem or "unknown"]()
    return session


# --- admin: create a session ---------------------------------------------------------------------


async def create_session(request: web.Request) -> web.Response:
    caller = await caller_for(request, allow_trusted=False)
    require_admin(caller)
    tid = check_id("tenant_id", request.match_info["tenant_id"])
    req = sessions.parse_session_request(await read_json_object(request))
    session, token = await _connector(request).create(tid, req, caller.actor)
    services_of(request.app).audit.record(
        AuditEvent(
            ts=session.created_at,
            tenant_id=tid,
            action="connect_session.create",
            actor=caller.actor,
            connection_id=session.connection_id,
            request_id=request_id_of(request),
            detail={"integration_id": req.integration_id, "session_id": session.session_id},
        )
    )
    out = {
        "token": token,
        "url": f"{services_of(request.app).settings.public_url}/connect/{token}",
        "expires_at": int(session.expires_at),
        "connection_id": session.connection_id,
        "session_id": session.session_id,
    }
    return web.json_response(out, status=201, headers={"Cache-Control": "no-store"})


# --- the end-user page ---------------------------------------------------------------------------


@_pages
async def connect_page(request: web.Request) -> web.Response:
    session = await _open(request)
    integration = services_of(request.app).catalogue.get(session.integration_id)
    scope = await _connector(request).form_scope(session, integration)
    fields = sessions.build_form(
        integration,
        values=scope.values,
        secrets_set=scope.secrets_set,
        hidden=scope.hidden,
        settable=scope.settable,
    )
    return _render_form(request, session, integration, fields, host=scope.host)


async def connect_status(request: web.Request) -> web.Response:
    """Whether the link has been used: the framed page polls it while the user signs in inside a
    popup (provider pages may cut the popup's link back to its opener)."""
    status, connection_id = await _connector(request).status(request.match_info["token"])
    resp = web.json_response(
        {"status": status, "connection_id": connection_id}, status=404 if status == "unknown" else 200
    )
    _security_headers(resp, None, ())
    return resp


def _same_origin(request: web.Request) -> bool:
    """Whether the form post came from our own page. Browsers say so in Sec-Fetch-Site; the
    Origin header is the fallback (``null`` under ``Referrer-Policy: no-referrer``, so it then
    tells nothing and the CSRF value decides)."""
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None:
        return site in ("same-origin", "none")
    origin = request.headers.get("Origin")
    if origin is None or origin == "null":
        return True
    own = {
        sessions.normalize_origin(services_of(request.app).settings.public_url),
        sessions.normalize_origin(f"{request.scheme}://{request.host}"),
    }
    return sessions.normalize_origin(origin) in own - {None}


@_pages
async def connect_submit(request: web.Request) -> web.Response:
    session = await _open(request)
    connector = _connector(request)
    integration = connector.catalogue.get(session.integration_id)
    try:
        posted = await request.post()
    except ValueError:  # UnicodeDecodeError: a form that is not UTF-8 (no browser sends one)
        raise BadRequest("the form is not UTF-8 encoded; submit it from the connect page") from None
    form = {k: v for k, v in posted.items() if isinstance(v, str)}
    if not _same_origin(request) or not session.csrf_ok(form.get("csrf"), time.time()):
        _audit(request, session, "connect.submit", Outcome.REFUSED, reason="csrf")
        raise ConnectFormUnverified()
    if sessions.uses_oauth_redirect(integration):
        raise ConnectsAnotherWay()
    scope = await connector.form_scope(session, integration)
    values, secrets_set = scope.values, scope.secrets_set
    params, problems = sessions.parse_form(
        integration, form, present=secrets_set, hidden=scope.hidden, settable=scope.settable
    )
    base_url = params.get("base_url")
    if integration.base_url is None and isinstance(base_url, str) and "base_url" not in problems:
        problem = validate_base_url(base_url)
        if problem:
            problems["base_url"] = problem
    if not problems:
        if not await connector.consume(session):
            raise _link_used(request)
        try:
            await connector.save(session, integration, params)
        except ProxyError:
            await connector.restore(session)
            raise
        _audit(request, session, "connect.complete", method="form")
        return _success_page(request, session, session.display_name or integration.label)
    # Re-render with what the user typed, except secrets: those are never echoed back.
    for spec in integration.fields:
        if not spec.secret and spec.name in form:
            values[spec.name] = form[spec.name]
    typed = {f.name for f in integration.fields if f.secret and form.get(f.name, "").strip()}
    fields = sessions.build_form(
        integration,
        values=values,
        secrets_set=secrets_set,
        errors=problems,
        reenter=typed,
        hidden=scope.hidden,
        settable=scope.settable,
    )
    _audit(request, session, "connect.submit", Outcome.INVALID, fields=sorted(problems))
    return _render_form(
        request, session, integration, fields, status=422, error_code="VALIDATION_ERROR", host=scope.host
    )


# --- OAuth2 --------------------------------------------------------------------------------------


@_pages
async def oauth_start(request: web.Request) -> web.StreamResponse:
    session = await _open(request)
    connector = _connector(request)
    integration = connector.catalogue.get(session.integration_id)
    if not sessions.uses_oauth_redirect(integration):
        raise ConnectsAnotherWay()
    try:
        url, cookie, browser = await connector.begin_oauth(session, integration)
    except OAuthConfigError as exc:
        raise SignInNotSetUp(
            f"The administrator has not finished setting up this integration ({exc})."
        ) from None
    resp = web.Response(status=302, headers={"Location": url})
    _security_headers(resp, None, ())
    resp.set_cookie(
        cookie,
        browser,
        path="/oauth/callback",
        max_age=oauth_state.STATE_TTL_S,
        httponly=True,
        samesite="Lax",  # sent on the provider's top-level redirect back, not on cross-site subrequests
        secure=services_of(request.app).settings.public_url.startswith("https://"),
    )
    _audit(request, session, "connect.oauth_start")
    return resp


async def oauth_callback(request: web.Request) -> web.StreamResponse:
    resp = await _callback(request)
    value = request.query.get("state")
    if oauth_state.well_formed(value) and oauth_state.binding_cookie_name(value) in request.cookies:
        resp.del_cookie(oauth_state.binding_cookie_name(value), path="/oauth/callback")  # spent either way
    return resp


@_pages
async def _callback(request: web.Request) -> web.StreamResponse:
    connector = _connector(request)
    q = request.query
    pending, session, problem = await connector.take_state(q.get("state"), request.cookies)
    if session is not None:
        request[_SESSION] = session
    if pending is None or session is None or problem is not None:
        if session is not None:
            _audit(request, session, "connect.oauth_callback", Outcome.REFUSED, reason=problem)
        if problem == "used":
            raise ConnectLinkUsed()
        if problem == "expired":
            raise ConnectLinkExpired()
        raise SignInUnknown() if problem == "state" else SignInElsewhere()
    # Before anything else in the answer (errors included) is believed: RFC 9207 §2.4.
    mixup = await connector.issuer_problem(session, q.get("iss"))
    if mixup is not None:
        _audit(request, session, "connect.oauth_callback", Outcome.REFUSED, reason="issuer")
        raise OAuthIssuerMismatch(
            f"Nothing was connected: {mixup}. Go back to the connect page and start again.",
            return_error="issuer_mismatch",
        )
    provider_error = q.get("error")
    if provider_error is not None:
        code = error_code(provider_error) or "unrecognised_error"
        _audit(request, session, "connect.oauth_callback", Outcome.DENIED, error=code)
        if code == "access_denied":
            raise OAuthAccessDenied(return_error=code)
        raise OAuthProviderError(
            f"The provider answered with error {code!r}. Go back to the connect page to try again.",
            return_error=code,
        )
    code_value = q.get("code")
    if not code_value:
        raise AuthorizationCodeMissing()
    integration = connector.catalogue.get(session.integration_id)
    try:
        tokens = await connector.finish_oauth(session, pending, code_value)
    except ProxyError as exc:
        _audit(request, session, "connect.oauth_callback", Outcome.FAILED, error=exc.code)
        raise
    if not await connector.consume(session):
        raise _link_used(request)
    try:
        await connector.save(session, integration, {}, tokens)
    except ProxyError:
        await connector.restore(session)
        raise
    _audit(request, session, "connect.complete", method="oauth2")
    return _success_page(request, session, session.display_name or integration.label)


def setup(app: web.Application) -> None:
    env = aiohttp_jinja2.setup(
        app,
        app_key=TEMPLATES,
        loader=jinja2.FileSystemLoader(str(TEMPLATES_DIR)),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        default_helpers=False,
    )
    env.globals.pop("app", None)
    r = app.router
    r.add_post("/admin/tenants/{tenant_id}/connect-sessions", create_session)
    r.add_get("/connect/{token}", connect_page)
    r.add_post("/connect/{token}", connect_submit)
    r.add_get("/connect/{token}/oauth/start", oauth_start)
    r.add_get("/connect/{token}/status", connect_status)
    r.add_get("/oauth/callback", oauth_callback)
