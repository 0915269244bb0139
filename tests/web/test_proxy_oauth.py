"""OAuth2 connections through the proxy: minted tokens injected, a 401 makes the next call refresh."""

from __future__ import annotations

import pytest

from tests.support.app import RunningService
from tests.support.authserver import (  # noqa: F401 - fixtures
    AuthServer,
    authserver_fixture,
    authserver_process_fixture,
)
from tests.support.upstream import Upstream


@pytest.fixture
def backend() -> None:
    """The embedded store only (``svc`` from tests/web/conftest.py runs on ``backend``)."""
    return None


def hdrs(svc: RunningService) -> dict[str, str]:
    return {**svc.admin_headers, "X-Tenant-Id": "t1", "X-Connection-Id": "cc"}


async def test_client_credentials_token_minted_and_renewed_after_401(
    svc: RunningService, upstream: Upstream, authserver: AuthServer
) -> None:
    params = {
        k: v for k, v in authserver.endpoints().items() if k in ("client_id", "client_secret", "token_url")
    }
    await svc.put_connection(
        "t1",
        "cc",
        {
            "integration_id": "http_oauth2_client_credentials",
            "parameters": {**params, "base_url": upstream.url},
        },
    )
    for _ in range(2):
        async with svc.session.get(svc.url + "/proxy/echo/a", headers=hdrs(svc)) as r:
            assert r.status == 200, await r.text()
    first = [s.header("Authorization") for s in upstream.seen]
    assert first[0] == first[1] and first[0][0].startswith("Bearer ")
    assert authserver.count("client_credentials") == 1  # minted once, then cached

    # The upstream refuses the token: the proxy passes the 401 on and tells the token manager.
    async with svc.session.get(svc.url + "/proxy/status/401", headers=hdrs(svc)) as r:
        assert r.status == 401
    async with svc.session.get(svc.url + "/proxy/echo/b", headers=hdrs(svc)) as r:
        assert r.status == 200
    renewed = upstream.seen[-1].header("Authorization")
    assert renewed != first[0]
    assert authserver.count("client_credentials") == 2
