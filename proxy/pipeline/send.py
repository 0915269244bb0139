"""Sending one prepared call upstream: the per-host cap, timeouts and the opt-in retries.

Split from ``proxy.pipeline.pipeline`` (which calls it as ``Pipeline.open``) so the pipeline's
stages read in one place and the retry loop in another.

Security invariants kept here:
- redirects are passed back to the caller, never followed (a redirect could carry the injected
  credential to another host);
- a call whose body cannot be replayed, or whose method is not idempotent without an
  ``Idempotency-Key``, is never retried; a timeout after the request was sent is never repeated;
- every retry asks the limiter again, so retries never exceed the connection's limits;
- no protocol switch passes the proxy and a status line that cannot be written back is not
  relayed (``_answered``).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import ClientResponse, ClientTimeout

from proxy.errors import ProxyError, RateLimited, ServiceUnavailable, UpstreamTimeout, UpstreamUnreachable
from proxy.observe.metrics import UPSTREAM_LATENCY_TALLY
from proxy.pipeline.exchange import Body, Exchange
from proxy.pipeline.headers import has_control, malformed_response
from proxy.pipeline.upstream.resolver import SKIP_LITERAL_GUARD
from proxy.ratelimit.signals.core import retry_after

if TYPE_CHECKING:
    from proxy.pipeline.plan import Plan
    from proxy.ratelimit.limiter import Decision, Limiter

__all__ = ["RETRY_STATUSES", "limit_kind", "send"]

RETRY_STATUSES = frozenset({429, 502, 503, 504})
BACKOFF_BASE_S = 0.1
BACKOFF_CAP_S = 5.0


def limit_kind(decision: Decision) -> str:
    """configured or learned: which limit said no (``source`` may name where it was decided)."""
    kind = decision.state.source
    return kind if kind in ("configured", "learned") else decision.source


async def send(
    ex: Exchange,
    body: Body,
    *,
    idempotency_key: bool,
    session: aiohttp.ClientSession,
    limiter: Limiter,
    observe: Callable[[Plan, int, Any, str | None], None],
    inflight: dict[str, int],
    cap: int,
) -> ClientResponse:
    """Send the call; returns the upstream response with its body unread.

    Takes a slot of ``inflight`` for the upstream host (at most ``cap``; the pipeline's ``finish``
    gives it back). Retries only when allowed (see the module doc); ``observe`` learns from every
    answer, retried or not.
    """
    held = inflight.get(ex.host_key, 0)
    if held >= cap:
        raise ServiceUnavailable(
            f"too many concurrent calls to upstream {ex.plan.host!r} ({cap} in flight, the "
            "upstream_max_per_host setting); retry shortly"
        )
    inflight[ex.host_key] = held + 1
    ex.holds_slot = True

    retries = ex.retries
    if not ex.may_retry(idempotency_key) or isinstance(body, aiohttp.StreamReader):
        retries = 0
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = started + (ex.timeout.total or 1e9)
    attempt = 0
    while True:
        timeout = ex.timeout
        if attempt:
            timeout = ClientTimeout(
                total=max(0.001, deadline - loop.time()),
                sock_connect=timeout.sock_connect,
                sock_read=timeout.sock_read,
            )
        resp: ClientResponse | None = None
        failure: ProxyError | None = None
        try:
            resp = await session.request(
                ex.method,
                ex.url,
                headers=ex.headers,
                data=body,
                allow_redirects=False,
                timeout=timeout,
                # check_destination ran check_literal on this exact host and no redirect is
                # followed, so the session's literal guard would only repeat it.
                middlewares=SKIP_LITERAL_GUARD,
            )
        except aiohttp.ClientConnectorError as exc:
            refusal = _refusal_in(exc)
            if refusal is not None:
                raise refusal from None
            failure = _unreachable(ex, exc)
        except TimeoutError as exc:
            failure = UpstreamTimeout(
                f"upstream {ex.plan.host!r} did not answer in time ({_timeout_text(timeout)}); "
                "raise the connection's timeouts option if the API is slow"
            )
            if not isinstance(exc, aiohttp.ConnectionTimeoutError):
                raise failure from None  # the request may have been processed: never repeat
        except ProxyError:
            raise
        except (aiohttp.ClientError, OSError) as exc:
            raise _unreachable(ex, exc) from None

        retry_after_s = 0.0
        if resp is not None:
            observe(ex.plan, resp.status, resp.headers, ex.token)
            if resp.status in RETRY_STATUSES and attempt < retries:
                now = time.time()
                until = retry_after(resp.headers, now=now)
                retry_after_s = 0.0 if until is None else until - now
            else:
                return _answered(ex, resp, loop.time() - started)
        elif attempt >= retries:
            assert failure is not None
            raise failure
        attempt += 1
        backoff = random.uniform(0.5, 1.0) * min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** (attempt - 1))
        delay = max(backoff, retry_after_s)
        if loop.time() + delay >= deadline:
            # No time left for another try: the caller gets what the upstream last said.
            if resp is not None:
                return _answered(ex, resp, loop.time() - started)
            assert failure is not None
            raise failure
        if resp is not None:
            resp.close()
        await asyncio.sleep(delay)
        decision = await limiter.acquire(ex.plan.target)
        if not decision.allowed:
            raise RateLimited(
                f"connection {ex.plan.record.connection_id!r} became rate limited while retrying; "
                f"retry after {decision.retry_after_ms} ms",
                retry_after_ms=decision.retry_after_ms,
                source=limit_kind(decision),
            )


def _answered(ex: Exchange, resp: ClientResponse, latency_s: float) -> ClientResponse:
    # No protocol switch passes the proxy (the new protocol would bypass every check and
    # the injected credential would sit on a raw tunnel), and a status line that cannot be
    # written back to the caller is not relayed. aiohttp consumes 100 and 103 itp.
    if resp.status < 200 or (resp.reason and has_control(resp.reason)):
        resp.close()
        what = (
            f"HTTP {resp.status}, which the proxy does not pass on"
            if resp.status < 200
            else "a control character in its reason phrase"
        )
        raise malformed_response(what)
    ex.latency_s = latency_s
    UPSTREAM_LATENCY_TALLY.observe(ex.plan.latency_labels, latency_s)
    return resp


def _refusal_in(exc: BaseException) -> ProxyError | None:
    """A ``HostNotAllowed`` the guarded resolver raised, possibly wrapped by aiohttp."""
    seen: BaseException | None = exc
    for _ in range(4):
        if seen is None:
            return None
        if isinstance(seen, ProxyError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _unreachable(ex: Exchange, exc: BaseException) -> UpstreamUnreachable:
    kind = "could not be resolved" if isinstance(exc, aiohttp.ClientConnectorDNSError) else "failed"
    return UpstreamUnreachable(
        f"the call to upstream {ex.plan.host!r} {kind} ({type(exc).__name__}); check the "
        "connection's base URL, or retry if the upstream is restarting"
    )


def _timeout_text(t: ClientTimeout) -> str:
    return f"connect {t.sock_connect}s, read {t.sock_read}s, total {t.total}s"
