"""The dev-mode public URL follows where the service listens (a real ``serve`` process)."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from tests.support.app import free_port, start_service_process

pytestmark = pytest.mark.system


def test_connect_links_point_at_the_listen_address_when_no_public_url_is_set(tmp_path: Path) -> None:
    port = free_port()
    # PROXY_LISTEN says one port, --listen another: the flag wins, and the links follow it.
    env = {"PROXY_LISTEN": f"127.0.0.1:{free_port()}", "PROXY_PUBLIC_URL": ""}
    with start_service_process(
        tmp_path / "data", env=env, port=port, args=("--listen", f"127.0.0.1:{port}")
    ) as sp:
        req = urllib.request.Request(
            sp.url + "/admin/tenants/t1/connect-sessions",
            data=json.dumps(
                {"integration_id": "http_bearer", "parameters": {"base_url": "https://api.example.com"}}
            ).encode(),
            headers={**sp.admin_headers, "Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert resp.status == 201
            link = json.load(resp)["url"]
    assert link.startswith(f"http://127.0.0.1:{port}/connect/")
