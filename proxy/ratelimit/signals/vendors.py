"""The header dialects behind :mod:`proxy.ratelimit.signals.core`: IETF drafts and vendor styles.

Each parser takes the response's :class:`~proxy.ratelimit.signals.reader.Reader` and the allowed style
names, records the policies it recognises through ``Reader.add`` and returns the style name that
matched (None when nothing did). They inherit the reader's guarantees: every value is validated
and clamped there, so nothing here raises on upstream input.

The ``X-RateLimit-*`` names are shared by GitHub, Discord, Atlassian and many others with
different reset encodings; :func:`x_ratelimit` picks the dialect from the configured style, or,
with no style configured, from tell-tale headers and the shape of ``X-RateLimit-Reset``.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal
from typing import Any

import http_sf

from proxy.ratelimit.signals.reader import MAX_COUNT, Reader


def _sf(text: str | None, kind: str) -> Any:
    if not text or not text.isascii():
        return None
    try:
        return http_sf.parse(text.encode("ascii"), tltype=kind)
    except Exception:  # third-party parser on untrusted bytes: any failure means "no signal"
        return None


def _sf_int(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_COUNT:
        return value
    return None


def _sf_num(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _sf_name(value: object) -> str | None:
    return str(value) if isinstance(value, str | http_sf.Token) else None


# --- IETF RateLimit fields ------------------------------------------------------------------


def ietf(r: Reader, allowed: frozenset[str]) -> str | None:
    """IETF ``RateLimit``/``RateLimit-Policy`` (draft 11 and older drafts), and ``Beta-`` forms."""
    prefixes = [""] if "ietf" in allowed else []
    if "ietf" in allowed or "atlassian" in allowed:  # Atlassian's Beta-RateLimit
        prefixes.append("beta-")
    found = False
    for prefix in prefixes:
        found |= _ietf_fields(r, prefix)
    return "ietf" if found else None


def _ietf_fields(r: Reader, prefix: str) -> bool:
    found = False
    windows: dict[int, float] = {}  # drafts <= 07: unnamed "100;w=60" policies, keyed by quota
    for item, params in _sf(r.joined(prefix + "ratelimit-policy"), "list") or ():
        window = r.window(_sf_num(params.get("w")))
        name = r.name(_sf_name(item))
        if name is not None:
            unit = params.get("qu")
            if unit is not None and str(unit) != "requests":
                continue  # byte or concurrency quotas: the limiter counts requests
            found |= r.add(name, limit=_sf_int(params.get("q")), window_s=window)
        elif (quota := _sf_int(item)) is not None and window is not None:
            windows.setdefault(quota, window)

    limit: int | None = None
    remaining: int | None = None
    reset_after: float | None = None
    current = r.joined(prefix + "ratelimit")
    items = _sf(current, "list")
    if items:  # draft 08+: "default";r=50;t=30
        for item, params in items:
            name = r.name(_sf_name(item))
            if name is not None:
                reset = r.after(_sf_num(params.get("t")))
                found |= r.add(name, remaining=_sf_int(params.get("r")), reset_at=reset)
    elif isinstance(fields := _sf(current, "dictionary"), dict):  # draft 07: limit=, remaining=
        limit, remaining, reset_after = (
            _sf_int(entry[0]) if isinstance(entry, tuple) else None
            for entry in (fields.get("limit"), fields.get("remaining"), fields.get("reset"))
        )
    if prefix == "":  # drafts <= 06: one field per value
        for item, params in _sf(r.joined("ratelimit-limit"), "list") or ():
            quota, window = _sf_int(item), r.window(_sf_num(params.get("w")))
            if quota is not None and window is not None:
                windows.setdefault(quota, window)
        limit = limit if limit is not None else r.count("ratelimit-limit")
        remaining = remaining if remaining is not None else r.count("ratelimit-remaining")
        if reset_after is None:
            reset_after = r.seconds("ratelimit-reset")
    window = windows.get(limit) if limit is not None else None
    if window is None and len(windows) == 1:
        window = next(iter(windows.values()))
    reset_at = r.after(reset_after)
    found |= r.add("default", limit=limit, window_s=window, remaining=remaining, reset_at=reset_at)
    return found


# --- X-RateLimit family and vendors ----------------------------------------

_XRL = "x-ratelimit-"
_FAMILY_HEADERS = tuple(
    _XRL + s for s in ("limit", "remaining", "reset", "reset-after", "used", "resource", "bucket")
)


def _family(r: Reader, prefix: str, mode: str) -> bool:
    limit = r.count(prefix + "limit")
    remaining = r.count(prefix + "remaining")
    used = r.count(prefix + "used")  # GitHub
    if remaining is None and limit is not None and used is not None and used <= limit:
        remaining = limit - used
    name = r.name(r.get(prefix + "resource")) or "default"  # GitHub: core, search, graphql...
    reset = r.reset(r.get(prefix + "reset"), mode)
    return r.add(name, limit=limit, remaining=remaining, reset_at=reset)


def _discord(r: Reader) -> bool:
    # Reset-After is relative, so it needs no clock correction: prefer it to the epoch Reset.
    reset = r.after(r.seconds(_XRL + "reset-after"))
    if reset is None:
        reset = r.reset(r.get(_XRL + "reset"), "epoch")
    return r.add(
        r.name(r.get(_XRL + "bucket")) or "default",
        limit=r.count(_XRL + "limit"),
        remaining=r.count(_XRL + "remaining"),
        reset_at=reset,
    )


def x_ratelimit(r: Reader, allowed: frozenset[str]) -> str | None:
    """``X-RateLimit-*`` (GitHub, Discord, Atlassian, generic) and X's ``x-rate-limit-*``."""
    # X (Twitter) spells it x-rate-limit-*; Zendesk's x-rate-limit-remaining shares a name, so
    # only the limit or reset fields (which Zendesk never sends) identify X.
    x_headers = r.has("x-rate-limit-limit", "x-rate-limit-reset")
    if "x" in allowed and x_headers and _family(r, "x-rate-limit-", "epoch"):
        return "x"
    if not r.has(*_FAMILY_HEADERS):
        return None
    if "discord" in allowed and r.has(_XRL + "bucket", _XRL + "reset-after"):
        return "discord" if _discord(r) else None
    reset = r.get(_XRL + "reset")
    atlassian_like = (reset is not None and r.is_iso(reset)) or r.has(_XRL + "nearlimit")
    if "atlassian" in allowed and atlassian_like:
        label, mode = "atlassian", "auto"
    elif r.generic:
        label = "github" if r.has(_XRL + "resource", _XRL + "used") else "x-ratelimit"
        mode = "auto"
    else:
        explicit = {"github": "epoch", "x": "epoch", "atlassian": "auto", "x-ratelimit": "auto"}
        configured = [style for style in explicit if style in allowed]
        if not configured:
            return None
        label, mode = configured[0], explicit[configured[0]]
    return label if _family(r, _XRL, mode) else None


def openai(r: Reader, allowed: frozenset[str]) -> str | None:
    """``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``; resets are Go durations."""
    if "openai" not in allowed:
        return None
    found = False
    for kind in ("requests", "tokens"):
        reset = go_duration(r.get(f"{_XRL}reset-{kind}"))
        found |= r.add(
            kind,
            limit=r.count(f"{_XRL}limit-{kind}"),
            remaining=r.count(f"{_XRL}remaining-{kind}"),
            reset_at=r.after(reset),
        )
    return "openai" if found else None


_GO_PART = re.compile(r"([0-9]{1,12}(?:\.[0-9]{1,9})?)(ns|us|µs|μs|ms|h|m|s)")
_GO_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,  # micro sign
    "μs": 1e-6,  # greek mu
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


def go_duration(text: str | None) -> float | None:
    """Seconds in a Go duration ("6m0s", "20ms", "1h2m3.5s"); a bare number is seconds."""
    if text is None or len(text) > 64:
        return None
    text = text.strip()
    if re.fullmatch(r"[0-9]{1,12}(?:\.[0-9]{1,9})?", text):  # Azure OpenAI sends plain "0"
        return float(text)
    total, position = 0.0, 0
    for part in _GO_PART.finditer(text):
        if part.start() != position:
            return None
        total += float(part[1]) * _GO_UNITS[part[2]]
        position = part.end()
    return total if 0 < position == len(text) else None


def anthropic(r: Reader, allowed: frozenset[str]) -> str | None:
    """``anthropic-ratelimit-<kind>-{limit,remaining,reset}``; resets are RFC 3339."""
    if "anthropic" not in allowed:
        return None
    found = False
    for kind in ("requests", "tokens", "input-tokens", "output-tokens"):
        prefix = f"anthropic-ratelimit-{kind}-"
        found |= r.add(
            kind,
            limit=r.count(prefix + "limit"),
            remaining=r.count(prefix + "remaining"),
            reset_at=r.reset(r.get(prefix + "reset"), "auto"),
        )
    return "anthropic" if found else None


def shopify(r: Reader, allowed: frozenset[str]) -> str | None:
    """``X-Shopify-Shop-Api-Call-Limit: 32/40``: a leaky bucket, so no window or reset."""
    text = r.get("x-shopify-shop-api-call-limit") if "shopify" in allowed else None
    parts = text.replace(" ", "").split("/") if text else []
    if len(parts) != 2:
        return None
    used, limit = r.to_count(parts[0]), r.to_count(parts[1])
    if used is None or limit is None:
        return None
    return "shopify" if r.add("default", limit=limit, remaining=max(limit - used, 0)) else None


_SFORCE_ITEM = re.compile(r"([a-z][a-z0-9-]{0,63})=([0-9]{1,19})/([0-9]{1,19})(?:\([^()]*\))?")


def salesforce(r: Reader, allowed: frozenset[str]) -> str | None:
    """``Sforce-Limit-Info: api-usage=25/15000; per-app-api-usage=17/250(appName=x)`` (daily)."""
    text = r.joined("sforce-limit-info") if "salesforce" in allowed else None
    if not text or len(text) > 1024:
        return None
    found = False
    for item in re.split(r"[;,]", text):
        match = _SFORCE_ITEM.fullmatch(item.strip())
        if match is None:
            continue
        used, limit = r.to_count(match[2]), r.to_count(match[3])
        if used is not None and limit is not None:
            remaining = max(limit - used, 0)
            found |= r.add(match[1], limit=limit, window_s=86400.0, remaining=remaining)
    return "salesforce" if found else None


def hubspot(r: Reader, allowed: frozenset[str]) -> str | None:
    """``X-HubSpot-RateLimit-*``: daily, per-interval (Max/Remaining) and per-second quotas."""
    if "hubspot" not in allowed:
        return None
    p = "x-hubspot-ratelimit-"
    interval_ms = r.count(p + "interval-milliseconds")
    found = r.add(
        "daily",
        limit=r.count(p + "daily"),
        remaining=r.count(p + "daily-remaining"),
        window_s=86400.0,
    )
    found |= r.add(
        "interval",
        limit=r.count(p + "max"),
        remaining=r.count(p + "remaining"),
        window_s=interval_ms / 1000 if interval_ms is not None else None,
    )
    found |= r.add(
        "secondly",
        limit=r.count(p + "secondly"),
        remaining=r.count(p + "secondly-remaining"),
        window_s=1.0,
    )
    return "hubspot" if found else None


def zendesk(r: Reader, allowed: frozenset[str]) -> str | None:
    """Account-wide ``X-Rate-Limit`` (per minute) and ``Zendesk-RateLimit-<endpoint>``."""
    if "zendesk" not in allowed:
        return None
    found = False
    account = r.count("x-rate-limit")
    # Without a configured style, x-rate-limit-remaining alone could be X's: require the
    # Zendesk-only account header before reading it.
    if account is not None or not r.generic:
        limit = account if account is not None else r.count("ratelimit-limit")
        remaining = r.count("x-rate-limit-remaining")
        if remaining is None:
            remaining = r.count("ratelimit-remaining")
        reset = r.after(r.seconds("ratelimit-reset"))
        found = r.add("default", limit=limit, window_s=60.0, remaining=remaining, reset_at=reset)
    prefix = "zendesk-ratelimit-"
    for header in r.names(prefix):
        name, text = r.name(header[len(prefix) :]), r.get(header)
        if name is None or text is None:
            continue
        fields: dict[str, str] = {}
        for pair in text.split(";"):
            key, _, value = pair.partition("=")
            fields.setdefault(key.strip().lower(), value.strip())
        found |= r.add(
            name,
            limit=r.to_count(fields.get("total")),
            remaining=r.to_count(fields.get("remaining")),
            reset_at=r.after(r.to_seconds(fields.get("resets"))),
        )
    return "zendesk" if found else None
