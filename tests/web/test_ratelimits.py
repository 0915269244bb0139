"""Rate-limit state as a resource: caller reports merge like the proxy's own observations, the
Connection Service's rate_limit reflects them, and the admin view shows windows and policies."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.support.app import bearer, running_service

CONN = {
    "integration_id": "sftp",
    "parameters": {"host": "sftp.example.com", "username": "u", "password": "pw"},
    "rate_limits": [{"limit": 5, "window": "1m"}],
}


async def test_reported_429_blocks_the_connection_everywhere(tmp_path: Path, backend: str | None) -> None:
    async with running_service(tmp_path, backend) as svc:
        await svc.put_connection("t1", "files", CONN)
        key = await svc.mint_key("t1")
        url = f"{svc.url}/connections/t1/files"
        async with svc.session.get(url, headers=bearer(key)) as r:
            assert r.status == 200
            assert (await r.json())["rate_limit"]["is_limited"] is False

        report = {"status": 429, "headers": {"Retry-After": "30"}}
        async with svc.session.post(url + "/observations", json=report, headers=bearer(key)) as r:
            body = await r.json()
            assert r.status == 202, body
            assert body["accepted"] is True and "retry-after" in body["styles"]
            assert body["rate_limit"]["is_limited"] is True
            assert 28_000 <= body["rate_limit"]["retry_after_ms"] <= 30_000

        async with svc.session.get(url, headers=bearer(key)) as r:
            state = (await r.json())["rate_limit"]
        assert state["is_limited"] is True
        assert state["reset_at"] >= int(time.time()) + 28

        status, view = await svc.admin("GET", "/admin/tenants/t1/connections/files/rate-limits")
        assert status == 200
        assert view["scope"] == "t1/files" and view["rate_limit"]["is_limited"] is True
        assert view["windows"][0]["limit"] == 5

        status, _ = await svc.admin("DELETE", "/admin/tenants/t1/connections/files/rate-limits")
        assert status == 204
        async with svc.session.get(url, headers=bearer(key)) as r:
            assert (await r.json())["rate_limit"]["is_limited"] is False


async def test_reported_headers_teach_remaining(tmp_path: Path) -> None:
    async with running_service(tmp_path) as svc:
        await svc.put_connection("t1", "files", CONN)
        key = await svc.mint_key("t1")
        url = f"{svc.url}/connections/t1/files/observations"
        reset = int(time.time()) + 60
        report = {
            "status": 200,
            "headers": [
                ["X-RateLimit-Limit", "100"],
                ["X-RateLimit-Remaining", "0"],
                ["X-RateLimit-Reset", str(reset)],
            ],
        }
        async with svc.session.post(url, json=report, headers=bearer(key)) as r:
            body = await r.json()
        assert r.status == 202 and body["policies"] == 1
        assert body["rate_limit"]["is_limited"] is True


@pytest.mark.parametrize(
    ("report", "field"),
    [
        ({"status": "429"}, "status"),
        ({"status": 99}, "status"),
        ({"status": 429, "headers": "Retry-After: 1"}, "headers"),
        ({"status": 429, "headers": [["Retry-After"]]}, "headers"),
        ({"status": 429, "observed_at": 1}, "observed_at"),
        ({"status": 429, "colour": "red"}, "colour"),
    ],
)
async def test_bad_reports_are_422_with_the_field(
    tmp_path: Path, report: dict[str, object], field: str
) -> None:
    async with running_service(tmp_path) as svc:
        await svc.put_connection("t1", "files", CONN)
        key = await svc.mint_key("t1")
        async with svc.session.post(
            f"{svc.url}/connections/t1/files/observations", json=report, headers=bearer(key)
        ) as r:
            body = await r.json()
        assert r.status == 422 and r.headers["X-Proxy-Error"] == "VALIDATION_ERROR"
        assert field in body["fields"]


async def test_reports_are_tenant_isolated_and_admin_view_is_admin_only(tmp_path: Path) -> None:
    async with running_service(tmp_path) as svc:
        await svc.put_connection("t1", "files", CONN)
        other = await svc.mint_key("t2")
        async with svc.session.post(
            f"{svc.url}/connections/t1/files/observations", json={"status": 429}, headers=bearer(other)
        ) as r:
            assert r.status == 404 and r.headers["X-Proxy-Error"] == "CONNECTION_NOT_FOUND"
        async with svc.session.get(
            f"{svc.url}/admin/tenants/t1/connections/files/rate-limits", headers=bearer(other)
        ) as r:
            assert r.status == 403
        async with svc.session.post(
            f"{svc.url}/connections/t1/files/observations", json={"status": 429}
        ) as r:
            assert r.status == 401
