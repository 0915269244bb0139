"""proxy.observe.logs: credentials are masked by shape and by value, in messages, arguments, exception
and stack text and extras; ordinary log text survives."""

from __future__ import annotations

import io
import logging
import secrets

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.observe import logs
from proxy.security import crypto

ADMIN = "admin-token-" + secrets.token_hex(8)
API_KEY = crypto.new_api_key()[1]
URLSAFE = secrets.token_urlsafe(32)
CONNECT = f"{secrets.token_urlsafe(12)}.{secrets.token_urlsafe(32)}"
MASTER = crypto.generate_master_key_text().strip()
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJ0ZW5hbnRfaWQiOiJ0MSJ9.c2lnbmF0dXJlLXNpZ25hdHVyZQ"


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        (f"Authorization: Bearer {URLSAFE}", URLSAFE),
        ("b'GET / HTTP/1.1\\nHost: x\\nAuthorization: Bearer s3cr3t-lower\\n\\n'", "s3cr3t-lower"),
        ("b'Authorization: Bearer abc\\x01def'", "def"),
        ("proxy-authorization:Basic dXNlcjpzZWNyZXQ=", "dXNlcjpzZWNyZXQ"),
        ("{'Cookie': 'sid=opaque-session-1', 'Host': 'x'}", "opaque-session-1"),
        ("Set-Cookie: sid=opaque-session-2; HttpOnly", "opaque-session-2"),
        ("sent Bearer tok.en-lower-case to the upstream", "tok.en-lower-case"),
        (f"GET /connect/{CONNECT} HTTP/1.1", CONNECT.split(".")[0]),
        ("GET /oauth/callback?state=st4te-v&code=c0de-v HTTP/1.1", "c0de-v"),
        ("GET /oauth/callback?state=st4te-v&code=c0de-v HTTP/1.1", "st4te-v"),
        (f"caller key {API_KEY} refused", API_KEY.split("_", 2)[2]),  # the secret part may hold "_"
        (f"key ring line 1:{MASTER.split(':')[1]}", MASTER.split(":")[1]),
        (f"token {JWT}", JWT.split(".")[1]),
        (f"a random {URLSAFE} in the text", URLSAFE),
    ],
    # Ids must not carry the random values: parallel workers collect them independently.
    ids=lambda v: "case",
)
def test_credential_shapes_are_masked(text: str, secret: str) -> None:
    out = logs.redact(text)
    assert secret not in out
    assert logs.MASK in out


def test_escaped_line_ends_bound_a_masked_header_value() -> None:
    out = logs.redact("b'Authorization: Bearer x\\r\\nHost: api.example.com\\r\\n'")
    assert "Host: api.example.com" in out and "Bearer x" not in out


@pytest.mark.parametrize(
    "text",
    [
        "request 9f86d081884c7d659a2feaa0c55ad015 failed: CONNECTION_NOT_FOUND connection 'c1'",
        "master key v2 3fa1b2c4d5e6: in use (newest)",
        "test_processes_starting_together_on_a_fresh_dir_share_one_key",
        "/work/wt/h-logs-keys/.venv/lib/python3.11/site-packages/aiohttp/web_protocol.py",
        "basic auth refused for tenant t1; send a Bearer <key>",
    ],
)
def test_ordinary_text_survives(text: str) -> None:
    assert logs.redact(text) == text


def test_known_secrets_are_masked_verbatim_and_short_ones_ignored() -> None:
    logs.add_known_secrets([ADMIN, "short", None])
    assert ADMIN not in logs.redact(f"x{ADMIN}y") and "short" in logs.redact("short")


def record(msg: str, *args: object, **kw: object) -> logging.LogRecord:
    return logging.LogRecord("t", logging.ERROR, __file__, 1, msg, args, None, **kw)  # type: ignore[arg-type]


def test_scrub_covers_arguments_exception_stack_and_extras() -> None:
    try:
        raise ValueError(f"head quoted Authorization: Bearer {URLSAFE}")
    except ValueError as exc:
        rec = logging.LogRecord(
            "t", logging.ERROR, __file__, 1, "failed %s", (API_KEY,), (type(exc), exc, exc.__traceback__)
        )
    rec.stack_info = f"Stack:\n  token={URLSAFE}"
    rec.__dict__["request_header"] = {"Authorization": "Bearer lowercase-secret", "Accept": "text/plain"}
    logs.scrub(rec)
    assert rec.args is None and rec.exc_info is None
    handler = logging.StreamHandler(io.StringIO())
    handler.setFormatter(logging.Formatter("%(message)s %(request_header)s"))
    text = handler.format(rec)
    assert "ValueError" in text and "Stack:" in text and "text/plain" in text
    for secret in (URLSAFE, API_KEY.split("_", 2)[2], "lowercase-secret"):
        assert secret not in text
    assert logs.scrub(rec) is rec  # idempotent


def test_a_broken_format_string_is_still_scrubbed() -> None:
    rec = record("bad %d format", f"Bearer {URLSAFE}")
    logs.scrub(rec)
    assert URLSAFE not in rec.getMessage() and "bad %d format" in rec.getMessage()


def test_the_handler_filter_keeps_every_record() -> None:
    rec = record("Authorization: Bearer lower-case-secret")
    assert logs.RedactingFilter().filter(rec) is True
    assert "lower-case-secret" not in rec.getMessage()


ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


@given(st.text(alphabet=ALNUM, max_size=31))
def test_short_alphanumeric_text_can_match_no_shape(text: str) -> None:
    # redact() returns such text after the known-secret pass only: the shape passes themselves
    # must agree that they would change nothing.
    assert logs._by_shape(text) == text
    assert logs.redact(text) == text


def test_the_alphanumeric_shortcut_still_masks_known_and_long_secrets() -> None:
    known = "Kn0wn" + secrets.token_hex(8)  # alphanumeric and short: the shortcut's input
    logs.add_known_secrets([known])
    assert logs.redact(known) == logs.MASK
    assert logs.redact(f"id{known}") == f"id{logs.MASK}"
    assert logs.redact("aB3" * 11) == logs.MASK  # 33 characters, both cases: a random token
    assert logs.redact(("aB3" * 11)[:32]) == logs.MASK  # the shortcut stops short of 32
