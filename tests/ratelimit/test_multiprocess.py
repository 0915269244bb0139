"""Four real processes sharing one Redis: admission is exact and an upstream block reaches all.

Each worker is a separate Python process running ``WORKER`` (the service's own RedisLimiter,
nothing shared but Redis). Once all are connected, they start together at
an agreed wall-clock instant.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[2]
PROCESSES = 4

WORKER = r"""
import asyncio, json, sys, time
from redis.asyncio import Redis
from proxy.model import RateWindow
from proxy.ratelimit.limiter import LimitTarget
from proxy.ratelimit.redis import RedisLimiter
from proxy.ratelimit.signals.core import Observation

async def main(url: str, index: int, wired: bool) -> None:
    lim = RedisLimiter.create(url, fail_mode="closed", timeout_s=1.0)
    raw = Redis.from_url(url)
    store = None
    heard = []  # when invalidations arrived (wall clock)

    def on_invalidation(tenant_id, connection_id):
        heard.append(time.time())
        lim.on_invalidation(tenant_id, connection_id)

    if wired:  # as the service wires it: invalidations through the store's channel
        from proxy.store.redis import RedisStore
        from proxy.services import _announcer
        store = RedisStore(url, timeout_s=1.0)
        await store.open()
        await store.subscribe_invalidations(on_invalidation)
        lim.use_invalidations(_announcer(store))
    exact = LimitTarget("t/exact", (RateWindow(50, 60.0),))   # no refill within the run
    smooth = LimitTarget("t/smooth", (RateWindow(50, 2.0),))  # refills one cell per 40 ms
    blocked = LimitTarget("t/blocked")
    await lim.peek(blocked)  # connect and load the script before the start
    print("ready", flush=True)
    start_at = float(sys.stdin.readline())
    out = {"late": time.time() > start_at}
    await asyncio.sleep(start_at - time.time())

    def us(t):
        return int(t[0]) * 1_000_000 + int(t[1])

    first = us(await raw.time())
    n_exact = n_smooth = 0
    while time.time() < start_at + 1.0:
        n_exact += (await lim.acquire(exact)).allowed
        n_smooth += (await lim.acquire(smooth)).allowed
        await asyncio.sleep(0.0005)
    out.update(exact=n_exact, smooth=n_smooth, first_us=first, last_us=us(await raw.time()))

    t_obs = start_at + 1.8
    if index == 0:
        await asyncio.sleep(t_obs - time.time())
        out["observe_start"] = time.time()
        out["blocked_until"] = out["observe_start"] + 2.0
        await lim.observe(blocked.scope, Observation(429, out["blocked_until"], (), ("retry-after",)))
        out["observed_at"] = time.time()
    else:
        await asyncio.sleep(t_obs - 0.3 - time.time())
        attempts = []
        remembered = False
        while time.time() < t_obs + 3.5:
            t0 = time.time()
            allowed = (await lim.acquire(blocked)).allowed
            attempts.append((t0, allowed, time.time()))
            if not heard:  # before the announcement: "nothing learned" may be remembered
                remembered = remembered or "t/blocked" in lim._clear
            await asyncio.sleep(0.002)
        out["attempts"] = attempts
        out["remembered_clear"] = remembered
        out["heard"] = heard
    await lim.close()
    if store is not None:
        await store.close()
    await raw.aclose()
    print(json.dumps(out))

asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"))
"""


def run_workers(redis_url: str, wired: bool) -> list[dict[str, Any]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, redis_url, str(i), "1" if wired else "0"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=ROOT,
            text=True,
        )
        for i in range(PROCESSES)
    ]
    try:
        for p in procs:  # every worker is connected and has the script loaded
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        start_at = time.time() + 1.0  # a loaded host may take a while to wake four processes
        for p in procs:
            assert p.stdin is not None
            p.stdin.write(f"{start_at!r}\n")
            p.stdin.flush()
        results = []
        for p in procs:
            out, err = p.communicate(timeout=30)
            assert p.returncode == 0, err
            results.append(json.loads(out))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert not any(r["late"] for r in results), "a worker missed the common start; the host is overloaded"
    return results


@pytest.mark.parametrize("wired", [False, True], ids=["limiter-alone", "with-store-invalidations"])
def test_four_processes_share_one_limit_and_one_block(redis_url: str, wired: bool) -> None:
    # Wired as the service is, replicas remember "nothing learned" for the unconstrained scope
    # and skip Redis; the block must still stop every one of them at once.
    results = run_workers(redis_url, wired)

    # Exactly L admitted out of thousands of attempts when the window cannot refill in the run.
    assert sum(r["exact"] for r in results) == 50

    # With refill (50 per 2 s: burst 50, then one per 40 ms), exactly GCRA's allowance: never
    # more than 50 + floor(span / 40 ms), and no cell left unused while everyone hammers.
    cell = 40_000
    total = sum(r["smooth"] for r in results)
    outer = max(r["last_us"] for r in results) - min(r["first_us"] for r in results)
    inner = min(r["last_us"] for r in results) - max(r["first_us"] for r in results)
    assert 50 + inner // cell - 2 <= total <= 50 + outer // cell

    # After one process learns "blocked for 2 s", no process admits anything until it ends.
    # Unwired, every call asks Redis: nothing passes once the observation is stored. Wired, the
    # others skip Redis until the announcement reaches them (pub/sub, milliseconds): nothing
    # passes from the moment each one heard it, and each hears it well within the block.
    observer = results[0]
    end = observer["observe_start"] + 1.5
    during: list[bool] = []
    for r in results[1:]:
        start = observer["observed_at"]
        if wired:
            heard = [t for t in r["heard"] if t >= observer["observe_start"]]
            assert heard and heard[0] < end, "the announcement did not reach a replica in time"
            start = heard[0]
        during += [ok for t, ok, _ in r["attempts"] if start <= t <= end]
    attempts = [a for r in results[1:] for a in r["attempts"]]
    after = [ok for t, ok, _ in attempts if t >= observer["observe_start"] + 2.2]
    # "Before" means answered before the observation was sent: an attempt that started earlier
    # but reached Redis after the write (a loaded host) is rightly refused.
    before = [ok for _, ok, answered in attempts if answered < observer["observe_start"]]
    assert before and all(before)
    assert during and not any(during)
    assert after and all(after)
    assert all(r["remembered_clear"] == wired for r in results[1:])
