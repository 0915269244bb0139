"""The one outcome vocabulary of the request metrics and the audit trail."""

from __future__ import annotations

import json

import pytest

from proxy.errors import ConnectionNotAuthorized, RateLimited, UpstreamTimeout
from proxy.model import AuditEvent
from proxy.observe.outcome import Outcome, of_error, of_status


@pytest.mark.parametrize(
    ("status", "outcome"),
    [(200, "ok"), (304, "ok"), (399, "ok"), (404, "upstream_4xx"), (503, "upstream_5xx")],
)
def test_of_status(status: int, outcome: str) -> None:
    assert of_status(status) == outcome


def test_of_error_is_the_code_the_caller_saw() -> None:
    # The same spelling as X-Proxy-Error, in the metric label and the audit trail alike.
    assert of_error(RateLimited("slow down", retry_after_ms=10)) == "RATE_LIMITED"
    assert of_error(ConnectionNotAuthorized("connect it")) == "CONNECTION_NOT_AUTHORIZED"
    assert of_error(UpstreamTimeout("late")) == "UPSTREAM_TIMEOUT"


def test_outcomes_are_plain_strings_where_they_are_recorded() -> None:
    assert [o.value for o in Outcome] == [
        "ok",
        "ok_public_only",
        "denied",
        "refused",
        "invalid",
        "failed",
        "client_disconnected",
        "error",
        "tls_handshake_failed",  # a granted CONNECT whose client refused the minted certificate
    ]
    event = AuditEvent(ts=1.0, tenant_id="t1", action="credential.read", actor="a", outcome=Outcome.DENIED)
    assert json.loads(json.dumps(event.to_dict()))["outcome"] == "denied"
    assert AuditEvent.from_dict(event.to_dict()).outcome == "denied"
    assert str(Outcome.OK) == "ok" and {("path", Outcome.OK): 1}[("path", "ok")] == 1
