"""Smoke test of the benchmarks: each runs end to end in ``--quick`` mode and prints its ratios.

The numbers of a quick run mean nothing; what this guards is that every benchmark still starts
its processes, drives real load through them, cleans up and reaches a numeric ratio line for
each target (a row that cannot be measured prints ``n/a ... not available`` and fails here).
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parents[2]
RATIO = re.compile(r"^ratio (?P<name>.+?): (?P<value>n/a|\d+\.\d+) \(target (?P<target>[^)]*)\)", re.M)

EXPECTED = {
    "connection_service.py": ["connection-proxy/bare rps @1 conns", "connection-proxy/bare rps @64 conns"],
    "proxy.py": ["connection-proxy/bare CPU per request @64 conns", "workers 2/1 rps @64 conns"],
    "resources.py": [
        "healthz p99 ms during 8 concurrent max-size envelope calls",
        "service peak RSS MiB (helpers included) during them",
        "healthz answered on the kept-alive connection during the slowloris (share)",
    ],
    "offload.py": [
        "nginx + decision (uncached) / node http-proxy rps",
        "nginx + decision (cached) / nginx alone CPU per call",
    ],
    "tunnel.py": [
        "tunnel/path CPU per call",
        "uncached/cached new tunnel CPU",
        "https-listener/plain-listener tunnel CPU per call",
    ],
    "ratelimit.py": [
        "redis commands per admitted proxied call",
        "redis commands per locally denied call",
        "admitted/limit across 4 processes",
    ],
}


@pytest.fixture(scope="module", autouse=True)
def node_packages() -> None:
    """The Node reference's one-time ``npm ci`` (a fresh clone has no node_modules) happens here,
    outside the time bound of whichever benchmark first starts Node."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import _refservers

        _refservers.ensure_node_packages()
    finally:
        sys.path.remove(str(REPO / "bench"))


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_bench_quick_run_prints_numeric_ratios(script: str) -> None:
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), "--quick"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    elapsed = time.monotonic() - started
    assert out.returncode == 0, (
        f"{script} exited {out.returncode}:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
    )
    ratios = {m["name"]: m["value"] for m in RATIO.finditer(out.stdout)}
    assert sorted(ratios) == sorted(EXPECTED[script]), out.stdout
    missing = {name: v for name, v in ratios.items() if v == "n/a"}
    assert not missing, f"{script}: ratios not measured:\n{out.stdout}"
    assert all(float(v) >= 0 for v in ratios.values()), out.stdout
    # The results table was printed.
    assert re.search(r"^-+  -+", out.stdout, re.M), out.stdout
    # A budget for the suite, not a speed claim: a quick run is ~10-15 s on a quiet machine.
    assert elapsed < 45, f"{script} --quick took {elapsed:.1f}s (keep each quick run well under a minute)"
