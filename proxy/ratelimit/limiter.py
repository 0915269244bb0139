"""The limiter interface used by the proxy pipeline, the Connection Service and the admin API.

One abstract :class:`Limiter` with two back ends: :class:`LocalLimiter` (this module, the embedded
single-process default) and ``RedisLimiter`` (shared by every replica). Both run the algorithm of
:mod:`proxy.ratelimit.gcra` and answer with the same :class:`Decision` / :class:`LimitState`, so
callers never care which one they hold. ``proxy.services.make_limiter`` picks one from the settings.
"""

from __future__ import annotations

import abc
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from proxy.errors import ValidationError
from proxy.model import RateWindow
from proxy.observe.metrics import RATELIMIT_DECISIONS_TALLY, RATELIMIT_OBSERVATIONS
from proxy.ratelimit import gcra
from proxy.ratelimit.signals.core import Observation

if TYPE_CHECKING:
    pass


@dataclass(frozen=True, slots=True)
class LimitState:
    """The seed contract's ``rate_limit`` object, plus which kind of limit it comes from."""

    is_limited: bool
    remaining: int | None
    reset_at: int | None  # epoch seconds, rounded up
    retry_after_ms: int | None
    source: str | None  # "configured" | "learned" | None

    def to_contract(self) -> dict[str, Any]:
        return {
            "is_limited": self.is_limited,
            "remaining": self.remaining,
            "reset_at": self.reset_at,
            "retry_after_ms": self.retry_after_ms,
        }


UNLIMITED = LimitState(False, None, None, None, None)


@dataclass(frozen=True, slots=True)
class Decision:
    """One acquire: ``retry_after_ms`` is 0 when allowed. ``source`` is configured, learned,
    local-cache (a denial known in-process, no Redis trip) or fallback (Redis unreachable)."""

    allowed: bool
    retry_after_ms: int
    state: LimitState
    source: str


@dataclass(frozen=True, slots=True)
class LimitTarget:
    """What is limited: one scope's configured windows, optionally inside a fair-share group."""

    scope: str  # "<tenant_id>/<connection_id>"
    windows: tuple[RateWindow, ...] = ()
    quota_key: str | None = None
    quota_windows: tuple[RateWindow, ...] = ()
    weight: float = 1.0
    reserve: int = 0

    def __post_init__(self) -> None:
        # Ids become Redis hash tags: a brace would move keys to another slot.
        for name, value in (("scope", self.scope), ("quota_key", self.quota_key or "x")):
            if not value or "{" in value or "}" in value:
                raise ValidationError(
                    f"rate-limit {name} must be non-empty without braces", fields={name: "invalid"}
                )
        if not (self.weight > 0 and math.isfinite(self.weight)):
            raise ValidationError(
                "quota weight must be a positive number", fields={"quota_weight": "must be > 0"}
            )
        if self.reserve < 0:
            raise ValidationError("rate-limit reserve must be >= 0", fields={"reserve": "must be >= 0"})


@lru_cache(maxsize=4096)
def compile_target(target: LimitTarget) -> gcra.Spec:
    quota = target.quota_windows if target.quota_key else ()
    return gcra.compile_spec(target.windows, quota, target.scope, target.weight, target.reserve)


def check_cost(spec: gcra.Spec, cost: int) -> None:
    if cost < 1:
        raise ValidationError("rate-limit cost must be >= 1", fields={"cost": "must be >= 1"})
    for c in (*spec.cells, *spec.quota):
        if c.inc * cost > c.tau:
            raise ValidationError(
                f"a call of cost {cost} can never fit the window {c.window.limit}/{c.window.window_s}s "
                "(burst too small): raise the burst or lower the cost",
                fields={"cost": "exceeds burst"},
            )


def _ms(us: int) -> int:
    return -(-us // 1000)


def state_of(o: gcra.Outcome) -> LimitState:
    limited = o.next_wait_us > 0
    src = o.next_source if limited else o.state_source
    return LimitState(
        is_limited=limited,
        remaining=o.remaining if o.remaining >= 0 else None,
        reset_at=-(-o.reset_us // gcra.US) if o.reset_us >= 0 else None,
        retry_after_ms=_ms(o.next_wait_us) if limited else None,
        source=gcra.SOURCE_NAMES[src],
    )


def decision_of(o: gcra.Outcome, source: str | None = None) -> Decision:
    state = state_of(o)
    if o.allowed:
        src = source or state.source or "configured"
        return Decision(True, 0, state, src)
    src = source or gcra.SOURCE_NAMES[o.wait_source] or "configured"
    return Decision(False, max(1, _ms(o.wait_us)), state, src)


_DECISION_LABELS: dict[tuple[bool, str], tuple[str, str]] = {}


def count(decision: Decision) -> Decision:
    key = (decision.allowed, decision.source)
    labels = _DECISION_LABELS.get(key)
    if labels is None:
        labels = _DECISION_LABELS[key] = ("allowed" if decision.allowed else "denied", decision.source)
    RATELIMIT_DECISIONS_TALLY.inc(labels)
    return decision


# What an unconstrained call decides: no configured window and no learned state for its scope.
_FREE = Decision(True, 0, UNLIMITED, "configured")
_FREE_LABELS = ("allowed", "configured")


def observation_args(obs: Observation, now_us: int) -> tuple[int, list[tuple[str, gcra.Learned]]]:
    """An observation in µs: (blocked_until or 0, [(policy name, learned)])."""
    blocked = math.ceil(obs.blocked_until * gcra.US) if obs.blocked_until is not None else 0
    policies = []
    for p in obs.policies:
        learned = gcra.learned_from(p.remaining, p.reset_at, p.limit, p.window_s, now_us)
        if learned is not None:
            policies.append((p.name, learned))
    for style in obs.styles:
        RATELIMIT_OBSERVATIONS.labels(style=style).inc()
    return blocked, policies


def describe_state(
    spec: gcra.Spec, st: gcra.ScopeState, group: gcra.GroupState | None, now: int
) -> dict[str, Any]:
    """The admin view of one scope: each configured window, each learned policy, the group."""

    def when(us: int) -> float:
        return round(us / gcra.US, 3)

    windows = []
    for c in spec.cells:
        r, reset, w = gcra.gcra_view(st.tats.get("c:" + c.sig, 0), now, c.inc, c.tau)
        windows.append(
            {**c.window.to_dict(), "remaining": r, "reset_at": when(reset), "retry_after_ms": -(-w // 1000)}
        )
    learned = [
        {
            "name": name,
            "limit": p.limit if p.limit >= 0 else None,
            "window_s": when(p.window_us) if p.window_us >= 0 else None,
            "remaining": p.remaining,
            "reset_at": when(p.reset_us),
        }
        for name, p in sorted(st.policies.items())
        if p.reset_us > now
    ]
    out: dict[str, Any] = {
        "windows": windows,
        "learned": learned,
        "blocked_until": when(st.blocked_us) if st.blocked_us > now else None,
        "reserve": spec.reserve,
        "quota": None,
    }
    if group is not None and spec.quota:
        qs = []
        for q, share in zip(spec.quota, group.shares(spec, now), strict=True):
            gr, greset, _ = gcra.gcra_view(group.tats.get("q:" + q.sig, 0), now, q.inc, q.tau)
            minc = gcra.member_inc(q.inc, q.tau, share, spec.weight, 1)
            mr, mreset, _ = gcra.gcra_view(st.tats.get("m:" + q.sig, 0), now, minc, q.tau)
            qs.append(
                {
                    **q.window.to_dict(),
                    "share": round(spec.weight / share, 4),
                    "group_remaining": gr,
                    "group_reset_at": when(greset),
                    "member_remaining": mr,
                    "member_reset_at": when(mreset),
                }
            )
        active = sum(
            1
            for m, t in group.active.items()
            if m != spec.member and t > now - max(q.horizon for q in spec.quota)
        )
        out["quota"] = {"weight": spec.weight, "other_active_members": active, "windows": qs}
    return out


class Limiter(abc.ABC):
    """Configured GCRA windows + learned upstream limits + fair shares, all-or-nothing."""

    @abc.abstractmethod
    async def acquire(self, target: LimitTarget, cost: int = 1) -> Decision:
        """Consume ``cost`` from every constraint if all admit it; otherwise consume nothing."""

    @abc.abstractmethod
    async def peek(self, target: LimitTarget) -> LimitState:
        """The current state (would a call of cost 1 pass?) without consuming anything."""

    @abc.abstractmethod
    async def observe(self, scope: str, obs: Observation, *, quota_key: str | None = None) -> None:
        """Merge what an upstream response said. Pass ``quota_key`` for grouped connections
        (their state lives under the group's hash tag); otherwise the last one seen is used."""

    @abc.abstractmethod
    async def describe(self, target: LimitTarget) -> dict[str, Any]:
        """The admin view: every configured window, every learned policy, the group share."""

    @abc.abstractmethod
    async def reset(self, scope: str, *, quota_key: str | None = None) -> None:
        """Forget every configured and learned state of ``scope``."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections; the limiter is unusable afterwards."""

    def use_invalidations(self, announce: Callable[[str], Awaitable[None]]) -> None:  # noqa: B027
        """The application now delivers the store's invalidations to ``on_invalidation``, and
        ``announce(scope)`` publishes one. A shared back end may then keep local shortcuts that
        an invalidation ends (see RedisLimiter); without this call it keeps none."""

    def on_invalidation(self, tenant_id: str, connection_id: str | None) -> None:  # noqa: B027
        """Another replica changed shared state; drop whatever local shortcut depends on it."""


class LocalLimiter(Limiter):
    """The in-process back end: exact within one process, nothing shared.

    Used alone when no Redis is configured, and as RedisLimiter's fail-open fallback. The clock is
    the wall clock (reset_at is epoch time) made monotonic, so a clock step back never refunds."""

    SWEEP_EVERY_S = 30.0

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._last_us = 0
        self._scopes: dict[str, gcra.ScopeState] = {}
        self._groups: dict[str, gcra.GroupState] = {}
        self._next_sweep = 0.0

    def now_us(self) -> int:
        self._last_us = max(self._last_us, int(self._clock() * gcra.US))
        return self._last_us

    def _states(self, target: LimitTarget) -> tuple[gcra.ScopeState, gcra.GroupState | None]:
        st = self._scopes.setdefault(target.scope, gcra.ScopeState())
        group = None
        if target.quota_key and target.quota_windows:
            group = self._groups.setdefault(target.quota_key, gcra.GroupState())
        return st, group

    def evaluate(self, target: LimitTarget, cost: int, commit: bool) -> gcra.Outcome:
        """The synchronous step (no await inside: atomic under asyncio)."""
        spec = compile_target(target)
        check_cost(spec, cost)
        now = self.now_us()
        self._sweep(now)
        st, group = self._states(target)
        return gcra.evaluate(spec, st, group, now, cost, commit)

    async def acquire(self, target: LimitTarget, cost: int = 1) -> Decision:
        spec = compile_target(target)
        if not spec.cells and not spec.quota and cost >= 1 and target.scope not in self._scopes:
            # Nothing configured and nothing learned: exactly what evaluate() would decide,
            # without building and dropping an empty state for every call. (No sweep either:
            # this path adds no state, and every path that does sweeps.)
            RATELIMIT_DECISIONS_TALLY.inc(_FREE_LABELS)
            return _FREE
        return count(decision_of(self.evaluate(target, cost, True)))

    async def peek(self, target: LimitTarget) -> LimitState:
        return state_of(self.evaluate(target, 1, False))

    def merge(self, scope: str, blocked_us: int, policies: list[tuple[str, gcra.Learned]]) -> None:
        """Merge an observation already in µs (see :func:`observation_args`)."""
        st = self._scopes.setdefault(scope, gcra.ScopeState())
        gcra.apply_observation(st, blocked_us, policies, self.now_us())

    async def observe(self, scope: str, obs: Observation, *, quota_key: str | None = None) -> None:
        self.merge(scope, *observation_args(obs, self.now_us()))

    async def describe(self, target: LimitTarget) -> dict[str, Any]:
        out = self.describe_now(target)
        out["backend"] = "local"
        return out

    def describe_now(self, target: LimitTarget) -> dict[str, Any]:
        spec = compile_target(target)
        now = self.now_us()
        st, group = self._states(target)
        state = state_of(gcra.evaluate(spec, st, group, now, 1, False))
        head = {"scope": target.scope, "quota_key": target.quota_key}
        return (
            head
            | {"state": {**state.to_contract(), "source": state.source}}
            | describe_state(spec, st, group, now)
        )

    async def reset(self, scope: str, *, quota_key: str | None = None) -> None:
        self._scopes.pop(scope, None)

    def _sweep(self, now: int) -> None:
        # Drop states whose every recorded time has passed: they equal "no state".
        if now < self._next_sweep:
            return
        self._next_sweep = now + self.SWEEP_EVERY_S * gcra.US
        for scope in [s for s, st in self._scopes.items() if st.latest() <= now]:
            del self._scopes[scope]
        for key, g in list(self._groups.items()):
            if max([*g.tats.values(), *g.active.values(), 0]) + gcra.MAX_ACTIVE_HORIZON_US <= now:
                del self._groups[key]
