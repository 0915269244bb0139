"""The rate limiter shared by every replica: state in Redis, at most one round trip per call.

An acquire that needs Redis is one EVALSHA of ``limiter.lua`` (redis-py's registered script falls back to
loading it on NOSCRIPT), with Redis ``TIME`` as the single clock and every key under one hash tag.
Denials already known (nothing can pass before T) are answered from an in-process cache with no
Redis trip until T: GCRA state and learned blocks only move forward, so such an answer cannot be
wrong, only (for a fair-share member whose group just emptied) slightly conservative.

Scopes with no configured window (most connections) are limited only by what upstreams taught
us. When Redis holds nothing learned for such a scope, a replica remembers that for up to
``CLEAR_TTL_S`` and admits its calls without a round trip (what that saves: bench/README.md). The
script reports when an observation gives a scope its first live learned state; the observing
replica then announces it on the store's invalidation channel, and every replica drops what it
remembered (``on_invalidation``), so the others stop within milliseconds, as they would after
their own next round trip. A lost message is covered by the TTL.

When Redis fails, each call is bounded by ``timeout_s``; ``fail_mode="open"`` serves it from an
in-process LocalLimiter with the same windows, ``"closed"`` raises ServiceUnavailable. After a
failure Redis is left alone for ``breaker_s`` (no hammering of a dead server), then tried again:
limiting resumes on Redis by itself, no restart. Connections that died while Redis restarted
are health-checked and replaced before use, and a peek, an observation (a monotonic merge) or a
describe meeting one is repeated once on a fresh connection; an acquire never is, since it may
have consumed quota before its reply was lost (``proxy.store.redisconn``).

With ``wait_replicas`` in ``PROXY_REDIS_URL`` an acquire is followed by ``WAIT`` on the same
connection, in the same round trip; an admission the replicas did not confirm is not trusted
(the call follows the fail mode), so a Sentinel failover cannot lose an admission and admit it
again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from importlib.resources import files
from typing import TYPE_CHECKING, Any, TypeAlias

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from proxy.cache import TtlCache
from proxy.errors import ServiceUnavailable
from proxy.observe.metrics import RATELIMIT_BACKEND_ERRORS
from proxy.ratelimit import gcra
from proxy.ratelimit.limiter import (
    Decision,
    Limiter,
    LimitState,
    LimitTarget,
    LocalLimiter,
    check_cost,
    compile_target,
    count,
    decision_of,
    describe_state,
    observation_args,
    state_of,
)
from proxy.ratelimit.signals.core import Observation
from proxy.redisurl import parse_redis_url
from proxy.store.redisconn import (
    REDIS_FAILURES,
    aclose_client,
    connect,
    follow_master,
    is_sentinel,
    retry_safe,
    warm,
)

log = logging.getLogger(__name__)
# The venv's types-redis 4.6 stubs (generic Redis, no aclose) shadow redis 8's own hints; the
# ignores tolerate both so mypy stays clean whichever is installed.
if TYPE_CHECKING:
    Client: TypeAlias = Redis[bytes]  # type: ignore[type-arg, unused-ignore]

SCRIPT = files("proxy.ratelimit").joinpath("limiter.lua").read_text(encoding="utf-8")
_FAILURES = (*REDIS_FAILURES, TimeoutError)
_CACHE_MAX = 50_000
# How long "Redis holds nothing learned for this scope" is trusted without asking again, should
# the announcement that ends it be lost (pub/sub delivers at most once).
CLEAR_TTL_S = 1.0
FOLLOW_S = 1.0


def keys_for(scope: str, quota_key: str | None, grouped: bool) -> list[str]:
    """All keys of one call share one hash tag, hence one cluster slot."""
    if quota_key is None:
        return [f"{{rl:{scope}}}:s"]
    tag = f"{{rlq:{quota_key}}}"
    own = f"{tag}:s:{scope}"
    return [own, f"{tag}:g", f"{tag}:a", f"{tag}:w"] if grouped else [own]


def _args(spec: gcra.Spec, cost: int) -> list[Any]:
    args: list[Any] = [cost, spec.reserve, spec.member, repr(spec.weight), len(spec.cells)]
    for c in spec.cells:
        args += [c.sig, c.inc, c.tau]
    args.append(len(spec.quota))
    for q in spec.quota:
        args += [q.sig, q.inc, q.tau, q.horizon]
    return args


def _outcome(raw: list[Any]) -> gcra.Outcome:
    v = [int(x) for x in raw]
    return gcra.Outcome(bool(v[0]), v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8])


class RedisLimiter(Limiter):
    def __init__(
        self,
        client: Client,
        *,
        fail_mode: str = "open",
        timeout_s: float = 0.25,
        breaker_s: float = 1.0,
        owns_client: bool = False,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 500,
    ) -> None:
        if fail_mode not in ("open", "closed"):
            raise ValueError("fail_mode must be 'open' or 'closed'")
        self._client = client
        self._warm = False  # see proxy.store.redisconn.warm: once, before the first command
        self._script = client.register_script(SCRIPT)
        self.fail_mode = fail_mode
        self._timeout_s = timeout_s
        self._breaker_s = breaker_s
        self._owns_client = owns_client
        self._wait = (wait_replicas, wait_timeout_ms)
        self._follow_at = 0.0  # monotonic; Sentinel: when to ask again where the master is
        self._follower: asyncio.Task[bool] | None = None
        self._sentinel = is_sentinel(client)
        self._down_until = 0.0  # monotonic; Redis is skipped before this
        self._failing = False
        self.fallback = LocalLimiter()
        # scope -> (monotonic deadline, reset_at, source): nothing passes before the deadline.
        # Not a proxy.cache cache: when full it drops only expired denials, because a live one
        # dropped is a Redis round trip for a scope already known to be refused.
        self._denied: dict[str, tuple[float, int | None, str | None]] = {}
        self._quota_keys: dict[str, str] = {}  # scope -> quota key last used with it
        # Unconstrained scope -> (monotonic deadline, the decision Redis gave): nothing learned.
        # Its ``generation`` guards answers that raced an invalidation (proxy.cache).
        self._clear: TtlCache[str, Decision] = TtlCache(_CACHE_MAX)
        self._announce: Callable[[str], Awaitable[None]] | None = None  # set by use_invalidations

    @classmethod
    def create(cls, source: Client | str, *, fail_mode: str, timeout_s: float) -> RedisLimiter:
        if isinstance(source, str):
            target = parse_redis_url(source)
            client = connect(target, timeout_s=timeout_s)
            return cls(
                client,
                fail_mode=fail_mode,
                timeout_s=timeout_s,
                owns_client=True,
                wait_replicas=target.wait_replicas,
                wait_timeout_ms=target.wait_timeout_ms,
            )
        return cls(source, fail_mode=fail_mode, timeout_s=timeout_s)

    # --- plumbing ----------------------------------------------------------------------------

    def _keys(self, target: LimitTarget, spec: gcra.Spec) -> list[str]:
        if target.quota_key:
            self._quota_keys[target.scope] = target.quota_key
        return keys_for(target.scope, target.quota_key, bool(spec.quota))

    def _follow(self) -> None:
        """Sentinel: once a second, in the background, ask where the master is, so admissions
        stop going to a demoted master within about a second of a failover (not ~10 s later,
        when Sentinel reconfigures it). Off the call path: no call waits for the sentinels."""
        now = time.monotonic()
        if now < self._follow_at or (self._follower is not None and not self._follower.done()):
            return
        self._follow_at = now + FOLLOW_S
        self._follower = asyncio.get_running_loop().create_task(self._follow_quietly())

    async def _follow_quietly(self) -> bool:
        try:
            async with asyncio.timeout(self._timeout_s * 4):
                return await follow_master(self._client)
        except _FAILURES:
            return False

    async def _run(self, keys: list[str], args: list[Any]) -> list[Any] | None:
        """The script's reply, or None when Redis is unavailable (then the breaker is open)."""
        if self._sentinel:
            self._follow()
        if time.monotonic() < self._down_until:
            return None
        try:
            async with asyncio.timeout(self._timeout_s):
                if not self._warm:
                    await warm(self._client)
                    self._warm = True
                if args[0] == "a" and self._wait[0]:
                    reply: list[Any] = await self._confirmed(keys, args)
                elif args[0] == "a":  # consumes quota: never repeated
                    reply = await self._script(keys=keys, args=args)
                else:
                    with retry_safe():
                        reply = await self._script(keys=keys, args=args)
        except _FAILURES as exc:
            self._down_until = time.monotonic() + self._breaker_s
            if not self._failing:
                log.warning(
                    "rate-limit store (Redis) failed (%s); fail mode %s", type(exc).__name__, self.fail_mode
                )
            self._failing = True
            return None
        if self._failing:
            log.warning("rate-limit store (Redis) answers again; limiting is shared again")
            self._failing = False
        return reply

    async def _confirmed(self, keys: list[str], args: list[Any]) -> list[Any]:
        """An acquire and its WAIT in one round trip; the reply only if the replicas hold it."""
        n, timeout_ms = self._wait
        for _ in range(2):
            pipe = self._client.pipeline(transaction=False)
            pipe.evalsha(self._script.sha, len(keys), *keys, *args)
            pipe.execute_command("WAIT", n, timeout_ms)
            reply, acked = await pipe.execute(raise_on_error=False)
            if isinstance(reply, NoScriptError):  # nothing ran: load it, then once more
                await self._client.script_load(SCRIPT)
                continue
            if isinstance(reply, Exception):
                raise reply
            if isinstance(acked, Exception) or int(acked) < n:
                await follow_master(self._client)  # a Sentinel failover? then use the new master
                raise TimeoutError("the replicas did not confirm the admission (wait_replicas)")
            return list(reply)
        raise NoScriptError("the limiter script could not be loaded")

    def _unavailable(self) -> None:
        """Count the failure; in closed mode refuse the call."""
        RATELIMIT_BACKEND_ERRORS.labels(mode=self.fail_mode).inc()
        if self.fail_mode == "closed":
            raise ServiceUnavailable(
                "the rate-limit store (Redis) is unreachable and ratelimit_fail_mode is 'closed', so calls "
                "are refused until it answers again; check that Redis at PROXY_REDIS_URL is up"
            )

    def _cached(self, scope: str) -> LimitState | None:
        hit = self._denied.get(scope)
        if hit is None:
            return None
        left = hit[0] - time.monotonic()
        if left <= 0:
            del self._denied[scope]
            return None
        return LimitState(True, 0, hit[1], max(1, int(left * 1000 + 0.999)), hit[2])

    def _remember(self, scope: str, state: LimitState, sent: float) -> None:
        """Caches a denial until it ends, counted from ``sent`` (monotonic, before the round trip):
        Redis computed ``retry_after_ms`` at some moment after that, so the cached denial never
        outlasts the real one, however late (a loaded host) the reply was read."""
        if not state.is_limited or not state.retry_after_ms:
            self._denied.pop(scope, None)
            return
        if len(self._denied) >= _CACHE_MAX:
            now = time.monotonic()
            self._denied = {k: v for k, v in self._denied.items() if v[0] > now}
        self._denied[scope] = (sent + state.retry_after_ms / 1000, state.reset_at, state.source)

    # --- the interface -----------------------------------------------------------------------

    def _known_clear(self, scope: str) -> Decision | None:
        hit = self._clear.get(scope)
        if hit is None:
            return None
        if hit[0] <= time.monotonic():
            self._clear.discard(scope)
            return None
        return hit[1]

    def _note(self, scope: str, outcome: gcra.Outcome, decision: Decision, since: int) -> None:
        """After a round trip for an unconstrained scope: remember "nothing learned" if so,
        unless an invalidation arrived while it was on the way (``since``: proxy.cache)."""
        if outcome.allowed and outcome.state_source == gcra.SRC_NONE:
            self._clear.put(scope, decision, time.monotonic() + CLEAR_TTL_S, since=since)
        else:
            self._clear.discard(scope)

    def use_invalidations(self, announce: Callable[[str], Awaitable[None]]) -> None:
        self._announce = announce  # from now on "nothing learned" may be remembered

    def on_invalidation(self, tenant_id: str, connection_id: str | None) -> None:
        # Any invalidation (a learned-state announcement, an admin change, a resubscribe after
        # lost messages) drops every "nothing learned" memo: each costs one round trip to redo.
        self._clear.clear()

    async def acquire(self, target: LimitTarget, cost: int = 1) -> Decision:
        spec = compile_target(target)
        check_cost(spec, cost)
        cached = self._cached(target.scope)
        if cached is not None:
            return count(Decision(False, cached.retry_after_ms or 1, cached, "local-cache"))
        # Only while invalidations reach us can "nothing learned" be remembered (module doc).
        unconstrained = not spec.cells and not spec.quota and self._announce is not None
        if unconstrained and (known := self._known_clear(target.scope)) is not None:
            return count(known)
        since = self._clear.generation
        sent = time.monotonic()
        reply = await self._run(self._keys(target, spec), ["a", *_args(spec, cost)])
        if reply is None:
            self._unavailable()
            return count(decision_of(self.fallback.evaluate(target, cost, True), "fallback"))
        outcome = _outcome(reply)
        decision = decision_of(outcome)
        self._remember(target.scope, decision.state, sent)
        if unconstrained:
            self._note(target.scope, outcome, decision, since)
        return count(decision)

    async def peek(self, target: LimitTarget) -> LimitState:
        spec = compile_target(target)
        cached = self._cached(target.scope)
        if cached is not None:
            return cached
        unconstrained = not spec.cells and not spec.quota and self._announce is not None
        if unconstrained and (known := self._known_clear(target.scope)) is not None:
            return known.state
        reply = await self._run(self._keys(target, spec), ["p", *_args(spec, 1)])
        if reply is None:
            self._unavailable()
            return state_of(self.fallback.evaluate(target, 1, False))
        return state_of(_outcome(reply))

    async def observe(self, scope: str, obs: Observation, *, quota_key: str | None = None) -> None:
        if obs.blocked_until is None and not obs.policies:
            return
        quota_key = quota_key or self._quota_keys.get(scope)
        blocked, policies = observation_args(obs, self.fallback.now_us())
        # Keep the local view in step: a block is known here without asking Redis again, and a
        # new policy may lift a cached learned denial. Something was learned: ask Redis again.
        self._denied.pop(scope, None)
        self._clear.discard(scope)
        if blocked and obs.blocked_until is not None:
            left = obs.blocked_until - time.time()
            if left > 0:
                self._denied[scope] = (time.monotonic() + left, -(-blocked // gcra.US), "learned")
        args: list[Any] = ["o", blocked, len(policies)]
        for name, p in policies:
            args += [name, p.remaining, p.reset_us, p.limit, p.window_us]
        reply = await self._run(keys_for(scope, quota_key, False), args)
        if reply is None:
            self.fallback.merge(scope, blocked, policies)
            self._unavailable()
            return
        if len(reply) > 1 and int(reply[1]) == 1 and self._announce is not None:
            # The scope's first live learned state: replicas that remembered "nothing learned"
            # must forget it. A failed announcement leaves them at most CLEAR_TTL_S behind.
            try:
                await self._announce(scope)
            except Exception as exc:  # type only: messages may quote values
                log.warning("could not announce learned rate-limit state (%s)", type(exc).__name__)

    async def describe(self, target: LimitTarget) -> dict[str, Any]:
        spec = compile_target(target)
        keys = self._keys(target, spec)
        if time.monotonic() >= self._down_until:
            try:
                async with asyncio.timeout(self._timeout_s * 4):
                    with retry_safe():
                        return await self._describe(target, spec, keys)
            except _FAILURES:
                self._down_until = time.monotonic() + self._breaker_s
        self._unavailable()
        return {**self.fallback.describe_now(target), "backend": "fallback"}

    async def _describe(self, target: LimitTarget, spec: gcra.Spec, keys: list[str]) -> dict[str, Any]:
        pipe = self._client.pipeline(transaction=False)
        pipe.time()
        pipe.hgetall(keys[0])
        if len(keys) == 4:
            pipe.hgetall(keys[1])
            pipe.zrange(keys[2], 0, -1, withscores=True)
            pipe.hgetall(keys[3])
        res = await pipe.execute()
        now = int(res[0][0]) * gcra.US + int(res[0][1])
        st = gcra.ScopeState.from_hash(res[1])
        group = None
        if len(keys) == 4:
            g = gcra.ScopeState.from_hash(res[2]).tats
            active = {m.decode(): int(score) for m, score in res[3]}
            weights = {k.decode(): float(v) for k, v in res[4].items()}
            group = gcra.GroupState(g, active, weights)
        state = state_of(gcra.evaluate(spec, st, group, now, 1, False))
        body = describe_state(spec, st, group, now)
        return {
            "scope": target.scope,
            "quota_key": target.quota_key,
            "backend": "redis",
            "state": {**state.to_contract(), "source": state.source},
        } | body

    async def reset(self, scope: str, *, quota_key: str | None = None) -> None:
        self._denied.pop(scope, None)
        self._clear.discard(scope)
        await self.fallback.reset(scope)
        keys = {keys_for(scope, None, False)[0]}
        for q in (quota_key, self._quota_keys.get(scope)):
            if q:
                keys.add(keys_for(scope, q, False)[0])
        try:
            async with asyncio.timeout(self._timeout_s * 4):
                with retry_safe():  # DEL again deletes nothing more
                    for key in keys:  # separate slots: one DEL each
                        await self._client.delete(key)
        except _FAILURES:
            RATELIMIT_BACKEND_ERRORS.labels(mode=self.fail_mode).inc()
            raise ServiceUnavailable(
                f"could not reset the rate-limit state of {scope}: the rate-limit store (Redis) is "
                "unreachable; retry when it answers again"
            ) from None

    async def close(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
            await asyncio.wait({self._follower}, timeout=2.0)
        if self._owns_client:
            await aclose_client(self._client)
