"""PKCE (RFC 7636) and the binding rules of the OAuth ``state``."""

from __future__ import annotations

import re

import pytest

from proxy.oauth import state
from proxy.oauth.state import PendingAuthorization


def test_pkce_rfc7636_appendix_b_vector() -> None:
    verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
    assert state.code_challenge(verifier) == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"


def test_new_verifier_is_43_unreserved_chars_and_unique() -> None:
    seen = {state.new_code_verifier() for _ in range(50)}
    assert len(seen) == 50
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{43}", v) for v in seen)
    assert all(len(state.code_challenge(v)) == 43 for v in seen)


@pytest.mark.parametrize("bad", ["short", "x" * 129, "a" * 42 + "!", "a" * 42 + " "])
def test_bad_verifier_is_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        state.code_challenge(bad)


def _pending(binding: str) -> PendingAuthorization:
    return PendingAuthorization(
        tenant_id="t",
        connection_id="c",
        session_id="sess-1",
        browser_hash=state.binding_hash(binding),
        redirect_uri="https://p/oauth/callback",
        created_at=1.0,
        code_verifier="v" * 43,
    )


def test_binding_accepts_only_same_session_and_browser() -> None:
    browser = state.new_browser_binding()
    pending = _pending(browser)
    assert pending.binding_problem(browser_value=browser, session_id="sess-1") is None
    assert pending.binding_problem(browser_value=browser, session_id="sess-2") == "session"
    assert pending.binding_problem(browser_value=browser, session_id=None) == "session"
    assert (
        pending.binding_problem(browser_value=state.new_browser_binding(), session_id="sess-1") == "browser"
    )
    assert pending.binding_problem(browser_value=None, session_id="sess-1") == "browser"
    assert pending.binding_problem(browser_value="x", session_id="sess-1") == "browser"


def test_pending_round_trip_hides_verifier() -> None:
    pending = _pending(state.new_browser_binding())
    assert PendingAuthorization.from_dict({**pending.to_dict(), "junk": 1}) == pending
    assert "vvvv" not in repr(pending)


def test_state_values_are_well_formed_and_random() -> None:
    values = {state.new_state() for _ in range(20)}
    assert len(values) == 20 and all(state.well_formed(v) for v in values)
    assert not state.well_formed("../etc") and not state.well_formed(None) and not state.well_formed("")


def test_binding_cookie_is_per_flow() -> None:
    a, b = state.new_state(), state.new_state()
    assert state.binding_cookie_name(a) == state.binding_cookie_name(a)
    assert state.binding_cookie_name(a) != state.binding_cookie_name(b)
    assert re.fullmatch(r"cp_oauth_[0-9a-f]{16}", state.binding_cookie_name(a))
