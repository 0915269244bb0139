"""Connect sessions: request validation, link tokens, CSRF, and the end-user form."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import pytest

from proxy.catalogue import Catalogue
from proxy.connect import sessions
from proxy.connect.sessions import ConnectSession
from proxy.errors import ValidationError
from proxy.security import destinations

CATALOGUE = Catalogue.load()


def test_parse_minimal_and_full_request() -> None:
    req = sessions.parse_session_request({"integration_id": "http_api_key"})
    assert (req.integration_id, req.connection_id, req.return_url, req.allowed_origins) == (
        "http_api_key",
        None,
        None,
        (),
    )
    full = sessions.parse_session_request(
        {
            "integration_id": "http_api_key",
            "connection_id": "c1",
            "runtime_user_id": "user-a",
            "default_connection_id": "c0",
            "return_url": "https://app.example.com/done?x=1",
            "allowed_origins": [
                "https://App.Example.com:443/",
                "http://localhost:3000",
                "https://app.example.com",
            ],
        }
    )
    assert full.allowed_origins == ("https://app.example.com", "http://localhost:3000")
    assert full.runtime_user_id == "user-a" and full.default_connection_id == "c0"


def test_parse_reports_every_problem_by_field() -> None:
    with pytest.raises(ValidationError) as info:
        sessions.parse_session_request(
            {
                "connection_id": "bad/id",
                "runtime_user_id": "u",
                "return_url": "javascript:alert(1)",
                "allowed_origins": [
                    "https://ok.example",
                    "*.example.com",
                    "https://x.example/path",
                    "ftp://x",
                ],
                "surprise": 1,
            }
        )
    fields = info.value.fields
    assert set(fields) == {
        "integration_id",
        "connection_id",
        "default_connection_id",
        "return_url",
        "allowed_origins[1]",
        "allowed_origins[2]",
        "allowed_origins[3]",
        "surprise",
    }
    assert info.value.status == 422


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("https://a.example", "https://a.example"),
        ("https://a.example:8443", "https://a.example:8443"),
        ("HTTP://A.example:80", "http://a.example"),
        ("http://[::1]:8080", "http://[::1]:8080"),
        ("https://user@a.example", None),
        ("https://a.example?q", None),
        ("https://a.example; script-src *", None),
        ("https://a example", None),
        ("null", None),
        (42, None),
    ],
)
def test_normalize_origin(raw: object, expected: str | None) -> None:
    assert sessions.normalize_origin(raw) == expected


@pytest.mark.parametrize(
    "bad",
    ["/relative", "ftp://x/y", "https://u:p@x/", "https://x/a b", "https://x/\r\nSet-Cookie:a", "x" * 2001],
)
def test_return_url_must_be_plain_http_url(bad: str) -> None:
    assert sessions.check_return_url(bad) is None


def test_return_url_with_adds_status() -> None:
    url = sessions.return_url_with(
        "https://app/done?x=1&status=old#frag", connection_id="c 1", status="active"
    )
    parts = urlsplit(url)
    assert parse_qs(parts.query) == {"x": ["1"], "connection_id": ["c 1"], "status": ["active"]}
    assert parts.fragment == "frag"


def _session(**kw: object) -> ConnectSession:
    sid, token = sessions.new_session_token()
    secret = token.split(".", 1)[1]
    base = dict(
        session_id=sid,
        secret_hash=sessions.secret_hash(secret),
        tenant_id="t",
        integration_id="http_api_key",
        connection_id="c",
        created_at=0.0,
        expires_at=100.0,
        created_by="admin:admin",
        csrf_key=sessions.new_csrf_key(),
    )
    base.update(kw)
    return ConnectSession(**base)  # type: ignore[arg-type]


def test_session_token_shape_and_secret_check() -> None:
    sid, token = sessions.new_session_token()
    assert sessions.split_session_token(token) == (sid, token.split(".", 1)[1])
    for bad in ("", "nodot", sid + ".", "a.b", token + "x", token.replace(".", "..")):
        assert sessions.split_session_token(bad) is None
    s = _session()
    assert not s.opens_with("wrong")
    assert ConnectSession.from_dict(s.to_dict()) == s
    assert s.csrf_key not in repr(s)


def test_csrf_bound_to_session_and_expires() -> None:
    a, b = _session(), _session()
    value = a.csrf_value(now=1000)
    assert a.csrf_ok(value, now=1000 + 60)
    assert not b.csrf_ok(value, now=1000)
    assert not a.csrf_ok(value, now=1000 + sessions.CSRF_MAX_AGE_S + 1)
    assert not a.csrf_ok(value, now=999)  # issued in the future
    assert not a.csrf_ok("1000." + "0" * 64, now=1000)
    assert not a.csrf_ok(None, now=1000) and not a.csrf_ok("garbage", now=1000)


def test_form_for_api_key_integration() -> None:
    integration = CATALOGUE.get("http_api_key")
    fields = {f.name: f for f in sessions.build_form(integration, values={"base_url": "https://api.example"})}
    assert (
        fields["api_key"].widget == "password"
        and fields["api_key"].required
        and fields["api_key"].value == ""
    )
    assert fields["api_key"].label == "API key"
    # Where the key goes and how it is framed are the operator's: not inputs on the page.
    assert set(fields) == {"api_key"}
    assert not set(fields) & integration.destination_names
    # A base URL the operator lets the end user choose is an input, with its bound as help.
    bounded = {
        f.name: f
        for f in sessions.build_form(
            integration,
            values={"base_url": "https://api.example.com"},
            settable={"base_url": ("*.example.com",)},
        )
    }
    assert set(bounded) == {"api_key", "base_url"}
    assert bounded["base_url"].widget == "url" and bounded["base_url"].value == "https://api.example.com"
    assert bounded["base_url"].help == "Must be under *.example.com."
    # A hidden field (a session preset) is not an input even when settable.
    hidden = sessions.build_form(
        integration, values={}, hidden={"base_url"}, settable={"base_url": ("*.example.com",)}
    )
    assert [f.name for f in hidden] == ["api_key"]


def test_form_select_for_user_settable_choice() -> None:
    integration = CATALOGUE.get("mailgun")
    settable = destinations.user_settable_fields(integration, {}, None, runtime_user=False)
    fields = {f.name: f for f in sessions.build_form(integration, values={}, settable=settable)}
    assert fields["region"].widget == "select" and fields["region"].choices == ("us", "eu")
    assert fields["region"].value == "us" and fields["region"].advanced
    # Not declared settable: not shown.
    assert "region" not in {f.name for f in sessions.build_form(integration, values={})}


def test_form_never_shows_secret_values_and_marks_stored_ones() -> None:
    integration = CATALOGUE.get("http_basic")
    fields = {
        f.name: f
        for f in sessions.build_form(
            integration, values={"password": "hunter2", "username": "bob"}, secrets_set={"password"}
        )
    }
    assert fields["password"].value == "" and fields["password"].is_set and not fields["password"].required
    again = {f.name: f for f in sessions.build_form(integration, values={}, reenter={"password", "username"})}
    assert again["password"].reenter and not again["username"].reenter
    assert fields["username"].value == "bob"


def test_oauth_form_excludes_token_fields() -> None:
    integration = CATALOGUE.get("http_oauth2_authorization_code")
    names = {f.name for f in sessions.user_fields(integration)}
    assert not names & {"access_token", "refresh_token", "expires_at"}
    assert sessions.uses_oauth_redirect(integration)
    assert not sessions.uses_oauth_redirect(CATALOGUE.get("http_oauth2_client_credentials"))


def test_parse_form_converts_and_validates() -> None:
    integration = CATALOGUE.get("http_api_key")
    posted = {
        "api_key": "  k3y  ",
        "base_url": "https://evil.example",
        "location": "query",
        "header_name": "",
    }
    params, problems = sessions.parse_form(integration, posted)
    assert problems == {}
    # Destination fields posted by the end user are ignored, never stored.
    assert params == {"api_key": "k3y"}
    _, problems = sessions.parse_form(integration, {"base_url": "not a url", "location": "body"})
    assert problems == {"api_key": "is required"}
    # A user-settable base URL is converted and checked against the session's host patterns.
    settable = {"base_url": ("*.example.com",)}
    params, problems = sessions.parse_form(
        integration, {"api_key": "k", "base_url": "https://api.example.com/v1"}, settable=settable
    )
    assert problems == {} and params["base_url"] == "https://api.example.com/v1"
    _, problems = sessions.parse_form(
        integration, {"api_key": "k", "base_url": "not a url"}, settable=settable
    )
    assert problems == {"base_url": "must be a full URL starting with https://"}
    _, problems = sessions.parse_form(
        integration, {"api_key": "k", "base_url": "https://evil.example"}, settable=settable
    )
    assert problems == {"base_url": "must be a host under *.example.com"}
    # ... and a hidden (preset) one is not read even if settable.
    params, problems = sessions.parse_form(
        integration,
        {"api_key": "k", "base_url": "https://evil.example"},
        hidden={"base_url"},
        settable=settable,
    )
    assert problems == {} and "base_url" not in params


def test_parse_form_user_settable_choice() -> None:
    integration = CATALOGUE.get("mailgun")
    settable = destinations.user_settable_fields(integration, {}, None, runtime_user=False)
    params, problems = sessions.parse_form(integration, {"api_key": "k", "region": "eu"}, settable=settable)
    assert problems == {} and params["region"] == "eu"
    _, problems = sessions.parse_form(integration, {"api_key": "k", "region": "asia"}, settable=settable)
    assert problems == {"region": "must be one of us, eu"}


def test_parse_form_never_takes_a_header_name_and_refuses_control_characters() -> None:
    # header_name is the operator's (a destination): a posted one is ignored, never stored; the
    # values the form does take pass Integration.validate_params like the admin API's.
    integration = CATALOGUE.get("http_api_key")
    params, problems = sessions.parse_form(
        integration, {"api_key": "k-1", "header_name": "Transfer-Encoding"}
    )
    assert "header_name" not in params and problems == {}
    _, problems = sessions.parse_form(integration, {"api_key": "k\x7fx"})
    assert "api_key" in problems


def test_parse_form_blank_stored_secret_is_kept() -> None:
    integration = CATALOGUE.get("http_basic")
    params, problems = sessions.parse_form(integration, {"username": "bob"}, present={"password"})
    assert problems == {} and "password" not in params


def test_parse_form_integer_and_length_limits() -> None:
    integration = CATALOGUE.get("sftp")
    params, problems = sessions.parse_form(integration, {"host": "h", "username": "u", "port": "22x"})
    assert problems == {"port": "must be a whole number"}
    params, problems = sessions.parse_form(integration, {"host": "h", "username": "u", "port": "2222"})
    assert params["port"] == 2222 and not problems
    _, problems = sessions.parse_form(integration, {"host": "h" * 20000, "username": "u"})
    assert "host" in problems
