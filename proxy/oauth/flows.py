"""OAuth 2.0 requests and responses as plain data: no I/O, so every rule here is unit-tested.

Why it exists: the token endpoint is where OAuth connections break in production (a refresh
token used twice, client secrets with ``:`` in them, providers answering errors with 200). This
module builds each request exactly as RFC 6749 / RFC 7009 say and turns every answer into either
a ``TokenSet`` or a ``TokenEndpointError`` whose ``kind`` tells the caller what to do:

- ``reauth``: the grant is dead (``invalid_grant``): the end user must connect again.
- ``client``: the OAuth client itself is rejected (``invalid_client``): an admin must fix it.
- ``rejected``: the server refused this request for another stated reason.
- ``transient``: 5xx/429/``temporarily_unavailable``: try again later, change nothing.
- ``protocol``: the answer is not OAuth at all (no access token, unknown token type, HTML).

Security: ``ClientConfig``, ``TokenRequest`` and ``TokenSet`` hide secrets from ``repr``, and
error messages carry the provider's error *code* only (validated), never a body or a token.
"""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qsl, quote, quote_plus, urlencode, urlsplit, urlunsplit

from proxy import jsonin
from proxy.catalogue import OAuth2Spec

FailureKind = Literal["reauth", "client", "rejected", "transient", "protocol"]
TokenAuth = Literal["basic", "post"]

# The names the token manager stores in a connection (``expires_at`` and ``issued_at`` are epoch
# seconds; ``issued_at`` tells a token's lifetime, so a short-lived one is renewed halfway).
TOKEN_PARAMS = ("access_token", "refresh_token", "expires_at", "issued_at", "scope")
# Parameters of the authorization request that extra_auth_params may never override: they carry
# the flow's security (state, PKCE, where the code goes).
RESERVED_AUTH_PARAMS = frozenset(
    {"response_type", "client_id", "redirect_uri", "state", "code_challenge", "code_challenge_method"}
)
# A connection's ``auth_params``: extra authorization-request parameters (``prompt``,
# ``access_type``...). Refused at the admin API when they name a reserved parameter or ``scope``
# (which has its own parameter); dropped when building the URL all the same (defence in depth).
AUTH_PARAMS = "auth_params"
_AUTH_PARAMS_MAX = 50
_ERROR_CODE_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"


class OAuthConfigError(ValueError):
    """The OAuth client is not configured well enough for the requested grant."""

    def __init__(self, missing: list[str], grant: str) -> None:
        super().__init__(f"the OAuth client is missing {', '.join(missing)} needed for {grant}")
        self.missing = missing
        self.grant = grant


class TokenEndpointError(Exception):
    """A token (or revocation) endpoint answer that is not a usable token set."""

    def __init__(self, kind: FailureKind, status: int, error: str | None, message: str) -> None:
        super().__init__(message)
        self.kind: FailureKind = kind
        self.status = status
        self.error = error
        self.message = message


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """Who we are to the authorization server and where it lives."""

    client_id: str | None
    client_secret: str | None = field(default=None, repr=False)
    auth_url: str | None = None
    token_url: str | None = None
    revocation_url: str | None = None
    scope: str | None = None
    token_auth: TokenAuth = "basic"
    audience: str | None = None
    pkce: bool = True
    extra_auth_params: Mapping[str, str] = field(default_factory=dict)
    issuer: str | None = None  # RFC 9207: what the callback's ``iss`` must be
    require_iss: bool = False  # the server always sends ``iss`` (its metadata says so)

    def require(self, grant: str) -> None:
        """Raises ``OAuthConfigError`` naming every field the grant needs and lacks."""
        needed = {
            "authorization_code": ("client_id", "auth_url", "token_url"),
            "refresh_token": ("client_id", "token_url"),
            "client_credentials": ("client_id", "client_secret", "token_url"),
        }[grant]
        missing = [name for name in needed if not getattr(self, name)]
        if missing:
            raise OAuthConfigError(missing, grant)


def auth_params_problems(value: Any) -> dict[str, str]:
    """What is wrong with a connection's ``auth_params`` (field -> problem; names, never values)."""
    where = f"parameters.{AUTH_PARAMS}"
    if not isinstance(value, dict):
        return {where: "must be an object of parameter name -> string value"}
    if len(value) > _AUTH_PARAMS_MAX:
        return {where: f"at most {_AUTH_PARAMS_MAX} parameters"}
    problems: dict[str, str] = {}
    for name, v in value.items():
        if not isinstance(name, str) or not 0 < len(name) <= 100 or not name.isprintable():
            problems[where] = "parameter names must be printable strings of 1-100 characters"
        elif name in RESERVED_AUTH_PARAMS:
            problems[f"{where}.{name}"] = (
                "is set by the authorization flow itself (state, PKCE, redirect) and cannot be overridden"
            )
        elif name == "scope":
            problems[f"{where}.{name}"] = "use the connection's scope parameter instead"
        elif not isinstance(v, str) or len(v) > 2000:
            problems[f"{where}.{name}"] = "must be a string of at most 2000 characters"
    return problems


def _auth_params(value: Any) -> dict[str, str]:
    """The usable entries of a stored ``auth_params`` (anything malformed is ignored here: the
    admin API refuses it on the way in)."""
    if not isinstance(value, dict):
        return {}
    return {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, str)}


def _flag(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.strip().lower() in ("true", "1", "yes"))


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def client_config(
    params: Mapping[str, Any],
    spec: OAuth2Spec | None,
    fallback: Mapping[str, Any] | None = None,
) -> ClientConfig:
    """A connection's OAuth client: its own parameters, else ``fallback``'s, else the spec's.

    ``fallback`` is the default connection of a runtime user connection: end users connect
    their own account, the OAuth app (client id and secret) is the default connection's. The
    client id and secret travel as a pair, never mixed from two sources.
    """
    fb = fallback or {}

    def pick(name: str) -> str | None:
        return _text(params.get(name)) or _text(fb.get(name))

    if _text(params.get("client_id")):
        client_id, secret = _text(params.get("client_id")), _text(params.get("client_secret"))
    else:
        client_id, secret = _text(fb.get("client_id")), _text(fb.get("client_secret"))
    scope = pick("scope")
    if scope is None and spec is not None and spec.scopes:
        scope = " ".join(spec.scopes)
    token_auth = pick("token_auth") or (spec.token_auth if spec is not None else "basic")
    return ClientConfig(
        client_id=client_id,
        client_secret=secret,
        auth_url=pick("auth_url") or (spec.auth_url if spec else None),
        token_url=pick("token_url") or (spec.token_url if spec else None),
        revocation_url=pick("revocation_url") or (spec.revocation_url if spec else None),
        scope=scope,
        token_auth="post" if token_auth == "post" else "basic",
        audience=pick("audience"),
        pkce=spec.pkce if spec is not None else True,
        issuer=pick(ISSUER) or (spec.issuer if spec is not None else None),
        require_iss=_flag(params.get(ISS_SUPPORTED) if ISS_SUPPORTED in params else fb.get(ISS_SUPPORTED))
        or (spec.iss_parameter_supported if spec is not None else False),
        # The integration's own, then the connection's (or its default connection's) on top.
        extra_auth_params={
            **(dict(spec.extra_auth_params) if spec is not None else {}),
            **_auth_params(params.get(AUTH_PARAMS) if AUTH_PARAMS in params else fb.get(AUTH_PARAMS)),
        },
    )


# --- authorization request (RFC 6749 §4.1.1, RFC 7636 §4.3) -------------------------------------


def authorization_url(
    client: ClientConfig, *, redirect_uri: str, state: str, code_challenge: str | None
) -> str:
    """The provider URL the user's browser is sent to. Keeps the endpoint's own query
    parameters (RFC 6749 §3.1) and drops any fragment, which the RFC forbids."""
    client.require("authorization_code")
    assert client.auth_url is not None and client.client_id is not None
    parts = urlsplit(client.auth_url)
    ours = set(RESERVED_AUTH_PARAMS) | {"scope"}
    extra = set(client.extra_auth_params)  # replace same-named ones hard-coded in auth_url
    query = [
        (k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in ours and k not in extra
    ]
    query += [("response_type", "code"), ("client_id", client.client_id), ("redirect_uri", redirect_uri)]
    if client.scope:
        query.append(("scope", client.scope))
    query.append(("state", state))
    if code_challenge is not None:
        query += [("code_challenge", code_challenge), ("code_challenge_method", "S256")]
    query += [(k, str(v)) for k, v in client.extra_auth_params.items() if k not in ours]
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query, quote_via=quote), ""))


# --- authorization response (RFC 9207) -----------------------------------------------------------

ISSUER = "issuer"
ISS_SUPPORTED = "authorization_response_iss_parameter_supported"


def _origin(url: str | None) -> tuple[str, str] | None:
    if not url:
        return None
    parts = urlsplit(url)
    return (parts.scheme.lower(), parts.netloc.lower()) if parts.scheme and parts.netloc else None


def issuer_problem(client: ClientConfig, received: str | None) -> str | None:
    """Why an authorization response's ``iss`` must be refused (RFC 9207), or None.

    Mix-up defence: a user who signs in at a malicious authorization server (or is sent back by
    one) could otherwise have another server's code exchanged with our client secret. Rules:
    - ``iss`` must equal the declared ``issuer`` exactly (RFC 9207 §2.4: simple string comparison);
    - with no issuer declared, it must at least be on the authorization endpoint's origin;
    - without ``iss``, the response is refused only when the server is declared to always send
      it (``authorization_response_iss_parameter_supported``), as RFC 9207 §2.4 requires.
    The received value is never quoted back: it comes from whoever sent the browser here.
    """
    if received is None:
        if client.require_iss:
            return (
                "the authorization server's answer does not say who issued it (no iss parameter), "
                "although the server is declared to always send one"
            )
        return None
    if client.issuer is not None:
        if received != client.issuer:
            return f"the answer comes from another authorization server than {client.issuer!r}"
        return None
    expected = _origin(client.auth_url)
    if expected is None or _origin(received) != expected:
        return (
            "the answer names an issuer that is not the authorization endpoint's server; if that "
            "server's issuer lives elsewhere, declare it as the connection's issuer"
        )
    return None


# --- token requests (RFC 6749 §4.1.3, §6, §4.4; RFC 7009 §2.1) -----------------------------------


@dataclass(frozen=True, slots=True)
class TokenRequest:
    """A form POST to a token or revocation endpoint. ``repr`` shows the URL and field names only."""

    url: str
    form: tuple[tuple[str, str], ...]
    headers: Mapping[str, str]
    grant: str

    def body(self) -> bytes:
        return urlencode(self.form).encode("ascii")

    def __repr__(self) -> str:
        names = ", ".join(k for k, _ in self.form)
        return f"TokenRequest({self.grant} -> {self.url}, fields=[{names}])"


def basic_auth_header(client_id: str, client_secret: str) -> str:
    """RFC 6749 §2.3.1: each part is form-urlencoded *before* base64, so a ``:`` in the id or
    secret cannot shift the split and non-ASCII survives."""
    raw = f"{quote_plus(client_id)}:{quote_plus(client_secret)}"
    return "Basic " + base64.b64encode(raw.encode("ascii")).decode("ascii")


def _request(client: ClientConfig, url: str, grant: str, form: list[tuple[str, str]]) -> TokenRequest:
    headers = {"Content-Type": FORM_CONTENT_TYPE, "Accept": "application/json"}
    assert client.client_id is not None
    if client.client_secret and client.token_auth == "basic":
        headers["Authorization"] = basic_auth_header(client.client_id, client.client_secret)
    else:
        # client_secret_post, or a public client (no secret) identifying itself (§4.1.3).
        form.append(("client_id", client.client_id))
        if client.client_secret:
            form.append(("client_secret", client.client_secret))
    return TokenRequest(url=url, form=tuple(form), headers=headers, grant=grant)


def authorization_code_request(
    client: ClientConfig, *, code: str, redirect_uri: str, code_verifier: str | None
) -> TokenRequest:
    client.require("authorization_code")
    assert client.token_url is not None
    form = [("grant_type", "authorization_code"), ("code", code), ("redirect_uri", redirect_uri)]
    if code_verifier is not None:
        form.append(("code_verifier", code_verifier))
    return _request(client, client.token_url, "authorization_code", form)


def refresh_request(client: ClientConfig, *, refresh_token: str) -> TokenRequest:
    # No scope: §6 says an omitted scope means "the same as originally granted".
    client.require("refresh_token")
    assert client.token_url is not None
    form = [("grant_type", "refresh_token"), ("refresh_token", refresh_token)]
    return _request(client, client.token_url, "refresh_token", form)


def client_credentials_request(client: ClientConfig) -> TokenRequest:
    client.require("client_credentials")
    assert client.token_url is not None
    form = [("grant_type", "client_credentials")]
    if client.scope:
        form.append(("scope", client.scope))
    if client.audience:
        form.append(("audience", client.audience))  # Auth0-style APIs need it; others ignore it
    return _request(client, client.token_url, "client_credentials", form)


def revocation_request(
    client: ClientConfig, *, token: str, token_type_hint: Literal["refresh_token", "access_token"]
) -> TokenRequest | None:
    """RFC 7009 revocation, or None when the client has no revocation endpoint or no id."""
    if not client.revocation_url or not client.client_id:
        return None
    form = [("token", token), ("token_type_hint", token_type_hint)]
    return _request(client, client.revocation_url, "revocation", form)


# --- responses -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TokenSet:
    access_token: str = field(repr=False)
    token_type: str = "Bearer"
    expires_at: int | None = None
    refresh_token: str | None = field(default=None, repr=False)
    scope: str | None = None
    issued_at: int | None = None  # set with expires_at: the token's lifetime is the difference

    def to_params(self) -> dict[str, Any]:
        """The connection parameters to store (None removes a stale value)."""
        return {
            "access_token": self.access_token,
            "refresh_token": self.refresh_token,
            "expires_at": self.expires_at,
            "issued_at": self.issued_at,
            "scope": self.scope,
        }


def expires_soon(expires_at: Any, now: float, skew_s: float) -> bool:
    """True when a token with this ``expires_at`` should be renewed; unknown expiry never is."""
    if expires_at is None or isinstance(expires_at, bool):
        return False
    try:
        return float(expires_at) - skew_s <= now
    except (TypeError, ValueError):
        return True  # a garbled expiry is treated as expired: refreshing is the safe side


def refresh_margin(expires_at: Any, issued_at: Any, skew_s: float) -> float:
    """How long before expiry a token is renewed: ``skew_s``, or half its lifetime when that is
    shorter. Without the halving, a token living less than ``skew_s`` would count as expiring
    from the moment it was issued and be refreshed on every call."""
    try:
        lifetime = float(expires_at) - float(issued_at)
    except (TypeError, ValueError):
        return skew_s  # lifetime unknown (e.g. tokens set by an admin): the plain margin
    if isinstance(expires_at, bool) or isinstance(issued_at, bool) or not lifetime > 0:
        return skew_s
    return min(skew_s, lifetime / 2)


def error_code(value: Any) -> str | None:
    """An OAuth error code fit to show and record: as sent when plain, else a fixed stand-in."""
    if not isinstance(value, str):
        return None
    return value if _ERROR_CODE_RE.fullmatch(value) else "unrecognised_error"


def _decode(content_type: str, body: bytes) -> dict[str, Any] | None:
    ctype = content_type.split(";")[0].strip().lower()
    text = body.decode("utf-8", "replace").strip()
    if ctype == FORM_CONTENT_TYPE:
        # Some providers (GitHub without Accept) answer form-encoded.
        return dict(parse_qsl(text, keep_blank_values=True))
    if ctype.endswith("json") or ctype.endswith("+json") or text.startswith("{"):
        try:
            data = jsonin.loads(text)  # a provider's answer is outside input too
        except ValueError:
            return None
        return data if isinstance(data, dict) else None
    return None


_KIND_BY_ERROR: dict[str, FailureKind] = {
    "invalid_grant": "reauth",
    "invalid_client": "client",
    "unauthorized_client": "client",
    "temporarily_unavailable": "transient",
    "server_error": "transient",
    "slow_down": "transient",
}


def _failure(status: int, error: str | None, what: str) -> TokenEndpointError:
    kind: FailureKind
    if error is not None:
        kind = _KIND_BY_ERROR.get(error, "rejected")
    elif status >= 500 or status == 429:
        kind = "transient"
    elif status == 401:
        kind = "client"
    elif 400 <= status < 500:
        kind = "rejected"
    else:
        kind = "protocol"
    if kind == "transient" and error is None:
        message = f"the {what} endpoint is failing (HTTP {status}); try again shortly"
    elif error is not None:
        message = f"the {what} endpoint answered HTTP {status} with error {error!r}"
    else:
        message = f"the {what} endpoint answered HTTP {status} without an OAuth error code"
    return TokenEndpointError(kind, status, error, message)


def _expires_in(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def parse_token_response(
    status: int,
    content_type: str,
    body: bytes,
    *,
    now: float,
    previous_refresh_token: str | None = None,
    requested_scope: str | None = None,
) -> TokenSet:
    """A successful token answer as a ``TokenSet``; anything else raises ``TokenEndpointError``.

    A server that does not rotate refresh tokens omits ``refresh_token`` from a refresh answer
    (RFC 6749 §6): the previous one stays valid and is kept.
    """
    data = _decode(content_type, body)
    error = error_code(data.get("error")) if data is not None else None
    if error is not None or not 200 <= status < 300:
        # Errors arrive as 400/401 per §5.2, but some providers send them with 200.
        raise _failure(status, error, "token")
    if data is None:
        raise TokenEndpointError(
            "protocol",
            status,
            None,
            f"the token endpoint answered HTTP {status} with a body that is not OAuth JSON",
        )
    access = data.get("access_token")
    if not isinstance(access, str) or not access:
        raise TokenEndpointError("protocol", status, None, "the token endpoint answer has no access_token")
    token_type = data.get("token_type", "Bearer")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        # Only bearer tokens can be injected as "Authorization: Bearer"; a DPoP/MAC token cannot.
        raise TokenEndpointError(
            "protocol",
            status,
            None,
            "the token endpoint issued a token type other than Bearer, which is unsupported",
        )
    seconds = _expires_in(data.get("expires_in"))
    refresh = data.get("refresh_token")
    scope = data.get("scope")
    if isinstance(scope, list):
        scope = " ".join(str(s) for s in scope)
    return TokenSet(
        access_token=access,
        token_type="Bearer",
        expires_at=int(now + seconds) if seconds is not None else None,
        issued_at=int(now) if seconds is not None else None,
        refresh_token=refresh if isinstance(refresh, str) and refresh else previous_refresh_token,
        scope=scope if isinstance(scope, str) and scope else requested_scope,
    )


def check_revocation_response(status: int, content_type: str, body: bytes) -> None:
    """RFC 7009 §2.2: 200 means revoked (or already invalid); anything else raises."""
    if status == 200:
        return
    data = _decode(content_type, body)
    error = error_code(data.get("error")) if data is not None else None
    raise _failure(status, error, "revocation")
