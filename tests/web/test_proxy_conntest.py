"""POST /admin/tenants/{t}/connections/{c}/test: the integration's test request, through the proxy."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.app import RunningService, free_port, running_service
from tests.support.upstream import Upstream


@pytest.fixture
async def svc(tmp_path: Path) -> AsyncIterator[RunningService]:
    extra = tmp_path / "integrations"
    extra.mkdir()
    (extra / "checked.toml").write_text(
        """
[[integration]]
id = "checked_api"
auth = "api_key"
fields = [
  { name = "api_key", secret = true, required = true },
  { name = "base_url", type = "url", required = true },
]
test = { method = "GET", path = "/echo/check?probe=1" }
"""
    )
    async with running_service(tmp_path / "data", integrations_dirs=[str(extra)]) as s:
        yield s


async def run_test(svc: RunningService, cid: str) -> tuple[int, dict[str, object]]:
    status, data = await svc.admin("POST", f"/admin/tenants/t1/connections/{cid}/test")
    assert isinstance(data, dict)
    return status, data


async def test_integration_test_request_ok(svc: RunningService, upstream: Upstream) -> None:
    await svc.put_connection(
        "t1",
        "c1",
        {"integration_id": "checked_api", "parameters": {"api_key": "k", "base_url": upstream.url}},
    )
    status, data = await run_test(svc, "c1")
    assert status == 200
    assert data["ok"] is True and data["status"] == 200 and data["error"] is None
    assert isinstance(data["latency_ms"], float | int) and data["latency_ms"] >= 0
    seen = upstream.seen[-1]
    assert (seen.method, seen.path, seen.query) == ("GET", "/echo/check", "probe=1")
    assert seen.header("X-API-Key") == ["k"]


async def test_401_marks_error_and_success_clears_it(svc: RunningService, upstream: Upstream) -> None:
    # No test request in http_bearer: GET of the base URL, which fails once with 401.
    await svc.put_connection(
        "t1",
        "c1",
        {
            "integration_id": "http_bearer",
            "parameters": {"token": "t", "base_url": upstream.url + "/flaky/x?fail=1&code=401"},
        },
    )
    status, data = await run_test(svc, "c1")
    assert status == 200
    assert (data["ok"], data["status"], data["error"]) == (False, 401, None)
    _, view = await svc.admin("GET", "/admin/tenants/t1/connections/c1")
    assert view["status"] == "error"
    assert "401" in view["status_detail"]

    status, data = await run_test(svc, "c1")
    assert (data["ok"], data["status"]) == (True, 200)
    _, view = await svc.admin("GET", "/admin/tenants/t1/connections/c1")
    assert view["status"] == "active"
    assert len(upstream.seen) == 2


async def test_unreachable_reports_the_error_code(svc: RunningService) -> None:
    await svc.put_connection(
        "t1",
        "c1",
        {
            "integration_id": "http_bearer",
            "parameters": {"token": "t", "base_url": f"http://127.0.0.1:{free_port()}/"},
        },
    )
    status, data = await run_test(svc, "c1")
    assert status == 200
    assert (data["ok"], data["status"], data["error"]) == (False, None, "UPSTREAM_UNREACHABLE")
    _, view = await svc.admin("GET", "/admin/tenants/t1/connections/c1")
    assert view["status"] == "active"  # not the credentials' fault


async def test_pending_reports_not_authorized(svc: RunningService, upstream: Upstream) -> None:
    await svc.put_connection(
        "t1", "p1", {"integration_id": "http_bearer", "parameters": {"base_url": upstream.url}}
    )
    status, data = await run_test(svc, "p1")
    assert (status, data["ok"], data["error"]) == (200, False, "CONNECTION_NOT_AUTHORIZED")
    assert upstream.seen == []


async def test_admin_only_and_unknown_connection(svc: RunningService, upstream: Upstream) -> None:
    await svc.put_connection(
        "t1", "c1", {"integration_id": "http_bearer", "parameters": {"token": "t", "base_url": upstream.url}}
    )
    key = await svc.mint_key("t1")
    async with svc.session.post(
        svc.url + "/admin/tenants/t1/connections/c1/test", headers={"Authorization": f"Bearer {key}"}
    ) as r:
        assert (r.status, r.headers["X-Proxy-Error"]) == (403, "FORBIDDEN")
    status, data = await run_test(svc, "nope")
    assert (status, data["error"]) == (404, "CONNECTION_NOT_FOUND")
    assert upstream.seen == []
