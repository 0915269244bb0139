"""The per-response reader every rate-limit header parser works through, and its scalar parsers.

Why a module of its own: the core (``signals.core``) and the vendor dialects (``signals.vendors``)
both need it, and neither may import the other's runtime for it (that was an import cycle).
Every value an upstream sends is validated and clamped here (bounds are in ``signals.core``'s
docstring), so no parser raises on upstream input.

Pure: no I/O, no aiohttp, no redis.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

MAX_HORIZON_S = 7 * 86400.0
MAX_WINDOW_S = 31 * 86400.0
MAX_COUNT = 2**63 - 1  # beyond a signed 64-bit integer: garbage, and Redis can't hold it
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


def iso_epoch(text: str) -> float | None:
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


def http_date_epoch(text: str) -> float | None:
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
        absolute = iso_epoch(text)
        if absolute is None:
            absolute = http_date_epoch(text)
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
