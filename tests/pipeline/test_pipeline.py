"""The per-connection plan: limit target, host binding, timeouts."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

import pytest

from proxy.catalogue import Catalogue
from proxy.errors import Forbidden, HostNotAllowed, ValidationError
from proxy.model import ConnectionRecord, RateWindow
from proxy.pipeline.plan import Plan
from proxy.ratelimit.targets import limit_target
from proxy.security.egress import EgressPolicy
from proxy.settings import Settings
from proxy.vault.records import Credentials

CAT = Catalogue.load()


def creds(integration_id: str, params: dict[str, Any], **record: Any) -> Credentials:
    rec = ConnectionRecord(tenant_id="t1", connection_id="c1", integration_id=integration_id, **record)
    return Credentials(record=rec, integration=CAT.get(integration_id), params=MappingProxyType(params))


def deps(egress_allow: tuple[str, ...] = ()) -> tuple[EgressPolicy, Settings]:
    # The plan takes exactly these two services; both are the real classes.
    return EgressPolicy(egress_allow), Settings(max_wait_ms_cap=5000)


def test_limit_target_uses_connection_windows_then_integration_defaults() -> None:
    record = ConnectionRecord("t1", "c1", "http_bearer", rate_limits=(RateWindow(5, 1.0),))
    target = limit_target(record, CAT.get("http_bearer"))
    assert target.scope == "t1/c1"
    assert target.windows == (RateWindow(5, 1.0),)
    assert target.quota_key is None and target.reserve == 0


def test_limit_target_quota_options() -> None:
    record = ConnectionRecord(
        "t1",
        "c1",
        "http_bearer",
        options={
            "quota_key": "app-1",
            "quota_weight": 2,
            "reserve": 3,
            "quota_rate_limits": [{"limit": 10, "window": "1s"}],
        },
    )
    target = limit_target(record, CAT.get("http_bearer"))
    assert (target.quota_key, target.weight, target.reserve) == ("app-1", 2.0, 3)
    assert target.quota_windows == (RateWindow(10, 1.0),)


def test_plan_binds_to_base_host_by_default() -> None:
    plan = Plan(creds("http_bearer", {"token": "t", "base_url": "https://api.example.com/v1"}), *deps())
    assert plan.host_patterns == ("api.example.com",)
    assert plan.host_key == "api.example.com:443"
    assert plan.refusal is None
    assert plan.injection is not None and plan.injection.headers == (("Authorization", "Bearer t"),)


def test_plan_refuses_plain_http_unless_egress_allowed() -> None:
    c = creds("http_bearer", {"token": "t", "base_url": "http://api.example.com/"})
    assert isinstance(Plan(c, *deps()).refusal, Forbidden)
    assert Plan(c, *deps(("api.example.com",))).refusal is None


def test_plan_refuses_base_host_outside_allowed_hosts() -> None:
    c = creds(
        "http_bearer", {"token": "t", "base_url": "https://api.example.com/"}, allowed_hosts=("other.com",)
    )
    assert isinstance(Plan(c, *deps()).refusal, HostNotAllowed)


def test_plan_vendor_host_pattern() -> None:
    ok = creds("shopify_access_token", {"access_token": "a", "shop_domain": "s.myshopify.com"})
    assert Plan(ok, *deps()).refusal is None
    bad = creds("shopify_access_token", {"access_token": "a", "shop_domain": "evil.com"})
    assert isinstance(Plan(bad, *deps()).refusal, HostNotAllowed)


def test_plan_needs_a_valid_base_url() -> None:
    with pytest.raises(ValidationError, match="no base URL"):
        Plan(creds("http_bearer", {"token": "t"}), *deps())
    with pytest.raises(ValidationError, match="user info"):
        Plan(creds("http_bearer", {"token": "t", "base_url": "https://u:p@h.com/"}), *deps())


def test_plan_timeouts_and_knobs_from_options() -> None:
    c = creds(
        "http_bearer",
        {"token": "t", "base_url": "https://h.com"},
        options={"timeouts": {"connect_s": 1, "read_s": 2, "total_s": 3}, "retries": 9, "max_wait_ms": 99999},
    )
    plan = Plan(c, *deps())
    assert (plan.timeout.sock_connect, plan.timeout.sock_read, plan.timeout.total) == (1, 2, 3)
    assert plan.retries == 5  # capped
    assert plan.max_wait_ms == 5000  # capped by max_wait_ms_cap


def test_oauth_plan_defers_injection_to_the_token() -> None:
    c = creds("http_oauth2_authorization_code", {"access_token": "a", "base_url": "https://h.com"})
    assert Plan(c, *deps()).injection is None
