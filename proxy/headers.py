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
error), so an upstream must not be able to forge it.

This runs on every request: one pass over the headers, with each distinct name classified once.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from proxy.errors import ValidationError

__all__ = [
    "CONTROL_HEADERS",
    "CONTROL_PREFIXES",
    "HOP_BY_HOP",
    "clean_request_headers",
    "clean_response_headers",
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
    }
)

_REQUEST_DROP = HOP_BY_HOP | CONTROL_HEADERS
# RFC 9110 token: the only characters a field name may hold.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


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
_request_names: dict[str, tuple[int, str]] = {}
_response_names: dict[str, tuple[int, str]] = {}


def _classify(name: str, drop: frozenset[str], cache: dict[str, tuple[int, str]]) -> tuple[int, str]:
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
        if len(cache) >= _NAME_CACHE_MAX:
            cache.clear()
        cache[name] = verdict
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
    for name, value in items:
        kind, lname = cache.get(name) or _classify(name, _REQUEST_DROP, cache)
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


def clean_response_headers(items: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The upstream's headers that go back to the caller, in order, duplicates kept.

    Drops hop-by-hop headers, those the ``Connection`` header names and ``X-Proxy-*``; keeps
    ``Content-Length``, ``Content-Encoding`` and ``Set-Cookie`` as the upstream sent them.
    A header with an invalid name or a CR/LF/NUL in its value is dropped, not passed on.
    """
    kept: list[tuple[str, str, str]] = []
    named: set[str] | None = None
    cache = _response_names
    for name, value in items:
        kind, lname = cache.get(name) or _classify(name, HOP_BY_HOP, cache)
        if kind == _KEEP:
            if not ("\r" in value or "\n" in value or "\x00" in value):
                kept.append((lname, name, value))
        elif kind == _CONNECTION:
            named = _connection_tokens(value, named)
    return _without(kept, named)
