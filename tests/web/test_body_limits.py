"""A 413 says how large a body may be and which setting changes that (``max_request_body_bytes``
for the bodies the service reads whole, ``envelope_max_request_bytes`` for Runtara's envelope)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.app import RunningService, running_service


@pytest.fixture
async def small(tmp_path: Path) -> AsyncIterator[RunningService]:
    async with running_service(
        tmp_path,
        max_request_body_bytes=2048,
        envelope_max_request_bytes=1024,
        trusted_networks=["127.0.0.1/32"],
    ) as s:
        yield s


async def test_an_admin_body_over_the_limit_names_the_limit_and_the_setting(small: RunningService) -> None:
    body = b'{"integration_id": "http_bearer", "metadata": {"x": "' + b"a" * 4096 + b'"}}'
    async with small.session.put(
        small.url + "/admin/tenants/t1/connections/c1",
        data=body,
        headers={**small.admin_headers, "Content-Type": "application/json"},
    ) as r:
        assert r.status == 413
        assert r.headers["X-Proxy-Error"] == "PAYLOAD_TOO_LARGE"
        message = (await r.json())["message"]
    assert "2048 bytes" in message
    assert "max_request_body_bytes" in message and "PROXY_MAX_REQUEST_BODY_BYTES" in message


async def test_an_envelope_over_the_limit_names_the_limit_and_the_setting(small: RunningService) -> None:
    # 1024 bytes of body travel as at most 1024 * 4 // 3 + 1 MiB bytes of envelope.
    cap = 1024 * 4 // 3 + 1024 * 1024
    async with small.session.post(
        small.url + "/api/internal/proxy", data=b"x" * (cap + 10), headers={"X-Org-Id": "t1"}
    ) as r:
        assert r.status == 413
        assert r.headers["X-Proxy-Error"] == "PAYLOAD_TOO_LARGE"
        message = (await r.json())["message"]
    assert f"{cap} bytes" in message and "at most 1024 bytes" in message
    assert "envelope_max_request_bytes" in message and "PROXY_ENVELOPE_MAX_REQUEST_BYTES" in message
