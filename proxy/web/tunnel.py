"""``CONNECT`` interception: HTTPS through ``HTTPS_PROXY`` with the credential injected inside TLS.

Why: vendor SDKs and tools speak https and honour ``HTTPS_PROXY``; they open a ``CONNECT``
tunnel and would hide every request from the proxy inside it. So a tunnel is never blind:

1. ``CONNECT host:port`` is authenticated like every forward-proxy call (``Proxy-Authorization``
   Basic from the proxy URL, or Bearer; 407 otherwise) and refused (403 JSON) unless ``host`` is
   one the named connection is bound to (its allowed hosts / base URL host) and the egress guard
   lets it through.
2. The service answers ``200``, then terminates TLS itself on the same socket
   (``loop.start_tls``) with a leaf for ``host`` minted from the deployment's CA
   (``proxy.security.ca``; ALPN http/1.1 only).
3. The decrypted stream is served by a second aiohttp server protocol (``web.Server``, one for all
   tunnels) whose handler relays every request through ``proxy_routes.relay``, i.e. the same
   pipeline as path mode: injection, limits, learning, egress on resolved addresses, audit,
   metrics. Keep-alive inside the tunnel is aiohttp's; ``Expect: 100-continue`` is answered once
   the call is admitted; WebSocket upgrades are refused (501) since the frames after a switch
   would bypass every check. The caller credential given at ``CONNECT`` is re-checked for every
   request, so a key revoked mid-tunnel stops working within the auth cache's TTL.
4. The upstream side is the service's ordinary upstream client: TLS with full verification
   (system roots, ``SSL_CERT_FILE``, and ``upstream_ca_file``).

Handing over the socket: the ``CONNECT`` handler stays running for the tunnel's life (the way
aiohttp's own WebSocket handler does), and after ``start_tls`` the raw transport's protocol is the
TLS one, so aiohttp's first ``RequestHandler`` and the connection guard see no more bytes. When
the TLS connection ends, the original protocol (the guard's wrapper) is told the connection is
lost, which frees its connection slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import traceback
from dataclasses import dataclass, field
from typing import cast

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from proxy.errors import (
    BadRequest,
    ConfigError,
    HostNotAllowed,
    NotSupported,
    ProxyAuthenticationRequired,
    ProxyError,
    Unauthenticated,
)
from proxy.model import Caller
from proxy.observe import logformat, trace
from proxy.observe.metrics import REQUESTS_TALLY, TUNNELS_OPEN
from proxy.observe.outcome import Outcome, of_error
from proxy.pipeline.plan import check_destination
from proxy.security import egress as egress_mod
from proxy.security.ca import CertificateAuthority, load_ca
from proxy.security.listener_tls import ListenerTLS, listener_tls
from proxy.web.authn import SERVICES
from proxy.web.errors import error_response, request_id_of
from proxy.web.proxy_routes import (
    CONNECT_HANDLER,
    PIPELINE,
    Identity,
    forward_caller,
    forward_target,
    proxy_auth_required,
    relay,
)

log = logging.getLogger("proxy.tunnel")

__all__ = ["LISTENER_TLS", "TUNNELS", "TUNNEL_CA", "Tunnels", "connect", "reload_tls", "setup"]

TUNNEL_CA = web.AppKey("tunnel_ca", CertificateAuthority)
# Set when the listener itself speaks TLS (https:// proxy URLs); read by the connection guard.
LISTENER_TLS = web.AppKey("listener_tls", ListenerTLS)
# Idle kept-alive tunnel connections are closed after this (aiohttp's server default is 75 s).
TUNNEL_KEEPALIVE_S = 75.0


@dataclass(frozen=True, slots=True)
class _Tunnel:
    """What every request inside one tunnel shares."""

    credential: dict[str, str] = field(repr=False)  # the CONNECT's Proxy-Authorization, re-checked
    identity: Identity
    origin: str  # https://host[:port]


class _TunnelProtocol(asyncio.Protocol):
    """The TLS side's application protocol: aiohttp's handler, plus the end-of-tunnel signal.

    ``start_tls`` does not call ``connection_made`` (its caller gets the transport), yet the
    client's first request can be decrypted before ``start_tls`` returns: bytes (and an EOF)
    that arrive before ``connection_made`` are held and replayed."""

    __slots__ = ("_done", "_eof", "_inner", "_pending")

    def __init__(self, inner: RequestHandler, done: asyncio.Future[None]) -> None:
        self._inner = inner
        self._done = done
        self._pending: list[bytes] | None = []
        self._eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._inner.connection_made(transport)
        pending, self._pending = self._pending, None
        for data in pending or ():
            self._inner.data_received(data)
        if self._eof:
            self._inner.eof_received()

    def data_received(self, data: bytes) -> None:
        if self._pending is not None:
            self._pending.append(data)
            return
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self._pending is not None:
            self._eof = True
        else:
            self._inner.eof_received()
        return None

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._pending is None:  # aiohttp's handler never saw a connection otherwise
            self._inner.connection_lost(exc)
        if not self._done.done():
            self._done.set_result(None)


class Tunnels:
    """The server protocol of every tunnel's decrypted side, and which tunnel each one serves."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self._server: web.Server | None = None  # built on first use: it needs the running loop
        self._by_handler: dict[RequestHandler, _Tunnel] = {}
        self.opened = 0  # tunnels established since start-up
        self.open = 0  # tunnels open now (also the proxy_tunnels_open gauge, over all apps)

    @property
    def server(self) -> web.Server:
        if self._server is None:
            self._server = web.Server(self._handle, keepalive_timeout=TUNNEL_KEEPALIVE_S, access_log=None)
        return self._server

    def protocol(self, tunnel: _Tunnel, done: asyncio.Future[None]) -> _TunnelProtocol:
        inner = self.server()
        self._by_handler[inner] = tunnel
        done.add_done_callback(lambda _: self._by_handler.pop(inner, None))
        return _TunnelProtocol(inner, done)

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """Each request in a tunnel is a call of its own: its own request and trace ids (not the
        CONNECT's, whose context the tunnel's tasks inherit) and its own access line, as the error
        middleware gives routed requests."""
        rid = request_id_of(request)
        headers = request.headers
        parent = headers.get("traceparent")
        ctx, token = trace.begin(rid, parent, headers.get("tracestate") if parent else None)
        status: int | None = None
        try:
            resp = await self._answer(request, rid)
            status = resp.status
            return resp
        finally:
            if ctx.front is not None:
                logformat.access_line(ctx, status)
            trace.end(token)

    async def _answer(self, request: web.BaseRequest, rid: str) -> web.StreamResponse:
        tunnel = self._by_handler.get(request.protocol)
        try:
            if tunnel is None:  # the tunnel ended while this request was being parsed
                raise BadRequest("the tunnel is closed")
            return await self._relay(tunnel, request)
        except ProxyError as exc:
            if exc.status >= 500 and not isinstance(exc, NotSupported):
                log.warning("tunnel request %s failed: %s %s", rid, exc.code, exc.message)
            resp = error_response(exc, rid)
            if isinstance(exc, ProxyAuthenticationRequired | NotSupported | BadRequest):
                resp.force_close()  # the client must re-CONNECT (and re-authenticate) or give up
            return resp
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception as exc:  # the same generic answer as the error middleware's
            log.error(
                "tunnel request %s: unexpected %s\n%s",
                rid,
                type(exc).__name__,
                "".join(traceback.format_tb(exc.__traceback__)),
            )
            return error_response(
                ProxyError(f"internal error; quote request id {rid} when reporting it"), rid
            )

    async def _relay(self, tunnel: _Tunnel, request: web.BaseRequest) -> web.StreamResponse:
        h = request.headers
        upgrade = h.get("Upgrade")
        if upgrade is not None:
            raise NotSupported(
                f"protocol upgrades ({upgrade[:32]!r}) are not carried through the proxy: after a "
                "switch the proxy could no longer see the requests it injects credentials into. "
                "Call the API over plain HTTP/1.1 requests"
            )
        raw = request.raw_path
        if raw[:1] != "/":
            raise BadRequest(
                "requests inside a tunnel must use a path (origin form), not an absolute URL or '*'"
            )
        try:
            caller = await self.app[SERVICES].auth.authenticate(tunnel.credential, None, allow_trusted=False)
        except Unauthenticated as exc:
            raise proxy_auth_required(exc.message) from None
        ident = tunnel.identity
        identity = Identity(caller, ident.tenant_id, ident.connection_id, ident.runtime_user_id)
        expect = h.get("Expect")
        return await relay(
            request,
            self.app,
            "tunnel",
            tunnel.origin + raw,
            identity,
            upgrade_scheme=False,
            expect_continue=expect is not None and expect.strip().lower() == "100-continue",
        )

    async def shutdown(self, timeout: float) -> None:
        if self._server is not None:
            await self._server.shutdown(timeout)


TUNNELS = web.AppKey("tunnels", Tunnels)


def _authority(target: str) -> tuple[str, int]:
    """``host:port`` of a CONNECT (RFC 9110 9.3.6: authority form, port required)."""
    host, sep, port = target.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or "/" in host or "@" in host:
        raise BadRequest("CONNECT needs an authority target, HOST:PORT (e.g. api.example.com:443)")
    return host.lower().rstrip("."), int(port)


async def _bound(app: web.Application, identity: Identity, host: str) -> None:
    """Refuse a host the connection is not bound to (no blind tunnels) before answering 200."""
    pipeline = app[PIPELINE]
    creds = await pipeline.credentials(identity.tenant_id, identity.connection_id, identity.runtime_user_id)
    plan = pipeline.plan_for(creds)
    if not egress_mod.host_matches(host, plan.host_patterns):
        raise HostNotAllowed(
            f"CONNECT to {host!r} refused: it is not among the allowed hosts of connection "
            f"{plan.record.connection_id!r} ({', '.join(plan.host_patterns)}); the proxy opens no tunnels it cannot "
            "inject into. Call that host without the proxy (NO_PROXY), or bind a connection to it"
        )
    check_destination(pipeline.egress, plan, "https", host)


CONNECT_ACTION = "proxy.connect"


def _audit_refusal(
    request: web.Request, caller: Caller | None, identity: Identity | None, exc: ProxyError, rid: str
) -> None:
    """A refused CONNECT into the audit trail of the tenant it concerns, outcome = its code.

    Who chose the tenant decides whether it is recorded: an authenticated caller's refusals (a
    host the connection is not bound to, egress, an unknown connection) go to its tenant; so
    does one naming a connection of *another* tenant (404, as an unknown one), with no
    connection id: the other tenant's trail never holds it, or any key could flood any trail,
    and the caller's trail shows the probe without a connection id of its own it could be
    mistaken for. A 407 only when it presented an existing API key id (wrong secret, revoked
    key), to that key's tenant, as ``api_key:<id>``. Any other unauthenticated CONNECT names no
    tenant it could be held to (the tenant in a proxy user is its own choice, and letting it
    write into any trail would let it flood that trail's buffer), so it is counted in the
    request metrics only.
    Uses fold per (actor, tenant, connection, outcome) like every use; no header value is kept.
    A tunnel granted but whose TLS handshake the client refused is recorded the same way
    (``tls_handshake_failed``, in ``connect``)."""
    svc = request.app[SERVICES]
    if identity is not None:
        actor, tenant, connection = identity.caller.actor, identity.tenant_id, identity.connection_id
    elif caller is not None and caller.tenant_id is not None:
        # Authenticated, but what it named was refused before it became an identity: another
        # tenant's connection, an invalid connection id.
        actor, tenant, connection = caller.actor, caller.tenant_id, None
    elif isinstance(exc, ProxyAuthenticationRequired):
        owner = svc.auth.refused_key_owner(request.headers)
        if owner is None:
            return
        actor, tenant, connection = f"api_key:{owner[0]}", owner[1], None
    else:
        return
    svc.audit.record_use(actor, tenant, connection, CONNECT_ACTION, of_error(exc), rid)


async def connect(request: web.Request) -> web.StreamResponse:
    """The ``CONNECT`` handler: check, answer 200, terminate TLS, serve the tunnel to its end."""
    app = request.app
    rid = request_id_of(request)
    caller: Caller | None = None
    identity: Identity | None = None
    try:
        caller, who = await forward_caller(request, app)
        identity = forward_target(caller, who, request.headers)
        host, port = _authority(request.raw_path)
        await _bound(app, identity, host)
        context = app[TUNNEL_CA].server_context(host)
    except ProxyError as exc:
        REQUESTS_TALLY.inc(("connect", of_error(exc)))
        _audit_refusal(request, caller, identity, exc, rid)
        resp = error_response(exc, rid)
        resp.force_close()  # the client may already be sending tunnel bytes: never read them
        return resp
    transport = request.transport
    if transport is None:
        REQUESTS_TALLY.inc(("connect", Outcome.CLIENT_DISCONNECTED.value))
        return web.Response(status=499)
    netloc = f"[{host}]" if ":" in host else host
    tunnel = _Tunnel(
        credential={"Proxy-Authorization": request.headers.get("Proxy-Authorization", "")},
        identity=identity,
        origin=f"https://{netloc}" + ("" if port == 443 else f":{port}"),
    )
    if not tunnel.credential["Proxy-Authorization"]:
        tunnel.credential["Authorization"] = request.headers.get("Authorization", "")
    outer = transport.get_protocol()
    loop = asyncio.get_running_loop()
    established = web.StreamResponse(status=200, reason="Connection Established")
    established.force_close()
    transport.pause_reading()  # the client's first TLS bytes belong to the TLS side, not aiohttp
    await established.prepare(request)
    tunnels = app[TUNNELS]
    done: asyncio.Future[None] = loop.create_future()
    tls: asyncio.BaseTransport | None = None
    outcome: str = Outcome.OK
    try:
        proto = tunnels.protocol(tunnel, done)
        tls = await loop.start_tls(
            cast(asyncio.WriteTransport, transport),
            proto,
            context,
            server_side=True,
            ssl_handshake_timeout=app[SERVICES].settings.head_timeout_s,
        )
        if tls is None:  # the client went away during the handshake
            raise ConnectionResetError
        proto.connection_made(tls)
        tunnels.opened += 1
        tunnels.open += 1
        TUNNELS_OPEN.inc()
        try:
            await done
        finally:
            tunnels.open -= 1
            TUNNELS_OPEN.dec()
    except (ssl.SSLError, ConnectionError, OSError, TimeoutError) as exc:
        outcome = Outcome.TLS_HANDSHAKE_FAILED
        # Most often the client does not trust the CA; the reason names no secret.
        log.info(
            "CONNECT %s: TLS handshake with the client failed (%s); does it trust the proxy's CA "
            "(connection-proxy ca export, GET /ca.pem)?",
            host,
            type(exc).__name__,
        )
        # On the caller's record too: after a CA rotation is finished, which callers' clients
        # still trust only the old CA.
        app[SERVICES].audit.record_use(
            identity.caller.actor, identity.tenant_id, identity.connection_id, CONNECT_ACTION, outcome, rid
        )
        transport.abort()
    except asyncio.CancelledError:
        outcome = Outcome.CLIENT_DISCONNECTED
        if tls is not None:
            tls.close()
        raise
    finally:
        REQUESTS_TALLY.inc(("connect", outcome))
        if not done.done():
            done.set_result(None)
        # The raw transport's protocol is the TLS one now: tell the original protocol (the
        # connection guard's wrapper around aiohttp's handler) that its connection is gone.
        with contextlib.suppress(Exception):
            loop.call_soon(outer.connection_lost, None)
    return established


async def ca_pem(request: web.Request) -> web.Response:
    """``GET /ca.pem`` (public): the CA certificates clients must trust; never the key."""
    return web.Response(
        text=request.app[TUNNEL_CA].bundle_pem,
        content_type="application/x-pem-file",
        headers={"Cache-Control": "public, max-age=300"},
    )


async def _shutdown(app: web.Application) -> None:
    await app[TUNNELS].shutdown(5.0)


def setup(app: web.Application) -> None:
    """Load the CA (dev mode: generate it), serve ``/ca.pem`` and take over ``CONNECT``; prepare
    the listener's own TLS when configured (``proxy.security.listener_tls``).

    With dev mode off and no ``ca_cert_file``/``ca_key_file``, CONNECT stays refused (405)."""
    settings = app[SERVICES].settings
    ca = load_ca(settings)
    tls = listener_tls(settings, ca)
    if tls is not None:
        log.info("listener TLS on (%s certificate)", tls.mode)
        app[LISTENER_TLS] = tls
    if ca is None:
        return
    log.info("CONNECT interception on: CA %s (sha256 %s)", ca.source, ca.fingerprint)
    app[TUNNEL_CA] = ca
    app[TUNNELS] = Tunnels(app)
    app[CONNECT_HANDLER] = connect
    app.router.add_get("/ca.pem", ca_pem)
    app.on_shutdown.append(_shutdown)


def reload_tls(app: web.Application) -> list[str]:
    """SIGHUP: re-read the CA files and the listener's certificate, keep serving. The CA object
    is updated in place (its leaf cache dropped), so new tunnels and handshakes use the new one
    at once; tunnels already open keep theirs. Each part is reloaded on its own: a bad file keeps
    that part as it was, and the first such ``ConfigError`` is raised after both were tried.
    Returns what changed, for the log (fingerprints, never keys)."""
    done: list[str] = []
    failed: ConfigError | None = None
    ca = app.get(TUNNEL_CA)
    if ca is not None:
        try:
            fresh = load_ca(app[SERVICES].settings)
        except ConfigError as exc:
            failed = exc
        else:
            if fresh is not None and ca.adopt(fresh):
                done.append(
                    f"CA reloaded from {ca.source}: signing sha256 {ca.fingerprint}, {len(ca.trusted)} trusted"
                )
            else:
                done.append("CA unchanged")
    tls = app.get(LISTENER_TLS)
    if tls is not None:
        try:
            if tls.reload():
                done.append("listener certificate reloaded")
        except ConfigError as exc:
            failed = failed or exc
    if failed is not None:
        for line in done:
            log.info("SIGHUP: %s", line)
        raise failed
    return done
