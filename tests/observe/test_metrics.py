"""Batched hot-path counts: what a scrape reads equals what direct prometheus-client calls give."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from proxy.observe import metrics
from proxy.observe.metrics import REGISTRY, Tally, flush_tallies
from proxy.observe.prometheus_internals import LatencyTally

BUCKETS = (0.001, 0.01, 0.1, 1.0)
ROOT = Path(__file__).resolve().parents[2]


def _sample(registry: CollectorRegistry, name: str, labels: dict[str, str]) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def test_tally_counts_reach_the_counter_when_the_registry_is_collected() -> None:
    before_ok = _sample(REGISTRY, "proxy_requests_total", {"front": "tally-test", "outcome": "ok"})
    for _ in range(5):
        metrics.REQUESTS_TALLY.inc(("tally-test", "ok"))
    metrics.REQUESTS_TALLY.inc(("tally-test", "UPSTREAM_TIMEOUT"))
    # Reading the registry (a scrape, or this) hands pending counts over first.
    assert (
        _sample(REGISTRY, "proxy_requests_total", {"front": "tally-test", "outcome": "ok"}) == before_ok + 5
    )
    text = generate_latest(REGISTRY).decode()
    assert 'proxy_requests_total{front="tally-test",outcome="UPSTREAM_TIMEOUT"} 1.0' in text


def test_latency_tally_matches_direct_histogram_observations() -> None:
    # The same values through LatencyTally and through Histogram.observe give the same
    # exposition, bucket boundaries (value == bound) included.
    direct_reg, tally_reg = CollectorRegistry(), CollectorRegistry()
    direct = Histogram("lat", "latency", ["integration"], buckets=BUCKETS, registry=direct_reg)
    tallied = Histogram("lat", "latency", ["integration"], buckets=BUCKETS, registry=tally_reg)
    tally = LatencyTally(tallied, BUCKETS)
    assert not tally._direct  # the prometheus-client internals it relies on are present
    rng = random.Random(7)
    values = [*BUCKETS, 0.0, 5.0, 1e9] + [rng.uniform(0, 2) for _ in range(500)]
    for i, value in enumerate(values):
        labels = ("a",) if i % 3 else ("b",)
        direct.labels(*labels).observe(value)
        tally.observe(labels, value)
    flush_tallies()

    def lines(registry: CollectorRegistry) -> list[str]:
        return [line for line in generate_latest(registry).decode().splitlines() if "_created" not in line]

    assert lines(tally_reg) == lines(direct_reg)
    tally.flush()  # nothing pending: a second flush changes nothing
    assert lines(tally_reg) == lines(direct_reg)


def test_tally_keeps_counting_after_a_flush() -> None:
    registry = CollectorRegistry()
    counter = Counter("things", "things", ["kind"], registry=registry)
    tally = Tally(counter)
    tally.inc(("x",))
    tally.flush()
    tally.inc(("x",))
    tally.inc(("y",))
    tally.flush()
    assert _sample(registry, "things_total", {"kind": "x"}) == 2
    assert _sample(registry, "things_total", {"kind": "y"}) == 1


@pytest.mark.system
def test_with_workers_the_shared_files_carry_the_tallies_and_nothing_else(tmp_path: Path) -> None:
    # Multiprocess mode is chosen at import, so this runs in a fresh interpreter.
    code = (
        "from proxy.observe import metrics\n"
        "metrics.REQUESTS_TALLY.inc(('path', 'ok'))\n"
        "metrics.UPSTREAM_LATENCY_TALLY.observe(('http_bearer',), 0.003)\n"
        "print(metrics.exposition().decode())\n"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    samples = [line for line in out.splitlines() if line and not line.startswith("#")]
    assert samples and all(line.startswith("proxy_") for line in samples)
    assert 'proxy_requests_total{front="path",outcome="ok"} 1.0' in out
    assert 'proxy_upstream_latency_seconds_bucket{integration="http_bearer",le="0.005"} 1.0' in out
    assert 'proxy_upstream_latency_seconds_bucket{integration="http_bearer",le="0.0025"} 0.0' in out
