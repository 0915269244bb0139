"""Secrets go only where an operator sent them: the destination rules over real sockets.

Each test is an attack a link holder, an end user or a careless write could make: two real
upstreams on 127.0.0.1 stand for the operator's API and the attacker's, and every test asserts
where the stored secret actually arrived.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.app import RunningService, running_service
from tests.support.nginx import front_settings, proxied_through
from tests.support.upstream import Upstream, running_upstream

T = "t1"
SECRET = "sk-destination-canary-5d1e"
SESSIONS = f"/admin/tenants/{T}/connect-sessions"


@pytest.fixture(
    params=[
        pytest.param(("sqlite", "path"), id="sqlite"),
        pytest.param(("redis", "path"), id="redis"),
        pytest.param(("sqlite", "nginx"), id="nginx", marks=pytest.mark.system),
    ]
)
async def svc(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[RunningService]:
    """Both stores in path mode, and calls through real nginx in front (embedded store)."""
    store, front = request.param
    backend = str(request.getfixturevalue("redis_url")) if store == "redis" else None
    async with (
        running_service(tmp_path / "data", redis_url=backend, **front_settings()) as s,
        proxied_through(s, tmp_path, front) as s,
    ):
        yield s


@pytest.fixture
async def good() -> AsyncIterator[Upstream]:
    async with running_upstream() as up:
        yield up


@pytest.fixture
async def evil() -> AsyncIterator[Upstream]:
    async with running_upstream() as up:
        yield up


def secret_seen(up: Upstream) -> bool:
    return any(SECRET in v for s in up.seen for _, v in s.headers) or any(SECRET in s.query for s in up.seen)


async def session_for(svc: RunningService, **body: Any) -> dict[str, Any]:
    status, data = await svc.admin("POST", SESSIONS, json={"integration_id": "http_api_key", **body})
    assert status == 201, data
    return dict(data)


async def page(svc: RunningService, url: str) -> str:
    async with svc.session.get(url) as r:
        assert r.status == 200
        return await r.text()


async def submit(svc: RunningService, url: str, form: dict[str, str]) -> tuple[int, str]:
    html = await page(svc, url)
    csrf = re.search(r'name="csrf" value="([^"]+)"', html)
    assert csrf
    async with svc.session.post(url, data={"csrf": csrf.group(1), **form}) as r:
        return r.status, await r.text()


async def proxy_call(svc: RunningService, cid: str, user: str | None = None) -> int:
    key = await svc.mint_key(T)
    headers = {"Authorization": f"Bearer {key}", "X-Connection-Id": cid}
    if user:
        headers["X-Runtime-User-Id"] = user
    async with svc.session.get(f"{svc.proxy_url}/proxy/echo/x", headers=headers) as r:
        await r.read()
        return r.status


# --- a connect link re-pointing a kept secret ----------------------------------------------------


async def test_connect_link_cannot_repoint_a_kept_secret(
    svc: RunningService, good: Upstream, evil: Upstream
) -> None:
    await svc.put_connection(
        T, "crm", {"integration_id": "http_api_key", "parameters": {"api_key": SECRET, "base_url": good.url}}
    )
    link = await session_for(svc, connection_id="crm")
    html = await page(svc, link["url"])
    # The destination is shown as a host, read only; there is no input for it.
    assert 'name="base_url"' not in html and 'name="header_name"' not in html
    assert "127.0.0.1" in html and 'id="destination"' in html
    status, _ = await submit(
        svc, link["url"], {"api_key": "", "base_url": evil.url, "header_name": "X-Other", "location": "query"}
    )
    assert status == 200
    view = (await svc.admin("GET", f"/admin/tenants/{T}/connections/crm"))[1]
    assert view["parameters"]["base_url"] == good.url and "header_name" not in view["parameters"]
    assert await proxy_call(svc, "crm") == 200
    assert secret_seen(good) and not evil.seen


async def test_client_credentials_link_cannot_repoint_the_token_url(
    svc: RunningService, evil: Upstream
) -> None:
    await svc.put_connection(
        T,
        "cc",
        {
            "integration_id": "http_oauth2_client_credentials",
            "parameters": {
                "token_url": "https://auth.example.com/token",
                "client_id": "app",
                "client_secret": SECRET,
                "base_url": "https://api.example.com",
            },
        },
    )
    link = await session_for(svc, integration_id="http_oauth2_client_credentials", connection_id="cc")
    assert 'name="token_url"' not in await page(svc, link["url"])
    status, _ = await submit(
        svc, link["url"], {"client_id": "app", "client_secret": "", "token_url": evil.url}
    )
    assert status == 200
    view = (await svc.admin("GET", f"/admin/tenants/{T}/connections/cc"))[1]
    assert view["parameters"]["token_url"] == "https://auth.example.com/token"


# --- rule 2: a destination never changes under a kept secret ---------------------------------------


async def test_admin_patch_of_a_destination_must_resend_the_secrets(
    svc: RunningService, good: Upstream, evil: Upstream
) -> None:
    path = f"/admin/tenants/{T}/connections/crm"
    await svc.put_connection(
        T, "crm", {"integration_id": "http_api_key", "parameters": {"api_key": SECRET, "base_url": good.url}}
    )
    for change in (
        {"parameters": {"base_url": evil.url}},
        {"parameters": {"base_url": evil.url, "api_key": "********"}},
        {"parameters": {"header_name": "X-Elsewhere"}},
        {"allowed_hosts": ["*.example.com"]},
    ):
        status, body = await svc.admin("PATCH", path, json=change)
        assert status == 422, change
        assert body["error"] == "VALIDATION_ERROR" and "parameters.api_key" in body["fields"]
        assert SECRET not in str(body)
    assert await proxy_call(svc, "crm") == 200 and not evil.seen
    # Carrying the secret again is the operator re-authorising the new destination.
    status, body = await svc.admin(
        "PATCH", path, json={"parameters": {"base_url": evil.url, "api_key": SECRET + "-2"}}
    )
    assert status == 200, body
    # Changes that leave the destination alone keep the secret as before.
    status, body = await svc.admin("PATCH", path, json={"metadata": {"owner": "ops"}})
    assert status == 200
    assert (await svc.services.vault.credentials(T, "crm")).params["api_key"] == SECRET + "-2"


async def test_equivalent_destination_spellings_are_not_a_change(svc: RunningService, good: Upstream) -> None:
    path = f"/admin/tenants/{T}/connections/crm"
    await svc.put_connection(
        T, "crm", {"integration_id": "http_api_key", "parameters": {"api_key": SECRET, "base_url": good.url}}
    )
    # The catalogue default written out, and a trailing slash, do not move the secret.
    status, body = await svc.admin(
        "PATCH", path, json={"parameters": {"header_name": "X-API-Key", "base_url": good.url + "/"}}
    )
    assert status == 200, body


# --- runtime users inherit their default's destination ----------------------------------------------


async def test_runtime_user_cannot_choose_where_the_tenant_calls_go(
    svc: RunningService, good: Upstream, evil: Upstream
) -> None:
    await svc.put_connection(
        T,
        "crm",
        {"integration_id": "http_api_key", "parameters": {"api_key": "org-key", "base_url": good.url}},
    )
    link = await session_for(svc, runtime_user_id="alice", default_connection_id="crm")
    html = await page(svc, link["url"])
    assert 'name="base_url"' not in html and "127.0.0.1" in html
    status, _ = await submit(svc, link["url"], {"api_key": SECRET, "base_url": "https://evil.example.com/"})
    assert status == 200
    assert await proxy_call(svc, "crm", user="alice") == 200
    assert secret_seen(good) and not evil.seen


async def test_runtime_user_connection_follows_its_default_whatever_it_stores(
    svc: RunningService, good: Upstream, evil: Upstream
) -> None:
    await svc.put_connection(
        T, "crm", {"integration_id": "http_api_key", "parameters": {"api_key": "org", "base_url": good.url}}
    )
    await svc.put_connection(
        T,
        "crm-bob",
        {
            "integration_id": "http_api_key",
            "parameters": {"api_key": SECRET, "base_url": evil.url, "location": "query"},
            "runtime_user_id": "bob",
            "default_connection_id": "crm",
        },
    )
    assert await proxy_call(svc, "crm", user="bob") == 200
    assert not evil.seen and good.seen[-1].header("X-API-Key") == [SECRET]
    # The default moves: its users move with it at once (their cached credentials are dropped).
    status, _ = await svc.admin(
        "PATCH",
        f"/admin/tenants/{T}/connections/crm",
        json={"parameters": {"base_url": evil.url, "api_key": "org-2"}},
    )
    assert status == 200
    assert await proxy_call(svc, "crm", user="bob") == 200
    assert evil.seen and evil.seen[-1].header("X-API-Key") == [SECRET]


async def test_default_host_binding_applies_to_its_users(svc: RunningService, good: Upstream) -> None:
    await svc.put_connection(
        T,
        "crm",
        {
            "integration_id": "http_api_key",
            "parameters": {"api_key": "org", "base_url": "https://crm.example.com"},
            "allowed_hosts": ["crm.example.com"],
            "options": {"users_choose_destination": True},
        },
    )
    await svc.put_connection(
        T,
        "crm-eve",
        {
            "integration_id": "http_api_key",
            "parameters": {"api_key": SECRET, "base_url": good.url},
            "runtime_user_id": "eve",
            "default_connection_id": "crm",
        },
    )
    key = await svc.mint_key(T)
    headers = {"Authorization": f"Bearer {key}", "X-Connection-Id": "crm", "X-Runtime-User-Id": "eve"}
    async with svc.session.get(f"{svc.proxy_url}/proxy/x", headers=headers) as r:
        body = await r.json()
        assert r.status == 403 and body["error"] == "HOST_NOT_ALLOWED"
    assert not good.seen


async def test_opted_in_default_lets_users_choose_within_its_binding(svc: RunningService) -> None:
    await svc.put_connection(
        T,
        "desk",
        {
            "integration_id": "http_api_key",
            "parameters": {"api_key": "org", "base_url": "https://acme.zendesk.example"},
            "allowed_hosts": ["*.zendesk.example"],
            "options": {"users_choose_destination": True},
        },
    )
    link = await session_for(svc, runtime_user_id="ann", default_connection_id="desk")
    assert 'name="base_url"' in await page(svc, link["url"])
    status, html = await submit(svc, link["url"], {"api_key": SECRET, "base_url": "https://evil.example.com"})
    assert status == 422 and "zendesk.example" in html
    status, _ = await submit(svc, link["url"], {"api_key": SECRET, "base_url": "https://ann.zendesk.example"})
    assert status == 200
    found = (await svc.admin("GET", f"/admin/tenants/{T}/connections?runtime_user_id=ann"))[1]
    (conn,) = found["items"] if isinstance(found, dict) else found
    assert conn["allowed_hosts"] == ["ann.zendesk.example"]
    assert conn["parameters"]["base_url"] == "https://ann.zendesk.example"


# --- sessions: presets, bounded choices, names ------------------------------------------------------


async def test_session_preset_locks_the_destination_and_names_the_app(
    svc: RunningService, good: Upstream, evil: Upstream
) -> None:
    link = await session_for(
        svc,
        connection_id="new",
        parameters={"base_url": good.url, "header_name": "X-Acme-Key"},
        display_name="Acme CRM",
        logo_url="https://cdn.example.com/acme.png",
    )
    async with svc.session.get(link["url"]) as r:
        html = await r.text()
        csp = r.headers["Content-Security-Policy"]
    assert "Connect your Acme CRM account" in html and 'src="https://cdn.example.com/acme.png"' in html
    assert "img-src data: https://cdn.example.com" in csp
    assert 'name="base_url"' not in html and 'name="header_name"' not in html
    status, _ = await submit(
        svc, link["url"], {"api_key": SECRET, "base_url": evil.url, "header_name": "Host"}
    )
    assert status == 200
    assert await proxy_call(svc, "new") == 200
    assert good.seen[-1].header("X-Acme-Key") == [SECRET] and not evil.seen


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "parameters.base_url"),  # nobody chose where the key goes
        ({"parameters": {"base_url": "https://a.example.com", "api_key": "x"}}, "parameters.api_key"),
        ({"parameters": {"base_url": "https://a.example.com", "nope": 1}}, "parameters.nope"),
        ({"parameters": {"base_url": "ftp://a.example.com"}}, "parameters.base_url"),
        (
            {
                "user_settable": {"api_key": ["*.example.com"]},
                "parameters": {"base_url": "https://a.example.com"},
            },
            "user_settable.api_key",
        ),
        ({"user_settable": {"base_url": ["*"]}}, "user_settable.base_url"),
        ({"user_settable": {"base_url": ["*.com"]}}, "user_settable.base_url"),
        ({"display_name": "x" * 101, "parameters": {"base_url": "https://a.example.com"}}, "display_name"),
        (
            {"logo_url": "http://cdn.example.com/a.png", "parameters": {"base_url": "https://a.example.com"}},
            "logo_url",
        ),
    ],
)
async def test_session_request_destination_problems(
    svc: RunningService, body: dict[str, Any], field: str
) -> None:
    status, data = await svc.admin("POST", SESSIONS, json={"integration_id": "http_api_key", **body})
    assert status == 422 and field in data["fields"], data


async def test_session_may_allow_a_bounded_destination(svc: RunningService) -> None:
    link = await session_for(svc, connection_id="mine", user_settable={"base_url": ["*.myapp.example"]})
    html = await page(svc, link["url"])
    assert 'name="base_url"' in html and "Must be under *.myapp.example" in html
    status, html = await submit(svc, link["url"], {"api_key": SECRET, "base_url": "https://evil.example.com"})
    assert status == 422
    status, _ = await submit(svc, link["url"], {"api_key": SECRET, "base_url": "https://eu.myapp.example/v1"})
    assert status == 200
    view = (await svc.admin("GET", f"/admin/tenants/{T}/connections/mine"))[1]
    assert view["allowed_hosts"] == ["eu.myapp.example"]


async def test_shopify_shop_domain_is_user_settable_under_myshopify(svc: RunningService) -> None:
    status, data = await svc.admin(
        "POST", SESSIONS, json={"integration_id": "shopify_access_token", "connection_id": "shop"}
    )
    assert status == 201, data
    assert 'name="shop_domain"' in await page(svc, data["url"])
    for bad in (
        "evil.example.com",
        "x.myshopify.com.evil.example",
        "a.myshopify.com/../x",
        "u@a.myshopify.com",
    ):
        status, _ = await submit(svc, data["url"], {"access_token": SECRET, "shop_domain": bad})
        assert status == 422, bad
    status, _ = await submit(svc, data["url"], {"access_token": SECRET, "shop_domain": "acme.myshopify.com"})
    assert status == 200
    view = (await svc.admin("GET", f"/admin/tenants/{T}/connections/shop"))[1]
    assert view["allowed_hosts"] == ["acme.myshopify.com"]


async def test_runtime_user_session_cannot_preset_a_destination(svc: RunningService, good: Upstream) -> None:
    await svc.put_connection(
        T, "crm", {"integration_id": "http_api_key", "parameters": {"api_key": "org", "base_url": good.url}}
    )
    status, data = await svc.admin(
        "POST",
        SESSIONS,
        json={
            "integration_id": "http_api_key",
            "runtime_user_id": "zoe",
            "default_connection_id": "crm",
            "parameters": {"base_url": "https://elsewhere.example.com"},
        },
    )
    assert status == 422 and "parameters.base_url" in data["fields"]
