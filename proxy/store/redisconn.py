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
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Final, TypeVar

from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

T = TypeVar("T")

HEALTH_CHECK_S: Final = 5.0
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
