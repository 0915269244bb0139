"""The destination rules as pure functions, and the catalogue's derivation of destination fields."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.catalogue import Catalogue, parse_integration
from proxy.errors import ConfigError, ValidationError
from proxy.model import ConnectionRecord
from proxy.security import destinations

CATALOGUE = Catalogue.load()
API_KEY = CATALOGUE.get("http_api_key")


def record(**kw: Any) -> ConnectionRecord:
    base: dict[str, Any] = {
        "tenant_id": "t",
        "connection_id": "c",
        "integration_id": "http_api_key",
        "public_params": {"base_url": "https://a.example.com"},
        "secret_params": {"api_key": "v1.sealed-1"},
    }
    return ConnectionRecord(**{**base, **kw})


def test_destination_fields_are_derived_from_names_flags_and_templates() -> None:
    assert {"base_url", "header_name", "location", "query_param", "cookie_name"} <= API_KEY.destination_names
    assert "api_key" not in API_KEY.destination_names
    assert CATALOGUE.get("shopify_access_token").destination_names == {"shop_domain"}
    assert CATALOGUE.get("mailgun").destination_names == {"region"}
    custom = parse_integration(
        {
            "id": "acme",
            "auth": "template",
            "base_url": "https://{{ tenant_host }}/api",
            "fields": [
                {"name": "tenant_host"},
                {"name": "hdr"},
                {"name": "proxy_to", "destination": True},
                {"name": "secret", "secret": True},
            ],
            "inject": {"headers": {"X-{{ hdr }}": "{{ secret }}"}},
        },
        "custom.toml",
    )
    assert custom.destination_names == {"tenant_host", "hdr", "proxy_to"}


@pytest.mark.parametrize(
    "field",
    [
        {"name": "base_url", "user_settable": True},  # unbounded
        {"name": "note", "user_settable": True, "choices": ["a"]},  # not a destination
        {"name": "base_url", "user_hosts": ["*.example.com"]},  # hosts without user_settable
        {"name": "base_url", "user_settable": True, "user_hosts": []},
    ],
)
def test_user_settable_destinations_must_be_bounded(field: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        parse_integration(
            {"id": "x", "auth": "bearer", "fields": [{"name": "token", "secret": True}, field]}, "f.toml"
        )


def test_kept_secret_under_a_new_destination_is_refused() -> None:
    old = record()
    moved = record(public_params={"base_url": "https://evil.example.com"})
    with pytest.raises(ValidationError) as err:
        destinations.check_write(API_KEY, old, moved)
    assert set(err.value.fields) == {"parameters.base_url", "parameters.api_key"}
    # The secret sealed anew (another ciphertext) is the writer re-authorising the destination.
    destinations.check_write(API_KEY, old, moved.evolve(secret_params={"api_key": "v1.sealed-2"}))
    # Removing the secret is fine too, and so is any change that leaves the destination.
    destinations.check_write(API_KEY, old, moved.evolve(secret_params={}))
    destinations.check_write(API_KEY, old, old.evolve(metadata={"a": 1}))
    destinations.check_write(API_KEY, None, moved)


@pytest.mark.parametrize(
    "change",
    [
        {"public_params": {"base_url": "https://a.example.com", "location": "query"}},
        {"public_params": {"base_url": "https://a.example.com", "header_name": "X-Other"}},
        {"allowed_hosts": ("*.example.com",)},
        {"default_connection_id": "other", "runtime_user_id": "u"},
    ],
)
def test_every_destination_counts(change: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        destinations.check_write(API_KEY, record(), record(**change))


def test_catalogue_default_and_trailing_slash_are_the_same_destination() -> None:
    same = record(public_params={"base_url": "https://a.example.com/", "header_name": "X-API-Key"})
    destinations.check_write(API_KEY, record(), same)


def test_inherit_takes_the_default_destination_unless_it_opted_in() -> None:
    default = record(public_params={"base_url": "https://org.example.com", "header_name": "X-Org"})
    user = {"api_key": "k", "base_url": "https://evil.example.com", "location": "query", "header_name": "H"}
    got = destinations.inherit(API_KEY, user, default)
    assert got["base_url"] == "https://org.example.com" and got["header_name"] == "X-Org"
    assert got["location"] == "header" and got["api_key"] == "k"  # the catalogue default, not the user's
    opted = default.evolve(options={destinations.USERS_CHOOSE_OPTION: True})
    assert destinations.inherit(API_KEY, user, opted)["base_url"] == "https://evil.example.com"


def test_inherited_binding() -> None:
    assert destinations.inherited_binding(API_KEY, record()) == ("a.example.com",)
    assert destinations.inherited_binding(API_KEY, record(allowed_hosts=("*.x.com",))) == ("*.x.com",)
    assert destinations.inherited_binding(API_KEY, record(public_params={})) == ()
    shop = CATALOGUE.get("shopify_access_token")
    assert destinations.inherited_binding(shop, record(public_params={})) == ("*.myshopify.com",)


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("acme.myshopify.com", True),
        ("ACME.myshopify.com", True),
        ("myshopify.com", False),
        ("evil.com", False),
        ("acme.myshopify.com.evil.com", False),
        ("acme.myshopify.com/path", False),
        ("user@acme.myshopify.com", False),
        ("", False),
        (5, False),
    ],
)
def test_user_destination_within_host_patterns(value: Any, ok: bool) -> None:
    shop = CATALOGUE.get("shopify_access_token")
    assert (destinations.check_user_destination(shop, "shop_domain", value, None) is None) is ok


def test_user_destination_rules() -> None:
    mailgun = CATALOGUE.get("mailgun")
    assert destinations.check_user_destination(mailgun, "region", "eu", None) is None
    assert destinations.check_user_destination(mailgun, "region", "xx", None) is not None
    # Not user-settable: refused whatever the value, unless the session bounds it.
    assert destinations.check_user_destination(API_KEY, "base_url", "https://a.example.com", None)
    allowed = ("*.example.com",)
    assert (
        destinations.check_user_destination(API_KEY, "base_url", "https://a.example.com/v1", allowed) is None
    )
    assert destinations.check_user_destination(API_KEY, "base_url", "https://a.evil.com", allowed)


def test_user_settable_fields_for_runtime_users() -> None:
    default = record(allowed_hosts=("*.org.example",))
    assert destinations.user_settable_fields(API_KEY, {}, default, runtime_user=True) == {}
    opted = default.evolve(options={destinations.USERS_CHOOSE_OPTION: True})
    assert destinations.user_settable_fields(API_KEY, {}, opted, runtime_user=True) == {
        "base_url": ("*.org.example",)
    }
    # Non-runtime sessions: the catalogue's own bounded fields, and the session's.
    assert destinations.user_settable_fields(
        API_KEY, {"base_url": ("*.a.com",)}, None, runtime_user=False
    ) == {"base_url": ("*.a.com",)}
    assert "shop_domain" in destinations.user_settable_fields(
        CATALOGUE.get("shopify_access_token"), {}, None, runtime_user=False
    )
