"""Building the upstream URL of a proxied call, without letting the caller leave the base path.

A connection's ``base_url`` (e.g. ``https://api.x.com/v2/``) scopes what its credentials may
reach; the caller only supplies the rest of the path and the query. Upstream servers normalise
paths in many ways (percent-decoding, ``\\`` as ``/``, Tomcat's ``..;``, overlong UTF-8, NFKC),
so every spelling of a ``..`` segment is refused here rather than trusting the upstream's idea
of what the path means. The caller's own percent-encoding is kept byte for byte: decoding and
re-encoding would change what the upstream receives (``%2B`` vs ``+``, ``%2F`` vs ``/``).

The path given to ``join_upstream`` must be the *raw* (still percent-encoded) request path and
the query the raw query string (``request.rel_url.raw_query_string`` in aiohttp, not the
decoded ``query_string``); the result must be sent with ``yarl.URL(url, encoded=True)`` so
nothing re-quotes it.
"""

from __future__ import annotations

import re
import unicodedata
from urllib.parse import quote, unquote_to_bytes, urlsplit

from proxy.errors import Forbidden, ValidationError

__all__ = [
    "escape_error",
    "join_upstream",
    "same_origin_host",
    "split_absolute",
    "validate_base_url",
]

_DEFAULT_PORTS = {"http": 80, "https": 443}
# Raw control characters never belong in a request target; CR/LF/NUL would split or truncate
# the upstream request line. (A raw space is merely percent-encoded.)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_WHITESPACE_OR_CONTROL = re.compile(r"[\x00-\x20\x7f]")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_PATH_SAFE = "!$&'()*+,;=:@/%-._~"  # RFC 3986 pchar and "/", plus "%" to keep escapes as sent
_QUERY_SAFE = _PATH_SAFE + "?"
# Overlong UTF-8 for "." and "/" and "\": some decoders still map them to the ASCII character.
_OVERLONG = (b"\xc0\xae", b"\xc0\xaf", b"\xc1\x9c", b"\xe0\x80\xae", b"\xe0\x80\xaf")
_HOST_CHARS = re.compile(r"[A-Za-z0-9._~!$&'()*+,;=-]+|\[[0-9A-Fa-f:.]+\]")
_MAX_DECODE_ROUNDS = 4

_ESCAPE = "path escapes the connection's base path"


def escape_error(outside: bool = False) -> Forbidden:
    """The refusal of a path that would leave the base path (a ``..``, or an absolute target
    outside it). The path is not quoted back: some APIs carry tokens in it, and messages get logged."""
    if outside:
        return Forbidden(
            f"{_ESCAPE}: the target URL's path is not under the base URL's path; a connection's "
            "credential only goes to URLs under its base URL"
        )
    return Forbidden(
        f"{_ESCAPE}: '..' segments (in any encoding) are refused; send the path relative to "
        f"the connection's base URL"
    )


def _is_dot_dot(part: str) -> bool:
    """A segment some server would read as ``..``: ``..``, ``..;x``, ``...``, ``.. ``."""
    part = part.partition(";")[0].rstrip(" \t")
    return len(part) >= 2 and part.strip(".") == ""


def _segment_escapes(segment: str, allow_encoded_slash: bool) -> bool | None:
    """True: a traversal. None: an encoded slash where none is allowed. False: fine."""
    seen = segment
    for _ in range(_MAX_DECODE_ROUNDS):  # double-encoding (%252e) is decoded by some stacks
        raw = unquote_to_bytes(seen)
        if b"\x00" in raw:  # C-string upstreams would cut the path there
            raise ValidationError(
                "the request path contains an encoded NUL (%00); remove it",
                fields={"path": "encoded NUL in path"},
            )
        if any(o in raw for o in _OVERLONG):
            return True
        text = raw.decode("utf-8", "replace")
        if not text.isascii():
            text = unicodedata.normalize("NFKC", text)  # full-width dots and slashes
        parts = text.replace("\\", "/").split("/")
        if any(_is_dot_dot(p) for p in parts):
            return True
        if len(parts) > 1 and not allow_encoded_slash:
            return None
        if text == seen:
            return False
        seen = text
    return True  # still changing after several rounds: nobody legitimately encodes that deep


def _check_path(path: str, allow_encoded_slash: bool) -> None:
    if _CONTROL.search(path) or "#" in path:
        raise ValidationError(
            "the request path contains a control character or '#'; percent-encode it",
            fields={"path": "control character or '#' in path"},
        )
    if _BAD_ESCAPE.search(path):
        raise ValidationError(
            "the request path contains a '%' that does not start a %XX escape; encode it as %25",
            fields={"path": "malformed percent-escape"},
        )
    for segment in path.split("/"):
        if not segment:
            continue
        verdict = _segment_escapes(segment, allow_encoded_slash)
        if verdict is True:
            raise escape_error()
        if verdict is None:
            raise Forbidden(
                f"{_ESCAPE}: a '\\' or an encoded '/' or '\\' (%5C, %2F) inside a path segment is "
                f"refused for this connection; send a plain '/' between segments"
            )


def join_upstream(base_url: str, path: str, query: str, *, allow_encoded_slash: bool = False) -> str:
    """The upstream URL: ``base_url``'s origin and path, then ``path``, then the queries.

    ``path`` is the raw remainder after ``/proxy/`` (leading slashes ignored), ``query`` the raw
    query string without ``?``; a query on ``base_url`` comes first. Raises ``Forbidden`` for any
    ``..`` segment in any spelling (and for %2F/%5C inside a segment unless
    ``allow_encoded_slash``, which APIs like GitLab's need) and ``ValidationError`` for control
    characters. Characters outside RFC 3986 (e.g. non-ASCII) are percent-encoded as UTF-8;
    existing escapes are kept as sent.
    """
    _check_path(path, allow_encoded_slash)
    if _CONTROL.search(query) or "#" in query:
        raise ValidationError(
            "the query string contains a control character or '#'; percent-encode it",
            fields={"query": "control character or '#' in query"},
        )
    base = urlsplit(base_url)
    base_path = base.path or "/"
    rest = quote(path.lstrip("/"), safe=_PATH_SAFE)
    if rest:
        full_path = base_path if base_path.endswith("/") else base_path + "/"
        full_path += rest
    else:
        full_path = base_path
    queries = [q for q in (base.query, quote(query, safe=_QUERY_SAFE)) if q]
    url = f"{base.scheme.lower()}://{base.netloc}{full_path}"
    return f"{url}?{'&'.join(queries)}" if queries else url


def validate_base_url(url: str) -> str | None:
    """What is wrong with ``url`` as a connection's base URL, or None when it is fine.

    Requires http or https, a host, no user info, no fragment, a valid port, and no ``.`` or
    ``..`` segments in the path.
    """
    if _WHITESPACE_OR_CONTROL.search(url):
        return "must not contain whitespace or control characters"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # (its text may quote the URL, which may hold a key)
        return "is not a valid URL (check the host, brackets and port)"
    if parts.scheme.lower() not in _DEFAULT_PORTS:
        return "must start with http:// or https://"
    if "@" in parts.netloc:
        return "must not contain user info (user:password@); store credentials as parameters"
    if "#" in url:
        return "must not contain a fragment ('#')"
    netloc = parts.netloc
    host = netloc[: netloc.find("]") + 1] if netloc.startswith("[") else netloc.partition(":")[0]
    if not host:
        return "must name a host"
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            return "has a host name that is not a valid internationalised domain name"
    if not _HOST_CHARS.fullmatch(host):
        return "has a host with characters that are not allowed in a host name"
    if port == 0:
        return "must not use port 0"
    if "\\" in parts.path or any(
        seg in (".", "..") for seg in unquote_to_bytes(parts.path).decode("utf-8", "replace").split("/")
    ):
        return "must not contain '.' or '..' path segments or backslashes"
    return None


def split_absolute(url: str) -> tuple[str, str, int, str]:
    """``(scheme, host, port, path_and_query)`` of a valid absolute http(s) URL.

    ``host`` is lower case without IPv6 brackets; ``port`` is explicit or the scheme's default;
    ``path_and_query`` is at least ``/``. Raises ``ValidationError`` for an unusable URL.
    """
    problem = validate_base_url(url)
    if problem is not None:
        raise ValidationError(f"the URL {problem}", fields={"url": problem})
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").rstrip(".")
    port = parts.port or _DEFAULT_PORTS[scheme]
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return scheme, host, port, target


def same_origin_host(url: str, base_url: str) -> bool:
    """Whether ``url`` has the same origin (scheme, host, effective port) as ``base_url``.

    Used before sending credentials to a URL that is not the base URL itself (e.g. a redirect
    or a pagination link). Invalid URLs are never the same origin.
    """
    try:
        a = split_absolute(url)
        b = split_absolute(base_url)
    except ValidationError:
        return False
    return a[:3] == b[:3]
