"""GCRA and learned-limit arithmetic: the one algorithm behind both limiter back ends.

``LocalLimiter`` runs :func:`evaluate` in-process; ``limiter.lua`` is the same algorithm, line for
line, inside Redis. Keeping the rules here, pure (no I/O, no aiohttp, no redis), lets the tests pin
the math with tables and run one sequence through both back ends to prove they agree.

Units: integer microseconds since the epoch everywhere. They are exact in a double up to 2**53
(year 2255), so Lua (doubles only) and Python (ints) compute identical numbers. The only float
step is a fair-share member's increment, floored the same way on both sides.

GCRA per window of ``limit`` calls per ``window_s`` with ``burst`` (default ``limit``): emission
interval ``T = window_us // limit`` and tolerance ``tau = burst * T``. A call of cost ``c`` passes
when ``max(TAT, now) + c*T - now <= tau`` and then sets ``TAT = max(TAT, now) + c*T``. From a full
bucket exactly ``burst`` calls pass at once, then one per ``T``: never more than
``burst + floor(d / T)`` over any span ``d``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from proxy.model import RateWindow

US = 1_000_000
# A member counts as active in a fair-share group if it asked within min(window, this horizon):
# long (daily) windows must not keep a member that called once in the morning "active" all day.
MAX_ACTIVE_HORIZON_US = 60 * US
SRC_NONE, SRC_CONFIGURED, SRC_LEARNED = 0, 1, 2
SOURCE_NAMES = {SRC_NONE: None, SRC_CONFIGURED: "configured", SRC_LEARNED: "learned"}


@dataclass(frozen=True, slots=True)
class Cell:
    """One GCRA constraint: ``sig`` names its state field; ``inc`` is T, ``tau`` the tolerance."""

    sig: str
    inc: int
    tau: int
    horizon: int  # fair-share activity horizon (quota windows only)
    window: RateWindow


def cell_for(w: RateWindow) -> Cell:
    window_us = max(1, round(w.window_s * US))
    inc = max(1, window_us // w.limit)
    burst = w.burst if w.burst is not None else w.limit
    sig = f"{w.limit}/{window_us}/{burst}"
    return Cell(sig, inc, burst * inc, min(window_us, MAX_ACTIVE_HORIZON_US), w)


@dataclass(frozen=True, slots=True)
class Spec:
    """A target compiled for evaluation; ``quota`` is empty unless the target is grouped."""

    cells: tuple[Cell, ...]
    quota: tuple[Cell, ...]
    member: str
    weight: float
    reserve: int


def compile_spec(
    windows: Iterable[RateWindow],
    quota_windows: Iterable[RateWindow],
    member: str,
    weight: float,
    reserve: int,
) -> Spec:
    return Spec(
        tuple(cell_for(w) for w in windows),
        tuple(cell_for(w) for w in quota_windows),
        member,
        float(weight),
        int(reserve),
    )


@dataclass(slots=True)
class Learned:
    """A learned upstream policy; ``limit``/``window_us`` are -1 when unknown."""

    remaining: int
    reset_us: int
    limit: int = -1
    window_us: int = -1

    def encode(self) -> str:
        return f"{self.remaining} {self.reset_us} {self.limit} {self.window_us}"

    @classmethod
    def decode(cls, text: str) -> Learned | None:
        parts = text.split(" ")
        try:
            return cls(*(int(p) for p in parts)) if len(parts) == 4 else None
        except ValueError:
            return None


@dataclass(slots=True)
class ScopeState:
    """Per-scope state; field names (``c:``/``m:`` + sig, ``p:`` + name, ``b``) match Redis."""

    tats: dict[str, int] = field(default_factory=dict)
    blocked_us: int = 0
    policies: dict[str, Learned] = field(default_factory=dict)

    @classmethod
    def from_hash(cls, raw: Mapping[Any, Any]) -> ScopeState:
        st = cls()
        for k, v in raw.items():
            f = k.decode() if isinstance(k, bytes) else str(k)
            text = v.decode() if isinstance(v, bytes) else str(v)
            if f == "b":
                st.blocked_us = int(text)
            elif f.startswith("p:"):
                p = Learned.decode(text)
                if p is not None:
                    st.policies[f[2:]] = p
            else:
                st.tats[f] = int(text)
        return st

    def latest(self) -> int:
        """The latest absolute time recorded: past it, this state equals no state at all."""
        return max([self.blocked_us, *self.tats.values(), *(p.reset_us for p in self.policies.values())])

    def prune(self, now: int) -> None:
        if self.blocked_us <= now:
            self.blocked_us = 0
        for name in [n for n, p in self.policies.items() if p.reset_us <= now]:
            del self.policies[name]


@dataclass(slots=True)
class GroupState:
    """A fair-share group: group TATs (``q:`` + sig), members' last activity and weights."""

    tats: dict[str, int] = field(default_factory=dict)
    active: dict[str, int] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)

    def shares(self, spec: Spec, now: int) -> list[float]:
        """Sum of active weights per quota window, this member included (ZRANGEBYSCORE order)."""
        others = sorted(((t, m) for m, t in self.active.items() if m != spec.member))
        out = []
        for q in spec.quota:
            s = spec.weight
            for t, m in others:
                if t > now - q.horizon:
                    s += self.weights.get(m, 1.0)
            out.append(s)
        return out

    def touch(self, spec: Spec, now: int) -> None:
        horizon = max(q.horizon for q in spec.quota)
        for m in [m for m, t in self.active.items() if t <= now - horizon]:
            del self.active[m]
            self.weights.pop(m, None)
        self.active[spec.member] = now
        self.weights[spec.member] = spec.weight


def member_inc(inc: int, tau: int, share: float, weight: float, cost: int) -> int:
    """A member's increment: T scaled by (active weight / own weight), so alone it is T; capped
    so one call still fits the tolerance (a tiny share rounds up to one call per window)."""
    m = math.floor(inc * share / weight)
    return max(1, min(m, tau // cost))


def gcra_step(tat: int, now: int, inc: int, tau: int, cost: int) -> tuple[int, int]:
    """-> (new TAT, 0) when the call fits, else (old TAT, microseconds until it would fit)."""
    new = max(tat, now) + inc * cost
    over = new - now - tau
    return (tat, over) if over > 0 else (new, 0)


def gcra_view(tat: int, now: int, inc: int, tau: int) -> tuple[int, int, int]:
    """-> (calls that fit now, when the bucket is full again, wait until one call fits)."""
    base = max(tat, now)
    return max(0, (tau - (base - now)) // inc), base, max(0, base + inc - now - tau)


def merge_policy(old: Learned | None, new: Learned, now: int) -> Learned | None:
    """A later reset replaces; the same reset (within 1 s) only lowers remaining; an earlier
    reset is a stale response and is ignored; anything past its reset is dropped."""
    if old is not None and old.reset_us <= now:
        old = None
    if new.reset_us <= now:
        return old
    if old is None or new.reset_us - old.reset_us >= US:
        return new
    if old.reset_us - new.reset_us >= US:
        return old
    return Learned(
        min(old.remaining, new.remaining),
        max(old.reset_us, new.reset_us),
        new.limit if new.limit >= 0 else old.limit,
        new.window_us if new.window_us >= 0 else old.window_us,
    )


def learned_from(
    remaining: int | None, reset_at: float | None, limit: int | None, window_s: float | None, now: int
) -> Learned | None:
    """An upstream policy in µs; without a reset, a known window is assumed to start now."""
    if remaining is None:
        return None
    if reset_at is not None:
        reset_us = math.ceil(reset_at * US)
    elif window_s is not None and window_s > 0:
        reset_us = now + math.ceil(window_s * US)
    else:
        return None
    win = math.ceil(window_s * US) if window_s is not None and window_s > 0 else -1
    lim = limit if limit is not None else -1
    return Learned(max(0, remaining), reset_us, lim, win) if reset_us > now else None


def apply_observation(
    st: ScopeState, blocked_us: int, policies: Iterable[tuple[str, Learned]], now: int
) -> None:
    """Merge one observation (blocked_until only grows; policies by :func:`merge_policy`)."""
    if blocked_us > now and blocked_us > st.blocked_us:
        st.blocked_us = blocked_us
    for name, p in policies:
        merged = merge_policy(st.policies.get(name), p, now)
        if merged is not None:
            st.policies[name] = merged
    st.prune(now)


@dataclass(frozen=True, slots=True)
class Outcome:
    """One evaluation. ``wait_us``: until this request fits (0 when allowed). The rest is the
    state afterwards: the most constraining remaining (-1 = no constraint) and its reset, and
    ``next_wait_us`` until a cost-1 call fits, from ``next_source``."""

    allowed: bool
    wait_us: int
    wait_source: int
    remaining: int
    reset_us: int
    next_wait_us: int
    state_source: int
    next_source: int
    now_us: int


def evaluate(
    spec: Spec, st: ScopeState, group: GroupState | None, now: int, cost: int, commit: bool
) -> Outcome:
    """Decide one call of ``cost``; when ``commit`` and it fits, consume from every constraint.

    Mirrors limiter.lua statement for statement (same order, same tie rules)."""
    if commit:
        st.prune(now)
    wait, wsrc, learned_deny = 0, SRC_NONE, False
    if st.blocked_us > now:
        wait, wsrc, learned_deny = st.blocked_us - now, SRC_LEARNED, True
    for p in st.policies.values():
        if p.reset_us > now and p.remaining - cost < spec.reserve:
            learned_deny = True
            if p.reset_us - now > wait:
                wait, wsrc = p.reset_us - now, SRC_LEARNED
    grouped = group is not None and bool(spec.quota)
    shares = group.shares(spec, now) if group is not None and grouped else []
    # (state dict, field, inc, tau) for every GCRA constraint, in the Lua's order.
    checks: list[tuple[dict[str, int], str, int, int]] = [
        (st.tats, "c:" + c.sig, c.inc, c.tau) for c in spec.cells
    ]
    if group is not None and grouped:
        for q, share in zip(spec.quota, shares, strict=True):
            checks.append((group.tats, "q:" + q.sig, q.inc, q.tau))
            checks.append((st.tats, "m:" + q.sig, member_inc(q.inc, q.tau, share, spec.weight, cost), q.tau))
    news: list[tuple[dict[str, int], str, int]] = []
    for tats, f, inc, tau in checks:
        new, over = gcra_step(tats.get(f, 0), now, inc, tau, cost)
        if over > 0:
            if over > wait:
                wait, wsrc = over, SRC_CONFIGURED
        else:
            news.append((tats, f, new))
    allowed = wait == 0
    if commit:
        if group is not None and grouped and not learned_deny:
            group.touch(spec, now)
        if allowed:
            for tats, f, new in news:
                tats[f] = new
            for p in st.policies.values():
                p.remaining = max(0, p.remaining - cost)

    rem, rst, nw, ssrc, nsrc = -1, -1, 0, SRC_NONE, SRC_NONE

    def post(r: int, rs: int, w: int, src: int) -> None:
        nonlocal rem, rst, nw, ssrc, nsrc
        if w > nw:
            nw, nsrc = w, src
        if rem < 0 or r < rem or (r == rem and rs > rst):
            rem, rst, ssrc = r, rs, src

    if st.blocked_us > now:
        post(0, st.blocked_us, st.blocked_us - now, SRC_LEARNED)
    for p in st.policies.values():
        if p.reset_us > now:
            eff = max(0, p.remaining - spec.reserve)
            post(eff, p.reset_us, p.reset_us - now if eff < 1 else 0, SRC_LEARNED)
    for tats, f, inc, tau in checks:
        post(*gcra_view(tats.get(f, 0), now, inc, tau), SRC_CONFIGURED)
    return Outcome(allowed, wait, wsrc, rem, rst, nw, ssrc, nsrc, now)
