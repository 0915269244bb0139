"""proxy.observe.logformat: the access line written directly is the line logging would have
written, redacted by type (canaries of every shape in every free-text field), and the direct
writer steps aside whenever logging would have done something else with the record."""

from __future__ import annotations

import io
import json
import logging
import secrets
from collections.abc import Iterator
from typing import Any

import pytest

from proxy.observe import logformat, logs, trace
from proxy.security import crypto

API_KEY = crypto.new_api_key()[1]
URLSAFE = secrets.token_urlsafe(32)
KNOWN = "known-admin-" + secrets.token_hex(8)
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJ0ZW5hbnRfaWQiOiJ0MSJ9.c2lnbmF0dXJlLXNpZ25hdHVyZQ"


@pytest.fixture
def json_logging() -> Iterator[io.StringIO]:
    """configure() as serve does (JSON), its handler writing to a buffer; logging restored after.

    pytest's own capture handlers join the root logger for each test's call phase, after the
    fixtures ran: ``plain()`` in the test body leaves configure()'s handler alone again.
    """
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logformat._handler, logformat._json_output)
    logformat.configure("INFO", "json")
    logs.add_known_secrets([KNOWN])
    handler = root.handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    out = io.StringIO()
    handler.setStream(out)
    try:
        yield out
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        logformat._handler, logformat._json_output = saved[2], saved[3]
        logformat.ACCESS.filters.clear()
        logformat.ACCESS.propagate = True


def plain() -> None:
    assert logformat._handler is not None
    logging.getLogger().handlers[:] = [logformat._handler]


def call(request_id: str = "0123abcd0123abcd0123", **fields: Any) -> trace.CallContext:
    ctx, token = trace.begin(request_id)
    ctx.front, ctx.outcome, ctx.limit, ctx.upstream_status = "path", "ok", "allowed", 200
    for k, v in fields.items():
        setattr(ctx, k, v)
    trace.end(token)
    return ctx


CANARIES = {
    "tenant": f"t-{KNOWN}",
    "connection": f"c {API_KEY}",
    "integration": f"Bearer {URLSAFE}",
    "upstream_host": f"h.{JWT}",
}


def lines(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_direct_line_has_every_field_and_no_canary(json_logging: io.StringIO) -> None:
    plain()
    assert logformat._direct_handler() is not None  # the plain set-up: the direct path runs
    logformat.access_line(call(request_id=f"r{URLSAFE}", **CANARIES), 200)
    [rec] = lines(json_logging)
    assert rec["level"] == "INFO" and rec["logger"] == "proxy.access" and rec["message"] == "proxy call"
    assert rec["event"] == "proxy.call" and rec["status"] == 200 and rec["front"] == "path"
    assert rec["ts"].endswith("Z") and len(rec["trace_id"]) == 32
    text = json_logging.getvalue()
    for secret in (KNOWN, API_KEY.split("_", 2)[2], URLSAFE, JWT.split(".")[1]):
        assert secret not in text
    for key in (*CANARIES, "request_id"):
        assert logs.MASK in rec[key], key


def test_direct_and_logging_paths_write_the_same_fields(json_logging: io.StringIO) -> None:
    plain()
    ctx = call(**CANARIES)
    logformat.access_line(ctx, 502)
    # A second root handler (as pytest's capture adds): logging carries the record to both.
    other = io.StringIO()
    extra = logging.StreamHandler(other)
    extra.setFormatter(logformat.JsonFormatter())
    logging.getLogger().addHandler(extra)
    assert logformat._direct_handler() is None
    logformat.access_line(ctx, 502)
    direct, via_logging = lines(json_logging)
    assert lines(other) == [via_logging]
    for rec in (direct, via_logging):
        del rec["ts"], rec["duration_ms"]
    assert direct == via_logging


def test_a_logger_filter_or_no_propagation_still_governs_the_line(json_logging: io.StringIO) -> None:
    plain()
    logformat.ACCESS.addFilter(lambda record: False)
    assert logformat._direct_handler() is None
    logformat.access_line(call(), 200)
    logformat.ACCESS.filters.clear()
    logformat.ACCESS.propagate = False
    logformat.access_line(call(), 200)
    assert json_logging.getvalue() == ""
    logformat.ACCESS.propagate = True
    logformat.access_line(call(), 200)
    assert len(lines(json_logging)) == 1


def test_a_handler_on_a_parent_logger_takes_the_logging_path(json_logging: io.StringIO) -> None:
    plain()
    parent = logging.getLogger("proxy")
    seen = io.StringIO()
    handler = logging.StreamHandler(seen)
    parent.addHandler(handler)
    try:
        assert logformat._direct_handler() is None
        logformat.access_line(call(), 200)
    finally:
        parent.removeHandler(handler)
    assert seen.getvalue() and len(lines(json_logging)) == 1


def test_timestamps_follow_the_clock_across_seconds() -> None:
    assert logformat._ts(1_700_000_000.25) == "2023-11-14T22:13:20.250Z"
    assert logformat._ts(1_700_000_001.999) == "2023-11-14T22:13:21.999Z"
    assert logformat._ts(1_700_000_000.0) == "2023-11-14T22:13:20.000Z"
