"""Fallback closed-loop HTTP load client for machines without ``wrk``.

``python bench/_loadgen.py URL -c CONNS -d SECONDS [-H 'Name: value' ...]`` keeps CONNS requests in
flight for SECONDS and prints one JSON object: requests, seconds, rps, p50_ms, p99_ms, bad.
Being Python it is far slower than wrk, so it caps what it can measure; the benchmarks say which
tool produced their numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import aiohttp


async def run(url: str, conns: int, duration: float, headers: dict[str, str]) -> dict[str, float | int]:
    latencies: list[float] = []
    bad = 0
    connector = aiohttp.TCPConnector(limit=conns)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
        start = time.perf_counter()
        deadline = start + duration

        async def worker() -> None:
            nonlocal bad
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                try:
                    async with session.get(url, headers=headers) as resp:
                        await resp.read()
                        if resp.status >= 400:
                            bad += 1
                except aiohttp.ClientError:
                    bad += 1
                latencies.append(time.perf_counter() - t0)

        await asyncio.gather(*(worker() for _ in range(conns)))
        elapsed = time.perf_counter() - start
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1e3 if latencies else 0.0

    return {
        "requests": len(latencies),
        "seconds": elapsed,
        "rps": len(latencies) / elapsed,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "bad": bad,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("-c", type=int, default=1)
    parser.add_argument("-d", type=float, default=5.0)
    parser.add_argument("-H", action="append", default=[])
    args = parser.parse_args()
    headers = dict(h.split(": ", 1) for h in args.H)
    print(json.dumps(asyncio.run(run(args.url, args.c, args.d, headers))))


if __name__ == "__main__":
    main()
