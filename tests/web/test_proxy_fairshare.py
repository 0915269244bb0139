"""Connections of different tenants sharing one upstream budget (one OAuth app, say) under a quota
key: the group never exceeds its budget, and a noisy tenant cannot starve a quiet one."""

from __future__ import annotations

from pathlib import Path

from tests.support.app import bearer, running_service
from tests.support.upstream import Upstream


async def test_quota_group_shares_a_budget_fairly(
    tmp_path: Path, upstream: Upstream, backend: str | None
) -> None:
    async with running_service(tmp_path, backend) as svc:
        keys = {}
        for tenant in ("noisy", "quiet"):
            await svc.put_connection(
                tenant,
                "crm",
                {
                    "integration_id": "http_bearer",
                    "parameters": {"token": f"tok-{tenant}", "base_url": upstream.url},
                    "options": {"quota_key": "crm-app", "quota_rate_limits": [{"limit": 10, "window": "1h"}]},
                },
            )
            keys[tenant] = await svc.mint_key(tenant)

        async def call(tenant: str) -> int:
            headers = {**bearer(keys[tenant]), "X-Connection-Id": "crm"}
            async with svc.session.get(f"{svc.url}/proxy/echo", headers=headers) as r:
                await r.read()
                return r.status

        admitted = {"noisy": 0, "quiet": 0}
        for _ in range(10):
            for tenant in ("noisy", "noisy", "noisy", "quiet"):
                if await call(tenant) == 200:
                    admitted[tenant] += 1
        assert admitted["noisy"] + admitted["quiet"] <= 10
        assert len(upstream.seen) == admitted["noisy"] + admitted["quiet"]
        # Equal weights: the quiet tenant keeps (about) its half although it asked 3x less.
        assert admitted["quiet"] >= 4, admitted
        assert admitted["noisy"] <= 6, admitted

        status, view = await svc.admin("GET", "/admin/tenants/quiet/connections/crm/rate-limits")
        assert status == 200 and view["quota_key"] == "crm-app"


async def test_bad_quota_budget_is_a_422_naming_the_field(tmp_path: Path) -> None:
    async with running_service(tmp_path) as svc:
        status, body = await svc.admin(
            "PUT",
            "/admin/tenants/t/connections/c",
            json={
                "integration_id": "http_bearer",
                "parameters": {"token": "x", "base_url": "https://api.example.com"},
                "options": {"quota_key": "app", "quota_rate_limits": [{"limit": 0, "window": "1m"}]},
            },
        )
        assert status == 422
        assert "options.quota_rate_limits[0]" in body["fields"]
