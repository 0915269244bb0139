"""OAuth2 through the real service: connect link -> provider -> callback -> proxied calls.

The provider is the real test authorization server process; the "browser" is an aiohttp
client with its own cookie jar that follows no redirect by itself, so each hop is checked.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from multidict import CIMultiDictProxy

from tests.support.app import RunningService
from tests.support.authserver import AuthServer, authserver_fixture, authserver_process_fixture  # noqa: F401

T = "t1"
OAUTH = "http_oauth2_authorization_code"


class Browser:
    """One user agent: its own cookies, every redirect inspected by the test."""

    def __init__(self) -> None:
        self.http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))

    async def get(self, url: str) -> tuple[int, str, CIMultiDictProxy[str]]:
        async with self.http.get(url, allow_redirects=False) as r:
            return r.status, await r.text(), r.headers

    async def redirect(self, url: str) -> str:
        status, _, headers = await self.get(url)
        assert status == 302, (url, status)
        return headers["Location"]

    async def sign_in(self, connect_url: str) -> str:
        """Start -> provider (auto-approves) -> the callback URL, not yet visited."""
        return await self.redirect(await self.redirect(connect_url + "/oauth/start"))

    async def close(self) -> None:
        await self.http.close()


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    b = Browser()
    yield b
    await b.close()


async def shell(svc: RunningService, auth: AuthServer, cid: str = "crm") -> None:
    await svc.put_connection(T, cid, {"integration_id": OAUTH, "parameters": auth.endpoints()})


async def session(svc: RunningService, **body: Any) -> dict[str, Any]:
    status, data = await svc.admin(
        "POST", f"/admin/tenants/{T}/connect-sessions", json={"integration_id": OAUTH, **body}
    )
    assert status == 201, data
    return dict(data)


async def connected(
    svc: RunningService, auth: AuthServer, browser: Browser, cid: str = "crm", **body: Any
) -> dict[str, Any]:
    await shell(svc, auth, cid)
    data = await session(svc, connection_id=cid, **body)
    status, _, _ = await browser.get(await browser.sign_in(data["url"]))
    assert status == 200
    return data


async def proxy_me(svc: RunningService, key: str, cid: str = "crm", **headers: str) -> tuple[int, str]:
    h = {"Authorization": f"Bearer {key}", "X-Connection-Id": cid, **headers}
    async with svc.session.get(svc.url + "/proxy/api/me", headers=h) as r:
        return r.status, await r.text()


async def test_authorization_code_flow_end_to_end(
    svc: RunningService, authserver: AuthServer, browser: Browser, tmp_path: Path
) -> None:
    await shell(svc, authserver)
    _, view = await svc.admin("GET", f"/admin/tenants/{T}/connections/crm")
    assert view["status"] == "pending"
    data = await session(svc, connection_id="crm", return_url="https://app.example.com/done")
    status, html, _ = await browser.get(data["url"])
    assert status == 200 and "Connect with OAuth 2.0 (authorization code)" in html and "/oauth/start" in html

    status, _, headers = await browser.get(data["url"] + "/oauth/start")
    assert status == 302 and headers["Referrer-Policy"] == "no-referrer"
    cookie = headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "Path=/oauth/callback" in cookie and "SameSite=Lax" in cookie
    location = headers["Location"]
    assert location.startswith(authserver.url + "/authorize?")
    q = parse_qs(urlsplit(location).query)
    assert q["redirect_uri"] == [svc.url + "/oauth/callback"] and q["code_challenge_method"] == ["S256"]
    assert (
        q["client_id"] == ["test-client"]
        and q["response_type"] == ["code"]
        and len(q["code_challenge"][0]) == 43
    )

    callback = await browser.redirect(location)
    status, html, headers = await browser.get(callback)
    assert status == 200 and "is connected" in html
    assert "status=active" in html and "connection_id=crm" in html

    creds = await svc.services.vault.credentials(T, "crm")
    access, refresh = creds.params["access_token"], creds.params["refresh_token"]
    assert access not in html and refresh not in html
    _, view = await svc.admin("GET", f"/admin/tenants/{T}/connections/crm")
    assert view["status"] == "active" and {"access_token", "refresh_token"} <= set(view["secret_fields_set"])
    assert access not in str(view) and isinstance(view["parameters"]["expires_at"], int)
    if svc.settings.redis_url is None:
        raw = svc.settings.store_path.read_bytes()
        assert access.encode() not in raw and refresh.encode() not in raw
    assert authserver.state()["last_token"]["client_auth"] == "basic"

    # The state is single use: replaying the callback is refused and changes nothing.
    status, html, headers = await browser.get(callback)
    assert status == 400 and headers["X-Proxy-Error"] == "BAD_REQUEST" and "cannot be completed" in html
    assert authserver.count("code_exchanges") == 1

    key = await svc.mint_key(T)
    status, body = await proxy_me(svc, key)
    assert status == 200 and '"sub": "user-1"' in body


async def test_refresh_through_proxy_happens_once_for_concurrent_calls(
    svc: RunningService, authserver: AuthServer, browser: Browser
) -> None:
    authserver.control(expires_in=0)  # due for refresh at once
    await connected(svc, authserver, browser)
    old = (await svc.services.vault.credentials(T, "crm")).params["refresh_token"]
    authserver.control(expires_in=3600, delay_s=0.3)
    key = await svc.mint_key(T)
    results = await asyncio.gather(*(proxy_me(svc, key) for _ in range(20)))
    assert [s for s, _ in results] == [200] * 20
    assert authserver.count("refreshes") == 1
    await svc.services.vault.invalidate(T, "crm")
    assert (await svc.services.vault.credentials(T, "crm")).params["refresh_token"] != old


async def test_invalid_grant_needs_reauth_then_reconnect(
    svc: RunningService, authserver: AuthServer, browser: Browser
) -> None:
    authserver.control(expires_in=0)  # due for refresh at once
    await connected(svc, authserver, browser)
    authserver.control(fail_next=["invalid_grant"], expires_in=3600)
    key = await svc.mint_key(T)
    status, body = await proxy_me(svc, key)
    assert status == 424 and "CONNECTION_NOT_AUTHORIZED" in body and "connect-sessions" in body
    _, view = await svc.admin("GET", f"/admin/tenants/{T}/connections/crm")
    assert view["status"] == "needs_reauth" and "invalid_grant" in view["status_detail"]
    async with svc.session.get(f"{svc.url}/connections/{T}/crm/metadata", headers=svc.admin_headers) as r:
        assert (await r.json())["status"] == "REQUIRES_RECONNECTION"

    again = await session(svc, connection_id="crm")
    status, _, _ = await browser.get(await browser.sign_in(again["url"]))
    assert status == 200
    _, view = await svc.admin("GET", f"/admin/tenants/{T}/connections/crm")
    assert view["status"] == "active" and view["status_detail"] is None
    assert (await proxy_me(svc, key))[0] == 200


async def test_callback_from_another_browser_is_refused(
    sqlite_svc: RunningService, authserver: AuthServer, browser: Browser
) -> None:
    svc = sqlite_svc
    await shell(svc, authserver)
    data = await session(svc, connection_id="crm")
    callback = await browser.sign_in(data["url"])
    attacker = Browser()
    try:
        status, html, _ = await attacker.get(callback)
    finally:
        await attacker.close()
    assert status == 400 and "another browser" in html
    # The state was spent by that attempt; the victim's browser cannot reuse it either.
    status, _, _ = await browser.get(callback)
    assert status == 400
    assert authserver.count("code_exchanges") == 0
    _, view = await svc.admin("GET", f"/admin/tenants/{T}/connections/crm")
    assert view["status"] == "pending"
    # The link itself is still good: starting again works.
    status, _, _ = await browser.get(await browser.sign_in(data["url"]))
    assert status == 200


async def test_state_of_a_finished_session_is_refused(
    sqlite_svc: RunningService, authserver: AuthServer, browser: Browser
) -> None:
    svc = sqlite_svc
    await shell(svc, authserver)
    data = await session(svc, connection_id="crm")
    first, second = await browser.sign_in(data["url"]), await browser.sign_in(data["url"])
    assert (await browser.get(first))[0] == 200
    status, html, headers = await browser.get(second)
    assert status == 410 and headers["X-Proxy-Error"] == "CONNECT_LINK_USED" and "already used" in html
    assert authserver.count("code_exchanges") == 1


async def test_forged_or_missing_state(sqlite_svc: RunningService) -> None:
    for query in ("", "?code=x", "?code=x&state=" + "A" * 43, "?state=../../x"):
        async with sqlite_svc.session.get(sqlite_svc.url + "/oauth/callback" + query) as r:
            assert r.status == 400 and r.headers["Content-Type"].startswith("text/html")
            assert r.headers["X-Proxy-Error"] == "BAD_REQUEST"


async def test_access_denied_leaves_connection_pending(
    sqlite_svc: RunningService, authserver: AuthServer, browser: Browser
) -> None:
    svc = sqlite_svc
    await shell(svc, authserver)
    data = await session(svc, connection_id="crm", return_url="https://app.example.com/done")
    authserver.control(deny=True)
    status, html, headers = await browser.get(await browser.sign_in(data["url"]))
    assert (
        status == 400
        and headers["X-Proxy-Error"] == "OAUTH_ACCESS_DENIED"
        and "Access was not granted" in html
    )
    assert "status=error" in html and "error=access_denied" in html
    _, view = await svc.admin("GET", f"/admin/tenants/{T}/connections/crm")
    assert view["status"] == "pending"
    authserver.control(deny=False)
    status, _, _ = await browser.get(await browser.sign_in(data["url"]))
    assert status == 200


async def test_delete_revokes_tokens_at_the_provider(
    svc: RunningService, authserver: AuthServer, browser: Browser
) -> None:
    await connected(svc, authserver, browser)
    creds = await svc.services.vault.credentials(T, "crm")
    status, _ = await svc.admin("DELETE", f"/admin/tenants/{T}/connections/crm")
    assert status == 204
    revoked = {(r["token"], r["hint"]) for r in authserver.state()["revoked"]}
    assert revoked == {
        (creds.params["refresh_token"], "refresh_token"),
        (creds.params["access_token"], "access_token"),
    }


async def test_runtime_user_signs_in_with_the_default_connections_app(
    svc: RunningService, authserver: AuthServer, browser: Browser
) -> None:
    await connected(svc, authserver, browser)
    data = await session(svc, runtime_user_id="user-a", default_connection_id="crm")
    user_browser = Browser()
    try:
        status, html, _ = await user_browser.get(await user_browser.sign_in(data["url"]))
    finally:
        await user_browser.close()
    assert status == 200 and "is connected" in html
    cid = data["connection_id"]
    _, view = await svc.admin("GET", f"/admin/tenants/{T}/connections/{cid}")
    assert (view["status"], view["runtime_user_id"], view["default_connection_id"]) == (
        "active",
        "user-a",
        "crm",
    )
    assert "client_id" not in view["parameters"] and view["parameters"]["base_url"] == authserver.url
    user = await svc.services.vault.credentials(T, cid)
    org = await svc.services.vault.credentials(T, "crm")
    assert user.params["access_token"] != org.params["access_token"]
    async with svc.session.get(
        f"{svc.url}/connections/{T}/crm", headers={**svc.admin_headers, "X-Runtime-User-Id": "user-a"}
    ) as r:
        assert (await r.json())["parameters"]["access_token"] == user.params["access_token"]
    key = await svc.mint_key(T)
    assert (await proxy_me(svc, key, "crm", **{"X-Runtime-User-Id": "user-a"}))[0] == 200


async def test_client_credentials_minted_once_for_many_proxied_calls(
    sqlite_svc: RunningService, authserver: AuthServer
) -> None:
    svc = sqlite_svc
    params = {k: v for k, v in authserver.endpoints().items() if k not in ("auth_url", "revocation_url")}
    await svc.put_connection(
        T, "svc", {"integration_id": "http_oauth2_client_credentials", "parameters": params}
    )
    key = await svc.mint_key(T)
    results = await asyncio.gather(*(proxy_me(svc, key, "svc") for _ in range(10)))
    assert [s for s, _ in results] == [200] * 10
    assert authserver.count("client_credentials") == 1


async def test_auth_params_reach_the_provider_and_cannot_override_the_flow(
    sqlite_svc: RunningService, authserver: AuthServer, browser: Browser
) -> None:
    svc = sqlite_svc
    path = f"/admin/tenants/{T}/connections/crm"
    for bad in ({"state": "mine"}, {"redirect_uri": "https://evil.example/cb"}, {"prompt": 1}):
        body = {"integration_id": OAUTH, "parameters": {**authserver.endpoints(), "auth_params": bad}}
        status, data = await svc.admin("PUT", path, json=body)
        assert status == 422 and data["error"] == "VALIDATION_ERROR", data
        assert f"parameters.auth_params.{next(iter(bad))}" in data["fields"]
    assert (await svc.admin("GET", path))[0] == 404  # nothing stored
    # An OpenID provider keeps offline_access only with prompt=consent: now a field of its own.
    extras = {"prompt": "consent", "access_type": "offline"}
    view = await svc.put_connection(
        T, "crm", {"integration_id": OAUTH, "parameters": {**authserver.endpoints(), "auth_params": extras}}
    )
    assert view["parameters"]["auth_params"] == extras  # not a secret: shown as set
    status, data = await svc.admin(
        "PATCH", path, json={"parameters": {"auth_params": {"code_challenge": "x"}}}
    )
    assert status == 422 and "parameters.auth_params.code_challenge" in data["fields"]

    data = await session(svc, connection_id="crm")
    status, _, _ = await browser.get(await browser.sign_in(data["url"]))
    assert status == 200
    sent = authserver.state()["last_authorize"]
    assert sent["prompt"] == "consent" and sent["access_type"] == "offline"
    assert sent["redirect_uri"] == svc.url + "/oauth/callback" and sent["code_challenge_method"] == "S256"


@pytest.mark.parametrize("declared", [True, False])
async def test_callback_naming_another_issuer_is_refused(
    sqlite_svc: RunningService, authserver: AuthServer, browser: Browser, declared: bool
) -> None:
    """RFC 9207 mix-up defence: the answer says another server issued it. Nothing is stored."""
    svc = sqlite_svc
    params = {**authserver.endpoints(), **({"issuer": authserver.url} if declared else {})}
    await svc.put_connection(T, "crm", {"integration_id": OAUTH, "parameters": params})
    authserver.control(iss="https://evil.example")
    data = await session(svc, connection_id="crm")
    callback = await browser.sign_in(data["url"])
    assert parse_qs(urlsplit(callback).query)["iss"] == ["https://evil.example"]
    status, html, headers = await browser.get(callback)
    assert status == 400 and headers["X-Proxy-Error"] == "OAUTH_ISSUER_MISMATCH"
    assert "another authorization server" in html or "not the authorization endpoint" in html
    assert "evil.example" not in html  # the sender's value is not echoed
    assert authserver.count("code_exchanges") == 0
    _, view = await svc.admin("GET", f"/admin/tenants/{T}/connections/crm")
    assert view["status"] == "pending" and "access_token" not in view["parameters"]
    # The link is still good: with the right issuer the same link connects.
    authserver.control(iss="self")
    status, _, _ = await browser.get(await browser.sign_in(data["url"]))
    assert status == 200
    _, view = await svc.admin("GET", f"/admin/tenants/{T}/connections/crm")
    assert view["status"] == "active"


async def test_callback_without_iss_is_refused_when_the_server_always_sends_it(
    sqlite_svc: RunningService, authserver: AuthServer, browser: Browser
) -> None:
    svc = sqlite_svc
    params = {
        **authserver.endpoints(),
        "issuer": authserver.url,
        "authorization_response_iss_parameter_supported": True,
    }
    await svc.put_connection(T, "crm", {"integration_id": OAUTH, "parameters": params})
    data = await session(svc, connection_id="crm")
    callback = await browser.sign_in(data["url"])  # the server is not sending iss (its default)
    assert "iss" not in parse_qs(urlsplit(callback).query)
    status, html, headers = await browser.get(callback)
    assert status == 400 and headers["X-Proxy-Error"] == "OAUTH_ISSUER_MISMATCH" and "no iss" in html
    assert authserver.count("code_exchanges") == 0
    authserver.control(iss="self")
    status, _, _ = await browser.get(await browser.sign_in(data["url"]))
    assert status == 200 and authserver.count("code_exchanges") == 1
