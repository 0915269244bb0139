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
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

from proxy.ratelimit.signals import vendors as _vendors

log = logging.getLogger(__name__)

MAX_HORIZON_S = 7 * 86400.0
MAX_WINDOW_S = 31 * 86400.0
MAX_COUNT = _vendors.MAX_COUNT

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
_MAX_SCALAR_LEN = 128
_MAX_SF_LEN = 4096
_INT_RE = re.compile(r"-?[0-9]{1,19}")
_DEC_RE = re.compile(r"-?[0-9]{1,15}(?:\.[0-9]{1,9})?")
_ISO_RE = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}(?::[0-9]{2}(?:\.[0-9]{1,9})?)?"
    r"(?:[Zz]|[+-][0-9]{2}:?[0-9]{2})?"
)
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:\-]{0,63}")


@dataclass(frozen=True, slots=True)
class Policy:
    """One quota the upstream told us about; unknown fields are None."""

    name: str
    limit: int | None
    window_s: float | None
    remaining: int | None
    reset_at: float | None  # absolute epoch seconds, local clock frame


@dataclass(frozen=True, slots=True)
class Observation:
    """Everything one response said about rate limits."""

    status: int
    blocked_until: float | None  # no call before this (Retry-After on 429/503, ...)
    policies: tuple[Policy, ...]
    styles: tuple[str, ...]  # which header styles matched, for metrics and debugging

    def is_empty(self) -> bool:
        return self.blocked_until is None and not self.policies


# --- scalar parsing: text in, value or None out ---------------------------------------------


def _first(text: str) -> str:
    # Proxies may fold duplicate fields into "50, 50"; parameters (";w=60") are not the value.
    return text.split(",", 1)[0].split(";", 1)[0].strip()


def to_count(text: str | None) -> int | None:
    """A non-negative integer count, or None."""
    if text is None:
        return None
    t = _first(text)
    if not _INT_RE.fullmatch(t):
        return None
    value = int(t)
    return value if 0 <= value <= MAX_COUNT else None


def to_seconds(text: str | None) -> float | None:
    """A decimal number of seconds (possibly negative: callers clamp), or None."""
    if text is None:
        return None
    t = _first(text)
    return float(t) if _DEC_RE.fullmatch(t) else None


def is_iso(text: str) -> bool:
    return _ISO_RE.fullmatch(text.strip()) is not None


def _iso_epoch(text: str) -> float | None:
    t = text.strip()
    if not _ISO_RE.fullmatch(t):
        return None
    t = t.replace("t", "T").replace("z", "Z")
    try:
        moment = datetime.fromisoformat(t)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _http_date_epoch(text: str) -> float | None:
    t = text.strip()
    if not 0 < len(t) <= 64 or not any(c.isalpha() for c in t):
        return None
    try:
        moment = parsedate_to_datetime(t)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return moment.timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


# --- the per-response reader handed to every style parser -----------------------------------


class Reader:
    """The relevant headers of one response, the clock, and the policies found so far."""

    __slots__ = ("_h", "_policies", "_upstream_now", "generic", "now")

    def __init__(
        self, h: dict[str, list[str]], now: float, upstream_now: float | None, generic: bool
    ) -> None:
        self._h = h
        self.now = now
        self._upstream_now = upstream_now
        self.generic = generic  # no styles configured: guess the dialect from the headers
        self._policies: dict[str, list[Any]] = {}

    def has(self, *names: str) -> bool:
        return any(n in self._h for n in names)

    def names(self, prefix: str) -> list[str]:
        return [n for n in self._h if n.startswith(prefix)]

    def get(self, name: str) -> str | None:
        values = self._h.get(name)
        if not values:
            return None
        text = values[0].strip()
        return text if 0 < len(text) <= _MAX_SCALAR_LEN else None

    def joined(self, name: str) -> str | None:
        # Structured-field lists may be split over several field lines (RFC 9651 section 3.1).
        values = self._h.get(name)
        if not values:
            return None
        text = ", ".join(v.strip() for v in values)
        return text if len(text) <= _MAX_SF_LEN else None

    # Scalar parsers, on the reader so vendor parsers need no runtime import of this module.
    to_count = staticmethod(to_count)
    to_seconds = staticmethod(to_seconds)
    is_iso = staticmethod(is_iso)

    def count(self, name: str) -> int | None:
        return to_count(self.get(name))

    def seconds(self, name: str) -> float | None:
        return to_seconds(self.get(name))

    def name(self, text: str | None) -> str | None:
        if text is None:
            return None
        text = text.strip()
        return text if _NAME_RE.fullmatch(text) else None

    def window(self, seconds: float | None) -> float | None:
        if seconds is None or not 0 < seconds <= MAX_WINDOW_S:
            return None
        return seconds

    def after(self, seconds: float | None) -> float | None:
        """``now + seconds``; negative counts as 0, beyond the horizon as unknown."""
        if seconds is None or not math.isfinite(seconds) or seconds > MAX_HORIZON_S:
            return None
        return self.now + max(seconds, 0.0)

    def at(self, upstream_epoch: float | None) -> float | None:
        """An absolute upstream time, moved into the local clock frame via the Date header."""
        if upstream_epoch is None:
            return None
        reference = self.now if self._upstream_now is None else self._upstream_now
        return self.after(upstream_epoch - reference)

    def reset(self, text: str | None, mode: str) -> float | None:
        """A reset time written as ``mode``: "epoch", "delta" or "auto" (guess, see below)."""
        if text is None:
            return None
        number = to_seconds(text)
        if mode == "epoch":
            return self.at(number)
        if mode == "delta":
            return self.after(number)
        # auto: epoch milliseconds, epoch seconds, ISO 8601 (Atlassian), HTTP-date, else delta.
        if number is not None:
            if number > 1e12:
                return self.at(number / 1000)
            return self.at(number) if number > 1e9 else self.after(number)
        absolute = _iso_epoch(text)
        if absolute is None:
            absolute = _http_date_epoch(text)
        return self.at(absolute)

    def add(
        self,
        name: str,
        *,
        limit: int | None = None,
        window_s: float | None = None,
        remaining: int | None = None,
        reset_at: float | None = None,
    ) -> bool:
        """Record a policy; same-named reports merge, the first known value of a field wins."""
        if limit is None and remaining is None and reset_at is None:
            return False  # a window alone says nothing about this response
        new = [limit, self.window(window_s), remaining, reset_at]
        old = self._policies.setdefault(name, [None, None, None, None])
        for i, value in enumerate(new):
            if old[i] is None:
                old[i] = value
        return True

    def policies(self) -> tuple[Policy, ...]:
        return tuple(Policy(name, *fields) for name, fields in self._policies.items())


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
    date = _http_date_epoch(text)
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
_names: dict[str, str] = {}
_NAMES_MAX = 2048


def _name_kind(key: str) -> str:
    lower = key.lower()
    kind = lower if lower.startswith(_PREFIXES) else ("date" if lower == "date" else "")
    if len(_names) >= _NAMES_MAX:
        _names.clear()
    _names[key] = kind
    return kind


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


def _parse(
    status: int,
    headers: Mapping[str, str] | Iterable[tuple[str, str]],
    now: float,
    styles: Sequence[str] | None,
) -> Observation:
    relevant: dict[str, list[str]] = {}
    date: str | None = None
    items = getattr(headers, "items", None)
    pairs: Iterable[tuple[str, str]] = items() if callable(items) else headers  # type: ignore[assignment]
    names = _names
    for key, value in pairs:
        kind = names.get(key) if isinstance(key, str) else None  # (multidict keys are istr)
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
    if not relevant or not math.isfinite(now):
        return _empty(status)

    if styles is None:
        allowed = _ALL
    else:
        named = (styles,) if isinstance(styles, str) else styles
        allowed = frozenset(s.strip().lower() for s in named if isinstance(s, str))
        allowed |= {"retry-after"}
    upstream_now = _http_date_epoch(date) if date is not None else None
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
