"""What every Redis operation goes through: one client, one error translation, one script cache.

Failures (refused, timed out, error replies) raise ``StoreUnavailable`` naming the operation,
never the URL (it may carry a password). A dead Redis fails fast: timeouts are never retried;
a command that meets a dead pooled connection is repeated once on a fresh one only when it is
safe to repeat (``proxy.store.redisconn``).

Writes go out as one pipeline (``_confirm``), so that with ``wait_replicas`` (``proxy.redisurl``)
a ``WAIT`` rides on the same connection in the same round trip: a write counts as done only once
that many replicas hold it, which is what makes it survive a Sentinel failover. Scripts inside
pipelines are sent as EVAL (source), never EVALSHA: a Cluster node or a freshly promoted master
may not have them cached, and a NOSCRIPT inside a pipeline cannot be repaired by a blind repeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from importlib.resources import files
from typing import Any, Final, NoReturn, TypeAlias

from proxy.errors import Conflict, StoreLost, StoreUnavailable
from proxy.redisurl import RedisTarget, parse_redis_url
from proxy.store.base import ANY_VERSION, ExpectedVersion, InvalidationCallback
from proxy.store.common import next_version
from proxy.store.redisconn import REDIS_FAILURES, follow_master, retry_safe

# The client runs with decode_responses=True, so every reply is str; redis-py's hints type replies
# as ``bytes | str`` and cannot express that. The client is therefore untyped at this one boundary,
# and every value is parsed and checked (``loads``, ``int``) right where it is read.
Client: TypeAlias = Any

MAX_BATCH: Final = 1000


def lua(name: str) -> str:
    """A script shipped beside this module (package data: see pyproject.toml)."""
    return files("proxy.store.redis").joinpath(name).read_text(encoding="utf-8")


class RedisCore:
    """The state and plumbing the concern mixins of ``RedisStore`` share."""

    identity: str | None = None

    def __init__(self, url: str, *, timeout_s: float = 0.25) -> None:
        self._url = url
        self._target: RedisTarget = parse_redis_url(url)
        self.timeout_s = timeout_s
        self._client: Client | None = None
        self._callbacks: list[InvalidationCallback] = []
        self._listener: asyncio.Task[None] | None = None
        self._closing = False
        self._scripts: dict[str, Any] = {}
        self._lost: StoreLost | None = None
        self._accepting = False
        self._watcher: asyncio.Task[None] | None = None
        self._flushes: set[asyncio.Task[None]] = set()

    @contextlib.contextmanager
    def _guard(self, op: str, *, safe: bool = False) -> Iterator[Client]:
        """The client for one operation. ``safe``: its commands may be repeated once on a fresh
        connection (reads, and writes whose repeat changes nothing; see proxy.store.redisconn)."""
        if self._client is None:
            raise StoreUnavailable(f"redis store is closed ({op}); open it first")
        if self._lost is not None:
            raise self._lost
        try:
            if safe:
                with retry_safe():
                    yield self._client
            else:
                yield self._client
        except REDIS_FAILURES as exc:
            if self._lost is not None:  # the connection was refused by the identity check
                raise self._lost from None
            # Only the class name: the URL (and so a password) never reaches the message.
            raise StoreUnavailable(
                f"redis store unavailable during {op} ({type(exc).__name__}); check that Redis is "
                "running and reachable at the configured PROXY_REDIS_URL"
            ) from exc

    def _registered(self, r: Client, source: str) -> Any:
        """Script objects are kept: EVALSHA, loading the source only on NOSCRIPT."""
        script = self._scripts.get(source)
        if script is None:
            script = self._scripts[source] = r.register_script(source)
        return script

    async def _script(
        self,
        op: str,
        source: str,
        keys: list[str],
        args: list[Any],
        *,
        safe: bool = False,
        write: bool = True,
    ) -> Any:
        with self._guard(op, safe=safe) as r:
            if not (write and self._target.wait_replicas):
                return await self._registered(r, source)(keys=keys, args=args)
            pipe = r.pipeline(transaction=False)
            queue_script(pipe, source, keys, args)
            (result,) = await self._confirm(op, pipe)
            return result

    async def _confirm(self, op: str, pipe: Any) -> list[Any]:
        """Runs a pipeline of writes; with ``wait_replicas`` it only returns once that many
        replicas confirmed them (same connection, same round trip). Call inside ``_guard``."""
        n = self._target.wait_replicas
        if n:
            pipe.execute_command("WAIT", n, self._target.wait_timeout_ms)
        results: list[Any] = await pipe.execute()
        if n:
            acked = int(results.pop())
            if acked < n:
                with contextlib.suppress(*REDIS_FAILURES):
                    await follow_master(self._client)  # a failover? then reconnect to the new master
                raise StoreUnavailable(
                    f"redis store write {op} reached {acked} of the {n} replicas wait_replicas asks "
                    f"for within {self._target.wait_timeout_ms} ms, so it may be lost in a failover "
                    "(it may also have been applied); check the replicas and retry"
                )
        return results


def queue_script(pipe: Any, source: str, keys: list[str], args: list[Any]) -> None:
    """A script call inside a pipeline, by source (see the module docstring)."""
    pipe.eval(source, len(keys), *keys, *args)


def loads(text: str) -> dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise StoreUnavailable("redis store holds a malformed record; restore it from a backup")
    return value


def conflict(kind: str, ident: str, expected: ExpectedVersion, current: int) -> NoReturn:
    """The script refused the write: explain with the same words as every back end."""
    next_version(kind, ident, expected, None if current < 0 else current)
    raise Conflict(f"{kind} {ident!r} changed concurrently; re-read it and retry")


def cas_args(expected: ExpectedVersion) -> tuple[str, str]:
    if expected is ANY_VERSION:
        return "any", ""
    if expected is None:
        return "new", ""
    if isinstance(expected, bool) or not isinstance(expected, int):
        raise TypeError("expected_version must be None, an int or ANY_VERSION")
    return "ver", str(expected)
