"""The connect pages in a real headless Chromium: forms, OAuth redirects, iframes, postMessage.

Host pages (the partner's app) are served by small aiohttp apps on other loopback ports, so the
browser really applies CSP ``frame-ancestors`` and ``postMessage`` origin rules across origins.
"""

from __future__ import annotations

import html as htmlmod
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from playwright.async_api import Browser, Frame, Page, async_playwright

from tests.support.app import RunningService
from tests.support.authserver import AuthServer, authserver_fixture, authserver_process_fixture  # noqa: F401

pytestmark = pytest.mark.browser

T = "t1"
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = Path("/tmp/connect-form.png")

HOST_PAGE = """<!doctype html>
<html><head><title>Partner app</title></head>
<body>
<h1>Partner app</h1>
<script>
  window.messages = [];
  window.addEventListener("message", function (e) { window.messages.push({origin: e.origin, data: e.data}); });
</script>
<iframe id="connect" src="{src}" width="480" height="700" title="connect"></iframe>
</body></html>"""


@asynccontextmanager
async def host_app(host: str = "127.0.0.1") -> AsyncIterator[str]:
    """A partner app: /host?src=URL frames URL; /done is the return_url landing page."""

    async def host_page(request: web.Request) -> web.Response:
        src = htmlmod.escape(request.query["src"], quote=True)
        return web.Response(text=HOST_PAGE.replace("{src}", src), content_type="text/html")

    async def done(request: web.Request) -> web.Response:
        return web.Response(text="<h1>Back in the app</h1>", content_type="text/html")

    app = web.Application()
    app.router.add_get("/host", host_page)
    app.router.add_get("/done", done)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


@pytest.fixture
def backend() -> None:
    """The embedded store only (``svc`` from tests/web/conftest.py runs on ``backend``)."""
    return None


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            await b.close()


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    context = await browser.new_context(viewport={"width": 900, "height": 900})
    p = await context.new_page()
    yield p
    await context.close()


async def connect_session(svc: RunningService, **body: Any) -> dict[str, Any]:
    status, data = await svc.admin("POST", f"/admin/tenants/{T}/connect-sessions", json=body)
    assert status == 201, data
    return dict(data)


async def status_of(svc: RunningService, cid: str) -> str:
    status, view = await svc.admin("GET", f"/admin/tenants/{T}/connections/{cid}")
    assert status == 200
    return str(view["status"])


async def test_api_key_form_connects_and_returns_to_the_app(svc: RunningService, page: Page) -> None:
    async with host_app() as app_origin:
        data = await connect_session(
            svc,
            integration_id="http_api_key",
            connection_id="c1",
            return_url=f"{app_origin}/done?from=connect",
            # The operator lets the end user choose the base URL, within bounds: the one
            # destination input this page can have.
            user_settable={"base_url": ["*.example.com"]},
        )
        await page.goto(data["url"])
        assert await page.title() == "Connect HTTP API key"
        assert await page.get_by_label("API key").get_attribute("type") == "password"
        assert await page.get_by_text("Must be under *.example.com.").is_visible()
        assert await page.locator("[name=location]").count() == 0
        # A bad base URL shows the error state; the typed key is not sent back into the page.
        await page.get_by_label("API key").fill("sk-browser-123")
        await page.get_by_label("Base URL").fill("api.example.com")
        await page.get_by_role("button", name="Connect").click()
        await page.wait_for_selector(".alert")
        assert (
            await page.locator("#e-base_url").inner_text()
            == "Base URL must be a full URL starting with https://"
        )
        assert await page.get_by_label("API key").input_value() == ""
        assert await page.get_by_text("please enter it again").is_visible()
        assert await page.get_by_label("Base URL").input_value() == "api.example.com"
        await page.screenshot(path=str(SCREENSHOT), full_page=True)
        await page.get_by_label("Base URL").fill("https://api.example.com/v1")
        assert not await page.locator("#e-base_url").is_visible()
        await page.get_by_label("API key").fill("sk-browser-123")
        await page.get_by_role("button", name="Connect").click()
        await page.wait_for_selector("text=HTTP API key is connected")
        assert "sk-browser-123" not in await page.content()
        assert await status_of(svc, "c1") == "active"
        # The success page takes the user back to the app with the outcome.
        await page.wait_for_url(f"{app_origin}/done?**", timeout=10_000)
        assert "connection_id=c1" in page.url and "status=active" in page.url and "from=connect" in page.url
        _, view = await svc.admin("GET", f"/admin/tenants/{T}/connections/c1")
        assert view["allowed_hosts"] == ["api.example.com"]  # the chosen host binds the connection


async def test_oauth_button_goes_through_the_provider(
    svc: RunningService, page: Page, authserver: AuthServer
) -> None:
    await svc.put_connection(
        T, "crm", {"integration_id": "http_oauth2_authorization_code", "parameters": authserver.endpoints()}
    )
    data = await connect_session(svc, integration_id="http_oauth2_authorization_code", connection_id="crm")
    await page.goto(data["url"])
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    await page.get_by_role("link", name="Connect with OAuth 2.0 (authorization code)").click()
    await page.wait_for_selector("text=is connected")
    assert any(u.startswith(authserver.url + "/authorize?") for u in requests)
    assert page.url.startswith(svc.url + "/oauth/callback?")
    assert await status_of(svc, "crm") == "active"
    assert authserver.count("code_exchanges") == 1


async def _frame(page: Page) -> Frame:
    handle = await page.wait_for_selector("iframe#connect")
    frame = await handle.content_frame()
    assert frame is not None
    await frame.wait_for_load_state()
    return frame


async def test_iframe_on_allowed_origin_gets_the_message(svc: RunningService, page: Page) -> None:
    async with host_app() as app_origin:
        data = await connect_session(
            svc,
            integration_id="http_bearer",
            connection_id="c1",
            allowed_origins=[app_origin],
            parameters={"base_url": "https://api.example.com"},
        )
        await page.goto(f"{app_origin}/host?src={data['url']}")
        frame = await _frame(page)
        # The operator's destination is shown, not asked for.
        assert (
            await frame.locator("#destination").inner_text()
            == "Your credentials will be sent to api.example.com only."
        )
        assert await frame.locator("input[name=base_url]").count() == 0
        await frame.get_by_label("Token").fill("tok-in-frame")
        await frame.get_by_role("button", name="Connect").click()
        await page.wait_for_function("window.messages.length > 0", timeout=10_000)
        messages = await page.evaluate("window.messages")
        assert messages == [
            {
                "origin": svc.url,
                "data": {"type": "connection-proxy:connected", "connectionId": "c1", "status": "active"},
            }
        ]
        assert await status_of(svc, "c1") == "active"
        assert page.url.startswith(app_origin)  # framed: the app stays where it is


async def test_iframe_on_other_origin_is_blocked(svc: RunningService, page: Page) -> None:
    async with host_app() as allowed, host_app("localhost") as other:
        data = await connect_session(
            svc,
            integration_id="http_bearer",
            connection_id="c1",
            allowed_origins=[allowed],
            parameters={"base_url": "https://api.example.com"},
        )
        console: list[str] = []
        page.on("console", lambda m: console.append(m.text))
        await page.goto(f"{other}/host?src={data['url']}")
        frame = await _frame(page)
        await page.wait_for_timeout(300)
        assert await frame.locator("input[name=token]").count() == 0
        assert await frame.locator("form").count() == 0
        assert any("frame-ancestors" in text for text in console), console
        # Same link, allowed origin: the form is there (the block above is the CSP, not a broken page).
        await page.goto(f"{allowed}/host?src={data['url']}")
        frame = await _frame(page)
        assert await frame.locator("input[name=token]").count() == 1


async def test_oauth_in_iframe_uses_a_popup_and_notifies_the_app(
    svc: RunningService, page: Page, authserver: AuthServer
) -> None:
    await svc.put_connection(
        T, "crm", {"integration_id": "http_oauth2_authorization_code", "parameters": authserver.endpoints()}
    )
    async with host_app() as app_origin:
        data = await connect_session(
            svc,
            integration_id="http_oauth2_authorization_code",
            connection_id="crm",
            allowed_origins=[app_origin],
        )
        await page.goto(f"{app_origin}/host?src={data['url']}")
        frame = await _frame(page)
        async with page.context.expect_page() as popup_info:
            await frame.get_by_role("link", name="Connect with OAuth 2.0 (authorization code)").click()
        popup = await popup_info.value
        await popup.wait_for_load_state()
        await page.wait_for_function("window.messages.length > 0", timeout=15_000)
        messages = await page.evaluate("window.messages")
        assert messages[0] == {
            "origin": svc.url,
            "data": {"type": "connection-proxy:connected", "connectionId": "crm", "status": "active"},
        }
        assert await frame.locator("#done").is_visible()
        assert await status_of(svc, "crm") == "active"
