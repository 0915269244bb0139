"""The integration catalogue: built-ins load and validate; operator files are checked at start-up."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.catalogue import AUTH_KINDS, AuthKind, Catalogue, parse_integration
from proxy.errors import ConfigError, ValidationError

CAT = Catalogue.load()

CONTRACT_IDS = {
    "http_bearer",
    "http_api_key",
    "http_basic",
    "http_oauth2_authorization_code",
    "http_oauth2_client_credentials",
    "openai_api_key",
    "stripe_api_key",
    "slack_bot",
    "hubspot_access_token",
    "shopify_access_token",
    "mailgun",
    "sftp",
    "postgres",
}


def test_builtins_cover_the_contract() -> None:
    cat = Catalogue.load()
    assert {i.id for i in cat} >= CONTRACT_IDS
    assert not cat.get("sftp").proxyable and not cat.get("postgres").proxyable
    assert cat.get("http_bearer").secret_names == {"token"}
    assert cat.get("http_basic").secret_names == {"password"}
    assert cat.get("stripe_api_key").secret_names == {"secret_key"}


def test_unknown_integration_is_opaque_and_all_secret() -> None:
    custom = Catalogue.load().get("my_custom_agent")
    assert not custom.proxyable
    assert custom.is_secret("anything")


def test_unknown_parameter_of_known_integration_is_secret() -> None:
    assert Catalogue.load().get("http_bearer").is_secret("extra_token")
    assert not Catalogue.load().get("http_bearer").is_secret("base_url")


def test_templated_base_urls_and_injection() -> None:
    cat = Catalogue.load()
    mg = cat.get("mailgun")
    assert mg.resolve_base_url({"region": "eu", "api_key": "k"}) == "https://api.eu.mailgun.net"
    assert mg.resolve_base_url({"region": "us", "api_key": "k"}) == "https://api.mailgun.net"
    assert mg.render(dict(mg.inject_headers)["Authorization"], {"api_key": "key-1"}) == "Basic YXBpOmtleS0x"
    shop = cat.get("shopify_access_token")
    assert shop.resolve_base_url({"shop_domain": "a.myshopify.com"}) == "https://a.myshopify.com/admin/api"
    assert shop.allowed_hosts == ("*.myshopify.com",)


def test_missing_template_variable_is_a_validation_error_without_values() -> None:
    mg = Catalogue.load().get("mailgun")
    with pytest.raises(ValidationError) as info:
        mg.render(dict(mg.inject_headers)["Authorization"], {"region": "us"})
    assert "api_key" in info.value.message


def test_sandbox_refuses_attribute_escapes() -> None:
    integ = parse_integration(
        {"id": "x", "auth": "template", "inject": {"headers": {"A": "{{ token.__class__.__mro__ }}"}}}, "t"
    )
    with pytest.raises(ValidationError):
        integ.render(dict(integ.inject_headers)["A"], {"token": "s"})


def test_oauth2_issuer_identification_is_read_from_the_oauth2_table() -> None:
    oauth2 = {
        "auth_url": "https://id.example.com/authorize",
        "issuer": "https://id.example.com",
        "authorization_response_iss_parameter_supported": True,
    }
    fields = [{"name": "access_token", "secret": True}, {"name": "refresh_token", "secret": True}]
    fields.append({"name": "client_secret", "secret": True})
    data = {"id": "idp", "auth": "oauth2_authorization_code", "fields": fields, "oauth2": oauth2}
    spec = parse_integration(data, "t").oauth2
    assert spec is not None and (spec.issuer, spec.iss_parameter_supported) == (
        "https://id.example.com",
        True,
    )
    with pytest.raises(ConfigError) as info:
        parse_integration({**data, "oauth2": {**oauth2, "issuer": "id.example.com"}}, "t")
    assert info.value.key == "t: idp.oauth2.issuer"


def test_param_validation_names_fields() -> None:
    api = Catalogue.load().get("http_api_key")
    problems = api.validate_params({"location": "body", "base_url": "ftp://x", "api_key": "k"})
    assert set(problems) == {"parameters.location", "parameters.base_url"}


def test_status_required_fields() -> None:
    bearer = Catalogue.load().get("http_bearer")
    assert bearer.missing_required({"base_url"}) == ["token"]
    assert bearer.missing_required({"base_url", "token"}) == []


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('[[integration]]\nauth = "bearer"\n', "id"),
        ('[[integration]]\nid = "a"\nauth = "magic"\n', "auth"),
        ('[[integration]]\nid = "a"\nauth = "template"\n', "inject"),
        ('[[integration]]\nid = "a"\nauth = "bearer"\nbase_url = "ftp://x"\n', "base_url"),
        ('[[integration]]\nid = "a"\nauth = "bearer"\nfields = [{name = "x", type = "blob"}]\n', "type"),
        (
            '[[integration]]\nid = "a"\nauth = "template"\n[integration.inject.headers]\nA = "{{ x "\n',
            "inject",
        ),
        ("not toml [", "TOML"),
    ],
)
def test_operator_file_errors_name_file_and_key(tmp_path: Path, text: str, needle: str) -> None:
    (tmp_path / "mine.toml").write_text(text)
    with pytest.raises(ConfigError) as info:
        Catalogue.load((tmp_path,))
    assert needle in str(info.value)


def test_operator_integration_added_and_overrides(tmp_path: Path) -> None:
    (tmp_path / "mine.toml").write_text(
        '[[integration]]\nid = "acme"\nauth = "template"\nbase_url = "https://api.acme.test"\n'
        'fields = [{name = "key", secret = true, required = true}]\n'
        '[integration.inject.query]\nkey = "{{ key }}"\n'
        '[[integration]]\nid = "http_bearer"\nlabel = "Overridden"\nauth = "bearer"\n'
        'fields = [{name = "token", secret = true, required = true}, {name = "base_url", required = true}]\n'
    )
    cat = Catalogue.load((tmp_path,))
    assert cat.get("acme").inject_query == (("key", "{{ key }}"),)
    assert cat.get("http_bearer").label == "Overridden"


def test_oauth_integration_must_declare_token_fields_secret(tmp_path: Path) -> None:
    (tmp_path / "o.toml").write_text(
        '[[integration]]\nid = "leaky"\nauth = "oauth2_authorization_code"\n'
        'fields = [{name = "access_token", secret = true}, {name = "client_secret", secret = true}]\n'
    )
    with pytest.raises(ConfigError, match="refresh_token"):
        Catalogue.load((tmp_path,))


@pytest.mark.parametrize(
    ("table", "name"),
    [("headers", "Transfer-Encoding"), ("headers", "Host"), ("headers", "X-Proxy-Foo"), ("cookies", "a b")],
)
def test_operator_template_with_forbidden_static_name_stops_start_up(
    tmp_path: Path, table: str, name: str
) -> None:
    (tmp_path / "smuggle.toml").write_text(
        '[[integration]]\nid = "smuggle"\nauth = "template"\nbase_url = "https://api.acme.test"\n'
        'fields = [{name = "key", secret = true}]\n'
        f'[integration.inject.{table}]\n"{name}" = "{{{{ key }}}}"\n'
    )
    with pytest.raises(ConfigError) as info:
        Catalogue.load((tmp_path,))
    message = str(info.value)
    assert "smuggle.toml" in message and f"inject.{table}.{name}" in message


def test_operator_template_with_control_character_in_static_value_stops_start_up(tmp_path: Path) -> None:
    (tmp_path / "ctl.toml").write_text(
        '[[integration]]\nid = "ctl"\nauth = "template"\nbase_url = "https://api.acme.test"\n'
        '[integration.inject.headers]\nX-Key = "a\\u000bb"\n'
    )
    with pytest.raises(ConfigError, match=r"inject\.headers\.X-Key"):
        Catalogue.load((tmp_path,))


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"header_name": "Transfer-Encoding"}, "parameters.header_name"),
        ({"header_name": "Content-Length"}, "parameters.header_name"),
        ({"header_name": "X-Forwarded-Host"}, "parameters.header_name"),
        ({"query_param": "a\x01"}, "parameters.query_param"),
        ({"cookie_name": "s id"}, "parameters.cookie_name"),
        ({"api_key": "k\x01"}, "parameters.api_key"),
        ({"api_key": "k\x7f"}, "parameters.api_key"),
        ({"api_key": "k\x0b"}, "parameters.api_key"),
        ({"api_key": "k;admin=1", "location": "cookie"}, "parameters.api_key"),
    ],
)
def test_write_time_checks_refuse_what_would_frame_the_request(params: dict[str, str], field: str) -> None:
    problems = CAT.get("http_api_key").validate_params(params)
    assert field in problems
    assert params.get("api_key", "\x00") not in problems[field]  # never the secret


def test_write_time_value_checks_cover_each_kind_and_leave_opaque_secrets_alone() -> None:
    assert "parameters.token" in CAT.get("http_bearer").validate_params({"token": "t\x01"})
    assert "parameters.username" in CAT.get("http_basic").validate_params({"username": "u\x7f"})
    assert CAT.get("http_basic").validate_params({"password": "any\tthing"}) == {}  # sent base64-encoded
    assert "parameters.api_key" in CAT.get("mailgun").validate_params({"api_key": "k\x0b"})
    # A PEM key is multi-line and never injected into a request.
    assert CAT.get("sftp").validate_params({"private_key": "-----BEGIN-----\nabc\n-----END-----"}) == {}
    assert CAT.get("http_api_key").validate_params({"header_name": "X-API-Key", "api_key": "k"}) == {}


def test_auth_kinds_parse_from_their_file_spelling() -> None:
    assert tuple(k.value for k in AuthKind) == AUTH_KINDS
    assert AuthKind.parse("oauth2_client_credentials", "f.auth") is AuthKind.OAUTH2_CLIENT_CREDENTIALS
    assert {k for k in AuthKind if k.is_oauth2} == {
        AuthKind.OAUTH2_AUTHORIZATION_CODE,
        AuthKind.OAUTH2_CLIENT_CREDENTIALS,
    }
    assert CAT.get("http_bearer").auth is AuthKind.BEARER and CAT.get("http_bearer").auth == "bearer"
    assert CAT.get("sftp").auth is AuthKind.OPAQUE and not CAT.get("sftp").proxyable


@pytest.mark.parametrize("value", ["Bearer", "oauth2", "", None, 1])
def test_unknown_auth_kind_stops_start_up_naming_the_kinds(value: object) -> None:
    with pytest.raises(ConfigError) as info:
        parse_integration({"id": "x", "auth": value}, "f.toml")
    assert info.value.key == "f.toml: x.auth"
    assert "must be one of bearer, api_key, basic" in info.value.message
