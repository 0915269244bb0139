"""proxy.observe.trace: a caller's traceparent is honoured only when exactly well formed, and the
upstream gets the caller's trace id with this service's span as its parent."""

from __future__ import annotations

import os

import pytest

from proxy.observe import logformat, trace

VALID = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_a_valid_traceparent_is_parsed() -> None:
    assert trace.parse_traceparent(VALID) == ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331", "01")
    # A later version may append fields after a dash.
    assert trace.parse_traceparent("01" + VALID[2:] + "-future") is not None


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        VALID.upper(),  # hex must be lower case
        "ff" + VALID[2:],  # version ff is invalid
        "00-00000000000000000000000000000000-b7ad6b7169203331-01",  # zero trace id
        "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",  # zero parent id
        VALID + "-extra",  # version 00 has exactly four fields
        VALID + "x",
        VALID[:-1],
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b716920333-01",
        "00_0af7651916cd43dd8448eb211c80319c_b7ad6b7169203331_01",
        " " + VALID,
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\nX-Evil: 1",
    ],
)
def test_malformed_traceparents_are_not_trusted(value: str | None) -> None:
    assert trace.parse_traceparent(value) is None


def test_upstream_gets_the_callers_trace_with_our_span_as_parent() -> None:
    ctx = trace.CallContext("rid-1", VALID, "vendor=opaque")
    headers = dict(ctx.upstream_headers())
    version, trace_id, parent, flags = headers["traceparent"].split("-")
    assert (version, trace_id, flags) == ("00", "0af7651916cd43dd8448eb211c80319c", "01")
    assert parent == ctx.span_id and parent != "b7ad6b7169203331" and len(parent) == 16
    assert ctx.parent_id == "b7ad6b7169203331"
    assert headers["tracestate"] == "vendor=opaque"


def test_a_malformed_traceparent_gets_a_fresh_trace_and_loses_its_tracestate() -> None:
    ctx = trace.CallContext("rid-2", VALID.upper(), "vendor=opaque")
    headers = dict(ctx.upstream_headers())
    assert "tracestate" not in headers
    parsed = trace.parse_traceparent(headers["traceparent"])
    assert parsed is not None and parsed[0] != "0af7651916cd43dd8448eb211c80319c"
    assert ctx.parent_id is None
    # Fresh ids differ from call to call.
    assert trace.CallContext("rid-3").trace_id != trace.CallContext("rid-4").trace_id


def test_a_tracestate_with_control_characters_is_dropped() -> None:
    ctx = trace.CallContext("rid-5", VALID, "a=b\x01")
    assert "tracestate" not in dict(ctx.upstream_headers())


def test_auto_format_is_text_on_a_terminal_and_json_elsewhere(tmp_path: object) -> None:
    master, slave = os.openpty()
    try:
        with os.fdopen(slave, "w", closefd=False) as tty:
            assert logformat.resolve_format("auto", tty) == "text"
            assert logformat.resolve_format("json", tty) == "json"
    finally:
        os.close(master)
        os.close(slave)
    with open(os.devnull, "w") as not_a_tty:
        assert logformat.resolve_format("auto", not_a_tty) == "json"
        assert logformat.resolve_format("text", not_a_tty) == "text"
