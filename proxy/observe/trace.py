"""Per-request context: request id, W3C trace context, and what the access line reports.

Operators follow one call across the caller, this service and the upstream by its W3C
``traceparent`` (https://www.w3.org/TR/trace-context/). A caller's header is honoured only when
it is exactly well formed (version ``00`` layout, lower-case hex, trace and parent ids not all
zero, version ``ff`` refused); a malformed one is dropped with its ``tracestate`` and a fresh
trace id generated, so a caller can never inject text into the upstream's header or into the
logs through it. The upstream receives the same trace id with this service's own span id as the
parent (the caller's ``tracestate`` travels along when its ``traceparent`` was valid).

The context lives in a ``ContextVar`` set by the error middleware for every request, so the
pipeline fills in what it learns (tenant, connection, limiter decision) without any front end
passing it along, and every log record made while the request runs can name its request and
trace ids. Ids are drawn from ``random`` (trace ids need uniqueness, not secrecy; W3C asks for
randomness, not a CSPRNG) and only when first needed.

Pure module: standard library only.
"""

from __future__ import annotations

import random
import re
import time
from contextvars import ContextVar, Token

__all__ = ["CallContext", "begin", "current", "end", "parse_traceparent"]

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
# tracestate: at most 512 characters of printable ASCII (W3C's limit); otherwise dropped.
_TRACESTATE_MAX = 512


def parse_traceparent(value: str | None) -> tuple[str, str, str] | None:
    """(trace id, parent id, flags) of a valid ``traceparent``; None when absent or malformed."""
    if not value or len(value) > 512:
        return None
    m = _TRACEPARENT.match(value)
    if m is None:
        return None
    version, trace_id, parent_id, flags = m.groups()
    if version == "ff" or trace_id == _ZERO_TRACE or parent_id == _ZERO_SPAN:
        return None
    rest = value[m.end() :]
    # Version 00 is exactly 55 characters; a later version may append fields after a '-'.
    if rest and (version == "00" or not rest.startswith("-")):
        return None
    return trace_id, parent_id, flags


def _random_hex(bits: int) -> str:
    n = 0
    while n == 0:  # all-zero ids are invalid
        n = random.getrandbits(bits)
    return f"{n:0{bits // 4}x}"


class CallContext:
    """One request's identity and, for a proxied call, what its access line reports."""

    __slots__ = (
        "_raw_traceparent",
        "_trace",
        "connection",
        "front",
        "integration",
        "limit",
        "limit_source",
        "limit_wait_ms",
        "outcome",
        "request_id",
        "span_id",
        "stale",
        "started",
        "tenant",
        "tracestate",
        "upstream_host",
        "upstream_ms",
        "upstream_status",
    )

    def __init__(
        self, request_id: str, traceparent: str | None = None, tracestate: str | None = None
    ) -> None:
        self.request_id = request_id
        self.started = time.perf_counter()
        self._raw_traceparent = traceparent
        self._trace: tuple[str, str | None, str] | None = None  # trace id, caller's parent, flags
        self.span_id: str | None = None
        self.tracestate = tracestate
        self.front: str | None = None  # set when the request is a proxied call
        self.tenant: str | None = None
        self.connection: str | None = None
        self.integration: str | None = None
        self.upstream_host: str | None = None
        self.upstream_status: int | None = None
        self.upstream_ms: float | None = None
        self.limit = "unchecked"
        self.limit_source: str | None = None
        self.limit_wait_ms: float | None = None
        self.outcome: str | None = None
        # Set when the call was answered from credentials served past their TTL because the
        # store was unreachable (proxy.stale): the access line and the audit trail say so.
        self.stale = False

    def _resolve(self) -> tuple[str, str | None, str]:
        trace = self._trace
        if trace is None:
            parsed = parse_traceparent(self._raw_traceparent)
            if parsed is None:
                trace = (_random_hex(128), None, "01")
                self.tracestate = None  # never forwarded without a valid traceparent
            else:
                trace = parsed
                ts = self.tracestate
                if ts is not None and (len(ts) > _TRACESTATE_MAX or not ts.isascii() or not ts.isprintable()):
                    self.tracestate = None
            self._trace = trace
            self.span_id = _random_hex(64)
        return trace

    @property
    def trace_id(self) -> str:
        return self._resolve()[0]

    @property
    def parent_id(self) -> str | None:
        """The caller's span (its ``traceparent``'s parent id), when it sent a valid one."""
        return self._resolve()[1]

    def upstream_headers(self) -> list[tuple[str, str]]:
        """The trace headers to send upstream: this service's span as the parent."""
        trace_id, _, flags = self._resolve()
        out = [("traceparent", f"00-{trace_id}-{self.span_id}-{flags}")]
        if self.tracestate:
            out.append(("tracestate", self.tracestate))
        return out

    def duration_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000


_CURRENT: ContextVar[CallContext | None] = ContextVar("proxy_call_context", default=None)


def current() -> CallContext | None:
    """The context of the request being handled in this task, if any."""
    return _CURRENT.get()


def begin(
    request_id: str, traceparent: str | None = None, tracestate: str | None = None
) -> tuple[CallContext, Token[CallContext | None]]:
    ctx = CallContext(request_id, traceparent, tracestate)
    return ctx, _CURRENT.set(ctx)


def end(token: Token[CallContext | None]) -> None:
    _CURRENT.reset(token)
