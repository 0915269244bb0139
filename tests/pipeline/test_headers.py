"""Header filtering in both directions: hop-by-hop, Connection-named, control headers, injection."""

from __future__ import annotations

import pytest

from proxy.errors import UpstreamUnreachable, ValidationError
from proxy.pipeline.headers import (
    CONTROL_HEADERS,
    HOP_BY_HOP,
    clean_request_headers,
    clean_response_headers,
    cookie_name_problem,
    cookie_value_problem,
    has_control,
    injected_header_problem,
    is_token,
    query_name_problem,
    redact_secrets,
    value_problem,
    without_framing,
)


def test_request_drops_hop_by_hop_and_control_headers() -> None:
    items = [
        ("Host", "proxy.local:8080"),
        ("Authorization", "Bearer caller-key"),
        ("Proxy-Authorization", "Bearer caller-key"),
        ("X-Connection-Id", "c1"),
        ("X-Tenant-Id", "t1"),
        ("X-Runtime-User-Id", "u1"),
        ("X-Org-Id", "o1"),
        ("X-Proxy-Max-Wait-Ms", "500"),
        ("x-proxy-anything", "1"),
        ("Connection", "keep-alive"),
        ("Keep-Alive", "timeout=5"),
        ("TE", "trailers"),
        ("Trailer", "X-Sum"),
        ("Transfer-Encoding", "chunked"),
        ("Upgrade", "websocket"),
        ("Proxy-Connection", "keep-alive"),
        ("Expect", "100-continue"),
        ("Accept", "application/json"),
        ("Content-Type", "application/json"),
        ("Content-Length", "12"),
        ("Cookie", "session=abc"),
        ("X-Request-Id", "r-1"),
        ("Accept", "text/plain"),
    ]
    assert clean_request_headers(items) == [
        ("Accept", "application/json"),
        ("Content-Type", "application/json"),
        ("Content-Length", "12"),
        ("Cookie", "session=abc"),
        ("X-Request-Id", "r-1"),
        ("Accept", "text/plain"),  # duplicates and order are kept
    ]


def test_request_drops_headers_named_by_connection() -> None:
    items = [
        ("X-Secret-Hop", "1"),
        ("Connection", "close, X-Secret-Hop ,x-other"),
        ("X-Other", "2"),
        ("connection", "X-Third"),
        ("X-Third", "3"),
        ("X-Kept", "4"),
    ]
    assert clean_request_headers(items) == [("X-Kept", "4")]


def test_request_names_are_case_insensitive() -> None:
    items = [("AUTHORIZATION", "x"), ("transfer-ENCODING", "chunked"), ("X-PROXY-FOO", "1")]
    assert clean_request_headers(items) == []


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("X-A", "v\r\nX-Injected: 1"),
        ("X-A", "v\nX-Injected: 1"),
        ("X-A", "v\rx"),
        ("X-A", "v\x00x"),
        ("X-A\r\nX-B", "v"),
        ("X-A\x00", "v"),
        ("X A", "v"),
        ("X-A:", "v"),
        ("", "v"),
        ("X-Ä", "v"),
        ("(X)", "v"),
        # Refused even when the header would have been dropped anyway.
        ("Authorization", "Bearer k\r\nX-Injected: 1"),
    ],
)
def test_request_injection_refused(name: str, value: str) -> None:
    with pytest.raises(ValidationError) as info:
        clean_request_headers([("Accept", "*/*"), (name, value)])
    assert info.value.status == 422
    assert "Bearer" not in info.value.message  # values are never echoed


def test_request_allows_all_token_characters_and_odd_values() -> None:
    name = "X-!#$%&'*+.^_`|~09azAZ"
    items = [(name, "tab\tand space, ünïcode, \x7f")]
    assert clean_request_headers(items) == items


def test_response_drops_hop_by_hop_and_named_keeps_the_rest() -> None:
    items = [
        ("Content-Type", "application/json"),
        ("Content-Length", "42"),
        ("Content-Encoding", "gzip"),
        ("Transfer-Encoding", "chunked"),
        ("Connection", "keep-alive, X-Hop"),
        ("X-Hop", "1"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Authenticate", "Basic"),
        ("Upgrade", "h2c"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
        ("X-Proxy-Error", "RATE_LIMITED"),  # an upstream must not forge the proxy's errors
        ("X-RateLimit-Remaining", "9"),
        ("WWW-Authenticate", "Bearer"),
    ]
    assert clean_response_headers(items) == [
        ("Content-Type", "application/json"),
        ("Content-Length", "42"),
        ("Content-Encoding", "gzip"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
        ("X-RateLimit-Remaining", "9"),
        ("WWW-Authenticate", "Bearer"),
    ]


def test_response_drops_invalid_names_and_refuses_control_characters_in_values() -> None:
    assert clean_response_headers([("X-Ok", "1"), ("Bad Name", "2"), ("X-Tab", "a\tb")]) == [
        ("X-Ok", "1"),
        ("X-Tab", "a\tb"),
    ]
    # Not valid HTTP, so not relayable: the whole answer is a 502, not a quietly altered one.
    for bad in ("a\r\nSet-Cookie: x=1", "\x00", "a\x01b", "a\x0bb", "\x7f", "a\x1fb"):
        with pytest.raises(UpstreamUnreachable) as caught:
            clean_response_headers([("X-Ok", "1"), ("X-Bad", bad)])
        assert "X-Bad" in caught.value.message and bad not in caught.value.message
    # A dropped header is not relayed, so its value does not matter.
    assert clean_response_headers([("X-Proxy-Error", "\x01"), ("Keep-Alive", "\x01")]) == []
    # obs-text and non-ASCII values pass (only controls are refused).
    assert clean_response_headers([("X-L", "caf\udce9"), ("X-U", "café")]) == [
        ("X-L", "caf\udce9"),
        ("X-U", "café"),
    ]


def test_is_token_and_has_control() -> None:
    assert is_token("GET") and is_token("M-SEARCH") and is_token("X-Custom_1")
    for bad in ("", "G T", "GET\n", "GÉT", "(GET)", "GET:"):
        assert not is_token(bad), bad
    assert not has_control("plain value, with é and a\ttab")
    for bad in ("\x00", "\x01", "\x0b", "\n", "\r", "\x1f", "\x7f"):
        assert has_control(f"a{bad}b"), repr(bad)


def test_constants() -> None:
    assert {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-connection",
    } <= HOP_BY_HOP
    assert "host" in CONTROL_HEADERS and "authorization" in CONTROL_HEADERS
    assert "content-length" not in CONTROL_HEADERS | HOP_BY_HOP
    assert "content-type" not in CONTROL_HEADERS | HOP_BY_HOP
    assert "cookie" not in CONTROL_HEADERS | HOP_BY_HOP


def test_name_verdicts_are_cached_per_spelling_and_stay_right_when_the_cache_floods() -> None:
    from proxy.pipeline import headers

    for i in range(3 * headers._NAME_CACHE_MAX):
        assert clean_request_headers([(f"X-Custom-{i}", "v")]) == [(f"X-Custom-{i}", "v")]
        assert clean_response_headers([(f"X-Up-{i}", "v"), ("Transfer-Encoding", "chunked")]) == [
            (f"X-Up-{i}", "v")
        ]
    assert len(headers._request_names) <= headers._NAME_CACHE_MAX
    assert len(headers._response_names) <= headers._NAME_CACHE_MAX
    for _ in range(2):  # the second round answers from the cache
        kept = clean_request_headers(
            [
                ("X-PROXY-Retries", "1"),
                ("authorization", "x"),
                ("Connection", "X-Ok2"),
                ("X-Ok", "1"),
                ("X-Ok2", "2"),
            ]
        )
        assert kept == [("X-Ok", "1")]
        with pytest.raises(ValidationError):
            clean_request_headers([("Bad Name", "v")])
        with pytest.raises(ValidationError):
            clean_request_headers([("X-Ok", "a\r\nInjected: 1")])
        # One spelling's verdict never leaks to another direction's drop list.
        assert clean_response_headers(
            [("Authorization", "kept upstream-side"), ("X-Proxy-Error", "forged")]
        ) == [("Authorization", "kept upstream-side")]


# --- what a credential may be injected as ------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "Transfer-Encoding",
        "content-length",
        "Host",
        "Connection",
        "Upgrade",
        "TE",
        "Trailer",
        "Keep-Alive",
        "Expect",
        "Proxy-Authorization",
        "Proxy-Connection",
        "Proxy-Anything",
        "X-Proxy-Max-Wait-Ms",
        "X-Connection-Id",
        "X-Tenant-Id",
        "X-Runtime-User-Id",
        "X-Org-Id",
        "Forwarded",
        "Via",
        "X-Forwarded-For",
        "X-Forwarded-Host",
        "X-Original-URL",
        "X-Rewrite-URL",
        "X-HTTP-Method-Override",
        "Cookie",
        "X Bad",
        "X-Bad:",
        "",
        "X-Ä",
        "X" * 300,
    ],
)
def test_injected_header_names_that_frame_route_or_reach_the_proxy_are_refused(name: str) -> None:
    assert injected_header_problem(name) is not None


@pytest.mark.parametrize(
    "name", ["Authorization", "X-API-Key", "Api-Key", "X-Shopify-Access-Token", "x-goog-api-key"]
)
def test_ordinary_credential_header_names_are_allowed(name: str) -> None:
    assert injected_header_problem(name) is None


@pytest.mark.parametrize("bad", ["\x01", "\x7f", "\x0b", "\t", "\r", "\n", "\x00", "\x85", "\x1b[2J"])
def test_values_with_any_control_character_are_refused(bad: str) -> None:
    assert value_problem(f"key{bad}rest") is not None
    assert cookie_value_problem(f"key{bad}rest") is not None
    assert query_name_problem(f"k{bad}") is not None


def test_plain_values_and_names_pass() -> None:
    assert value_problem("sk_live_abc/+=~ ünï") is None
    assert cookie_value_problem("abc") is None and cookie_value_problem("a;b") is not None
    assert query_name_problem("api_key") is None and query_name_problem("") is not None
    assert cookie_name_problem("sid") is None and cookie_name_problem("s id") is not None


def test_without_framing_drops_only_framing_headers() -> None:
    items = [
        ("Content-Length", "1000"),
        ("transfer-encoding", "chunked"),
        ("TE", "trailers"),
        ("Trailer", "X"),
        ("Expect", "100-continue"),
        ("Content-Type", "text/plain"),
        ("X-Custom", "1"),
    ]
    assert without_framing(items) == [("Content-Type", "text/plain"), ("X-Custom", "1")]


def test_redact_secrets_in_any_header_raw_and_encoded() -> None:
    secrets = ("s3cr%2Ft%2Bk", "s3cr/t+k")  # longest first, as Injection.scrub lists them
    items = [
        ("Location", "https://h/next?api_key=s3cr%2Ft%2Bk&page=2"),
        ("X-Echo", "Bearer s3cr/t+k"),
        ("Link", "<https://h/?k=s3cr%2ft%2bk>"),  # lower-case escapes: not listed, still caught
        ("Content-Length", "42"),
        ("Content-Type", "application/json"),
    ]
    assert redact_secrets(items, secrets) == [
        ("Location", "https://h/next?api_key=********&page=2"),
        ("X-Echo", "Bearer ********"),
        ("Link", "********"),
        ("Content-Length", "42"),
        ("Content-Type", "application/json"),
    ]
    assert redact_secrets(items, ()) is items  # nothing to redact: no work at all


def test_redact_never_rewrites_the_content_length() -> None:
    assert redact_secrets([("Content-Length", "1234")], ("1234",)) == [("Content-Length", "1234")]
