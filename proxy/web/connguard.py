"""Bounds on client connections: how many are served at once, and how long a request head may take.

Why: aiohttp accepts every connection and waits for each request head as long as its keep-alive
timer allows, so idle or half-sent connections pile up until the process runs out of file
descriptors, and then nothing is answered, not even ``/healthz`` (1100 half-sent connections
stopped a 1024-descriptor process). aiohttp has no setting for either bound, so a protocol
wrapper sits between the event loop and aiohttp's ``RequestHandler``:

- **cap**: at most ``max_connections`` connections are served. The next ``connection_reserve``
  are accepted into an ops lane that answers ``GET /healthz`` (probes keep working while the
  service is full) and anything else with 503 ``SERVICE_UNAVAILABLE`` + ``Retry-After``, then
  closes. Beyond that a new connection is closed at once, before a byte is read, so descriptors
  are never exhausted by clients.
- **head deadline**: a connection must deliver a complete request head within ``head_timeout_s``
  of connecting; on a kept-alive connection, within ``head_timeout_s`` of the first byte of the
  next head (an idle kept-alive connection is aiohttp's keep-alive timeout's business). Ops-lane
  connections get at most ``OPS_HEAD_TIMEOUT_S``, so reserve slots come free quickly.

The wrapper reads two private attributes of aiohttp's ``RequestHandler``: ``_request_count``
(incremented by ``data_received`` when the parser completes a head) and ``_waiter`` (set while the
handler waits for its next request). ``tests/web/test_connguard.py`` fails if either changes.

``plan_connections`` compares the cap with ``RLIMIT_NOFILE`` at start-up (raising the soft limit
towards the hard one when that is enough) and lowers the cap, loudly, when descriptors cannot
cover it: each served call can hold a client and an upstream socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
import ssl
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, cast

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from proxy.errors import ServiceUnavailable
from proxy.observe.metrics import CLIENT_CONNECTIONS_CLOSED
from proxy.settings import Settings
from proxy.web import ops
from proxy.web.errors import error_response
from proxy.web.tunnel import LISTENER_TLS

log = logging.getLogger("proxy.connguard")

OPS_HEAD_TIMEOUT_S = 2.0
# Descriptors kept free for everything that is not a client connection: the store, Redis,
# log files, the listening socket, the envelope's encoding processes.
FD_MARGIN = 64
# The private RequestHandler attributes the head deadline reads (see the module docstring).
HANDLER_INTERNALS = ("_request_count", "_waiter")


def handler_internals_present() -> bool:
    slots: set[str] = set()
    for cls in RequestHandler.__mro__:
        slots.update(getattr(cls, "__slots__", ()))
    return all(name in slots for name in HANDLER_INTERNALS)


class _Guarded(asyncio.Protocol):
    """One client connection: delegates to aiohttp's handler, enforces the head deadline."""

    __slots__ = ("_guard", "_inner", "_lane", "_timeout", "_timer", "_transport")

    def __init__(self, guard: ConnectionGuard, inner: RequestHandler, lane: str, timeout: float) -> None:
        self._guard = guard
        self._inner = inner
        self._lane = lane
        self._timeout = timeout
        self._timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._inner.connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        inner = self._inner
        heads = inner._request_count
        inner.data_received(data)
        if inner._request_count != heads:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        elif self._timer is None and inner._waiter is not None:
            # Bytes while the handler waits for a request: a new head has begun.
            self._arm()

    def eof_received(self) -> bool | None:
        self._inner.eof_received()
        return None  # aiohttp's handler never keeps a half-closed connection open

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._guard._release(self, self._lane)
        self._inner.connection_lost(exc)

    def _arm(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(self._timeout, self._expire)

    def _expire(self) -> None:
        self._timer = None
        CLIENT_CONNECTIONS_CLOSED.labels(reason="head_timeout").inc()
        if self._transport is not None:
            self._transport.abort()  # frees the descriptor now; connection_lost follows

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


class _GuardedTLS(_Guarded):
    """A connection to an https listener: its TLS handshake runs inside the connection's slot
    and deadline (``loop.start_tls`` on the accepted socket), then it is a ``_Guarded`` one.

    Why not ``create_server(ssl=...)``: asyncio never tells the protocol about a connection whose
    handshake failed (``SSLProtocol.connection_lost`` skips the application protocol until the
    handshake is done), so every failed handshake, a scanner's or a plain-HTTP client's, would
    keep its slot forever and soon fill ``max_connections``. Here the handshake task frees it.
    The head deadline counts from the TCP connect, so it bounds the handshake too. Bytes the TLS
    layer decrypts before the handshake task has resumed are held and replayed."""

    __slots__ = ("_context", "_eof", "_pending", "_released")

    def __init__(
        self,
        guard: ConnectionGuard,
        inner: RequestHandler,
        lane: str,
        timeout: float,
        context: ssl.SSLContext,
    ) -> None:
        super().__init__(guard, inner, lane, timeout)
        self._context = context
        self._pending: list[bytes] | None = []
        self._eof = False
        self._released = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._arm()
        self._guard._handshake(self, self._tls(self._transport))

    async def _tls(self, raw: asyncio.Transport) -> None:
        loop = asyncio.get_running_loop()
        try:
            tls = await loop.start_tls(
                raw, self, self._context, server_side=True, ssl_handshake_timeout=self._timeout
            )
        except (OSError, ssl.SSLError, TimeoutError):  # no trust, not TLS, too slow, gone
            tls = None
        except asyncio.CancelledError:
            raw.abort()
            self._give_up()
            raise
        if tls is None or self._released:
            raw.abort()
            self._give_up()
            return
        self._transport = tls
        self._inner.connection_made(tls)
        pending, self._pending = self._pending, None
        for data in pending or ():
            super().data_received(data)
        if self._eof:
            super().eof_received()

    def data_received(self, data: bytes) -> None:
        if self._pending is not None:
            self._pending.append(data)
            return
        super().data_received(data)

    def eof_received(self) -> bool | None:
        if self._pending is not None:
            self._eof = True
            return None
        return super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._pending is not None:  # lost before aiohttp's handler saw the connection
            self._give_up()
        elif not self._released:
            self._released = True
            super().connection_lost(exc)

    def _give_up(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._released:
            self._released = True
            self._guard._release(self, self._lane)


class _Refused(asyncio.Protocol):
    """Over every limit: closed before reading a byte, so the descriptor is free at once."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        CLIENT_CONNECTIONS_CLOSED.labels(reason="over_limit").inc()
        cast(asyncio.Transport, transport).abort()


class ConnectionGuard:
    """The protocol factory the listening socket uses instead of aiohttp's ``web.Server``."""

    def __init__(
        self,
        server: web.Server,
        max_connections: int,
        reserve: int,
        head_timeout_s: float,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        if not handler_internals_present():
            raise RuntimeError(
                "aiohttp's RequestHandler no longer has "
                f"{', '.join(HANDLER_INTERNALS)}: proxy/web/connguard.py needs updating"
            )
        self.max_connections = max_connections
        self.reserve = reserve
        self.head_timeout_s = head_timeout_s
        self._server = server
        self._ops = web.Server(self._ops_lane, access_log=None)
        self.open = 0  # main-lane connections
        self._ops_conns: set[_Guarded] = set()
        self._tls = tls  # the https listener's context (proxy.security.listener_tls)
        self._handshakes: dict[_Guarded, asyncio.Task[None]] = {}

    def _conn(self, inner: RequestHandler, lane: str, timeout: float) -> _Guarded:
        if self._tls is None:
            return _Guarded(self, inner, lane, timeout)
        return _GuardedTLS(self, inner, lane, timeout, self._tls)

    def __call__(self) -> asyncio.Protocol:
        if self.open < self.max_connections:
            self.open += 1
            return self._conn(self._server(), "main", self.head_timeout_s)
        if len(self._ops_conns) < self.reserve:
            conn = self._conn(self._ops(), "ops", min(self.head_timeout_s, OPS_HEAD_TIMEOUT_S))
            self._ops_conns.add(conn)
            return conn
        return _Refused()

    def _handshake(self, conn: _Guarded, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._handshakes[conn] = task  # a reference until done; close() cancels the rest
        task.add_done_callback(lambda _: self._handshakes.pop(conn, None))

    def _release(self, conn: _Guarded, lane: str) -> None:
        if lane == "main":
            self.open -= 1
        else:
            self._ops_conns.discard(conn)

    async def _ops_lane(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.method in ("GET", "HEAD") and request.path == "/healthz":
            resp = await ops.healthz(cast(web.Request, request))
        else:
            CLIENT_CONNECTIONS_CLOSED.labels(reason="over_limit").inc()
            resp = error_response(
                ServiceUnavailable(
                    f"the service is serving its limit of {self.max_connections} client connections "
                    "(max_connections); retry shortly",
                    headers={"Retry-After": "1"},
                )
            )
        resp.force_close()
        return resp

    def close(self) -> None:
        """Drop the ops lane's connections and unfinished TLS handshakes (the runner's shutdown
        drains the main lane)."""
        for conn in list(self._ops_conns):
            conn.abort()
        for task in list(self._handshakes.values()):
            task.cancel()


# --- descriptors -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConnectionPlan:
    max_connections: int
    soft_limit: int
    message: str
    lowered: bool


def _open_descriptors() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 32


def plan_connections(
    max_connections: int, reserve: int, limits: tuple[int, int] | None = None, in_use: int | None = None
) -> ConnectionPlan:
    """The connection cap the process's descriptor limit can honour, raising the soft limit if needed.

    Each served connection can hold two descriptors (the client's and an upstream socket), each
    reserve connection one, and ``FD_MARGIN`` stay free for the rest of the process.
    """
    setting = resource.getrlimit(resource.RLIMIT_NOFILE) if limits is None else limits
    soft, hard = setting
    in_use = _open_descriptors() if in_use is None else in_use
    need = in_use + FD_MARGIN + reserve + 2 * max_connections
    if soft != resource.RLIM_INFINITY and soft < need and limits is None:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    if soft == resource.RLIM_INFINITY or soft >= need:
        return ConnectionPlan(
            max_connections,
            soft,
            f"max_connections {max_connections} (+{reserve} for /healthz): RLIMIT_NOFILE {soft} "
            f"covers the ~{need} descriptors they may need",
            False,
        )
    fitting = max(1, (soft - in_use - FD_MARGIN - reserve) // 2)
    return ConnectionPlan(
        min(fitting, max_connections),
        soft,
        f"max_connections {max_connections} needs ~{need} file descriptors but RLIMIT_NOFILE is "
        f"{soft} (hard {hard}): serving at most {min(fitting, max_connections)} client connections. "
        "Raise the limit (LimitNOFILE= in the systemd unit, ulimit -n) or lower max_connections",
        True,
    )


# --- serving -----------------------------------------------------------------------------------


async def start_guarded(
    runner: web.AppRunner,
    settings: Settings,
    *,
    max_connections: int | None = None,
    sock: Any = None,
    reuse_port: bool = False,
) -> tuple[ConnectionGuard, asyncio.Server]:
    """Listen for ``runner`` (already set up) through a ``ConnectionGuard``; on ``sock`` or on
    the settings' address. Close the returned server and the guard before ``runner.cleanup()``."""
    assert runner.server is not None, "runner.setup() first"
    # https:// proxy URLs: the listener's TLS (proxy.web.tunnel, proxy.security.listener_tls),
    # run by the guard so a failed handshake frees its slot (see _GuardedTLS).
    tls = runner.app.get(LISTENER_TLS) if isinstance(runner, web.AppRunner) else None
    guard = ConnectionGuard(
        runner.server,
        max_connections or settings.max_connections,
        settings.connection_reserve,
        settings.head_timeout_s,
        tls.context if tls is not None else None,
    )
    loop = asyncio.get_running_loop()
    if sock is not None:
        server = await loop.create_server(guard, sock=sock, backlog=1024)
    else:
        server = await loop.create_server(
            guard,
            settings.listen_host,
            settings.listen_port,
            backlog=1024,
            reuse_address=True,
            reuse_port=reuse_port or None,
        )
    return guard, server


async def serve(
    app: web.Application, settings: Settings, *, reuse_port: bool, announce: Callable[[str], None]
) -> None:
    """Serve ``app`` behind the guard until SIGTERM/SIGINT, then stop gracefully (10 s for
    in-flight requests, then the app's cleanup): what ``web.run_app`` did, plus the guard."""
    plan = plan_connections(settings.max_connections, settings.connection_reserve)
    (log.warning if plan.lowered else log.info)("%s", plan.message)
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=75.0, shutdown_timeout=10.0)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    guard: ConnectionGuard | None = None
    server: asyncio.Server | None = None
    try:
        guard, server = await start_guarded(
            runner, settings, max_connections=plan.max_connections, reuse_port=reuse_port
        )
        host = settings.listen_host if ":" not in settings.listen_host else f"[{settings.listen_host}]"
        scheme = "https" if settings.listen_tls else "http"
        announce(f"Running on {scheme}://{host}:{settings.listen_port}\n(Press CTRL+C to quit)")
        await stop.wait()
    finally:
        if server is not None:
            server.close()
        if guard is not None:
            guard.close()
        await runner.cleanup()
