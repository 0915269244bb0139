"""Log redaction: no log record carries a credential, whatever the input.

Secrets stay out of log calls by design, but text the service does not write can still quote
them: aiohttp's parser errors carry the raw request head (``Authorization: Bearer ...``, a connect
link's token in the path) and land in the traceback of ``aiohttp.server``'s "Error handling
request"; an enabled access log may print header values; an exception's text may quote an input.
So every record is scrubbed by *shape*, not by hoping the writer was careful:

- values of ``Authorization``, ``Proxy-Authorization``, ``Cookie`` and ``Set-Cookie`` headers,
  ``Bearer`` / ``Basic`` credentials, secret-looking query parameters and connect-page paths;
- the known secrets of this process (the admin token, the JWT secret), verbatim;
- anything shaped like a secret this service mints (caller API keys, random url-safe tokens of
  32+ characters, base64 master keys, JWTs).

Where: a log-record factory redacts each record as it is created, so every logger, handler and
formatter (the root handler, aiohttp's server and access loggers, pytest's capture) only ever
sees the scrubbed text; the message is formatted once and its arguments dropped, the exception
and stack text are rendered, scrubbed and the live ``exc_info`` dropped. The same redaction is
also a ``logging.Filter`` for handlers, in case something replaces the factory.

Malformed requests are also handled at the source: ``aiohttp.server``'s record for a request
the HTTP parser refused (``HttpProcessingError``) becomes one warning line with the peer and the
parser's reason, never the head it quotes.

Pure module: standard library only (and the pure ``proxy.cache``).
"""

from __future__ import annotations

import logging
import re
import threading
import traceback
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from proxy.cache import BoundedCache

MASK = "[REDACTED]"
# Known secrets shorter than this are not scrubbed verbatim (they would mask ordinary words);
# settings already require the admin token to be at least 16 characters.
_MIN_KNOWN_SECRET = 12

_SENSITIVE_HEADERS = ("proxy-authorization", "authorization", "set-cookie", "cookie")
# A header line, in a real head or quoted in a bytes repr: the value runs to the end of the
# line, or to an escaped CR/LF (``\r``, ``\n``) inside a repr. Everything up to there is masked,
# including any control byte or quote in the value: over-masking is the safe direction.
_HEADER_RE = re.compile(
    r"(?i)\b((?:proxy-)?authorization|(?:set-)?cookie)(['\"]?\s*[:=]\s*)(?:(?!\\r|\\n)[^\r\n])+"
)
_SCHEME_RE = re.compile(r"(?i)\b(bearer(?=\s+[^\s<])|basic(?=\s+[A-Za-z0-9+/=]{8}))(\s+)[A-Za-z0-9._~+/=-]+")
_QUERY_RE = re.compile(
    r"(?i)([?&;](?:access_token|refresh_token|id_token|token|code|state|client_secret|api_key|"
    r"apikey|key|secret|password|sig|signature)=)[^&\s'\"#]+"
)
_CONNECT_PATH_RE = re.compile(r"(/connect/)[^/\s?#'\"]+")
_JWT_RE = re.compile(r"\beyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_API_KEY_RE = re.compile(r"\b[A-Za-z0-9]+_[A-Za-z0-9]{12}_[A-Za-z0-9_-]{20,}")
_MASTER_KEY_RE = re.compile(r"[A-Za-z0-9+/]{43}=")
# Random url-safe tokens (``secrets.token_urlsafe(32)`` is 43 characters): long runs holding
# both cases. Identifiers, hex digests and request ids (one case) are left alone.
_TOKEN_RE = re.compile(r"(?<![A-Za-z0-9_-])(?=[A-Za-z0-9_-]*[a-z])(?=[A-Za-z0-9_-]*[A-Z])[A-Za-z0-9_-]{32,}")

_known: set[str] = set()
_known_re: re.Pattern[str] | None = None
_lock = threading.Lock()


def add_known_secrets(values: Iterable[str | None]) -> None:
    """Register this process's own secrets (admin token, JWT secret) for verbatim masking."""
    global _known_re
    with _lock:
        fresh = {v for v in values if v and len(v) >= _MIN_KNOWN_SECRET} - _known
        if not fresh:
            return
        _known.update(fresh)
        # Longest first, so a secret containing another is masked whole.
        _known_re = re.compile("|".join(re.escape(v) for v in sorted(_known, key=len, reverse=True)))
        _redacted_cache.clear()  # a cached result may hold what is now a known secret


def redact(text: str) -> str:
    """``text`` with every credential-shaped part replaced by ``[REDACTED]``."""
    if _known_re is not None:
        text = _known_re.sub(MASK, text)
    # Every shape below needs a character that is not an ASCII letter or digit (":", "=",
    # whitespace, "?&;", "/", ".", "_") or a run of 32+ characters: short alphanumeric text
    # (minted request ids, most tenant and connection ids) cannot match one, so it skips the
    # nine passes. tests/observe/test_logs.py checks the claim against the passes themselves.
    if len(text) < _SHAPE_MIN and text.isascii() and text.isalnum():
        return text
    return _by_shape(text)


_SHAPE_MIN = 32


def _by_shape(text: str) -> str:
    """The shape passes of ``redact`` (known secrets already masked)."""
    text = _HEADER_RE.sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}", text)
    text = _SCHEME_RE.sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}", text)
    text = _QUERY_RE.sub(lambda m: f"{m.group(1)}{MASK}", text)
    text = _CONNECT_PATH_RE.sub(lambda m: f"{m.group(1)}{MASK}", text)
    for pattern in (_JWT_RE, _API_KEY_RE, _MASTER_KEY_RE, _TOKEN_RE):
        text = pattern.sub(MASK, text)
    return text


# Short values that recur (ids, host names on every access line): redacted once each.
_redacted_cache: BoundedCache[str, str] = BoundedCache(4096)
_CACHE_VALUE_MAX = 256


def redact_cached(text: str) -> str:
    """``redact(text)``, remembered for short texts (values that recur, such as ids and hosts)."""
    done = _redacted_cache.get(text)
    if done is None:
        done = redact(text)
        if len(text) <= _CACHE_VALUE_MAX:
            _redacted_cache.put(text, done)
    return done


def _redact_value(key: str, value: Any) -> Any:
    if isinstance(value, str):
        if key.lower() in _SENSITIVE_HEADERS:
            return MASK
        return redact(value)
    if isinstance(value, Mapping):  # e.g. the access logger's request_header / response_header
        return {str(k): _redact_value(str(k), v) for k, v in value.items()}
    return value


# Attributes every LogRecord has; anything else came in through ``extra=``.
_STANDARD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}
STANDARD_ATTRS = _STANDARD_ATTRS


def scrub(record: logging.LogRecord) -> logging.LogRecord:
    """Redact ``record`` in place (idempotent): message, exception and stack text, extras."""
    if getattr(record, "_redacted", False):
        _scrub_extras(record)  # extras may have been added since
        return record
    try:
        message = record.getMessage()
    except Exception:  # a broken format string: keep its parts, still scrubbed
        message = f"{record.msg} {record.args!r}"
    record.msg = redact(message)
    record.args = None
    if record.exc_info and not record.exc_text:
        record.exc_text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
    # The live exception would let a formatter render the unscrubbed text again.
    record.exc_info = None
    if record.exc_text:
        record.exc_text = redact(record.exc_text)
    if record.stack_info:
        record.stack_info = redact(record.stack_info)
    record.__dict__["_redacted"] = True
    _scrub_extras(record)
    return record


def _scrub_extras(record: logging.LogRecord) -> None:
    for key, value in list(record.__dict__.items()):
        if key not in _STANDARD_ATTRS and key != "_redacted":
            record.__dict__[key] = _redact_value(key, value)


class RedactingFilter(logging.Filter):
    """Handler filter doing the same as the record factory; never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        scrub(record)
        return True


class MalformedRequestFilter(logging.Filter):
    """On ``aiohttp.server``: a request the HTTP parser refused becomes one line, peer and reason.

    aiohttp logs these as "Error handling request from %s" with the parser exception, whose
    text quotes the raw head (credentials included) and a traceback of aiohttp's own code that
    says nothing an operator can act on.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = _processing_error(record)
        if exc is None:
            return True
        peer = record.args[0] if isinstance(record.args, tuple) and record.args else "unknown peer"
        record.msg = "malformed HTTP request from %s refused with %s: %s"
        record.args = (peer, getattr(exc, "code", 400), parser_reason(exc))
        record.exc_info = None
        record.exc_text = None
        if record.levelno > logging.WARNING:
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def _processing_error(record: logging.LogRecord) -> BaseException | None:
    if not record.exc_info or not isinstance(record.msg, str):
        return None
    if not record.msg.startswith("Error handling request"):
        return None
    exc = record.exc_info[1]
    # By name, so this module needs no aiohttp import: every parser error derives from it.
    names = {cls.__name__ for cls in type(exc).__mro__}
    return exc if "HttpProcessingError" in names else None


def parser_reason(exc: BaseException) -> str:
    """The parser's explanation without the bytes it quotes: its lines up to the first repr."""
    message = str(getattr(exc, "message", "") or type(exc).__name__)
    lines = []
    for line in message.splitlines():
        line = line.strip()
        if line.startswith(("b'", 'b"', "^")):
            break
        if line:
            lines.append(line.rstrip(":"))
    return redact("; ".join(lines)[:200] or type(exc).__name__)


_installed = False
_MALFORMED = MalformedRequestFilter()
_REDACTING = RedactingFilter()


def install(known_secrets: Iterable[str | None] = ()) -> None:
    """Scrub every record of this process from now on (idempotent); register known secrets."""
    global _installed
    add_known_secrets(known_secrets)
    with _lock:
        if _installed:
            return
        _installed = True
        previous: Callable[..., logging.LogRecord] = logging.getLogRecordFactory()
        # ``extra=`` attributes are set on a record only after the factory made it; aiohttp's
        # access logger passes the request headers that way, so its records are scrubbed again
        # by a logger filter (which runs once the extras are there).
        for name in ("aiohttp.access", "aiohttp.server", "aiohttp.web"):
            logging.getLogger(name).addFilter(_REDACTING)

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            # Before scrubbing: the rewrite needs the live exception to know what it is.
            if record.name == "aiohttp.server":
                _MALFORMED.filter(record)
            return scrub(record)

        logging.setLogRecordFactory(factory)


__all__ = [
    "MASK",
    "STANDARD_ATTRS",
    "MalformedRequestFilter",
    "RedactingFilter",
    "add_known_secrets",
    "install",
    "parser_reason",
    "redact",
    "redact_cached",
    "scrub",
]
