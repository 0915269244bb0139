"""Pure OAuth request building and response parsing (RFC 6749, 7009)."""

from __future__ import annotations

import base64
import json
from urllib.parse import parse_qs, parse_qsl, unquote_plus, urlsplit

import pytest

from proxy.catalogue import OAuth2Spec
from proxy.oauth import flows
from proxy.oauth.flows import ClientConfig, OAuthConfigError, TokenEndpointError

CLIENT = ClientConfig(
    client_id="my client",
    client_secret="p@ss:wo rd+/&=é",
    auth_url="https://auth.example.com/oauth/authorize?tenant=acme&state=evil#frag",
    token_url="https://auth.example.com/oauth/token",
    revocation_url="https://auth.example.com/oauth/revoke",
    scope="read write",
    extra_auth_params={"access_type": "offline", "redirect_uri": "https://evil.example", "prompt": "consent"},
)


def test_authorization_url_has_every_rfc_parameter_and_keeps_endpoint_query() -> None:
    url = flows.authorization_url(
        CLIENT, redirect_uri="https://proxy.example.com/oauth/callback", state="st4te", code_challenge="chal"
    )
    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc, parts.path, parts.fragment) == (
        "https",
        "auth.example.com",
        "/oauth/authorize",
        "",
    )
    q = parse_qs(parts.query)
    assert q == {
        "tenant": ["acme"],
        "response_type": ["code"],
        "client_id": ["my client"],
        "redirect_uri": ["https://proxy.example.com/oauth/callback"],
        "scope": ["read write"],
        "state": ["st4te"],  # the endpoint's own "state" cannot smuggle a second value
        "code_challenge": ["chal"],
        "code_challenge_method": ["S256"],
        "access_type": ["offline"],
        "prompt": ["consent"],
    }
    assert "%20" in parts.query and "+" not in parts.query  # spaces as %20 in a URL


def test_connection_auth_params_reach_the_authorize_url_but_never_the_flows_own() -> None:
    spec = OAuth2Spec(
        auth_url="https://id.example.com/authorize?prompt=login", extra_auth_params={"a": "spec"}
    )
    params = {
        "client_id": "c",
        "token_url": "https://id.example.com/token",
        # "state" and "scope" are refused by the admin API; a stored record carrying them anyway
        # (written before that check) still cannot steer the flow.
        "auth_params": {"prompt": "consent", "a": "mine", "state": "evil", "scope": "admin", "n": 1},
    }
    client = flows.client_config(params, spec)
    q = parse_qs(
        urlsplit(
            flows.authorization_url(client, redirect_uri="https://p/cb", state="s", code_challenge="c")
        ).query
    )
    assert q["prompt"] == ["consent"]  # replaces the one hard-coded in auth_url
    assert q["a"] == ["mine"] and q["state"] == ["s"] and "scope" not in q and "n" not in q
    # A runtime user's connection without its own uses its default connection's.
    inherited = flows.client_config({}, spec, fallback=params)
    assert inherited.extra_auth_params["prompt"] == "consent"


@pytest.mark.parametrize(
    ("value", "field"),
    [
        ({"state": "x"}, "parameters.auth_params.state"),
        ({"code_challenge": "x"}, "parameters.auth_params.code_challenge"),
        ({"redirect_uri": "https://evil.example"}, "parameters.auth_params.redirect_uri"),
        ({"client_id": "x"}, "parameters.auth_params.client_id"),
        ({"response_type": "token"}, "parameters.auth_params.response_type"),
        ({"scope": "x"}, "parameters.auth_params.scope"),
        ({"prompt": 1}, "parameters.auth_params.prompt"),
        (["prompt"], "parameters.auth_params"),
        ({"": "x"}, "parameters.auth_params"),
    ],
)
def test_auth_params_problems(value: object, field: str) -> None:
    assert field in flows.auth_params_problems(value)


def test_auth_params_problems_accepts_plain_extras() -> None:
    assert flows.auth_params_problems({"prompt": "consent", "access_type": "offline"}) == {}


def test_issuer_problem_rfc9207() -> None:
    declared = ClientConfig(
        client_id="c", auth_url="https://id.example.com/authorize", issuer="https://id.example.com/t1"
    )
    assert flows.issuer_problem(declared, "https://id.example.com/t1") is None
    assert flows.issuer_problem(declared, "https://id.example.com/t1/") is not None  # exact comparison
    assert flows.issuer_problem(declared, "https://evil.example") is not None
    assert flows.issuer_problem(declared, None) is None  # not declared to always send it
    # No issuer declared: at least the authorization endpoint's own server.
    plain = ClientConfig(client_id="c", auth_url="https://ID.example.com/authorize")
    assert flows.issuer_problem(plain, "https://id.example.com") is None
    assert flows.issuer_problem(plain, "https://id.example.com.evil.example") is not None
    assert flows.issuer_problem(plain, "not a url") is not None
    # Declared to always send it: a missing iss is refused.
    required = flows.client_config(
        {
            "client_id": "c",
            "issuer": "https://id.example.com",
            "authorization_response_iss_parameter_supported": True,
        },
        OAuth2Spec(auth_url="https://id.example.com/authorize"),
    )
    assert required.require_iss and flows.issuer_problem(required, None) is not None
    spec = OAuth2Spec(
        auth_url="https://a.example/auth", issuer="https://a.example", iss_parameter_supported=True
    )
    from_spec = flows.client_config({"client_id": "c"}, spec)
    assert (from_spec.issuer, from_spec.require_iss) == ("https://a.example", True)
    assert "evil" not in (flows.issuer_problem(from_spec, "https://evil.example") or "evil")  # never echoed


def test_authorization_url_without_pkce_omits_challenge() -> None:
    url = flows.authorization_url(CLIENT, redirect_uri="https://p/cb", state="s", code_challenge=None)
    assert "code_challenge" not in url


def test_authorization_url_requires_client_and_endpoints() -> None:
    with pytest.raises(OAuthConfigError) as info:
        flows.authorization_url(
            ClientConfig(client_id=None), redirect_uri="x", state="s", code_challenge=None
        )
    assert info.value.missing == ["client_id", "auth_url", "token_url"]


def test_basic_auth_form_encodes_id_and_secret_before_base64() -> None:
    header = flows.basic_auth_header("my client", "p@ss:wo rd+/&=é")
    raw = base64.b64decode(header.removeprefix("Basic ")).decode("ascii")
    assert raw == "my+client:p%40ss%3Awo+rd%2B%2F%26%3D%C3%A9"
    cid, _, secret = raw.partition(":")  # exactly one unencoded ':'
    assert (unquote_plus(cid), unquote_plus(secret)) == ("my client", "p@ss:wo rd+/&=é")


def test_authorization_code_request_with_basic_auth() -> None:
    req = flows.authorization_code_request(
        CLIENT, code="c0de", redirect_uri="https://p/oauth/callback", code_verifier="v" * 43
    )
    assert req.url == "https://auth.example.com/oauth/token"
    assert dict(parse_qsl(req.body().decode())) == {
        "grant_type": "authorization_code",
        "code": "c0de",
        "redirect_uri": "https://p/oauth/callback",
        "code_verifier": "v" * 43,
    }
    assert req.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert req.headers["Authorization"] == flows.basic_auth_header("my client", "p@ss:wo rd+/&=é")
    assert "p@ss" not in repr(req) and "c0de" not in repr(req)


def test_post_auth_puts_credentials_in_body_and_no_header() -> None:
    client = ClientConfig(
        client_id="id", client_secret="s e&c", token_url="https://t/token", token_auth="post"
    )
    req = flows.refresh_request(client, refresh_token="rt&1")
    assert "Authorization" not in req.headers
    assert req.body() == b"grant_type=refresh_token&refresh_token=rt%261&client_id=id&client_secret=s+e%26c"


def test_public_client_sends_only_client_id() -> None:
    client = ClientConfig(client_id="pub", token_url="https://t/token")
    req = flows.refresh_request(client, refresh_token="r")
    assert dict(req.form) == {"grant_type": "refresh_token", "refresh_token": "r", "client_id": "pub"}
    assert "Authorization" not in req.headers


def test_client_credentials_request_includes_scope_and_audience() -> None:
    client = ClientConfig(
        client_id="id", client_secret="sec", token_url="https://t/token", scope="a b", audience="https://api"
    )
    req = flows.client_credentials_request(client)
    assert dict(req.form) == {"grant_type": "client_credentials", "scope": "a b", "audience": "https://api"}
    with pytest.raises(OAuthConfigError, match="client_secret"):
        flows.client_credentials_request(ClientConfig(client_id="id", token_url="https://t"))


def test_revocation_request_rfc7009() -> None:
    req = flows.revocation_request(CLIENT, token="rt", token_type_hint="refresh_token")
    assert req is not None and req.url == "https://auth.example.com/oauth/revoke"
    assert dict(req.form) == {"token": "rt", "token_type_hint": "refresh_token"}
    assert (
        flows.revocation_request(ClientConfig(client_id="x"), token="t", token_type_hint="access_token")
        is None
    )


def test_client_config_precedence_and_pairing() -> None:
    spec = OAuth2Spec(
        auth_url="https://spec/auth", token_url="https://spec/token", scopes=("a", "b"), token_auth="post"
    )
    own = flows.client_config(
        {"token_url": "https://own/token"}, spec, fallback={"client_id": "fb", "client_secret": "fbs"}
    )
    assert (own.client_id, own.client_secret, own.token_url, own.auth_url, own.scope, own.token_auth) == (
        "fb",
        "fbs",
        "https://own/token",
        "https://spec/auth",
        "a b",
        "post",
    )
    # A connection with its own client id never borrows the fallback's secret.
    mixed = flows.client_config(
        {"client_id": "mine"}, None, fallback={"client_id": "fb", "client_secret": "fbs"}
    )
    assert (mixed.client_id, mixed.client_secret) == ("mine", None)
    assert "fbs" not in repr(own)


def _ok(body: dict[str, object], **kw: object) -> flows.TokenSet:
    return flows.parse_token_response(200, "application/json", json.dumps(body).encode(), now=1000.0, **kw)  # type: ignore[arg-type]


def test_parse_success_computes_absolute_expiry() -> None:
    tokens = _ok(
        {
            "access_token": "a",
            "token_type": "bearer",
            "expires_in": 3600,
            "refresh_token": "r",
            "scope": "x y",
        }
    )
    assert (tokens.access_token, tokens.expires_at, tokens.refresh_token, tokens.scope) == (
        "a",
        4600,
        "r",
        "x y",
    )
    assert tokens.to_params() == {
        "access_token": "a",
        "refresh_token": "r",
        "expires_at": 4600,
        "issued_at": 1000,
        "scope": "x y",
    }
    assert "'a'" not in repr(tokens) and "'r'" not in repr(tokens)


def test_parse_keeps_previous_refresh_token_when_not_rotated() -> None:
    tokens = _ok({"access_token": "a", "expires_in": "60"}, previous_refresh_token="old", requested_scope="s")
    assert (tokens.refresh_token, tokens.expires_at, tokens.scope, tokens.token_type) == (
        "old",
        1060,
        "s",
        "Bearer",
    )
    assert _ok({"access_token": "a"}).expires_at is None


def test_parse_form_encoded_answer() -> None:
    tokens = flows.parse_token_response(
        200, "application/x-www-form-urlencoded; charset=utf-8", b"access_token=a%2Bb&expires_in=10", now=0
    )
    assert (tokens.access_token, tokens.expires_at) == ("a+b", 10)


@pytest.mark.parametrize(
    ("status", "ctype", "body", "kind", "error"),
    [
        (400, "application/json", b'{"error":"invalid_grant"}', "reauth", "invalid_grant"),
        (401, "application/json", b'{"error":"invalid_client"}', "client", "invalid_client"),
        (400, "application/json", b'{"error":"unauthorized_client"}', "client", "unauthorized_client"),
        (400, "application/json", b'{"error":"invalid_scope"}', "rejected", "invalid_scope"),
        (200, "application/json", b'{"error":"invalid_grant"}', "reauth", "invalid_grant"),  # GitHub style
        (
            503,
            "application/json",
            b'{"error":"temporarily_unavailable"}',
            "transient",
            "temporarily_unavailable",
        ),
        (500, "text/html", b"<html>oops</html>", "transient", None),
        (429, "text/plain", b"slow down", "transient", None),
        (401, "text/plain", b"nope", "client", None),
        (302, "text/html", b"", "protocol", None),
        (200, "text/html", b"<html>login</html>", "protocol", None),
        (200, "application/json", b'{"token_type":"bearer"}', "protocol", None),
        (200, "application/json", b'{"access_token":"a","token_type":"mac"}', "protocol", None),
        (400, "application/json", b'{"error":"bad \\"code\\" <script>"}', "rejected", "unrecognised_error"),
    ],
)
def test_parse_failures_map_to_typed_outcomes(
    status: int, ctype: str, body: bytes, kind: str, error: str | None
) -> None:
    with pytest.raises(TokenEndpointError) as info:
        flows.parse_token_response(status, ctype, body, now=0)
    assert (info.value.kind, info.value.error, info.value.status) == (kind, error, status)
    assert "<html>" not in info.value.message and "script" not in info.value.message


def test_revocation_response() -> None:
    flows.check_revocation_response(200, "", b"")
    with pytest.raises(TokenEndpointError) as info:
        flows.check_revocation_response(400, "application/json", b'{"error":"unsupported_token_type"}')
    assert info.value.kind == "rejected"
    with pytest.raises(TokenEndpointError) as info:
        flows.check_revocation_response(503, "", b"")
    assert info.value.kind == "transient"


def test_expires_soon() -> None:
    assert flows.expires_soon(1059, now=1000, skew_s=60)
    assert not flows.expires_soon(1061, now=1000, skew_s=60)
    assert not flows.expires_soon(None, now=1000, skew_s=60)
    assert flows.expires_soon("garbage", now=1000, skew_s=60)


def test_refresh_margin_is_half_the_lifetime_of_short_lived_tokens() -> None:
    assert flows.refresh_margin(4600, 1000, 60) == 60  # an hour: a minute early
    assert flows.refresh_margin(1020, 1000, 60) == 10  # twenty seconds: halfway
    assert not flows.expires_soon(1020, now=1009, skew_s=flows.refresh_margin(1020, 1000, 60))
    assert flows.expires_soon(1020, now=1010, skew_s=flows.refresh_margin(1020, 1000, 60))
    # Lifetime unknown or nonsensical: the plain margin.
    for issued in (None, "x", True, 1020, 1030):
        assert flows.refresh_margin(1020, issued, 60) == 60
    assert flows.refresh_margin(None, 1000, 60) == 60
