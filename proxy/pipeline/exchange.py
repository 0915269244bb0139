"""One proxied call as data: what every front end and stage passes along (``Exchange``), and the
checks of the caller's own request line and control headers that every front end applies.

Split from ``proxy.pipeline.pipeline`` so that the sending loop (``proxy.pipeline.send``) and the
pipeline's stages share these types without importing each other.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
from aiohttp import ClientTimeout
from yarl import URL

from proxy.errors import MethodNotAllowed, ValidationError
from proxy.model import Caller
from proxy.pipeline.plan import Plan

__all__ = ["IDEMPOTENT", "Admit", "Body", "Exchange", "Pair", "parse_control_int", "refuse_trace"]

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})

Pair = tuple[str, str]
# Called by ``prepare`` with (plan, tenant id, cleaned caller headers) before the limiter runs.
Admit = Callable[[Plan, str, list[Pair]], Awaitable[None]]
# What is sent upstream: nothing, buffered bytes (replayable) or the caller's stream.
Body = bytes | aiohttp.StreamReader | None


@dataclass(slots=True)
class Exchange:
    """One proxied call as it moves through the pipeline."""

    caller: Caller
    tenant_id: str
    connection_id: str  # as resolved (a runtime user's connection when one applies)
    request_id: str
    method: str
    plan: Plan
    # Not in repr: the injected credential rides in the headers or the query of the URL.
    url: URL = field(repr=False)
    headers: list[Pair] = field(repr=False)
    timeout: ClientTimeout
    retries: int
    host_key: str
    token: str | None = field(default=None, repr=False)  # the OAuth access token sent, if any
    # Forms of the injected secret to redact from the response headers (proxy-only connections).
    scrub: tuple[str, ...] = field(default=(), repr=False)
    holds_slot: bool = False
    latency_s: float = 0.0
    # Which kind of limit state the limiter reported for this call (None: nothing configured or
    # learned binds it); the decision endpoint only lets nginx cache a decision when it is None.
    limit_source: str | None = None

    def may_retry(self, idempotency_key: bool) -> bool:
        """Retries are asked for, and repeating the call is safe (``proxy.pipeline.send``)."""
        return bool(self.retries) and (self.method in IDEMPOTENT or idempotency_key)


def refuse_trace(method: str) -> None:
    """TRACE makes the upstream echo the request back, injected credential included."""
    if method == "TRACE":
        raise MethodNotAllowed(
            "TRACE is refused: the upstream would echo the request back to you, and with it the "
            "credential the proxy injects; use another method"
        )


def parse_control_int(value: str | None, name: str, cap: int) -> int | None:
    """A non-negative integer control header (``X-Proxy-*``), capped; 422 when malformed."""
    if value is None:
        return None
    value = value.strip()
    if not (value.isascii() and value.isdigit()) or len(value) > 12:  # "²".isdigit() is True
        raise ValidationError(f"{name} must be a non-negative integer", fields={name: "not an integer"})
    return min(int(value), cap)
