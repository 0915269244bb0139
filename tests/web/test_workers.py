"""`serve --workers 2`: two processes on one port behave as one service, metrics included."""

from __future__ import annotations

import re
from pathlib import Path

import aiohttp
import pytest

from proxy.security import crypto
from tests.support.app import bearer, start_service_process

pytestmark = pytest.mark.system


def _counter(text: str, name: str, labels: str) -> float:
    m = re.search(rf"^{name}\{{{labels}\}} ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


async def test_two_workers_share_one_port_and_one_metrics_view(tmp_path: Path, redis_url: str) -> None:
    env = {"PROXY_MASTER_KEY": crypto.generate_master_key_text().strip()}
    with start_service_process(tmp_path / "svc", redis_url=redis_url, env=env, args=("--workers", "2")) as sp:
        # A fresh TCP connection per request, so the kernel spreads them over both workers.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
            body = {
                "integration_id": "http_bearer",
                "parameters": {"token": "t", "base_url": "https://api.example.com"},
            }
            async with s.put(
                f"{sp.url}/admin/tenants/t1/connections/c1", json=body, headers=sp.admin_headers
            ) as r:
                assert r.status == 201
            async with s.post(f"{sp.url}/admin/tenants/t1/api-keys", json={}, headers=sp.admin_headers) as r:
                key = (await r.json())["api_key"]
            for _ in range(40):
                async with s.get(f"{sp.url}/connections/t1/c1", headers=bearer(key)) as r:
                    assert r.status == 200
            # Whichever worker answers a scrape (each on a fresh connection), it reports all 40
            # reads; with per-process registries each scrape would see only its worker's share.
            for _ in range(6):
                async with s.get(f"{sp.url}/metrics") as r:
                    text = await r.text()
                assert _counter(text, "proxy_connection_service_requests_total", 'outcome="ok"') == 40
