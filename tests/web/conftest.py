"""The service in-process, for the route tests: ``svc`` runs a test on both back ends, ``sqlite_svc``
on the embedded store only. A module whose service needs other settings or seeded data defines its
own ``svc`` on ``backend`` (the Redis URL of the redis run, ``None`` on the embedded store) and
``running_service``; a module that runs on the embedded store only overrides ``backend`` with
``None``::

    @pytest.fixture
    async def svc(backend: str | None, tmp_path: Path) -> AsyncIterator[RunningService]:
        async with running_service(tmp_path, redis_url=backend, trusted_networks=["127.0.0.1/32"]) as s:
            yield s
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.app import RunningService, running_service


@pytest.fixture(params=["sqlite", "redis"])
def backend(request: pytest.FixtureRequest) -> str | None:
    """The Redis URL (a flushed server) for the redis run, ``None`` for the embedded store."""
    return str(request.getfixturevalue("redis_url")) if request.param == "redis" else None


@pytest.fixture
async def svc(backend: str | None, tmp_path: Path) -> AsyncIterator[RunningService]:
    async with running_service(tmp_path, redis_url=backend) as s:
        yield s


@pytest.fixture
async def sqlite_svc(tmp_path: Path) -> AsyncIterator[RunningService]:
    async with running_service(tmp_path) as s:
        yield s
