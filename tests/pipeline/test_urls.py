"""Upstream URL joining: base paths, raw query and escapes kept, every path escape refused."""

from __future__ import annotations

import pytest

from proxy.errors import Forbidden, ValidationError
from proxy.pipeline.urls import join_upstream, same_origin_host, split_absolute, validate_base_url

JOINS = [
    ("https://api.x.com/v2/", "users/1", "", "https://api.x.com/v2/users/1"),
    ("https://api.x.com/v2", "users/1", "", "https://api.x.com/v2/users/1"),
    ("https://api.x.com", "users", "", "https://api.x.com/users"),
    ("https://api.x.com", "", "", "https://api.x.com/"),
    ("https://api.x.com/v2", "", "", "https://api.x.com/v2"),
    ("https://api.x.com/v2/", "/users", "", "https://api.x.com/v2/users"),
    ("https://api.x.com/v2/", "//evil.com/x", "", "https://api.x.com/v2/evil.com/x"),
    ("https://api.x.com/v2/", "users/", "", "https://api.x.com/v2/users/"),
    ("https://api.x.com/v2/", "a//b", "", "https://api.x.com/v2/a//b"),
    ("https://api.x.com/v2/", "a/./b", "", "https://api.x.com/v2/a/./b"),
    ("HTTPS://api.x.com:8443/v2/", "u", "", "https://api.x.com:8443/v2/u"),
    ("http://127.0.0.1:9000/base/", "p", "", "http://127.0.0.1:9000/base/p"),
    # The caller's encoding is kept byte for byte: no decoding, no re-encoding, no case change.
    ("https://api.x.com/", "a%20b/c%2bd/%7e", "", "https://api.x.com/a%20b/c%2bd/%7e"),
    ("https://api.x.com/", "files/r%C3%A9sum%C3%A9.pdf", "", None),
    ("https://api.x.com/", "a+b/c:d@e;f=g,h", "", "https://api.x.com/a+b/c:d@e;f=g,h"),
    # Characters that may not appear raw are percent-encoded as UTF-8.
    ("https://api.x.com/", "café/a b", "", "https://api.x.com/caf%C3%A9/a%20b"),
    # Queries are kept as sent, after any query of the base URL.
    ("https://api.x.com/v1/", "s", "q=a%2Bb&x=1+2", "https://api.x.com/v1/s?q=a%2Bb&x=1+2"),
    ("https://api.x.com/v1/", "s", "a=1&a=2&flag", "https://api.x.com/v1/s?a=1&a=2&flag"),
    ("https://api.x.com/v1/", "s", "redirect=/x?y=1", "https://api.x.com/v1/s?redirect=/x?y=1"),
    ("https://api.x.com/v1/", "s", "t=%0A", "https://api.x.com/v1/s?t=%0A"),
    ("https://api.x.com/v1/", "s", "q=é", "https://api.x.com/v1/s?q=%C3%A9"),
    ("https://a.azure.com/x?api-version=2", "y", "top=5", "https://a.azure.com/x/y?api-version=2&top=5"),
    ("https://a.azure.com/x?api-version=2", "y", "", "https://a.azure.com/x/y?api-version=2"),
]


@pytest.mark.parametrize(("base", "path", "query", "expected"), JOINS)
def test_join(base: str, path: str, query: str, expected: str | None) -> None:
    if expected is None:
        expected = base + path
    assert join_upstream(base, path, query) == expected


ESCAPES = [
    "..",
    "../x",
    "a/../../x",
    "a/..",
    "%2e%2e/x",
    "%2E%2E/x",
    ".%2e/x",
    ".%2E/x",
    "%2e./x",
    "a/%2e%2e",
    "a%2f..%2fb",
    "a%2F..",
    "%2f..",
    "..%2fx",
    "..%5cx",
    "a%5c..%5cb",
    "..\\x",
    "a\\..\\b",
    "..;/x",
    "..;jsessionid=1/x",
    "%2e%2e;x/y",
    "...",
    "..%20",
    "%252e%252e/x",  # double encoding
    "%25252e%25252e/x",  # triple
    "%c0%ae%c0%ae/x",  # overlong UTF-8
    "%e0%80%ae%e0%80%ae/x",
    "\uff0e\uff0e/x",  # full-width full stops, which NFKC folds to ".."
    "%EF%BC%8E%EF%BC%8E/x",
]


@pytest.mark.parametrize("path", ESCAPES)
def test_escape_refused(path: str) -> None:
    with pytest.raises(Forbidden) as info:
        join_upstream("https://api.x.com/v2/", path, "")
    assert info.value.message.startswith("path escapes the connection's base path")
    assert info.value.status == 403


@pytest.mark.parametrize("path", ["a%2Fb", "a%2fb", "a%5cb", "a\\b", "%252Fetc", "x/%2F%2Fevil"])
def test_encoded_slash_refused_by_default(path: str) -> None:
    with pytest.raises(Forbidden, match="path escapes the connection's base path"):
        join_upstream("https://api.x.com/v2/", path, "")


def test_encoded_slash_allowed_when_asked_but_never_with_dots() -> None:
    url = join_upstream("https://gitlab.x.com/api/v4/", "projects/g%2Fp", "", allow_encoded_slash=True)
    assert url == "https://gitlab.x.com/api/v4/projects/g%2Fp"
    with pytest.raises(Forbidden):
        join_upstream("https://gitlab.x.com/api/v4/", "a%2F..%2F..", "", allow_encoded_slash=True)


@pytest.mark.parametrize(
    ("path", "query", "field"),
    [
        ("a\r\nHost: evil", "", "path"),
        ("a\nb", "", "path"),
        ("a\x00b", "", "path"),
        ("a%00b", "", "path"),
        ("a%2500b", "", "path"),
        ("a#frag", "", "path"),
        ("a%zz", "", "path"),
        ("100%", "", "path"),
        ("s", "q=1\r\nX-Injected: 1", "query"),
        ("s", "q=\x00", "query"),
        ("s", "q=1\n", "query"),
        ("s", "q=1#frag", "query"),
    ],
)
def test_control_characters_refused(path: str, query: str, field: str) -> None:
    with pytest.raises(ValidationError) as info:
        join_upstream("https://api.x.com/", path, query)
    assert field in info.value.fields


def test_escape_message_does_not_echo_the_path() -> None:
    with pytest.raises(Forbidden) as info:
        join_upstream("https://api.x.com/", "bot123:SECRET/../x", "")
    assert "SECRET" not in info.value.message


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("https://api.x.com/v2/", None),
        ("http://127.0.0.1:8080", None),
        ("https://[::1]:8443/x", None),
        ("https://bücher.de/", None),
        ("https://api.x.com/v2?api-version=1", None),
        ("ftp://api.x.com/", "http"),
        ("api.x.com/v2", "http"),
        ("javascript:alert(1)", "http"),
        ("https://user:pw@api.x.com/", "user info"),
        ("https://api.x.com\\@evil.com/", "user info"),
        ("https://api.x.com/#frag", "fragment"),
        ("https://api.x.com/#", "fragment"),
        ("https:///path", "host"),
        ("https://:443/", "host"),
        ("https://api.x.com:99999/", "not a valid URL"),
        ("https://api.x.com:0/", "port 0"),
        ("https://api x.com/", "whitespace"),
        ("https://api.x.com/\r\n", "whitespace"),
        ("https://api.x.com/a/../b", "'..'"),
        ("https://api.x.com/a/%2e%2e/b", "'..'"),
        ("https://api.x.com/a\\b", "backslash"),
        ("https://api<x>.com/", "characters"),
    ],
)
def test_validate_base_url(url: str, problem: str | None) -> None:
    result = validate_base_url(url)
    if problem is None:
        assert result is None
    else:
        assert result is not None and problem in result


def test_split_absolute() -> None:
    assert split_absolute("https://API.x.com./v2?q=1") == ("https", "api.x.com", 443, "/v2?q=1")
    assert split_absolute("http://[::1]:8080") == ("http", "::1", 8080, "/")
    assert split_absolute("HTTP://h.test") == ("http", "h.test", 80, "/")
    with pytest.raises(ValidationError) as info:
        split_absolute("https://user:secretpw@h.test/")
    assert "url" in info.value.fields
    assert "secretpw" not in info.value.message


@pytest.mark.parametrize(
    ("url", "base", "same"),
    [
        ("https://api.x.com/other?x=1", "https://api.x.com/v2/", True),
        ("https://API.x.com:443/", "https://api.x.com/v2/", True),
        ("https://api.x.com./a", "https://api.x.com", True),
        ("http://api.x.com/", "https://api.x.com/", False),  # downgrade
        ("https://api.x.com:8443/", "https://api.x.com/", False),
        ("https://evil.com/", "https://api.x.com/", False),
        ("https://api.x.com.evil.com/", "https://api.x.com/", False),
        ("https://user@api.x.com/", "https://api.x.com/", False),
        ("not a url", "https://api.x.com/", False),
    ],
)
def test_same_origin_host(url: str, base: str, same: bool) -> None:
    assert same_origin_host(url, base) is same
