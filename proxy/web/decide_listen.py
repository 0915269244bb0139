"""The lean listener for ``/_decide`` (setting ``decision_listen``): HTTP/1.1 on a loopback port
or a unix socket, for the proxy in front and nothing else.

Why it exists: nginx asks for a decision on every call, and on the main listener most of that
call's CPU was aiohttp's server machinery (router, middleware, request and response objects,
the per-request trace context and access line), not the decision (bench/offload.py). The
requests here come from nginx's ``auth_request`` subrequests: small, bodiless, kept alive. This
module reads exactly that shape with a few bytes operations and writes the answer in one
``write``; anything else is refused, never guessed at.

Invariants:
- parsing is strict: a request line ``METHOD TARGET HTTP/1.x``, header names that are HTTP
  tokens, values without control characters, a head of at most ``MAX_HEAD`` bytes, no chunked
  body (a ``Content-Length`` body is read and ignored); a malformed request is answered 400 and
  the connection closed, so no request is ever split or joined differently from nginx's view;
- an answer whose header value holds CR or LF is never written (a 500 instead): a credential
  cannot smuggle a header into nginx's view of the decision;
- errors go through the one mapping (``proxy.web.errors.error_parts``); an unexpected exception
  is logged with its frames only and answered as a generic 500 with the request id;
- the token check, audit and metrics are the decision's own (``proxy.web.decide.answer``);
- a head seen before is not parsed again: the parse is a pure function of its bytes, kept with
  its headers as a read-only view (``heads``), so every handler sees exactly what a first parse
  gives; a 200 answer whose header dict is the same object as before (a replayed verdict) is
  written from the bytes rendered for it then (``rendered``).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import re
import stat
import traceback
from collections.abc import Awaitable, Callable, Coroutine
from http import HTTPStatus
from typing import Any

from multidict import CIMultiDict, CIMultiDictProxy

from proxy import errors
from proxy.cache import BoundedCache, IdentityCache
from proxy.web.errors import error_parts, request_id_from

__all__ = ["MAX_HEAD", "LeanListener", "Pair", "Parts", "start"]

log = logging.getLogger("proxy.decide")

Pair = tuple[str, str]
Parts = tuple[int, dict[str, str], bytes]
# (target, method, headers, the same as pairs in order, request id) -> answer; raises
# ProxyError to refuse. The headers are read-only and shared by every request with the same
# head bytes (see ``_Conn._next``).
Handler = Callable[[str, str, CIMultiDictProxy[str], tuple[Pair, ...], str], Awaitable[Parts]]

MAX_HEAD = 64 * 1024  # nginx forwards at most its own large_client_header_buffers (4 x 8k)
MAX_BODY = 1 << 20
# nginx sends the same subrequest head again and again (same caller, same target): heads up to
# this size are parsed once and their parse kept (at most HEADS_KEPT of them).
MEMO_HEAD = 4096
HEADS_KEPT = 1024
# Heads hold the caller's credential: kept parses are dropped this often (see decision.MEMO_S).
HEADS_FORGET_S = 10.0
IDLE_S = 75.0  # a kept-alive connection without a request for this long is closed
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HEADERS = re.compile(
    rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[^\x00-\x08\x0a-\x1f\x7f]*(?:\r\n[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[^\x00-\x08\x0a-\x1f\x7f]*)*"
)
_BAD_LINE = re.compile(rb"[\x00-\x20\x7f]")
_REASONS = {s.value: s.phrase for s in HTTPStatus}


class _Bad(Exception):
    """A request this listener will not interpret: 400 and close."""


Parsed = tuple[str, str, bool, tuple[Pair, ...], int, CIMultiDictProxy[str]]


def _parse(head: bytes) -> Parsed:
    """(method, target, keep_alive, header pairs, body length, headers) of one request head."""
    line, _, block = head.partition(b"\r\n")
    parts = line.split(b" ")
    if len(parts) != 3 or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise _Bad
    method, target, version = parts
    if not _TOKEN.fullmatch(method) or not target.startswith(b"/") or _BAD_LINE.search(target):
        raise _Bad
    # One pass over the whole block: every line a token, a colon and a value without control
    # characters (no bare CR or LF either).
    if block and not _HEADERS.fullmatch(block):
        raise _Bad
    pairs: list[Pair] = []
    keep_alive = version == b"HTTP/1.1"
    length = 0
    for raw in block.split(b"\r\n") if block else ():
        name, _, value = raw.partition(b":")
        key, val = name.decode("ascii"), value.strip(b" \t").decode("utf-8", "surrogateescape")
        pairs.append((key, val))
        first = key[0]
        if first not in "cCtT":
            continue
        lower = key.lower()
        if lower == "connection":
            tokens = {t.strip() for t in val.lower().split(",")}
            keep_alive = "keep-alive" in tokens if version == b"HTTP/1.0" else "close" not in tokens
        elif lower == "content-length":
            # ASCII digits only: str.isdigit() admits '²' and Arabic-Indic digits, which int() reads or refuses.
            if not (val.isascii() and val.isdigit()) or length or int(val) > MAX_BODY:
                raise _Bad
            length = int(val)
        elif lower == "transfer-encoding":
            raise _Bad  # nginx sends the subrequest without a body; chunked is not ours to guess
    h = CIMultiDictProxy(CIMultiDict(pairs))
    return method.decode("ascii"), target.decode("ascii"), keep_alive, tuple(pairs), length, h


def _render(status: int, headers: dict[str, str], body: bytes, close: bool) -> bytes:
    out = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\nContent-Length: {len(body)}\r\n"]
    if body:
        out.append("Content-Type: application/json\r\n")
    if close:
        out.append("Connection: close\r\n")
    out.extend(f"{k}: {v}\r\n" for k, v in headers.items())
    out.append("\r\n")
    text = "".join(out)
    # Exactly the CRLFs written above (the first piece holds two lines): none smuggled in a
    # name or value.
    if text.count("\n") != len(out) + 1 or text.count("\r") != len(out) + 1:
        raise ValueError("a header of the answer holds CR or LF")
    return text.encode("utf-8", "surrogateescape") + body


class _Conn(asyncio.Protocol):
    def __init__(self, lean: LeanListener) -> None:
        self.lean = lean
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.busy = False
        self.seen = lean.loop.time()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.lean.conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lean.conns.discard(self)
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.seen = self.lean.loop.time()
        self.buf += data
        if not self.busy:
            self._next()
        elif len(self.buf) > MAX_HEAD + MAX_BODY and self.transport is not None:
            self.transport.pause_reading()  # pipelined faster than answered: back-pressure

    def _next(self) -> None:
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > MAX_HEAD:
                self._refuse(431)
            return
        if end > MAX_HEAD:
            self._refuse(431)
            return
        head = bytes(self.buf[:end])
        parsed = self.lean.heads.get(head)
        if parsed is None:
            try:
                parsed = _parse(head)
            except (_Bad, UnicodeDecodeError):
                self._refuse(400)
                return
            if end <= MEMO_HEAD:  # a pure function of the bytes: the same head, the same parse
                self.lean.heads.put(head, parsed)
        method, target, keep_alive, pairs, length, h = parsed
        if len(self.buf) < end + 4 + length:
            return  # the body is still coming; it is read and ignored
        del self.buf[: end + 4 + length]
        self.busy = True
        # Most decisions never wait (every cache warm): run the handler at once, and make a
        # task only of one that does (a Task per call was a measurable share of the decision).
        ctx = contextvars.copy_context()
        coro = self._serve(method, target, keep_alive, pairs, h)
        try:
            yielded = ctx.run(coro.send, None)
        except StopIteration:
            return
        task = self.lean.loop.create_task(_drive(coro, yielded), context=ctx)
        self.lean.tasks.add(task)
        task.add_done_callback(self.lean.tasks.discard)

    def _refuse(self, status: int) -> None:
        exc = errors.BadRequest(
            "the decision listener reads only nginx's auth_request subrequests: HTTP/1.x, "
            "well-formed headers, no chunked body"
        )
        exc.status = status  # type: ignore[misc]
        code, headers, body = error_parts(exc, request_id_from(""))
        if self.transport is not None:
            self.transport.write(_render(code, headers, body, True))
            self.transport.close()
        self.buf.clear()

    async def _serve(
        self, method: str, target: str, keep_alive: bool, pairs: tuple[Pair, ...], h: CIMultiDictProxy[str]
    ) -> None:
        rid = request_id_from(h.get("X-Request-Id", ""))
        try:
            status, headers, body = await self.lean.handler(target, method, h, pairs, rid)
            if status == 200 and not body:
                # A replayed verdict's headers are the same dict: written once as bytes.
                tag = None if keep_alive else "close"
                data = self.lean.rendered.get(headers, tag)
                if data is None:
                    data = self.lean.rendered.put(headers, _render(200, headers, b"", not keep_alive), tag)
            else:
                data = _render(status, headers, body, not keep_alive)
        except errors.ProxyError as exc:
            if exc.status >= 500:
                log.warning("decision %s failed: %s %s", rid, exc.code, exc.message)
            data = _render(*error_parts(exc, rid), not keep_alive)
        except Exception as exc:
            # Frames and type only: an exception's message may quote a value (a credential).
            log.error(
                "decision %s: unexpected %s\n%s",
                rid,
                type(exc).__name__,
                "".join(traceback.format_tb(exc.__traceback__)),
            )
            internal = errors.ProxyError(f"internal error; quote request id {rid} when reporting it")
            data = _render(*error_parts(internal, rid), not keep_alive)
        transport = self.transport
        if transport is None:
            return
        transport.write(data)
        self.busy = False
        self.seen = self.lean.loop.time()
        if not keep_alive:
            transport.close()
            return
        if not transport.is_reading():
            transport.resume_reading()
        if self.buf:
            # Next loop turn, not recursion: a client pipelining many requests cannot nest
            # answers (each may complete synchronously) into a deep stack.
            self.lean.loop.call_soon(self._next_if_idle)

    def _next_if_idle(self) -> None:
        if not self.busy and self.transport is not None:
            self._next()


async def _drive(coro: Coroutine[Any, Any, None], yielded: Any) -> None:
    """Run ``coro`` on from where it suspended, having yielded ``yielded``, as a Task would:
    wait for that future, then resume it (it reads the future's outcome itself)."""
    while True:
        if yielded is None:  # a bare yield (asyncio.sleep(0))
            await asyncio.sleep(0)
        else:
            # As Task.__step does: the future is now ours to wait on, no longer "blocking".
            yielded._asyncio_future_blocking = False
            try:
                await yielded
            except asyncio.CancelledError:
                if not yielded.cancelled():  # this task itself was cancelled (shutdown)
                    coro.close()
                    raise
            except Exception:  # noqa: S110 - the coroutine reads the future's error itself
                pass
        try:
            yielded = coro.send(None)
        except StopIteration:
            return


class LeanListener:
    """One bound listener; ``close`` stops it and its connections."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.loop = asyncio.get_running_loop()
        self.conns: set[_Conn] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.heads: BoundedCache[bytes, Parsed] = BoundedCache(HEADS_KEPT)
        self.rendered: IdentityCache[dict[str, str], bytes] = IdentityCache(HEADS_KEPT)
        self.server: asyncio.Server | None = None
        self.path: str | None = None
        self._sweeper = self.loop.call_later(IDLE_S / 3, self._sweep)
        self._forgetter = self.loop.call_later(HEADS_FORGET_S, self._forget)

    def _forget(self) -> None:
        self.heads.clear()
        self.rendered.clear()
        self._forgetter = self.loop.call_later(HEADS_FORGET_S, self._forget)

    def _sweep(self) -> None:
        cutoff = self.loop.time() - IDLE_S
        for conn in list(self.conns):
            if not conn.busy and conn.seen < cutoff and conn.transport is not None:
                conn.transport.close()
        self._sweeper = self.loop.call_later(IDLE_S / 3, self._sweep)

    async def close(self) -> None:
        self._sweeper.cancel()
        self._forgetter.cancel()
        if self.server is not None:
            self.server.close()
        for conn in list(self.conns):
            if conn.transport is not None:
                conn.transport.close()
        for task in list(self.tasks):
            task.cancel()
        if self.server is not None:
            with contextlib.suppress(Exception):
                await self.server.wait_closed()
        if self.path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)


async def start(where: str, handler: Handler, *, reuse_port: bool = True) -> LeanListener:
    """Listen on ``where`` (``HOST:PORT`` or ``unix:/path``, as settings validated it)."""
    lean = LeanListener(handler)
    loop = lean.loop
    if where.startswith("unix:"):
        path = where[5:]
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise errors.ConfigError("decision_listen", f"{path} exists and is not a socket")
            os.unlink(path)  # a stale socket of an earlier run
        lean.server = await loop.create_unix_server(lambda: _Conn(lean), path)
        # nginx's workers run as another user; the decision token, not the file mode, is what
        # guards the credentials this socket answers with.
        os.chmod(path, 0o666)  # noqa: S103 - see above
        lean.path = path
    else:
        host, _, port = where.rpartition(":")
        lean.server = await loop.create_server(
            lambda: _Conn(lean), host.strip("[]"), int(port), reuse_port=reuse_port
        )
    return lean
