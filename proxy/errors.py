"""The one exception tree of the service.

Every failure the service itself reports to a caller is a ``ProxyError`` subclass carrying a
stable ``code`` (the contract's error codes), an HTTP ``status`` and a ``message`` that says what
happened and what to do. ``proxy.web.errors`` is the single place that turns them into JSON
responses, and ``proxy.web.connect`` renders them as the end user's error page on the connect
routes (``ConnectPageError`` adds the page's title); nothing else builds error responses by hand.

Security invariant: messages are built from identifiers and field *names* only, never from a
credential value, so they are safe to log and to return.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar


class ProxyError(Exception):
    """Base of every error the service turns into a response."""

    code: ClassVar[str] = "INTERNAL"
    status: ClassVar[int] = 500

    def __init__(
        self,
        message: str,
        *,
        fields: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.fields = dict(fields or {})
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.code, "message": self.message}
        if self.fields:
            body["fields"] = self.fields
        body.update(self.extra)
        return body


class BadRequest(ProxyError):
    code = "BAD_REQUEST"
    status = 400


class Unauthenticated(ProxyError):
    code = "UNAUTHENTICATED"
    status = 401


class ProxyAuthenticationRequired(Unauthenticated):
    """Forward-proxy front ends: no or bad ``Proxy-Authorization`` (clients retry with their
    proxy URL's credentials on 407, never on 401)."""

    status = 407


class Forbidden(ProxyError):
    code = "FORBIDDEN"
    status = 403


class HostNotAllowed(ProxyError):
    code = "HOST_NOT_ALLOWED"
    status = 403


class NotFound(ProxyError):
    code = "NOT_FOUND"
    status = 404


class ConnectionNotFound(NotFound):
    code = "CONNECTION_NOT_FOUND"


class MethodNotAllowed(ProxyError):
    code = "METHOD_NOT_ALLOWED"
    status = 405


class Conflict(ProxyError):
    """A compare-and-set lost: the record changed since it was read."""

    code = "CONFLICT"
    status = 409


class PayloadTooLarge(ProxyError):
    code = "PAYLOAD_TOO_LARGE"
    status = 413


class ValidationError(ProxyError):
    """Input that does not fit; ``fields`` maps each offending field to what is wrong."""

    code = "VALIDATION_ERROR"
    status = 422


class IntegrationNotProxyable(ValidationError):
    """The connection's integration speaks another protocol (SFTP, Postgres): never proxied."""

    code = "INTEGRATION_NOT_PROXYABLE"


class ConnectionNotAuthorized(ProxyError):
    """The connection exists but holds no usable credentials (pending or needs re-auth)."""

    code = "CONNECTION_NOT_AUTHORIZED"
    status = 424


class RateLimited(ProxyError):
    code = "RATE_LIMITED"
    status = 429

    def __init__(self, message: str, *, retry_after_ms: int, source: str = "configured") -> None:
        retry_after_ms = max(0, int(retry_after_ms))
        # Retry-After is whole seconds rounded up, so a client never retries too early.
        seconds = max(1, -(-retry_after_ms // 1000))
        super().__init__(
            message,
            headers={"Retry-After": str(seconds), "Retry-After-Ms": str(retry_after_ms)},
            extra={"retry_after_ms": retry_after_ms, "limit_source": source},
        )
        self.retry_after_ms = retry_after_ms
        self.source = source


class UpstreamUnreachable(ProxyError):
    code = "UPSTREAM_UNREACHABLE"
    status = 502


class UpstreamResponseTooLarge(UpstreamUnreachable):
    """The upstream's answer is larger than the envelope buffers (``envelope_max_response_bytes``).

    Its own code: unlike an unreachable upstream, retrying the same call will not help."""

    code = "UPSTREAM_RESPONSE_TOO_LARGE"


class NotSupported(ProxyError):
    """A protocol feature the proxy deliberately does not carry (WebSocket inside a tunnel)."""

    code = "NOT_SUPPORTED"
    status = 501


class ServiceUnavailable(ProxyError):
    code = "SERVICE_UNAVAILABLE"
    status = 503


class UpstreamTimeout(ProxyError):
    code = "UPSTREAM_TIMEOUT"
    status = 504


# --- Connect pages: what an end user sees when a link or a sign-in cannot go on ---------------


class ConnectPageError(ProxyError):
    """A connect link or sign-in that cannot go on. ``proxy.web.connect`` shows it as a page
    (``title`` and the message, with ``X-Proxy-Error``), never as JSON; ``return_error`` is what
    the application's return URL is told (``?status=error&error=...``)."""

    title: ClassVar[str] = "Could not connect"
    default_message: ClassVar[str] = ""

    def __init__(self, message: str | None = None, *, return_error: str = "error") -> None:
        super().__init__(message or self.default_message)
        self.return_error = return_error


class ConnectLinkUnknown(ConnectPageError, NotFound):
    code = "CONNECT_LINK_UNKNOWN"
    title = "This link is not valid"
    default_message = "The link may be mistyped or expired. Ask the application for a new link."


class ConnectLinkUsed(ConnectPageError):
    code = "CONNECT_LINK_USED"
    status = 410
    title = "This link was already used"
    default_message = (
        "The connection was set up with this link already. To connect again, ask the application "
        "for a new link."
    )


class ConnectLinkExpired(ConnectPageError):
    code = "CONNECT_LINK_EXPIRED"
    status = 410
    title = "This link has expired"
    default_message = "Connect links are valid for a limited time. Ask the application for a new link."


class ConnectFormUnverified(ConnectPageError, Forbidden):
    """The form's CSRF value or its origin is not ours."""

    title = "Please try again"
    default_message = (
        "This form could not be verified (it is too old or was sent from another site). Reload the "
        "page and submit it again."
    )


class ConnectsAnotherWay(ConnectPageError, BadRequest):
    """A form post to an OAuth integration's page, or an OAuth start for a form integration."""

    title = "Nothing to do here"
    default_message = "This integration connects a different way."


class SignInUnknown(ConnectPageError, BadRequest):
    """The callback's ``state`` is unknown, expired or already used."""

    title = "This sign-in cannot be completed"
    default_message = (
        "The sign-in attempt is unknown, expired or was already completed. Go back to the connect "
        "page and start again."
    )


class SignInElsewhere(ConnectPageError, BadRequest):
    """The ``state`` is bound to another browser or another link."""

    title = "This sign-in cannot be completed"
    default_message = (
        "The sign-in was started in another browser or for another link. Open the connect link in "
        "this browser and start again."
    )


class SignInNotSetUp(ConnectPageError, ConnectionNotAuthorized):
    """The integration's OAuth client lacks what the authorization-code flow needs."""

    title = "Sign-in is not set up yet"


class AuthorizationCodeMissing(ConnectPageError, BadRequest):
    title = "Missing authorization code"
    default_message = "Go back to the connect page and start again."


class OAuthAccessDenied(ConnectPageError, BadRequest):
    code = "OAUTH_ACCESS_DENIED"
    title = "Access was not granted"
    default_message = "You declined the request, so nothing was connected. Go back to try again."


class OAuthProviderError(ConnectPageError, BadRequest):
    """The provider answered the authorization request with an error other than access_denied."""

    code = "OAUTH_ERROR"
    title = "The provider refused the sign-in"


class OAuthIssuerMismatch(ConnectPageError, BadRequest):
    """The callback's ``iss`` is not the expected authorization server's (RFC 9207)."""

    code = "OAUTH_ISSUER_MISMATCH"
    title = "This sign-in cannot be completed"


# --- Errors that are not HTTP-facing by themselves -------------------------------------------


class ConfigError(ProxyError):
    """A bad setting: stops start-up. ``key`` names the offending setting."""

    code = "CONFIG_ERROR"
    status = 500

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"setting {key!r}: {message}", fields={key: message})
        self.key = key


class CryptoError(ProxyError):
    """Decryption or key-ring failure (tamper, wrong key, missing key version).

    Surfaces as 503 to callers: the credential exists but cannot be opened right now, and the
    operator (not the caller) must act. The message never includes key material.
    """

    code = "SERVICE_UNAVAILABLE"
    status = 503


class KeyVersionMissing(CryptoError):
    def __init__(self, version: int, what: str = "stored data", advice: str | None = None) -> None:
        super().__init__(
            f"master key version {version} is needed to open {what} but is not in the key ring; "
            + (advice or "add it to PROXY_MASTER_KEY / PROXY_MASTER_KEY_FILE")
        )
        self.version = version
        self.what = what


class StoreUnavailable(ServiceUnavailable):
    """The store (SQLite or Redis) cannot be reached or answered with an error."""


class StoreLost(StoreUnavailable):
    """The store is not the one this process opened: its data was lost (Redis flushed or
    restarted empty, the SQLite file deleted or replaced). Every store operation is refused, so
    nothing acknowledged can land in a store that does not hold its key records."""


class KeyRecordChanged(CryptoError):
    """A write was refused because the tenant key record it was encrypted under is no longer the
    one in the store (lost, or replaced). Nothing was written; a retry encrypts afresh."""
