"""``/_decide``: the decision endpoint a proxy in front (nginx ``auth_request``) asks per call, and
the UDP listener where nginx reports each relayed response (its syslog access log).

The request is the caller's own (nginx passes its headers) plus ``X-Original-Method`` and
``X-Original-URI``; the answer is ``proxy.pipeline.decision.Verdict`` as ``X-CP-*`` headers, read
by the generated configuration (``proxy.nginxconf``) with ``auth_request_set``.

Security: a 200 answer *contains the credential*. The endpoint is off unless ``decision_token``
is set, and answers only callers presenting it (``X-CP-Decision-Token``, compared in constant
time); anyone else gets 401 and learns nothing about connections.

Refusals: nginx passes only 401 and 403 of an ``auth_request`` through (anything else becomes
500), so for ``X-CP-Front: nginx`` every refusal is a 403 carrying the real status, the JSON body
and the headers (``X-CP-Status``, ``X-CP-Body``, ``X-CP-Error``, ``X-CP-Retry-After``...) that the
generated error location returns verbatim. Other callers (Envoy ``ext_authz``, tests) get the
real status and body directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from multidict import CIMultiDictProxy

from proxy.cache import IdentityCache
from proxy.errors import NotFound, ProxyError, Unauthenticated
from proxy.model import Caller
from proxy.observe.metrics import NGINX_REPORTS_DROPPED
from proxy.observe.outcome import Outcome, of_error
from proxy.pipeline.decision import (
    CONTROL_SET,
    MEMO_S,
    NGINX_STRIPS,
    OBSERVATION_TTL_S,
    Decider,
    Verdict,
    Who,
    injectable_headers,
    observation_key,
)
from proxy.pipeline.exchange import refuse_trace
from proxy.web import decide_listen
from proxy.web.authn import services_of
from proxy.web.errors import request_id_of
from proxy.web.proxy_routes import PIPELINE, audit_refusal, header_target

__all__ = ["DECIDER", "DECIDE_PATH", "setup"]

log = logging.getLogger("proxy.decide")

DECIDER = web.AppKey("decider", Decider)
FORGET = web.AppKey("decide_forget", list[asyncio.TimerHandle])
# The inputs read from each read-only header view the lean listener hands in (see ``answer``).
INPUTS = web.AppKey("decide_inputs", IdentityCache[Mapping[str, str], "_Inputs"])
DECIDE_PATH = "/_decide"
TOKEN_HEADER = "X-CP-Decision-Token"
_PATH_PREFIX = "/proxy"
# Headers nginx adds to the subrequest: never part of the caller's request.
_OURS = ("x-cp-", "x-original-")
# Error headers the generated config returns (anything else a refusal carries is not needed;
# the request id travels as X-CP-Request-Id).
ERROR_HEADERS = ("Retry-After", "Retry-After-Ms")


Parts = tuple[int, dict[str, str], bytes]


def _caller_headers(pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(k, v) for k, v in pairs if not (k[:1] in "xX" and k.lower().startswith(_OURS))]


def _check_token(headers: Mapping[str, str], token: str | None) -> None:
    if not token:
        raise NotFound("no such endpoint; the decision endpoint is off until decision_token is set")
    given = headers.get(TOKEN_HEADER, "")
    if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), token.encode()):
        raise Unauthenticated(
            f"the decision endpoint answers only the proxy in front: send {TOKEN_HEADER} with the "
            "decision_token setting (connection-proxy nginx-config puts it in the nginx config)"
        )


def verdict_headers(verdict: Verdict, names: tuple[str, ...]) -> dict[str, str]:
    out = {
        "X-CP-Route": verdict.route,
        "X-CP-Scheme": verdict.scheme,
        "X-CP-Addr": verdict.addr,
        "X-CP-Host": verdict.host,
        "X-CP-SNI": verdict.server_name,
        "X-CP-URI": verdict.uri,
        "X-CP-Obs": verdict.observation,
        "X-Accel-Expires": str(verdict.lifetime_s),
    }
    # Only what is set: an absent control header is empty in nginx, i.e. removed; an injectable
    # one also carries its flag (absent flag: the caller's own value passes, as in path mode).
    for name in ("connection", *CONTROL_SET, *NGINX_STRIPS):
        value = verdict.set_headers.get(name)
        if value:
            out[f"X-CP-H-{name}"] = value
    for name in names:
        value = verdict.set_headers.get(name)
        if value is not None and name not in CONTROL_SET:
            out[f"X-CP-S-{name}"] = "1"
            if value:
                out[f"X-CP-H-{name}"] = value
    return out


def refusal(exc: ProxyError, rid: str) -> Parts:
    """A refusal in the shape the generated nginx error location turns back into ``exc``."""
    body = exc.to_body()
    body["request_id"] = rid
    headers = {
        "X-CP-Status": str(exc.status),
        "X-CP-Error": exc.code,
        # ensure_ascii: one header line, no control character can be in it.
        "X-CP-Body": json.dumps(body, ensure_ascii=True),
        "X-CP-Request-Id": rid,
        "X-Accel-Expires": "0",
    }
    for name in ERROR_HEADERS:
        if name in exc.headers:
            headers[f"X-CP-{name}"] = exc.headers[name]
    return 403, headers, b""


@dataclass(frozen=True, slots=True)
class _Inputs:
    """What a decision reads from its request's headers, past the token check."""

    nginx: bool
    method: str
    path: str  # below /proxy
    query: str
    caller_headers: tuple[tuple[str, str], ...]
    nominated: str


def _inputs(h: Mapping[str, str], pairs: Iterable[tuple[str, str]]) -> _Inputs:
    method = h.get("X-Original-Method", "")
    refuse_trace(method)
    uri = h.get("X-Original-URI", "")
    path, _, query = uri.partition("?")
    if not (path == _PATH_PREFIX or path.startswith(_PATH_PREFIX + "/")) or not method:
        raise NotFound(
            "no such endpoint: calls through nginx are made as in path mode, "
            "/proxy/{path} with X-Connection-Id"
        )
    return _Inputs(
        nginx=h.get("X-CP-Front", "") == "nginx",
        method=method,
        path=path[len(_PATH_PREFIX) :],
        query=query,
        caller_headers=tuple(_caller_headers(pairs)),
        nominated=h.get("X-CP-Caller-Connection", ""),
    )


async def answer(
    app: web.Application, h: Mapping[str, str], pairs: Iterable[tuple[str, str]], rid: str
) -> Parts:
    """One decision as (status, headers, body), whichever listener received it. ``h`` is the
    request's headers (case-insensitive), ``pairs`` the same in order; a listener that hands the
    same read-only ``h`` for the same request bytes (the lean one) has them read once. A refusal
    is answered in nginx's shape for ``X-CP-Front: nginx``, else raised (the listener maps it)."""
    svc = services_of(app)
    decider = app[DECIDER]
    pipeline = app[PIPELINE]
    known = app[INPUTS]
    inputs = known.get(h)
    if inputs is None:
        # Before anything else, and raised as is: nginx passes a 401 through unchanged.
        _check_token(h, svc.settings.decision_token)
    nginx = inputs.nginx if inputs is not None else h.get("X-CP-Front", "") == "nginx"
    outcome: str = Outcome.ERROR
    resolved: Who | None = None
    who: Who = ("-", "-", "-")
    caller: Caller | None = None
    try:
        if inputs is None:
            inputs = _inputs(h, pairs)
            if isinstance(h, CIMultiDictProxy):  # read-only: the same object is the same request
                known.put(h, inputs)
        # As path mode names its caller and connection: authenticated first.
        caller = await svc.auth.authenticate(h, None, allow_trusted=False)
        ident = header_target(caller, h)
        who = (caller.actor, ident.tenant_id, ident.connection_id)
        verdict, resolved = await decider.decide(
            caller=caller,
            tenant_id=ident.tenant_id,
            connection_id=ident.connection_id,
            runtime_user_id=ident.runtime_user_id,
            method=inputs.method,
            path=inputs.path,
            query=inputs.query,
            caller_headers=inputs.caller_headers,
            nominated=inputs.nominated,
            request_id=rid,
        )
        outcome = "allowed" if verdict.route == "upstream" else "service"
        headers = decider.rendered.get(verdict)
        if headers is None:  # a replayed verdict is the same object: render it once
            headers = decider.rendered.put(verdict, verdict_headers(verdict, decider.names))
        return 200, headers, b""
    except ProxyError as exc:
        outcome = of_error(exc)
        if nginx:
            return refusal(exc, rid)
        raise
    finally:
        if resolved is not None:
            who = resolved
        if who[1] != "-":
            pipeline.audit.record_use(who[0], who[1], who[2], "proxy.decide", outcome, rid)
        else:  # refused before its identity was complete: the caller's own tenant, if any
            audit_refusal(pipeline, caller, None, None, outcome, rid, "proxy.decide")
        pipeline.finish(None, "nginx", outcome)


async def decide(request: web.Request) -> web.StreamResponse:
    """``/_decide`` on the main listener (errors mapped by its middleware)."""
    status, headers, body = await answer(
        request.app, request.headers, request.headers.items(), request_id_of(request)
    )
    return web.Response(status=status, headers=headers, body=body or None)


# --- reports: nginx's access log over UDP -------------------------------------------------------


def _is_loopback(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return False
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return (mapped or ip).is_loopback


class ReportProtocol(asyncio.DatagramProtocol):
    """One syslog datagram per relayed response: ``<PRI>... cp: {json}`` (see proxy.nginxconf).

    Whoever reaches the port can send one, so a datagram teaches the limiter only when:
    - it comes from loopback, when the listener is bound to loopback (nginx on this machine);
    - its token verifies (``Decider.verify``, once per datagram);
    - its (token, request id) pair was not seen before within the token's lifetime: nginx
      reports each call once under its own ``$request_id``, so a replayed datagram is dropped.
      The token itself cannot be single-use: one cached decision carries many calls. At most
      ``MAX_SEEN`` pairs are remembered (the oldest go first), so above ``MAX_SEEN`` reports per
      token lifetime a replay of one of the oldest is no longer recognised. The memory is per
      process: with ``--workers`` the kernel spreads datagrams over the workers' sockets
      (``SO_REUSEPORT``), so a replay sent from another source port may reach a worker that
      has not seen it.
    Drops are counted in ``proxy_nginx_reports_dropped_total`` by reason, never by sender.
    """

    MAX_SEEN = 1 << 16

    def __init__(self, decider: Decider) -> None:
        self.decider = decider
        self.tasks: set[asyncio.Task[Any]] = set()
        self.loopback_only = True
        # MAC of the token + request id -> monotonic time it may be forgotten (insertion order
        # is expiry order: every entry lives OBSERVATION_TTL_S).
        self._seen: dict[str, float] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sockname = transport.get_extra_info("sockname")
        self.loopback_only = bool(sockname) and _is_loopback(str(sockname[0]))

    def _first_time(self, token: str, rid: str) -> bool:
        seen = self._seen
        now = time.monotonic()
        key = f"{token.rpartition('.')[2]}|{rid}"
        if key in seen:
            return False
        while seen and (len(seen) >= self.MAX_SEEN or next(iter(seen.values())) <= now):
            del seen[next(iter(seen))]
        seen[key] = now + OBSERVATION_TTL_S
        return True

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        if self.loopback_only and not _is_loopback(str(addr[0])):
            NGINX_REPORTS_DROPPED.labels("source").inc()
            return
        start = data.find(b"{")
        # Anyone who reaches the port can send a datagram: whatever it holds (1e999, deep nesting,
        # lone surrogates) is dropped, never a traceback per datagram in the log.
        try:
            if start < 0:
                raise ValueError
            line = json.loads(data[start:].decode("utf-8", "replace"))
            token, status = str(line["o"]), int(line["s"])
            headers = [(str(k), str(v)) for k, v in dict(line.get("h") or {}).items() if v]
            rid = str(line.get("r") or "")[:64]
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError, RecursionError):
            NGINX_REPORTS_DROPPED.labels("invalid").inc()
            return
        who = self.decider.verify(token) if token else None
        if who is None:
            NGINX_REPORTS_DROPPED.labels("invalid").inc()
            return
        if not self._first_time(token, rid):
            NGINX_REPORTS_DROPPED.labels("replay").inc()
            return
        if self.decider.observed_now(who, status, headers, rid):
            return
        task = asyncio.get_running_loop().create_task(self.decider.observed(who, status, headers, rid))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


REPORTS = web.AppKey("nginx_reports", asyncio.DatagramTransport)
LEAN = web.AppKey("decision_listener", decide_listen.LeanListener)


def _lean_handler(app: web.Application) -> decide_listen.Handler:
    async def handle(
        target: str, method: str, h: CIMultiDictProxy[str], pairs: tuple[tuple[str, str], ...], rid: str
    ) -> Parts:
        if target.partition("?")[0] != DECIDE_PATH:
            raise NotFound(f"no such endpoint; this listener serves only {DECIDE_PATH}")
        return await answer(app, h, pairs, rid)

    return handle


async def _start(app: web.Application) -> None:
    svc = services_of(app)
    key = svc.secrets.ring.get(svc.secrets.ring.newest_version)
    decider = Decider(
        app[PIPELINE],
        injectable_headers(svc.catalogue, svc.settings.nginx_inject_headers),
        observation_key(key),
        svc.settings.nginx_decision_cache_s,
    )
    app[DECIDER] = decider
    inputs: IdentityCache[Mapping[str, str], _Inputs] = IdentityCache(1024)
    app[INPUTS] = inputs
    loop = asyncio.get_running_loop()
    timer: list[asyncio.TimerHandle] = []

    def forget() -> None:  # the memos hold callers' credentials: see decision.MEMO_S
        decider.forget()
        inputs.clear()
        timer[:] = [loop.call_later(MEMO_S, forget)]

    timer.append(loop.call_later(MEMO_S, forget))
    app[FORGET] = timer
    where = svc.settings.nginx_report_listen
    if where is not None and svc.settings.decision_token:
        transport, _ = await loop.create_datagram_endpoint(
            lambda: ReportProtocol(decider), local_addr=where, reuse_port=True
        )
        app[REPORTS] = transport
        log.info("nginx reports: listening on udp %s:%d", *where)


async def _start_listener(app: web.Application) -> None:
    svc = services_of(app)
    lean = svc.settings.decision_listen
    if lean is not None and svc.settings.decision_token:
        app[LEAN] = await decide_listen.start(lean, _lean_handler(app))
        log.info("decisions: lean listener on %s", lean)


async def _stop(app: web.Application) -> None:
    for timer in app.get(FORGET, []):
        timer.cancel()
    transport = app.get(REPORTS)
    if transport is not None:
        transport.close()
    lean = app.get(LEAN)
    if lean is not None:
        await lean.close()
    decider = app.get(DECIDER)
    if decider is not None:
        with contextlib.suppress(Exception):
            await decider.close()


def setup(app: web.Application) -> None:
    app.router.add_route("*", DECIDE_PATH, decide)
    app.on_startup.append(_start)
    app.on_cleanup.insert(0, _stop)


def setup_listener(app: web.Application) -> None:
    """The lean listener (``decision_listen``) opens last in start-up, once the services it
    answers with are started (like the main listener, which opens after start-up)."""
    app.on_startup.append(_start_listener)
