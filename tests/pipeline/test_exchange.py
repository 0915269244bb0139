"""The caller's control headers and request line, as every front end checks them."""

from __future__ import annotations

import pytest

from proxy.errors import MethodNotAllowed, ValidationError
from proxy.pipeline.exchange import parse_control_int, refuse_trace


@pytest.mark.parametrize(("raw", "expected"), [(None, None), ("0", 0), ("250", 250), ("99999", 5000)])
def test_control_int(raw: str | None, expected: int | None) -> None:
    assert parse_control_int(raw, "X-Proxy-Max-Wait-Ms", 5000) == expected


@pytest.mark.parametrize("raw", ["-1", "1.5", "soon", "", "1" * 20])
def test_control_int_refuses_garbage(raw: str) -> None:
    with pytest.raises(ValidationError):
        parse_control_int(raw, "X-Proxy-Retries", 5)


def test_trace_is_refused_and_other_methods_pass() -> None:
    with pytest.raises(MethodNotAllowed):
        refuse_trace("TRACE")
    for method in ("GET", "POST", "trace"):  # methods are case-sensitive: "trace" is another one
        refuse_trace(method)
