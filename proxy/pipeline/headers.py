"""Which headers cross the proxy, in each direction.

A caller's request carries headers meant for the proxy itself (its own credentials, the
connection and tenant selectors, ``X-Proxy-*`` controls) and hop-by-hop headers that describe
the caller's connection, not the upstream's (RFC 9110 section 7.6.1). None of those may reach
the upstream: forwarding the caller's ``Authorization`` would leak the proxy key to a third
party, and forwarding ``Transfer-Encoding`` or ``Connection`` invites request smuggling. Header
names or values with CR, LF or NUL are refused outright rather than cleaned, since they only
ever come from an injection attempt.

On the way back, hop-by-hop headers are dropped, and so is the ``X-Proxy-*`` namespace: it
belongs to this service (``X-Proxy-Error`` tells callers the proxy, not the upstream, made an
error), so an upstream must not be able to forge it. A value with a control character is not
cleaned but refused (a 502): the answer is not valid HTTP and cannot be relayed as sent.

This runs on every request: one pass over the headers, with each distinct name classified once.

The second half is the one rule for what a *stored credential* may be injected as (checked when
a connection is written, when the catalogue loads, and again when the credential is injected):
an injected header must not frame the request (``Content-Length``, ``Transfer-Encoding``), route
it (``Host``, ``Forwarded``, ``X-Forwarded-*``, method and URL overrides), manage the connection
or talk to the proxy; a ``Transfer-Encoding: chunked`` next to the caller's ``Content-Length``
would let the caller's body carry a second request past the base path, the limiter and the audit.
Injected values hold no control character at all. Pure: imported by the catalogue and the injector.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import unquote_plus

from proxy.cache import BoundedCache
from proxy.errors import UpstreamUnreachable, ValidationError

__all__ = [
    "CONTROL_HEADERS",
    "CONTROL_PREFIXES",
    "FRAMING_HEADERS",
    "HOP_BY_HOP",
    "INJECT_FORBIDDEN",
    "INJECT_FORBIDDEN_PREFIXES",
    "clean_request_headers",
    "clean_response_headers",
    "cookie_name_problem",
    "cookie_value_problem",
    "has_control",
    "injected_header_problem",
    "is_token",
    "malformed_response",
    "query_name_problem",
    "redact_secrets",
    "value_problem",
    "without_framing",
]

HOP_BY_HOP: frozenset[str] = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

CONTROL_PREFIXES: tuple[str, ...] = ("x-proxy-",)

# Addressed to the proxy, never to the upstream. ``host`` is set by the client from the
# upstream URL; ``content-length`` and ``content-type`` describe the body and are kept.
# ``expect`` is dropped because the proxy's own server already answered 100-continue.
CONTROL_HEADERS: frozenset[str] = frozenset(
    {
        "authorization",
        "x-connection-id",
        "x-tenant-id",
        "x-runtime-user-id",
        "x-org-id",
        "host",
        "expect",
        # W3C trace context: the pipeline sends its own (proxy.observe.trace), never the caller's raw.
        "traceparent",
        "tracestate",
    }
)

_REQUEST_DROP = HOP_BY_HOP | CONTROL_HEADERS
# RFC 9110 token: the only characters a field name (or a method) may hold.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# What HTTP/1.1 cannot carry in a field value or reason phrase (RFC 9110 5.5: no controls but
# HTAB). The same set aiohttp refuses to write: relaying such a value would fail mid-response.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def is_token(value: str) -> bool:
    """Whether ``value`` is an RFC 9110 token (a method or a field name)."""
    return _TOKEN.fullmatch(value) is not None


def has_control(value: str) -> bool:
    """Whether ``value`` holds a character no HTTP field value or reason phrase may hold."""
    # isprintable() is one C pass and true for nearly every real value; only the rest (tabs,
    # obs-text, controls) pay for the regex.
    return not value.isprintable() and _CONTROL.search(value) is not None


def _connection_tokens(value: str, into: set[str] | None) -> set[str]:
    names = into if into is not None else set()
    for token in value.split(","):
        token = token.strip().lower()
        if token:
            names.add(token)
    return names


def _without(kept: list[tuple[str, str, str]], named: set[str] | None) -> list[tuple[str, str]]:
    """(name, value) of the ``(lname, name, value)`` kept, less those a Connection header named."""
    if named is None:
        return [(name, value) for _, name, value in kept]
    return [(name, value) for lname, name, value in kept if lname not in named]


def _shown(name: str) -> str:
    return repr(name[:64])


# Verdicts per raw field name: callers and upstreams send the same few names again and again,
# so each distinct spelling is validated and classified once. Bounded: a flood of distinct
# names only clears the cache.
_KEEP, _DROP, _CONNECTION, _INVALID = 0, 1, 2, 3
_NAME_CACHE_MAX = 2048
_request_names: BoundedCache[str, tuple[int, str]] = BoundedCache(_NAME_CACHE_MAX)
_response_names: BoundedCache[str, tuple[int, str]] = BoundedCache(_NAME_CACHE_MAX)


def _classify(name: str, drop: frozenset[str], cache: BoundedCache[str, tuple[int, str]]) -> tuple[int, str]:
    verdict = cache.get(name)
    if verdict is None:
        lname = name.lower()
        if not _TOKEN.fullmatch(name):
            verdict = (_INVALID, lname)
        elif lname == "connection":
            verdict = (_CONNECTION, lname)
        elif lname in drop or lname.startswith(CONTROL_PREFIXES):
            verdict = (_DROP, lname)
        else:
            verdict = (_KEEP, lname)
        cache.put(name, verdict)
    return verdict


def clean_request_headers(items: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The caller's headers that may go upstream, in order, duplicates kept.

    Drops hop-by-hop headers, headers the ``Connection`` header names, the proxy's control
    headers (``Authorization``, ``X-Connection-Id``, ``X-Proxy-*``, ...) and ``Host``; keeps
    cookies, content headers and everything else. Raises ``ValidationError`` when a name is
    not an RFC 9110 token or a name or value holds CR, LF or NUL (the value is never quoted).
    """
    kept: list[tuple[str, str, str]] = []
    named: set[str] | None = None
    cache = _request_names
    verdict_of = cache.get  # hoisted: a local bound method is as cheap as an inlined dict.get
    for name, value in items:
        kind, lname = verdict_of(name) or _classify(name, _REQUEST_DROP, cache)
        if kind == _INVALID:
            raise ValidationError(
                f"request header name {_shown(name)} is not a valid HTTP field name",
                fields={"headers": "invalid header name"},
            )
        # CR, LF or NUL: three substring scans in C beat a regex search on short values.
        if "\r" in value or "\n" in value or "\x00" in value:
            raise ValidationError(
                f"request header {name!r} has a value containing CR, LF or NUL; remove them",
                fields={name: "CR, LF or NUL in header value"},
            )
        if kind == _KEEP:
            kept.append((lname, name, value))
        elif kind == _CONNECTION:
            named = _connection_tokens(value, named)
    return _without(kept, named)


def malformed_response(what: str) -> UpstreamUnreachable:
    """The 502 for an upstream answer that is not valid HTTP and so cannot be relayed."""
    return UpstreamUnreachable(
        f"the upstream sent a malformed response ({what}); nothing was relayed. The API, or "
        "something between it and the proxy, is broken: report it to its operator"
    )


def clean_response_headers(items: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The upstream's headers that go back to the caller, in order, duplicates kept.

    Drops hop-by-hop headers, those the ``Connection`` header names, ``X-Proxy-*`` and headers
    with an invalid name; keeps ``Content-Length``, ``Content-Encoding`` and ``Set-Cookie`` as
    the upstream sent them. A kept header whose value holds a control character makes the whole
    answer an ``UpstreamUnreachable`` (502): it cannot be relayed (the client's connection
    would break mid-response) and silently dropping it would hand on an altered answer.
    """
    kept: list[tuple[str, str, str]] = []
    named: set[str] | None = None
    cache = _response_names
    verdict_of = cache.get  # hoisted: a local bound method is as cheap as an inlined dict.get
    for name, value in items:
        kind, lname = verdict_of(name) or _classify(name, HOP_BY_HOP, cache)
        if kind == _KEEP:
            if not value.isprintable() and _CONTROL.search(value):
                raise malformed_response(f"header {_shown(name)} holds a control character")
            kept.append((lname, name, value))
        elif kind == _CONNECTION:
            named = _connection_tokens(value, named)
    return _without(kept, named)


# --- what a credential may be injected as ------------------------------------------------------

# Describe how the request body is delimited. A caller never picks them in the envelope (the
# proxy frames the body it builds) and an injection never sets them.
FRAMING_HEADERS: frozenset[str] = frozenset(
    {"content-length", "transfer-encoding", "te", "trailer", "expect"}
)

# Header names an injected credential may not use: framing and connection management (request
# smuggling), routing (where the upstream or a gateway in front of it sends the call, so the base
# path could be left), ``Cookie`` (cookies have their own location, whose values are checked for
# ';'), and everything addressed to this proxy. ``Authorization`` is the usual target and allowed.
INJECT_FORBIDDEN: frozenset[str] = (
    HOP_BY_HOP
    | FRAMING_HEADERS
    | (CONTROL_HEADERS - {"authorization"})
    | {
        "cookie",
        "forwarded",
        "via",
        "x-host",
        "x-original-host",
        "x-original-url",
        "x-rewrite-url",
        "x-http-method",
        "x-http-method-override",
        "x-method-override",
    }
)
INJECT_FORBIDDEN_PREFIXES: tuple[str, ...] = ("proxy-", "x-forwarded-", *CONTROL_PREFIXES)
MAX_INJECTED_NAME = 256
# Unicode Cc: C0, DEL and C1 (NEL, U+0085, ends a line for some parsers). Tab is refused too:
# no credential holds one, and some servers fold or split on it.
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_COOKIE_BAD = re.compile(r"[\x00-\x1f\x7f-\x9f;]")


def injected_header_problem(name: str) -> str | None:
    """Why ``name`` cannot carry an injected credential, or None. Never mentions a value."""
    if not name or len(name) > MAX_INJECTED_NAME or not _TOKEN.fullmatch(name):
        return "is not a valid HTTP field name (RFC 9110 token)"
    lname = name.lower()
    if lname in INJECT_FORBIDDEN or lname.startswith(INJECT_FORBIDDEN_PREFIXES):
        return (
            "names a header that frames or routes the request or is addressed to the proxy "
            "(hop-by-hop, Content-Length, Transfer-Encoding, Host, Forwarded, X-Forwarded-*, "
            "Cookie, Proxy-*, X-Proxy-*, ...); a credential cannot be sent in it"
        )
    return None


def query_name_problem(name: str) -> str | None:
    if not name or len(name) > MAX_INJECTED_NAME or _CONTROL_CHARS.search(name):
        return "must be a non-empty query parameter name without control characters"
    return None


def cookie_name_problem(name: str) -> str | None:
    if not name or len(name) > MAX_INJECTED_NAME or not _TOKEN.fullmatch(name):
        return "is not a valid cookie name (RFC 6265 token)"
    return None


def value_problem(value: str) -> str | None:
    if _CONTROL_CHARS.search(value):
        return "contains a control character (CR, LF, NUL, tab, DEL, ...)"
    return None


def cookie_value_problem(value: str) -> str | None:
    if _COOKIE_BAD.search(value):
        return "contains ';' or a control character"
    return None


def without_framing(items: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """``items`` less the framing headers, for requests whose body the proxy frames itself."""
    return [(name, value) for name, value in items if name.lower() not in FRAMING_HEADERS]


# Relayed as sent even when it happens to hold a secret's digits: rewriting it would corrupt the
# response framing, and a length reveals nothing.
_NOT_REDACTED = frozenset({"content-length"})


def redact_secrets(
    items: list[tuple[str, str]], secrets: tuple[str, ...], placeholder: str = "********"
) -> list[tuple[str, str]]:
    """``items`` with every occurrence of a ``secrets`` string in a value replaced.

    ``secrets`` should hold the encoded forms too (see ``inject.Injection.scrub``); a value that
    holds a secret only in some other percent-encoding is replaced whole. Cost: a substring scan
    per value and secret, and a decode only of values with a '%' or '+'.
    """
    if not secrets:
        return items
    out: list[tuple[str, str]] = []
    for name, value in items:
        if name.lower() not in _NOT_REDACTED:
            for secret in secrets:
                if secret in value:
                    value = value.replace(secret, placeholder)
            if "%" in value or "+" in value:
                decoded = unquote_plus(value)
                if any(secret in decoded for secret in secrets):
                    value = placeholder
        out.append((name, value))
    return out
