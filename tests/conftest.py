"""Suite-wide fixtures: one real redis-server per session, flushed before each test using it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.redis_server import RedisServer


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    if redis_server.proc is None:  # a previous test stopped it
        redis_server.start()
    redis_server.flushall()
    return redis_server.url
