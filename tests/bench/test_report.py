"""bench/report.py turns a small fixed set of results files into PNG charts and a summary.

Fast and untimed: the inputs are ``tests/bench/data/results/*.json`` (the shape the benchmarks
write with ``--results``), nothing is measured.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DATA = Path(__file__).resolve().parent / "data" / "results"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One render for the module: matplotlib's start-up is most of a run's time."""
    results = tmp_path_factory.mktemp("report") / "results"
    shutil.copytree(DATA, results)
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "report.py"), "--results", str(results)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return results, out.stdout


def test_report_renders_charts_and_a_summary_of_every_row(rendered: tuple[Path, str]) -> None:
    results, stdout = rendered
    # One chart per load table, one for the limiter table that has a chart spec; none for the
    # accuracy table (no numbers to draw).
    pngs = sorted(p.name for p in results.glob("*.png"))
    assert pngs == ["proxy.png", "ratelimit.png"], pngs  # one chart: no table number
    for name in pngs:
        data = (results / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, name
        assert f"wrote {results / name}" in stdout

    summary = (results / "SUMMARY.md").read_text()
    source = json.loads((DATA / "proxy.json").read_text())
    for row in source["tables"][0]["rows"]:
        assert row[0] in summary, row[0]
    assert "![proxy.py: proxied GET to one local upstream](proxy.png)" in summary
    # The ratios with their verdicts, an unmeasured one with its reason; the load context.
    assert (
        "| proxy.py | connection-proxy/bare CPU per request @64 conns | 1.35 | <= 1.3 | **MISSES** |"
        in summary
    )
    assert "| ratelimit.py | admitted/limit across 4 processes | 1.00 | = 1.00 exactly | meets |" in summary
    assert "n/a: redis-server not installed" in summary
    assert "load avg 1/5/15 at start" in summary and "3.70 / " in summary
    # connection-proxy against the bare pass-through: 556 / 411 CPU us per request.
    assert "| proxy.py | **connection-proxy** | 64 | 1,268 | 1.03 | 556 | 1.35 |" in summary


def test_report_machine_readable_summary(rendered: tuple[Path, str]) -> None:
    results, _ = rendered
    with open(results / "summary.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    node = [r for r in rows if r["label"] == "node http-proxy (npm)" and r["conns"] == "64"]
    assert len(node) == 1 and float(node[0]["cpu_us"]) == 925.0
    assert abs(float(node[0]["cpu_x_ref"]) - 925 / 411) < 1e-6
    doc = json.loads((results / "summary.json").read_text())
    assert [s["script"] for s in doc["scripts"]] == ["proxy.py", "ratelimit.py"]
    assert len(doc["comparison"]) == len(rows) == 16
