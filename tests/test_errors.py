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
