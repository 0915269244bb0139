"""Read what an upstream response says about its rate limits, as plain facts.

After every proxied response the limiter merges these facts into the state shared by all
replicas, so that every replica stops *before* the API answers 429. This module only reads:
headers in, :class:`Observation` out. It is pure (no I/O, no aiohttp, no redis) and it never
raises on upstream input: a malformed value is ignored field by field, because a parsing bug must
never turn an otherwise successful proxied call into a 500.

Clock. Every time in the output is absolute epoch seconds in the *local* clock frame. Relative
values (delta seconds, durations) are added to ``now``. Absolute values (epoch seconds, HTTP-dates,
RFC 3339) are measured against the upstream's own ``Date`` header when it has one, so a skewed
upstream clock does not shift our schedule: ``local = now + (upstream_value - upstream_date)``.

Bounds (chosen, not specified by the vendors):
- a wait or reset in the past counts as "now"; one more than :data:`MAX_HORIZON_S` (7 days) away
  is ignored, since daily quotas (Atlassian, Salesforce) are legitimately a day long but a week
  or more is a broken clock or a monthly quota this short-horizon limiter does not model;
- a window must be positive and at most :data:`MAX_WINDOW_S` (31 days);
- counts must be integers in ``0 .. 2**63-1``; a negative count is ignored rather than clamped,
  because Azure OpenAI sends ``-1`` to mean "unknown", and reading it as 0 would block all calls;
- policy names come from the upstream and are kept only if short and plain
  (``[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from proxy.cache import BoundedCache
from proxy.ratelimit.signals import vendors as _vendors
from proxy.ratelimit.signals.reader import (
    MAX_COUNT,
    MAX_HORIZON_S,
    MAX_WINDOW_S,
    Policy,
    Reader,
    http_date_epoch,
    to_seconds,
)

__all__ = [
    "MAX_COUNT",
    "MAX_HORIZON_S",
    "MAX_WINDOW_S",
    "STYLES",
    "Observation",
    "Policy",
    "parse_response",
    "retry_after",
]

log = logging.getLogger(__name__)

STYLES: tuple[str, ...] = (
    "retry-after",
    "ietf",
    "x-ratelimit",
    "github",
    "x",
    "discord",
    "atlassian",
    "openai",
    "anthropic",
    "shopify",
    "salesforce",
    "hubspot",
    "zendesk",
)

# Any header starting with one of these may carry a signal; a response with none of them (the
# common case) is answered without further work.
_PREFIXES = (
    "retry-after",
    "x-ms-retry-after-ms",
    "ratelimit",
    "beta-ratelimit",
    "x-ratelimit-",
    "x-rate-limit",
    "anthropic-ratelimit-",
    "x-hubspot-ratelimit-",
    "zendesk-ratelimit-",
    "x-shopify-shop-api-call-limit",
    "sforce-limit-info",
)


@dataclass(frozen=True, slots=True)
class Observation:
    """Everything one response said about rate limits."""

    status: int
    blocked_until: float | None  # no call before this (Retry-After on 429/503, ...)
    policies: tuple[Policy, ...]
    styles: tuple[str, ...]  # which header styles matched, for metrics and debugging

    def is_empty(self) -> bool:
        return self.blocked_until is None and not self.policies


# --- Retry-After and friends ----------------------------------------------------------------


_RETRY_HEADERS = ("retry-after-ms", "x-ms-retry-after-ms", "retry-after")


def _throttled(r: Reader, status: int) -> bool:
    # 403 counts only with a rate-limit marker: GitHub answers 403 both for its secondary limits
    # (with Retry-After) and for an exhausted primary quota (X-RateLimit-Remaining: 0).
    if status in (429, 503):
        return True
    return status == 403 and (r.has(*_RETRY_HEADERS) or r.count("x-ratelimit-remaining") == 0)


def _retry_after(r: Reader) -> float | None:
    """The explicit wait of a throttled response; the millisecond forms are the more precise."""
    for name in _RETRY_HEADERS[:2]:
        millis = r.seconds(name)
        if millis is not None and (until := r.after(millis / 1000)) is not None:
            return until
    text = r.get("retry-after")
    if text is None:
        return None
    delay = to_seconds(text)
    if delay is not None:
        return r.after(delay)
    date = http_date_epoch(text)
    return r.at(date) if date is not None else None


Parser = Callable[[Reader, frozenset[str]], str | None]
_PARSERS: tuple[Parser, ...] = (
    _vendors.ietf,
    _vendors.x_ratelimit,
    _vendors.openai,
    _vendors.anthropic,
    _vendors.shopify,
    _vendors.salesforce,
    _vendors.hubspot,
    _vendors.zendesk,
)
_ALL = frozenset(STYLES)


# Raw header name -> "" (not a signal), "date", or its lower-case form (a possible signal).
# Responses repeat the same few names, so each spelling is classified once; bounded.
_NAMES_MAX = 2048
_names: BoundedCache[str, str] = BoundedCache(_NAMES_MAX)


def _name_kind(key: str) -> str:
    lower = key.lower()
    return _names.put(key, lower if lower.startswith(_PREFIXES) else ("date" if lower == "date" else ""))


_EMPTY: dict[int, Observation] = {}


def _empty(status: int) -> Observation:
    """The (immutable) "nothing said" observation, one per status: the common answer."""
    obs = _EMPTY.get(status)
    if obs is None:
        obs = Observation(status, None, (), ())
        if len(_EMPTY) < 1000:
            _EMPTY[status] = obs
    return obs


def parse_response(
    status: int,
    headers: Mapping[str, str] | Iterable[tuple[str, str]],
    *,
    now: float,
    styles: Sequence[str] | None = None,
) -> Observation:
    """Read one upstream response's rate-limit signals; never raises.

    ``headers`` is a mapping (a multidict keeps its duplicates) or an iterable of pairs; names
    are matched case-insensitively. ``styles`` None tries every style; otherwise only the named
    ones (from the integration's config) plus ``retry-after``, which is always honoured.
    """
    try:
        return _parse(status, headers, now, styles)
    except Exception as exc:  # the invariant: upstream input never becomes a 500
        log.warning("ignored the rate-limit headers of a response: %s", type(exc).__name__)
        return _empty(status)


def retry_after(headers: Mapping[str, str] | Iterable[tuple[str, str]], *, now: float) -> float | None:
    """When the response says to call again (``Retry-After``, ``retry-after-ms``), whatever its
    status: absolute epoch seconds in the local frame, or None. The same reading as
    ``Observation.blocked_until`` (the millisecond forms first, HTTP-dates against ``Date``,
    nothing beyond the horizon); never raises. The proxy's retries wait for it."""
    try:
        relevant, date = _collect(headers)
        if not relevant or not math.isfinite(now):
            return None
        upstream_now = http_date_epoch(date) if date is not None else None
        return _retry_after(Reader(relevant, now, upstream_now, generic=False))
    except Exception as exc:  # the invariant: upstream input never becomes a 500
        log.warning("ignored the Retry-After of a response: %s", type(exc).__name__)
        return None


def _collect(
    headers: Mapping[str, str] | Iterable[tuple[str, str]],
) -> tuple[dict[str, list[str]], str | None]:
    """The headers that may carry a signal, by lower-case name, and the first ``Date``."""
    relevant: dict[str, list[str]] = {}
    date: str | None = None
    items = getattr(headers, "items", None)
    pairs: Iterable[tuple[str, str]] = items() if callable(items) else headers  # type: ignore[assignment]
    kind_of = _names.get  # hoisted: a local bound method is as cheap as an inlined dict.get
    for key, value in pairs:
        kind = kind_of(key) if isinstance(key, str) else None  # (multidict keys are istr)
        if kind is None:
            if not isinstance(key, str):
                continue
            kind = _name_kind(key)
        if kind == "" or not isinstance(value, str):
            continue
        if kind == "date":
            if date is None:
                date = value
        else:
            relevant.setdefault(kind, []).append(value)
    return relevant, date


def _parse(
    status: int,
    headers: Mapping[str, str] | Iterable[tuple[str, str]],
    now: float,
    styles: Sequence[str] | None,
) -> Observation:
    relevant, date = _collect(headers)
    if not relevant or not math.isfinite(now):
        return _empty(status)

    if styles is None:
        allowed = _ALL
    else:
        named = (styles,) if isinstance(styles, str) else styles
        allowed = frozenset(s.strip().lower() for s in named if isinstance(s, str))
        allowed |= {"retry-after"}
    upstream_now = http_date_epoch(date) if date is not None else None
    r = Reader(relevant, now, upstream_now, generic=styles is None)

    matched: list[str] = []
    for parser in _PARSERS:
        label = parser(r, allowed)
        if label is not None and label not in matched:
            matched.append(label)
    policies = r.policies()
    blocked_until = _retry_after(r) if _throttled(r, status) else None
    if blocked_until is not None:
        matched.append("retry-after")
    elif _throttled(r, status):
        # Throttled without an explicit wait: the latest reset of an exhausted quota.
        resets = [p.reset_at for p in policies if p.remaining == 0 and p.reset_at is not None]
        blocked_until = max(resets, default=None)
    return Observation(status, blocked_until, policies, tuple(matched))
