"""Log output: one JSON object a line (or plain text), and one access line per proxied call.

Log pipelines (journald, Kubernetes, Loki, Elasticsearch) want fields, not prose: with
``log_format = "json"`` every record, the service's own and every library's, is one JSON object
on one line with ``ts``, ``level``, ``logger``, ``message``, the ``request_id`` and ``trace_id``
of the request it was logged under, ``exception`` text when there is one, and any ``extra=``
fields. ``serve`` picks JSON by itself when stderr is not a terminal (systemd, containers: where
a machine reads the logs) and text on a terminal (where a person does), unless told.

The access line (logger ``proxy.access``, INFO) is written once per proxied call, whatever the
front end and whether it succeeded: request id, W3C trace id and span ids, front end, method,
tenant, connection (as resolved), integration, upstream host, the status the caller got and the
upstream's, the outcome (``ok`` or the error code), total and upstream durations, and the
limiter's decision (``allowed``, ``waited``, ``denied`` or ``unchecked``, with where it was
decided). It names no URL path or query (a query can carry a credential) and no header value.

Redaction: every record has already been scrubbed by ``proxy.observe.logs`` when it was made;
the JSON formatter scrubs the ``extra=`` fields again (they are attached after the record
factory ran) and the request context's fields, by the same rules; the access line's fields are
redacted by type as they are gathered (``AccessFields``), each distinct id or host once.

The access line's cost: with JSON output and the plain set-up of ``configure`` (one handler, on
the root logger, nothing else listening on ``proxy.access`` or its parents), the line is not a
``logging.LogRecord`` at all: its fields are known-safe or already redacted, so it is serialised
and written to the handler's stream directly, under the handler's lock (``_direct_handler``
says when that is allowed; any other set-up, a test's capture handler included, takes the
ordinary logging path with the same fields). That took a written line from ~80 to ~20 us of
CPU in-process (record creation, caller lookup, the record factory's scrub and the formatter's
second scrub were most of it). When the level filters the access line out, a proxied call pays
for one cached ``isEnabledFor`` check.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from proxy.observe import logs, trace

__all__ = [
    "ACCESS",
    "FORMATS",
    "TEXT_FORMAT",
    "AccessFields",
    "JsonFormatter",
    "access_line",
    "configure",
    "resolve_format",
]

ACCESS = logging.getLogger("proxy.access")
FORMATS = ("auto", "json", "text")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Attributes every record has (and ours): never copied into the JSON object as extras.
_SKIP = logs.STANDARD_ATTRS | {"_redacted", "access"}


# (second, its formatted prefix) as one object: records are formatted on executor threads too,
# and two globals updated one after the other could be read half-updated (a second off).
_ts_cache: tuple[int, str] = (-1, "")


def _ts(created: float) -> str:
    """ISO 8601 UTC with milliseconds; the formatted second is reused while it lasts."""
    global _ts_cache
    seconds = int(created)
    second, prefix = _ts_cache
    if seconds != second:
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        _ts_cache = (seconds, prefix)
    return f"{prefix}.{int((created - seconds) * 1000):03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line, every string scrubbed."""

    def format(self, record: logging.LogRecord) -> str:
        logs.scrub(record)  # idempotent; scrubs extras added after the record was made
        out: dict[str, Any] = {
            "ts": _ts(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        access = record.__dict__.get("access")
        if isinstance(access, AccessFields):
            out.update(access.fields)  # redacted when made
        else:
            ctx = trace.current()
            if ctx is not None:
                out["request_id"] = logs.redact(ctx.request_id)
                out["trace_id"] = ctx.trace_id
        for key, value in record.__dict__.items():
            if key not in _SKIP and key not in out:
                out[key] = value
        if record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = record.stack_info
        return json.dumps(out, ensure_ascii=False, default=str, separators=(",", ":"))


class AccessFields:
    """The access line's fields, redacted by type when made (so only ever seen redacted).

    Numbers, generated hex ids and the service's own vocabularies (front end, outcome code,
    limiter decision) cannot hold a credential; every text that came from outside (request id,
    tenant, connection, integration, upstream host) goes through the log redaction, each
    distinct value once. Not a mapping: the generic extras pass of ``logs.scrub`` leaves the
    object alone instead of redacting the same values again on every line.
    """

    __slots__ = ("fields",)

    def __init__(self, ctx: trace.CallContext, status: int | None, duration_ms: float) -> None:
        clean = logs.redact_cached
        self.fields: dict[str, Any] = {
            "event": "proxy.call",
            # Unique per call: remembering it would only push the recurring values out of the
            # cache. A minted id is short and alphanumeric, which redact() settles at once.
            "request_id": logs.redact(ctx.request_id),
            "trace_id": ctx.trace_id,
            "span_id": ctx.span_id,
            "parent_span_id": ctx.parent_id,
            "front": ctx.front,
            "tenant": clean(ctx.tenant) if ctx.tenant else None,
            "connection": clean(ctx.connection) if ctx.connection else None,
            "integration": clean(ctx.integration) if ctx.integration else None,
            "upstream_host": clean(ctx.upstream_host) if ctx.upstream_host else None,
            "status": status,
            "upstream_status": ctx.upstream_status,
            "outcome": ctx.outcome,
            "duration_ms": duration_ms,
            "upstream_ms": ctx.upstream_ms,
            "limit": ctx.limit,
            "limit_source": ctx.limit_source,
            "limit_wait_ms": ctx.limit_wait_ms,
        }
        if ctx.stale:  # credentials served past their TTL while the store was unreachable
            self.fields["stale_credentials"] = True


# Set by configure(): with JSON output the fields say it all and the message stays short.
_json_output = False
# The handler configure() installed on the root logger (JSON output only): the direct writer's.
_handler: logging.StreamHandler[Any] | None = None
_ACCESS_MESSAGE = "proxy call"
# What the JSON formatter would write before the fields, for the one logger and level.
_HEAD = {"level": "INFO", "logger": ACCESS.name, "message": _ACCESS_MESSAGE}
_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=str).encode


def _direct_handler() -> logging.StreamHandler[Any] | None:
    """configure()'s handler when it alone would receive an access record, else None.

    The direct write must be exactly what logging would have done: so only while the root's
    handlers are [that handler] (unfiltered, level admitting INFO), and no logger from
    ``proxy.access`` up to the root has a handler of its own or stops propagation. Logger
    filters are left to logging too (they could veto the line). A few attribute reads a call.
    """
    h = _handler
    if h is None or h.filters or h.level > logging.INFO or ACCESS.filters:
        return None
    logger: logging.Logger | None = ACCESS
    while logger is not None and logger is not logging.root:
        if logger.handlers or not logger.propagate:
            return None
        logger = logger.parent
    roots = logging.root.handlers
    return h if len(roots) == 1 and roots[0] is h else None


def _write_direct(h: logging.StreamHandler[Any], fields: dict[str, Any]) -> None:
    line = _encode({"ts": _ts(time.time()), **_HEAD, **fields})
    h.acquire()
    try:
        stream = h.stream
        stream.write(line + h.terminator)
        stream.flush()
    except Exception:  # as StreamHandler.emit: a failed log write never fails the call
        h.handleError(logging.makeLogRecord({"msg": _ACCESS_MESSAGE, "name": ACCESS.name}))
    finally:
        h.release()


def access_line(ctx: trace.CallContext, status: int | None) -> None:
    """Log the access line of the proxied call ``ctx`` describes (cheap when filtered out)."""
    if not ACCESS.isEnabledFor(logging.INFO):
        return
    duration = round(ctx.duration_ms(), 2)
    fields = AccessFields(ctx, status, duration)
    if _json_output:
        h = _direct_handler()
        if h is not None:
            _write_direct(h, fields.fields)
            return
        ACCESS.info(_ACCESS_MESSAGE, extra={"access": fields})
        return
    extra = {"access": fields}
    ACCESS.info(
        "%s %s/%s -> %s: %s %s in %.1f ms (upstream %s ms), limit %s, request %s, trace %s",
        ctx.front,
        ctx.tenant or "-",
        ctx.connection or "-",
        ctx.upstream_host or "-",
        status if status is not None else "-",
        ctx.outcome,
        duration,
        ctx.upstream_ms if ctx.upstream_ms is not None else "-",
        ctx.limit,
        ctx.request_id,
        ctx.trace_id,
        extra=extra,
    )


def resolve_format(setting: str, stream: Any) -> str:
    """``auto``: JSON unless ``stream`` is a terminal."""
    if setting != "auto":
        return setting
    isatty = getattr(stream, "isatty", None)
    return "text" if callable(isatty) and isatty() else "json"


def configure(level: str, fmt: str = "text") -> None:
    """The root handler on stderr in ``fmt`` (json or text), every record redacted."""
    # Redaction first, so not even a record made while logging is being set up is unscrubbed.
    global _json_output, _handler
    logs.install()
    _json_output = fmt == "json"
    # Neither format prints thread names; gathering them costs every record a few microseconds.
    logging.logThreads = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())  # it scrubs each record, extras included
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
        handler.addFilter(logs.RedactingFilter())
    _handler = handler if fmt == "json" else None
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
