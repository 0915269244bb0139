"""Suite-wide fixtures: one real redis-server per session, flushed before each test using it, a
store fixture that runs a test against both back ends, and a real upstream on a loopback port."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from proxy.store.base import Store
from proxy.store.redis import RedisStore
from proxy.store.sqlite import SqliteStore
from tests.support.redis_server import RedisServer
from tests.support.redis_topologies import RedisClusterSet, SentinelSet
from tests.support.upstream import Upstream, running_upstream


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


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterSet]:
    """A real 3-master Redis Cluster, started once, only by the tests that ask for it."""
    cluster = RedisClusterSet()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def redis_cluster_url(redis_cluster: RedisClusterSet) -> str:
    redis_cluster.flushall()
    return redis_cluster.url


@pytest.fixture(scope="session")
def redis_sentinel() -> Iterator[SentinelSet]:
    """A real master, one replica and three sentinels, started once (no failover: the failover
    tests make their own)."""
    sentinels = SentinelSet(replicas=1)
    try:
        sentinels.start()
        yield sentinels
    finally:
        sentinels.stop()


@pytest.fixture
def redis_sentinel_url(redis_sentinel: SentinelSet) -> str:
    """Through Sentinel, every write confirmed by the replica (wait_replicas=1)."""
    redis_sentinel.flushall()
    return redis_sentinel.url("wait_replicas=1&wait_timeout_ms=2000")


@pytest.fixture(params=["sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """An opened store of each back end (modules that need other options define their own)."""
    s: Store
    if request.param == "redis":
        s = RedisStore(request.getfixturevalue("redis_url"))
    else:
        s = SqliteStore(tmp_path / "store.sqlite3")
    await s.open()
    yield s
    await s.close()


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    """A real upstream on 127.0.0.1 recording what reached it (``tests.support.upstream``)."""
    async with running_upstream() as up:
        yield up
