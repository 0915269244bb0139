"""Credential injection: what each auth kind adds, and that exactly one credential survives."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from proxy.catalogue import Catalogue, parse_integration
from proxy.errors import ConnectionNotAuthorized, ValidationError
from proxy.pipeline.inject import Injection, apply, build_injection

CAT = Catalogue.load()


def _params(integration_id: str, **values: Any) -> dict[str, Any]:
    integration = CAT.get(integration_id)
    params = {f.name: f.default for f in integration.fields if f.default is not None}
    params.update(values)
    return params


def test_bearer() -> None:
    inj = build_injection(CAT.get("http_bearer"), _params("http_bearer", token="tok-1"))
    assert inj.headers == (("Authorization", "Bearer tok-1"),)
    assert inj.query == () and inj.cookies == ()


def test_api_key_default_header() -> None:
    inj = build_injection(CAT.get("http_api_key"), _params("http_api_key", api_key="k1"))
    assert inj.headers == (("X-API-Key", "k1"),)


def test_api_key_custom_header() -> None:
    inj = build_injection(
        CAT.get("http_api_key"), _params("http_api_key", api_key="k1", header_name="X-Token")
    )
    assert inj.headers == (("X-Token", "k1"),)


def test_api_key_query_is_encoded() -> None:
    inj = build_injection(
        CAT.get("http_api_key"),
        _params("http_api_key", api_key="a b&c=d", location="query", query_param="key"),
    )
    assert inj.query == (("key", "a b&c=d"),)
    _, query = apply(inj, [], "x=1")
    assert query == "x=1&key=a%20b%26c%3Dd"


def test_api_key_cookie() -> None:
    inj = build_injection(
        CAT.get("http_api_key"),
        _params("http_api_key", api_key="k1", location="cookie", cookie_name="sid"),
    )
    assert inj.cookies == (("sid", "k1"),)
    headers, _ = apply(inj, [("Cookie", "a=1; sid=forged"), ("cookie", "b=2")], "")
    assert headers == [("Cookie", "a=1; b=2; sid=k1")]


def test_basic() -> None:
    inj = build_injection(CAT.get("http_basic"), _params("http_basic", username="ann", password="pä:ss"))
    ((name, value),) = inj.headers
    assert name == "Authorization"
    assert base64.b64decode(value.removeprefix("Basic ")).decode() == "ann:pä:ss"


def test_basic_username_with_colon_refused() -> None:
    with pytest.raises(ValidationError) as info:
        build_injection(CAT.get("http_basic"), _params("http_basic", username="a:b", password="p"))
    assert info.value.fields == {"username": "contains ':'"}


def test_oauth_uses_given_token_then_stored() -> None:
    integration = CAT.get("http_oauth2_authorization_code")
    params = _params("http_oauth2_authorization_code", access_token="stored")
    assert build_injection(integration, params, access_token="fresh").headers == (
        ("Authorization", "Bearer fresh"),
    )
    assert build_injection(integration, params).headers == (("Authorization", "Bearer stored"),)


def test_oauth_client_credentials_without_token_is_not_authorized() -> None:
    integration = CAT.get("http_oauth2_client_credentials")
    with pytest.raises(ConnectionNotAuthorized):
        build_injection(integration, _params("http_oauth2_client_credentials"))


def test_template_vendor_mailgun() -> None:
    inj = build_injection(CAT.get("mailgun"), _params("mailgun", api_key="key-123"))
    ((name, value),) = inj.headers
    assert name == "Authorization"
    assert base64.b64decode(value.removeprefix("Basic ")).decode() == "api:key-123"


def test_template_header_query_and_cookie_with_templated_name() -> None:
    integration = parse_integration(
        {
            "id": "custom",
            "auth": "template",
            "fields": [{"name": "key", "secret": True}, {"name": "hdr"}],
            "inject": {
                "headers": {"{{ hdr }}": "K {{ key }}"},
                "query": {"sig": "{{ key | b64encode }}"},
                "cookies": {"session": "{{ key }}"},
            },
        },
        "test",
    )
    inj = build_injection(integration, {"key": "s3", "hdr": "X-Custom"})
    assert inj.headers == (("X-Custom", "K s3"),)
    assert inj.query == (("sig", base64.b64encode(b"s3").decode()),)
    assert inj.cookies == (("session", "s3"),)


@pytest.mark.parametrize("bad", ["a\r\nX-Evil: 1", "a\nb", "a\x00b"])
def test_crlf_nul_in_rendered_header_refused(bad: str) -> None:
    with pytest.raises(ValidationError) as info:
        build_injection(CAT.get("http_bearer"), _params("http_bearer", token=bad))
    assert bad not in info.value.message


def test_semicolon_in_cookie_value_refused() -> None:
    with pytest.raises(ValidationError):
        build_injection(
            CAT.get("http_api_key"),
            _params("http_api_key", api_key="k; admin=1", location="cookie"),
        )


@pytest.mark.parametrize(
    "name", ["Transfer-Encoding", "Content-Length", "Host", "X-Proxy-Retries", "Forwarded"]
)
def test_framing_or_routing_header_name_refused_at_injection(name: str) -> None:
    # The defensive check for values that reached the store without the write-time one.
    with pytest.raises(ValidationError) as info:
        build_injection(
            CAT.get("http_api_key"), _params("http_api_key", api_key="k-secret", header_name=name)
        )
    assert info.value.status == 422
    assert "k-secret" not in info.value.message


@pytest.mark.parametrize("bad", ["\x01", "\x7f", "\x0b", "\x85"])
def test_control_characters_refused_at_injection(bad: str) -> None:
    for location in ("header", "query", "cookie"):
        with pytest.raises(ValidationError) as info:
            build_injection(
                CAT.get("http_api_key"), _params("http_api_key", api_key=f"k{bad}", location=location)
            )
        assert bad not in info.value.message


def test_scrub_lists_the_credential_raw_and_encoded() -> None:
    inj = build_injection(CAT.get("http_bearer"), _params("http_bearer", token="t/k+n="))
    assert set(inj.scrub) == {"t/k+n=", "t%2Fk%2Bn%3D"}  # not "Bearer ...": "t/k+n=" covers it
    assert len(inj.scrub[0]) >= len(inj.scrub[-1])  # longest first
    basic = build_injection(CAT.get("http_basic"), _params("http_basic", username="u", password="p"))
    assert base64.b64encode(b"u:p").decode() in basic.scrub
    query = build_injection(
        CAT.get("http_api_key"), _params("http_api_key", api_key="key 1", location="query")
    )
    assert set(query.scrub) == {"key 1", "key%201", "key+1"}
    short = build_injection(CAT.get("http_bearer"), _params("http_bearer", token="ab"))
    assert set(short.scrub) == {"Bearer ab", "Bearer%20ab", "Bearer+ab"}  # "ab" alone would mangle answers


def test_scrub_of_a_template_skips_static_companion_values() -> None:
    integration = parse_integration(
        {
            "id": "t",
            "auth": "template",
            "fields": [{"name": "key", "secret": True}],
            "inject": {"headers": {"Authorization": "Token token={{ key }}", "X-Api-Version": "2024-01-01"}},
        },
        "test",
    )
    inj = build_injection(integration, {"key": "sekrit"})
    assert "sekrit" in inj.scrub
    assert not any("2024" in form for form in inj.scrub)


def test_bad_header_name_refused() -> None:
    with pytest.raises(ValidationError):
        build_injection(CAT.get("http_api_key"), _params("http_api_key", api_key="k", header_name="X Bad:"))


@pytest.mark.parametrize("integration_id", ["sftp", "postgres", "something_unknown"])
def test_opaque_refused_with_clear_message(integration_id: str) -> None:
    with pytest.raises(ValidationError, match=f"integration '{integration_id}' is not proxied"):
        build_injection(CAT.get(integration_id), {"password": "x"})


def test_missing_secret_is_not_authorized() -> None:
    with pytest.raises(ConnectionNotAuthorized, match="'token' is not set"):
        build_injection(CAT.get("http_bearer"), _params("http_bearer", token=""))


def test_apply_removes_caller_copies_case_insensitively() -> None:
    inj = Injection(headers=(("Authorization", "Bearer real"),))
    headers, query = apply(
        inj,
        [("AUTHORIZATION", "Bearer forged"), ("Accept", "x"), ("authorization", "again")],
        "a=1",
    )
    assert headers == [("Accept", "x"), ("Authorization", "Bearer real")]
    assert query == "a=1"


@pytest.mark.parametrize(
    "caller_query", ["key=forged", "key=forged&a=1", "a=1&k%65y=forged", "key&a=1", "key=1&key=2&a=1"]
)
def test_apply_removes_caller_query_param_of_same_name(caller_query: str) -> None:
    inj = Injection(query=(("key", "real"),))
    _, query = apply(inj, [], caller_query)
    parts = query.split("&")
    assert parts[-1] == "key=real"
    assert [p for p in parts if p.split("=")[0] in ("key", "k%65y")] == ["key=real"]


def test_apply_empty_query_gets_only_credential() -> None:
    _, query = apply(Injection(query=(("key", "v"),)), [], "")
    assert query == "key=v"


def test_apply_no_caller_cookie_still_sets_one() -> None:
    headers, _ = apply(Injection(cookies=(("sid", "v"),)), [("Accept", "x")], "")
    assert headers == [("Accept", "x"), ("Cookie", "sid=v")]


def test_repr_hides_values() -> None:
    inj = Injection(headers=(("Authorization", "Bearer canary-123"),), query=(("k", "canary-456"),))
    assert "canary" not in repr(inj)
