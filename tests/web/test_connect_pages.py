"""Connect sessions and the form pages over real sockets (the service as built by build_app)."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from multidict import CIMultiDictProxy

from proxy.connect import sessions
from tests.support.app import RunningService, bearer

T = "t1"
ORIGIN = "https://app.example.com"
SESSIONS = f"/admin/tenants/{T}/connect-sessions"


API = "https://api.example.com"


async def new_session(svc: RunningService, **body: Any) -> dict[str, Any]:
    """A session; an http_api_key one gets the operator's base URL unless the test says otherwise
    (end users never choose where credentials go)."""
    body = {"integration_id": "http_api_key", **body}
    if body["integration_id"] == "http_api_key" and not {"parameters", "default_connection_id"} & set(body):
        body["parameters"] = {"base_url": API}
    status, data = await svc.admin("POST", SESSIONS, json=body)
    assert status == 201, data
    return dict(data)


async def get(svc: RunningService, url: str, **kw: Any) -> tuple[int, str, CIMultiDictProxy[str]]:
    async with svc.session.get(url, **kw) as r:
        return r.status, await r.text(), r.headers


async def post_form(
    svc: RunningService, url: str, form: dict[str, str], **kw: Any
) -> tuple[int, str, CIMultiDictProxy[str]]:
    async with svc.session.post(url, data=form, **kw) as r:
        return r.status, await r.text(), r.headers


def csrf_of(html: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', html)
    assert m, "the form has no CSRF field"
    return m.group(1)


async def open_form(svc: RunningService, url: str) -> str:
    status, html, _ = await get(svc, url)
    assert status == 200
    return csrf_of(html)


# --- creating sessions ---------------------------------------------------------------------------


async def test_create_session_answers_token_url_and_expiry(svc: RunningService) -> None:
    before = time.time()
    data = await new_session(svc, connection_id="c1", return_url="https://app.example.com/back")
    assert set(data) >= {"token", "url", "expires_at"}
    assert data["url"] == f"{svc.url}/connect/{data['token']}"
    assert (
        before + svc.settings.connect_session_ttl_s - 5
        <= data["expires_at"]
        <= time.time() + svc.settings.connect_session_ttl_s + 1
    )
    assert data["connection_id"] == "c1"
    # The store keeps no usable link: only the session id and a hash of the secret.
    raw = await svc.services.store.get_ephemeral(sessions.SESSION_NAMESPACE, data["session_id"])
    assert raw is not None and data["token"].split(".")[1] not in str(raw)


async def test_create_session_generates_ids(svc: RunningService) -> None:
    a, b = await new_session(svc), await new_session(svc)
    assert a["connection_id"].startswith("http_api_key-") and a["connection_id"] != b["connection_id"]


async def test_create_session_needs_admin(svc: RunningService) -> None:
    async with svc.session.post(svc.url + SESSIONS, json={"integration_id": "http_api_key"}) as r:
        assert r.status == 401 and r.headers["X-Proxy-Error"] == "UNAUTHENTICATED"
    key = await svc.mint_key(T)
    async with svc.session.post(
        svc.url + SESSIONS, json={"integration_id": "http_api_key"}, headers=bearer(key)
    ) as r:
        assert r.status == 403


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "integration_id"),
        ({"integration_id": "nope"}, "integration_id"),
        ({"integration_id": "http_api_key", "return_url": "javascript:alert(1)"}, "return_url"),
        ({"integration_id": "http_api_key", "allowed_origins": "https://a.example"}, "allowed_origins"),
        (
            {"integration_id": "http_api_key", "allowed_origins": ["https://a.example/path"]},
            "allowed_origins[0]",
        ),
        ({"integration_id": "http_api_key", "runtime_user_id": "u1"}, "default_connection_id"),
        (
            # The operator gives the destination, so what is missing is the OAuth app itself.
            {
                "integration_id": "http_oauth2_authorization_code",
                "parameters": {"base_url": "https://api.example.com"},
            },
            "oauth2",
        ),
    ],
)
async def test_create_session_validation(
    sqlite_svc: RunningService, body: dict[str, Any], field: str
) -> None:
    status, data = await sqlite_svc.admin("POST", SESSIONS, json=body)
    assert status == 422 and data["error"] == "VALIDATION_ERROR"
    assert field in data["fields"], data


async def test_runtime_user_session_prechecks_default_connection(svc: RunningService) -> None:
    body = {"runtime_user_id": "user-a", "default_connection_id": "dflt"}
    status, data = await svc.admin("POST", SESSIONS, json={"integration_id": "http_api_key", **body})
    assert status == 422 and "does not exist" in data["fields"]["default_connection_id"]
    await svc.put_connection(
        T, "dflt", {"integration_id": "http_api_key", "parameters": {"base_url": "https://api.example.com"}}
    )
    status, data = await svc.admin("POST", SESSIONS, json={"integration_id": "http_api_key", **body})
    assert status == 422 and "is pending" in data["fields"]["default_connection_id"]
    await svc.put_connection(
        T,
        "dflt",
        {
            "integration_id": "http_api_key",
            "parameters": {"base_url": "https://api.example.com", "api_key": "k"},
        },
    )
    status, data = await svc.admin("POST", SESSIONS, json={"integration_id": "http_bearer", **body})
    assert status == 422 and "http_api_key" in data["fields"]["default_connection_id"]
    data = await new_session(svc, **body)
    assert data["connection_id"] == "http_api_key-user-a"


# --- the page ------------------------------------------------------------------------------------


async def test_page_headers_limit_framing_to_allowed_origins(svc: RunningService) -> None:
    data = await new_session(svc, allowed_origins=[ORIGIN, "http://localhost:3000"])
    status, html, headers = await get(svc, data["url"])
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    csp = headers["Content-Security-Policy"]
    assert "frame-ancestors https://app.example.com http://localhost:3000" in csp
    assert "X-Frame-Options" not in headers
    assert headers["Referrer-Policy"] == "no-referrer" and headers["Cache-Control"] == "no-store"
    nonce = re.search(r"'nonce-([^']+)'", csp)
    assert nonce and f'nonce="{nonce.group(1)}"' in html
    assert 'type="password" name="api_key"' in html and "Connect HTTP API key" in html
    # Where the key goes is the operator's: shown, not an input.
    assert 'name="base_url"' not in html and 'name="location"' not in html
    assert "Your credentials will be sent to <strong>api.example.com</strong> only." in html

    bare = await new_session(svc)
    _, _, headers = await get(svc, bare["url"])
    assert (
        "frame-ancestors 'none'" in headers["Content-Security-Policy"]
        and headers["X-Frame-Options"] == "DENY"
    )


@pytest.mark.parametrize("token", ["garbage", "a" * 16 + "." + "b" * 43])
async def test_unknown_link_is_a_friendly_html_404(sqlite_svc: RunningService, token: str) -> None:
    status, html, headers = await get(sqlite_svc, f"{sqlite_svc.url}/connect/{token}")
    assert status == 404 and headers["Content-Type"].startswith("text/html")
    assert headers["X-Proxy-Error"] == "CONNECT_LINK_UNKNOWN" and "This link is not valid" in html


async def test_wrong_secret_for_a_real_session_is_unknown(sqlite_svc: RunningService) -> None:
    data = await new_session(sqlite_svc)
    forged = data["session_id"] + "." + "x" * 43
    status, _, _ = await get(sqlite_svc, f"{sqlite_svc.url}/connect/{forged}")
    assert status == 404


async def test_expired_link_is_410(sqlite_svc: RunningService) -> None:
    data = await new_session(sqlite_svc, return_url="https://app.example.com/back")
    store = sqlite_svc.services.store
    raw = await store.get_ephemeral(sessions.SESSION_NAMESPACE, data["session_id"])
    assert raw is not None
    await store.put_ephemeral(
        sessions.SESSION_NAMESPACE, data["session_id"], {**raw, "expires_at": time.time() - 1}, 60
    )
    status, html, headers = await get(sqlite_svc, data["url"])
    assert status == 410 and headers["X-Proxy-Error"] == "CONNECT_LINK_EXPIRED"
    assert "status=error" in html  # the way back to the application is still offered


# --- submitting ----------------------------------------------------------------------------------


async def test_form_submit_creates_active_connection_and_consumes_link(svc: RunningService) -> None:
    data = await new_session(
        svc, connection_id="c1", return_url="https://app.example.com/back?x=1", allowed_origins=[ORIGIN]
    )
    csrf = await open_form(svc, data["url"])
    # Destination fields posted by the link holder are ignored: the operator's preset wins.
    form = {
        "csrf": csrf,
        "api_key": "sk-live-9f8e7d",
        "base_url": "https://evil.example/v2",
        "location": "query",
    }
    status, html, headers = await post_form(svc, data["url"], form, headers={"Origin": svc.url})
    assert status == 200 and "HTTP API key is connected" in html
    assert "sk-live-9f8e7d" not in html
    assert "frame-ancestors https://app.example.com" in headers["Content-Security-Policy"]
    back = re.search(r'id="back" href="([^"]+)"', html)
    assert back is not None
    q = parse_qs(urlsplit(back.group(1).replace("&amp;", "&")).query)
    assert q == {"x": ["1"], "connection_id": ["c1"], "status": ["active"]}
    assert '"connection-proxy:connected"' in html and '"https://app.example.com"' in html

    status, view = await svc.admin("GET", f"/admin/tenants/{T}/connections/c1")
    assert status == 200 and view["status"] == "active"
    assert view["parameters"]["api_key"] == "********" and view["parameters"]["base_url"] == API
    assert "location" not in view["parameters"]  # the default (header) applies, not the posted "query"
    creds = await svc.services.vault.credentials(T, "c1")
    assert creds.params["api_key"] == "sk-live-9f8e7d"

    status, html, headers = await get(svc, data["url"])
    assert status == 410 and headers["X-Proxy-Error"] == "CONNECT_LINK_USED"
    status, _, _ = await post_form(svc, data["url"], form)
    assert status == 410


async def test_validation_errors_rerender_without_echoing_secrets(sqlite_svc: RunningService) -> None:
    svc = sqlite_svc
    # A base URL the operator lets the end user choose (within bounds) is a form input.
    data = await new_session(
        svc, connection_id="c1", parameters={}, user_settable={"base_url": ["*.example.com"]}
    )
    csrf = await open_form(svc, data["url"])
    form = {
        "csrf": csrf,
        "api_key": "sk-secret-do-not-echo",
        "base_url": "ftp://files.example.com",
    }
    status, html, headers = await post_form(svc, data["url"], form)
    assert status == 422 and headers["X-Proxy-Error"] == "VALIDATION_ERROR"
    assert "sk-secret-do-not-echo" not in html
    assert 'value="ftp://files.example.com"' in html  # non-secret input is kept for correction
    assert "Base URL must be a full URL starting with https://" in html
    assert "Please correct the highlighted fields" in html
    status, html, _ = await post_form(
        svc, data["url"], {**form, "base_url": "https://files.elsewhere.example"}
    )
    assert status == 422 and "Base URL must be a host under *.example.com" in html
    assert "sk-secret-do-not-echo" not in html
    status, html, _ = await post_form(svc, data["url"], {"csrf": csrf, "base_url": "https://api.example.com"})
    assert status == 422 and "API key is required" in html
    # The link still works after validation errors; the chosen host binds the connection.
    status, _, _ = await post_form(
        svc, data["url"], {"csrf": csrf, "api_key": "k", "base_url": "https://api.example.com"}
    )
    assert status == 200
    _, view = await svc.admin("GET", f"/admin/tenants/{T}/connections/c1")
    assert view["parameters"]["base_url"] == "https://api.example.com"
    assert view["allowed_hosts"] == ["api.example.com"]


async def test_csrf_and_origin_are_enforced(sqlite_svc: RunningService) -> None:
    svc = sqlite_svc
    data, other = await new_session(svc), await new_session(svc)
    good = {"api_key": "k"}
    status, html, headers = await post_form(svc, data["url"], good)
    assert status == 403 and headers["X-Proxy-Error"] == "FORBIDDEN" and "Reload the page" in html
    other_csrf = await open_form(svc, other["url"])
    status, _, _ = await post_form(svc, data["url"], {**good, "csrf": other_csrf})
    assert status == 403
    csrf = await open_form(svc, data["url"])
    status, _, _ = await post_form(
        svc, data["url"], {**good, "csrf": csrf}, headers={"Origin": "https://evil.example"}
    )
    assert status == 403
    status, _, _ = await post_form(
        svc, data["url"], {**good, "csrf": csrf}, headers={"Sec-Fetch-Site": "cross-site"}
    )
    assert status == 403
    status, _, _ = await post_form(
        svc, data["url"], {**good, "csrf": csrf}, headers={"Sec-Fetch-Site": "same-site"}
    )
    assert status == 403
    status, _, _ = await post_form(svc, data["url"], {**good, "csrf": csrf})
    assert status == 200


async def test_admin_shell_is_filled_in(svc: RunningService) -> None:
    await svc.put_connection(
        T,
        "shell",
        {
            "integration_id": "http_basic",
            "parameters": {"base_url": "https://erp.example.com"},
            "metadata": {"team": "ops"},
        },
    )
    # The shell's base URL is the destination: shown, not an input.
    data = await new_session(svc, integration_id="http_basic", connection_id="shell")
    status, html, _ = await get(svc, data["url"])
    assert 'name="base_url"' not in html
    assert "Your credentials will be sent to <strong>erp.example.com</strong> only." in html
    form = {"csrf": csrf_of(html), "username": "alice", "password": "pw-1"}
    status, html, _ = await post_form(svc, data["url"], form)
    assert status == 200
    _, view = await svc.admin("GET", f"/admin/tenants/{T}/connections/shell")
    assert view["status"] == "active" and view["metadata"] == {"team": "ops"}
    assert view["parameters"]["username"] == "alice"
    assert view["parameters"]["base_url"] == "https://erp.example.com"

    # Reconnecting: a stored secret may be left blank and is kept.
    again = await new_session(svc, integration_id="http_basic", connection_id="shell")
    status, html, _ = await get(svc, again["url"])
    assert "leave blank to keep it" in html and "pw-1" not in html
    form = {"csrf": csrf_of(html), "username": "bob", "password": ""}
    status, _, _ = await post_form(svc, again["url"], form)
    assert status == 200
    creds = await svc.services.vault.credentials(T, "shell")
    assert (creds.params["username"], creds.params["password"]) == ("bob", "pw-1")


async def test_runtime_user_connection_through_the_form(svc: RunningService) -> None:
    await svc.put_connection(
        T,
        "crm",
        {
            "integration_id": "http_bearer",
            "parameters": {"token": "org-token", "base_url": "https://crm.example.com"},
        },
    )
    data = await new_session(
        svc, integration_id="http_bearer", runtime_user_id="user-a", default_connection_id="crm"
    )
    status, html, _ = await get(svc, data["url"])
    # The destination is the default connection's: shown, not an input.
    assert 'name="base_url"' not in html
    assert "Your credentials will be sent to <strong>crm.example.com</strong> only." in html
    status, _, _ = await post_form(
        svc,
        data["url"],
        {"csrf": csrf_of(html), "token": "user-a-token", "base_url": "https://evil.example"},
    )
    assert status == 200
    _, view = await svc.admin("GET", f"/admin/tenants/{T}/connections/{data['connection_id']}")
    assert view["parameters"]["base_url"] == "https://crm.example.com"  # the posted one is ignored
    assert (view["runtime_user_id"], view["default_connection_id"], view["status"]) == (
        "user-a",
        "crm",
        "active",
    )
    # A new session for the same user reconnects the same connection.
    again = await new_session(
        svc, integration_id="http_bearer", runtime_user_id="user-a", default_connection_id="crm"
    )
    assert again["connection_id"] == data["connection_id"]
    status, body = await svc.admin(
        "POST",
        SESSIONS,
        json={
            "integration_id": "http_bearer",
            "runtime_user_id": "user-a",
            "default_connection_id": "crm",
            "connection_id": "other",
        },
    )
    assert status == 422 and "already has connection" in body["fields"]["connection_id"]


async def test_connect_events_are_audited(sqlite_svc: RunningService) -> None:
    svc = sqlite_svc
    data = await new_session(
        svc, connection_id="c1", parameters={}, user_settable={"base_url": ["*.example.com"]}
    )
    csrf = await open_form(svc, data["url"])
    await post_form(
        svc, data["url"], {"csrf": csrf, "api_key": "sk-audit-canary", "base_url": "https://evil.example"}
    )
    await post_form(
        svc, data["url"], {"csrf": csrf, "api_key": "sk-audit-canary", "base_url": "https://api.example.com"}
    )
    await svc.flush_audit()
    status, body = await svc.admin("GET", f"/admin/tenants/{T}/audit?connection_id=c1")
    assert status == 200
    events = [(e["action"], e["outcome"]) for e in reversed(body["items"])]
    assert events == [
        ("connect_session.create", "ok"),
        ("connect.submit", "invalid"),
        ("connect.complete", "ok"),
    ]
    assert "sk-audit-canary" not in str(body) and "evil.example" not in str(body)
    assert body["items"][0]["actor"] == f"connect:{data['session_id']}"


async def test_status_endpoint(sqlite_svc: RunningService) -> None:
    svc = sqlite_svc
    data = await new_session(svc, connection_id="c1")
    async with svc.session.get(data["url"] + "/status") as r:
        assert r.status == 200 and (await r.json()) == {"status": "pending", "connection_id": None}
    csrf = await open_form(svc, data["url"])
    await post_form(svc, data["url"], {"csrf": csrf, "api_key": "k"})
    async with svc.session.get(data["url"] + "/status") as r:
        assert (await r.json()) == {"status": "connected", "connection_id": "c1"}
    async with svc.session.get(f"{svc.url}/connect/{data['session_id']}.{'y' * 43}/status") as r:
        assert r.status == 404


async def test_double_submit_connects_once(sqlite_svc: RunningService) -> None:
    svc = sqlite_svc
    data = await new_session(svc, connection_id="c1")
    csrf = await open_form(svc, data["url"])
    form = {"csrf": csrf, "api_key": "k"}
    results = await asyncio.gather(*(post_form(svc, data["url"], form) for _ in range(5)))
    assert sorted(r[0] for r in results) == [200, 410, 410, 410, 410]
