"""Prometheus metrics, defined once so every module counts into the same registry.

Label values are bounded, non-secret vocabularies (front end, outcome, integration id, error
code). Tenant and connection ids are deliberately NOT labels: they are unbounded and, for some
deployments, sensitive; per-connection detail lives in the audit trail instead.

With ``serve --workers N`` the parent sets ``PROMETHEUS_MULTIPROC_DIR`` for its workers, so every
worker's samples go to shared files and any worker's ``/metrics`` answers for all of them
(prometheus-client's multiprocess mode). Gauges are summed over live workers.

Hot-path counts go through ``Tally`` and ``LatencyTally``: plain integers per label set, handed
to prometheus-client in batches (see ``Tally``), a few dict updates per proxied call instead of
locked increments. ``LatencyTally`` writes prometheus-client internals, so it lives apart, in
``proxy.observe.prometheus_internals``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from proxy.observe.prometheus_internals import LATENCY_TALLIES, LatencyTally

MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
REGISTRY = CollectorRegistry(auto_describe=True)


# --- batched hot-path counts ---------------------------------------------------------------------

_TALLIES: list[Tally] = []


def flush_tallies() -> None:
    for tally in _TALLIES:
        tally.flush()
    for latency in LATENCY_TALLIES:
        latency.flush()


class _FlushFirst(Collector):
    """Registered before every metric, so any collection of REGISTRY (a scrape, a test reading
    a sample) first moves the pending tallies into the metrics it is about to read."""

    def collect(self) -> Iterable[Any]:
        flush_tallies()
        return []

    def describe(self) -> Iterable[Any]:
        return []


REGISTRY.register(_FlushFirst())


class Tally:
    """Increments of one labelled Counter, kept as plain integers until someone looks.

    prometheus-client takes a lock per ``inc`` (and with workers writes a shared file). A Tally
    adds to a dict entry instead and hands the totals over in one batch whenever REGISTRY is
    collected, and with workers also once a second and at shutdown, so another worker's scrape
    lags by at most that second. Label values are passed as one tuple the caller keeps.
    """

    __slots__ = ("_counter", "_pending")

    def __init__(self, counter: Counter) -> None:
        self._counter = counter
        self._pending: dict[tuple[str, ...], int] = {}
        _TALLIES.append(self)

    def inc(self, labels: tuple[str, ...]) -> None:
        pending = self._pending
        pending[labels] = pending.get(labels, 0) + 1

    def flush(self) -> None:
        if self._pending:
            pending, self._pending = self._pending, {}
            for labels, n in pending.items():
                self._counter.labels(*labels).inc(n)


_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

REQUESTS = Counter(
    "proxy_requests_total",
    "Requests handled, by front end and outcome (ok or an error code).",
    ["front", "outcome"],
    registry=REGISTRY,
)
UPSTREAM_RESPONSES = Counter(
    "proxy_upstream_responses_total",
    "Upstream responses passed back, by integration and status class.",
    ["integration", "status_class"],
    registry=REGISTRY,
)
UPSTREAM_LATENCY = Histogram(
    "proxy_upstream_latency_seconds",
    "Time to upstream response headers, by integration.",
    ["integration"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
UPSTREAM_INFLIGHT = Gauge(
    "proxy_upstream_inflight",
    "Upstream calls in flight (summed over workers).",
    registry=REGISTRY,
    multiprocess_mode="livesum",
)
ERRORS = Counter(
    "proxy_errors_total",
    "Errors the service itself answered, by code.",
    ["code"],
    registry=REGISTRY,
)
CREDENTIAL_CACHE = Counter(
    "proxy_credential_cache_total",
    "Decrypted-credential cache lookups, by result (hit, miss).",
    ["result"],
    registry=REGISTRY,
)
CONNECTION_SERVICE = Counter(
    "proxy_connection_service_requests_total",
    "Connection Service reads, by outcome.",
    ["outcome"],
    registry=REGISTRY,
)
RATELIMIT_DECISIONS = Counter(
    "proxy_ratelimit_decisions_total",
    "Limiter decisions, by result (allowed, denied, waited) and where it was decided.",
    ["result", "source"],
    registry=REGISTRY,
)
RATELIMIT_BACKEND_ERRORS = Counter(
    "proxy_ratelimit_backend_errors_total",
    "Limiter calls that could not reach the shared back end, by fail mode applied.",
    ["mode"],
    registry=REGISTRY,
)
RATELIMIT_OBSERVATIONS = Counter(
    "proxy_ratelimit_observations_total",
    "Upstream rate-limit signals merged into shared state, by header style.",
    ["style"],
    registry=REGISTRY,
)
AUDIT_EVENTS = Counter(
    "proxy_audit_events_total",
    "Audit events written, by outcome (written, dropped, failed).",
    ["result"],
    registry=REGISTRY,
)
AUDIT_QUEUE = Gauge(
    "proxy_audit_queue_depth",
    "Audit events buffered in memory, waiting to be written (summed over workers).",
    registry=REGISTRY,
    multiprocess_mode="livesum",
)
OAUTH_REFRESH = Counter(
    "proxy_oauth_token_refresh_total",
    "OAuth2 token refreshes and client-credentials mints, by outcome.",
    ["outcome"],
    registry=REGISTRY,
)
STORE_ERRORS = Counter(
    "proxy_store_errors_total",
    "Store operations that failed, by back end.",
    ["backend"],
    registry=REGISTRY,
)
STALE_SERVED = Counter(
    "proxy_stale_served_total",
    "Cached store reads answered past their TTL because the store was unreachable (stale-if-error), "
    "by cache (credentials, resolve, api_key, tenant_flags).",
    ["cache"],
    registry=REGISTRY,
)
STORE_DEGRADED = Gauge(
    "proxy_store_degraded",
    "1 while this process finds the store unreachable and serves cached entries (stale-if-error).",
    registry=REGISTRY,
    multiprocess_mode="max",
)
TUNNELS_OPEN = Gauge(
    "proxy_tunnels_open",
    "CONNECT tunnels open now (TLS established with the client; summed over workers).",
    registry=REGISTRY,
    multiprocess_mode="livesum",
)
CLIENT_CONNECTIONS_CLOSED = Counter(
    "proxy_client_connections_closed_total",
    "Client connections closed by the resource bounds: over_limit (max_connections) or head_timeout.",
    ["reason"],
    registry=REGISTRY,
)

NGINX_REPORTS_DROPPED = Counter(
    "proxy_nginx_reports_dropped_total",
    "Datagrams of the nginx report listener dropped, by reason: source (not loopback while the "
    "listener is), invalid (no report, or a token this service did not sign), replay.",
    ["reason"],
    registry=REGISTRY,
)


# --- gauges computed from process state, and exposition ----------------------------------------

_SAMPLED: list[tuple[Gauge, Callable[[], float]]] = []


def gauge_from(gauge: Gauge, read: Callable[[], float]) -> None:
    """A gauge whose value is read from process state: at scrape time in a single process (no
    update on the hot path); sampled once a second into the shared files with workers."""
    if MULTIPROCESS:
        _SAMPLED.append((gauge, read))
    else:
        gauge.set_function(read)


async def sample_gauges_forever(interval_s: float = 1.0) -> None:
    """With workers: sample the state-read gauges and hand over the tallies, once a second."""
    while True:
        for gauge, read in _SAMPLED:
            gauge.set(read())
        flush_tallies()
        await asyncio.sleep(interval_s)


def exposition() -> bytes:
    if not MULTIPROCESS:
        return bytes(generate_latest(REGISTRY))
    flush_tallies()  # this worker's own counts are current; the others' lag by at most 1 s
    registry = CollectorRegistry()
    MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return bytes(generate_latest(registry))


# The hot path's counts (see Tally).
REQUESTS_TALLY = Tally(REQUESTS)
UPSTREAM_RESPONSES_TALLY = Tally(UPSTREAM_RESPONSES)
UPSTREAM_LATENCY_TALLY = LatencyTally(UPSTREAM_LATENCY, _LATENCY_BUCKETS)
CREDENTIAL_CACHE_TALLY = Tally(CREDENTIAL_CACHE)
RATELIMIT_DECISIONS_TALLY = Tally(RATELIMIT_DECISIONS)
STALE_SERVED_TALLY = Tally(STALE_SERVED)
