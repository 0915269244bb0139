"""Connect-page errors are members of the one error tree, with the pages' status, code and text."""

from __future__ import annotations

import pytest

from proxy import errors


@pytest.mark.parametrize(
    ("cls", "status", "code", "base"),
    [
        (errors.ConnectLinkUnknown, 404, "CONNECT_LINK_UNKNOWN", errors.NotFound),
        (errors.ConnectLinkUsed, 410, "CONNECT_LINK_USED", errors.ConnectPageError),
        (errors.ConnectLinkExpired, 410, "CONNECT_LINK_EXPIRED", errors.ConnectPageError),
        (errors.ConnectFormUnverified, 403, "FORBIDDEN", errors.Forbidden),
        (errors.ConnectsAnotherWay, 400, "BAD_REQUEST", errors.BadRequest),
        (errors.SignInUnknown, 400, "BAD_REQUEST", errors.BadRequest),
        (errors.SignInElsewhere, 400, "BAD_REQUEST", errors.BadRequest),
        (errors.AuthorizationCodeMissing, 400, "BAD_REQUEST", errors.BadRequest),
        (errors.OAuthAccessDenied, 400, "OAUTH_ACCESS_DENIED", errors.BadRequest),
        (errors.OAuthProviderError, 400, "OAUTH_ERROR", errors.BadRequest),
        (errors.OAuthIssuerMismatch, 400, "OAUTH_ISSUER_MISMATCH", errors.BadRequest),
        (errors.SignInNotSetUp, 424, "CONNECTION_NOT_AUTHORIZED", errors.ConnectionNotAuthorized),
    ],
)
def test_connect_page_errors(cls: type[errors.ConnectPageError], status: int, code: str, base: type) -> None:
    exc = cls("what happened")
    assert isinstance(exc, errors.ProxyError) and isinstance(exc, base)
    assert (exc.status, exc.code, exc.return_error) == (status, code, "error")
    assert exc.title and exc.to_body() == {"error": code, "message": "what happened"}


def test_canned_messages_and_return_error() -> None:
    assert errors.ConnectLinkUnknown().message.startswith("The link may be mistyped or expired")
    assert errors.OAuthAccessDenied(return_error="access_denied").return_error == "access_denied"


def _possessives_after_repr() -> list[str]:
    """f-string places where a !r value is followed by 's: it prints 'echo''s."""
    import ast
    from pathlib import Path

    root = Path(errors.__file__).resolve().parent
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.JoinedStr):
                for value, after in zip(node.values, node.values[1:], strict=False):
                    if (
                        isinstance(value, ast.FormattedValue)
                        and value.conversion == ord("r")
                        and isinstance(after, ast.Constant)
                        and str(after.value).startswith(("'s", "\u2019s"))
                    ):
                        found.append(f"{path.relative_to(root.parent)}:{node.lineno}")
    return found


def test_no_message_puts_a_possessive_after_a_quoted_value() -> None:
    assert _possessives_after_repr() == []


def test_the_possessive_check_finds_one() -> None:
    import ast

    tree = ast.parse("""f"connection {cid!r}'s hosts" """)
    joined = next(n for n in ast.walk(tree) if isinstance(n, ast.JoinedStr))
    value, after = joined.values[1], joined.values[2]
    assert isinstance(value, ast.FormattedValue) and value.conversion == ord("r")
    assert isinstance(after, ast.Constant) and after.value.startswith("'s")
