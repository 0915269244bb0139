"""How the store and the limiter talk to Redis when connections die under them.

After a Redis restart, pooled connections that saw no FIN (a restarted container, a dropped
NAT entry) look alive until a command is written to them; that command then fails although
Redis is up again. Two defences, shared by both clients:

- ``health_check_interval``: a connection idle for longer than ``HEALTH_CHECK_S`` is PINGed
  before it carries a command. A failed PING is always retried on a fresh connection: nothing of
  the caller's command was sent yet.
- one retry, on a fresh connection, of a command that fails with ``ConnectionError``, but only
  inside ``retry_safe()``: reads, and writes whose repeat cannot change the outcome (an HSET of
  the same value, a compare-and-set, a monotonic merge). A command that may have run before
  its reply was lost (appending audit events, consuming rate-limit quota) is never repeated.

Timeouts are never retried, so every call stays bounded by its configured timeout (a retry adds
at most one reconnect, itself bounded by the connect timeout).

``connect()`` builds the client ``PROXY_REDIS_URL`` names (``proxy.redisurl``): one
server, a Cluster (``RedisCluster``: it follows MOVED/ASK itself; its own topology retry runs
only inside ``retry_safe()``, by the rule above, and then may repeat a timed-out read once), or a
Sentinel-monitored master (``Sentinel.master_for``: the master is asked of the sentinels on every
new connection, and a connection that meets a demoted master (READONLY) is dropped).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Final, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError

from proxy.redisurl import RedisTarget, parse_redis_url

T = TypeVar("T")

HEALTH_CHECK_S: Final = 5.0
# Everything a Redis client raises when Redis is unreachable or refuses: redis-py's Cluster
# errors (no reachable node, slot not covered) are not RedisErrors, so they are named here, once,
# and every caller maps the lot to StoreUnavailable / the limiter's fail mode.
REDIS_FAILURES: Final = (RedisError, RedisClusterException, OSError)
_RETRY_SAFE: contextvars.ContextVar[bool] = contextvars.ContextVar("redis_retry_safe", default=False)
# redis-py runs its pre-use PING through the connection's Retry with this failure callback; the
# name is pinned by tests/store/test_redis_reconnect.py (a stale idle connection must not fail a
# non-idempotent command).
_HEALTH_CHECK_FAILED: Final = "_ping_failed"


@contextlib.contextmanager
def retry_safe() -> Iterator[None]:
    """Marks the commands sent inside as safe to repeat once on a fresh connection."""
    token = _RETRY_SAFE.set(True)
    try:
        yield
    finally:
        _RETRY_SAFE.reset(token)


class FreshConnectionRetry(Retry):
    """One retry after a ConnectionError, for health-check PINGs and ``retry_safe()`` commands."""

    def __init__(self) -> None:
        super().__init__(NoBackoff(), 1, (RedisConnectionError,))

    async def call_with_retry(
        self,
        do: Callable[[], Awaitable[T]],
        fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> T:
        safe = _RETRY_SAFE.get() or getattr(fail, "__name__", "") == _HEALTH_CHECK_FAILED

        def retryable(error: Exception) -> bool:
            return safe and (is_retryable is None or is_retryable(error))

        return await super().call_with_retry(do, fail, retryable, with_failure_count)


def client_options(timeout_s: float) -> dict[str, Any]:
    """Connection options both clients use (see the module docstring)."""
    return {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "socket_keepalive": True,
        "health_check_interval": HEALTH_CHECK_S,
        "retry": FreshConnectionRetry(),
    }


class ClusterRetry(Retry):
    """RedisCluster's own retry (re-learn the topology, run again) only for ``retry_safe()``
    commands: a limiter acquire or an audit append that timed out may have run already."""

    def __init__(self) -> None:
        super().__init__(NoBackoff(), 1)

    def get_retries(self) -> int:
        return 1 if _RETRY_SAFE.get() else 0


def connect(
    url: str | RedisTarget,
    *,
    timeout_s: float,
    decode_responses: bool = False,
    connect_func: Callable[[Any], Awaitable[None]] | None = None,
) -> Any:
    """The redis-py client for ``url`` (untyped: three client classes, one command surface).
    ``connect_func`` runs on each new connection to one server or a Sentinel master; a Cluster
    ignores it (its nodes hold different keys, so a per-connection check of one key cannot run
    on every node). Close it with ``aclose_client``."""
    target = url if isinstance(url, RedisTarget) else parse_redis_url(url)
    options: dict[str, Any] = {**client_options(timeout_s), "decode_responses": decode_responses}
    if target.kind == "single":
        if connect_func is not None:
            options["redis_connect_func"] = connect_func
        return aioredis.Redis.from_url(target.url, **options)
    auth: dict[str, Any] = {"username": target.username, "password": target.password}
    tls: dict[str, Any] = dict(target.tls_options)
    if target.tls:
        tls["ssl"] = True
    if target.kind == "cluster":
        options["retry"] = ClusterRetry()
        return RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
            require_full_coverage=True,
            **auth,
            **tls,
            **options,
        )
    sentinel_options: dict[str, Any] = {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "username": target.sentinel_username,
        "password": target.sentinel_password,
        **tls,
    }
    if connect_func is not None:
        options["redis_connect_func"] = connect_func
    sentinel = Sentinel(list(target.nodes), sentinel_kwargs=sentinel_options)  # type: ignore[no-untyped-call]
    client = sentinel.master_for(str(target.service), db=target.db, **auth, **tls, **options)
    client.cp_sentinel = sentinel  # closed with the client (aclose_client)
    return client


async def warm(client: Any) -> None:
    """Learns a Cluster's topology before the first commands: commands started concurrently on a
    cold ``RedisCluster`` can fail with a closed connection while it replaces its startup nodes
    (seen with redis-py 8.1). Cheap once done; a no-op for the other clients."""
    if isinstance(client, RedisCluster):
        await client.initialize()


def is_sentinel(client: Any) -> bool:
    """Whether ``client`` reaches its master through Sentinel (``follow_master`` does something)."""
    return isinstance(getattr(client, "connection_pool", None), SentinelConnectionPool)


async def follow_master(client: Any) -> bool:
    """For a Sentinel client: asks the sentinels where the master is; when it moved, drops every
    connection, in use or idle, so none keeps writing to the demoted one (Sentinel turns the old
    master into a replica only seconds after the failover, and until then it accepts writes that
    are lost). True when the master moved. Other clients: a no-op."""
    pool = getattr(client, "connection_pool", None)
    if not isinstance(pool, SentinelConnectionPool):
        return False
    before = pool.master_address
    after = await pool.get_master_address()  # type: ignore[no-untyped-call]
    if before is None or after == before:
        return False
    await pool.disconnect(inuse_connections=True)
    return True


async def aclose_client(client: Any) -> None:
    """Closes a client from ``connect`` with what it holds (a Sentinel's own connections)."""
    try:
        await client.aclose()
    finally:
        sentinel = getattr(client, "cp_sentinel", None)
        for s in getattr(sentinel, "sentinels", ()):
            await s.aclose()
