"""Charts and one summary table from the benchmarks' results files (``make bench`` runs it last).

Each benchmark run with ``--results bench/results`` leaves ``bench/results/<script>.json``: its
tables as printed, its ``ratio`` lines and the machine's context (``bench/_results.py``). This
renders, into the same folder:

- ``<script>.png`` per load table (``req/s`` and ``CPU us/req`` columns): CPU per request and
  requests per second side by side, one row of panels per connection count, connection-proxy's
  rows in blue and the references (bare aiohttp, nginx, Node's http-proxy) in grey, every bar
  labelled with its value and its multiple of the script's reference row;
- ``<script>-<n>.png`` for the other tables listed in ``BAR_CHARTS``;
- ``SUMMARY.md``: the machine and how loaded it was (load average at each script's start and
  end, the share of CPU other work took), every target ratio with its verdict, connection-proxy
  against its references, then every table; ``summary.csv`` and ``summary.json`` hold the same
  comparison for machines.

On a shared machine absolute figures move with other people's work; ratios measured in one
interleaved run do not (much), which is why the summary leads with them.

Run: ``python bench/report.py [--results DIR] [--out DIR]`` (needs the ``bench`` extra: matplotlib).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a display
import matplotlib.pyplot as plt

HERE = Path(__file__).resolve().parent
ORDER = ("proxy.py", "connection_service.py", "tunnel.py", "offload.py", "ratelimit.py", "resources.py")
# The row every other row of a load table is divided by.
REFERENCE = {"proxy.py": "bare aiohttp pass-through", "connection_service.py": "bare aiohttp handler"}
OURS, REF, NEUTRAL = "#1f5fbf", "#8c8c8c", "#d0d0d0"


def is_ours(label: str) -> bool:
    return label.startswith("connection-proxy")


@dataclass(frozen=True)
class BarChart:
    """A chart for a table that is not a load table: ``values`` are (column, axis label)."""

    label_column: str
    values: tuple[tuple[str, str], ...]
    is_reference: Callable[[str], bool] = lambda label: False


BAR_CHARTS: dict[tuple[str, str], BarChart] = {
    ("ratelimit.py", "limiter acquire cost"): BarChart(
        "call",
        (("us/call", "µs per acquire (wall, lower is better)"), ("CPU us/call", "CPU µs per acquire")),
        lambda label: label.startswith("no limiter"),
    ),
    ("ratelimit.py", "Redis commands per proxied call"): BarChart(
        "calls", (("per call", "Redis commands per call (target ≤ 1 admitted, ~0 denied)"),)
    ),
    ("offload.py", "table 1"): BarChart(
        "front",
        (("CPU us/req", "CPU µs per call, nginx and service together (lower is better)"), ("req/s", "req/s")),
        lambda label: label.startswith(("nginx alone", "floor:", "node")),
    ),
    ("tunnel.py", "tunnel (CONNECT) against path mode"): BarChart(
        "what",
        (("service CPU us", "service CPU µs (lower is better)"), ("client wall us", "client wall µs")),
        lambda label: label.startswith("path"),
    ),
}


def num(cell: Any) -> float | None:
    """A printed cell as a number ("1234", "0.52", "37%"); None for "-" and prose."""
    m = re.fullmatch(r"\s*(-?\d+(?:\.\d+)?)\s*%?\s*", str(cell))
    return float(m.group(1)) if m else None


def load_docs(results: Path) -> list[dict[str, Any]]:
    docs = []
    for path in sorted(results.glob("*.json")):
        if path.name == "summary.json":
            continue
        doc = json.loads(path.read_text())
        if isinstance(doc, dict) and "tables" in doc and "script" in doc:
            docs.append(doc)
    rank = {name: i for i, name in enumerate(ORDER)}
    return sorted(docs, key=lambda d: (rank.get(d["script"], len(ORDER)), d["script"]))


def is_load_table(table: dict[str, Any]) -> bool:
    return {"req/s", "CPU us/req", "conns"} <= set(table["headers"])


def load_rows(table: dict[str, Any]) -> list[dict[str, Any]]:
    """A load table's rows as dicts of numbers (None where the row printed "-")."""
    h = table["headers"]
    out = []
    for row in table["rows"]:
        cell = dict(zip(h, row, strict=False))
        out.append(
            {
                "label": row[0],
                "conns": int(num(cell["conns"]) or 0),
                "rps": num(cell.get("req/s")),
                "cpu_us": num(cell.get("CPU us/req")),
                "p50_ms": num(cell.get("p50 ms")),
                "p99_ms": num(cell.get("p99 ms")),
                "errors": num(cell.get("errors")),
                "others_pct": num(cell.get("others CPU")),
            }
        )
    return out


def with_ratios(script: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row with ``rps_x_ref`` and ``cpu_x_ref``: its multiple of the reference row's."""
    ref_label = REFERENCE.get(script)
    refs = {r["conns"]: r for r in rows if r["label"] == ref_label}
    for r in rows:
        ref = refs.get(r["conns"])
        r["reference"] = ref_label
        r["rps_x_ref"] = r["rps"] / ref["rps"] if ref and r["rps"] and ref["rps"] else None
        r["cpu_x_ref"] = r["cpu_us"] / ref["cpu_us"] if ref and r["cpu_us"] and ref["cpu_us"] else None
    return rows


def context_line(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    la0, la1 = m["loadavg_start"], m["loadavg_end"]
    return (
        f"{m['cpus']} CPUs ({m['cpu_model']}), shared; load average {la0[0]:.1f} at start, "
        f"{la1[0]:.1f} at end; {m['load_tool']}; commit {m['commit'] or '?'}; {doc['started'][:16]} UTC"
    )


def _bar_text(ax: Any, bars: Any, texts: Sequence[str]) -> None:
    top = max((b.get_width() for b in bars), default=0) or 1
    for bar, text in zip(bars, texts, strict=True):
        if text:
            ax.text(
                bar.get_width() + top * 0.01,
                bar.get_y() + bar.get_height() / 2,
                text,
                va="center",
                fontsize=9,
            )
    ax.set_xlim(0, top * 1.5)


def _legend(fig: Any, extra_reference: bool = True) -> None:
    from matplotlib.patches import Patch

    handles = [Patch(color=OURS, label="connection-proxy (us)")]
    if extra_reference:
        handles.append(Patch(color=REF, label="reference"))
    # 0.3 in above the bottom edge, leaving the last line for a footnote.
    y = 0.3 / fig.get_figheight()
    fig.legend(
        handles=handles,
        loc="lower center",
        bbox_to_anchor=(0.5, y),
        ncol=len(handles),
        frameon=False,
        fontsize=10,
    )


BOTTOM_IN = 0.75  # inches below the axes: tick labels' room is tight_layout's; legend and footnote


# Rows left out of the charts (named in a footnote instead): direct-to-upstream is the ceiling of
# the load generator and upstream, several times any proxy's rate, and would flatten every bar.
CEILING_ROWS = ("direct (no proxy)",)


def _header(fig: Any, title: str, context: str) -> float:
    """Title and context line at fixed distances from the top; returns the top of the axes area."""
    height = fig.get_figheight()
    fig.suptitle(title, fontsize=13, fontweight="bold", y=1 - 0.12 / height, va="top")
    fig.text(0.5, 1 - 0.48 / height, context, ha="center", va="top", fontsize=8.5, color="#444")
    return 1 - 0.62 / height


def chart_load(doc: dict[str, Any], table: dict[str, Any], path: Path) -> Path:
    every = with_ratios(doc["script"], load_rows(table))
    rows = [r for r in every if r["label"] not in CEILING_ROWS]
    levels = sorted({r["conns"] for r in rows})
    n = max(len([r for r in rows if r["conns"] == lv]) for lv in levels)
    fig, axes = plt.subplots(
        len(levels), 2, figsize=(14, 1.6 + len(levels) * (0.42 * n + 1.0)), squeeze=False
    )
    ref = REFERENCE.get(doc["script"], "")
    for i, level in enumerate(levels):
        sub = [r for r in rows if r["conns"] == level]
        labels = [r["label"] for r in sub]
        colours = [OURS if is_ours(r["label"]) else REF for r in sub]
        panels = (
            ("cpu_us", "cpu_x_ref", "CPU per request (lower is better)", "µs of CPU per request"),
            ("rps", "rps_x_ref", "throughput (higher is better)", "requests per second"),
        )
        for j, (key, xkey, title, unit) in enumerate(panels):
            ax = axes[i][j]
            values = [r[key] or 0.0 for r in sub]
            bars = ax.barh(range(len(sub)), values, color=colours)
            texts = []
            for r in sub:
                if r[key] is None:
                    texts.append("not measured")
                elif r["label"] == ref:
                    texts.append(f"{r[key]:,.0f}  (reference, 1.00x)")
                elif r[xkey] is None:
                    texts.append(f"{r[key]:,.0f}")
                else:
                    texts.append(f"{r[key]:,.0f}  ({r[xkey]:.2f}x bare)")
            _bar_text(ax, bars, texts)
            ax.set_yticks(range(len(sub)), labels if j == 0 else [""] * len(sub), fontsize=9)
            ax.invert_yaxis()
            ax.set_title(f"{title} @ {level} connection{'s' if level != 1 else ''}", fontsize=10)
            ax.set_xlabel(unit, fontsize=9)
            ax.grid(axis="x", alpha=0.3)
            ax.set_axisbelow(True)
    others = [r["others_pct"] for r in every if r["others_pct"] is not None]
    busy = (
        f"; other work took {min(others):.0f}-{max(others):.0f}% of the machine during runs" if others else ""
    )
    top = _header(fig, f"{doc['script']}: {table['title']}", context_line(doc) + busy)
    ceiling = [r for r in every if r["label"] in CEILING_ROWS and r["rps"]]
    note = "; ".join(f"{r['label']}: {r['rps']:,.0f} req/s @ {r['conns']} conns" for r in ceiling)
    _legend(fig)
    if note:
        fig.text(
            0.5,
            0.08 / fig.get_figheight(),
            f"not drawn (the load side's ceiling): {note}",
            ha="center",
            fontsize=8,
            color="#444",
        )
    fig.tight_layout(rect=(0, BOTTOM_IN / fig.get_figheight(), 1, top))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def chart_bars(doc: dict[str, Any], table: dict[str, Any], spec: BarChart, path: Path) -> Path | None:
    h = table["headers"]
    li = h.index(spec.label_column)
    cols = [(h.index(col), axis) for col, axis in spec.values if col in h]
    rows = [r for r in table["rows"] if any(num(r[ci]) is not None for ci, _ in cols)]
    if not rows or not cols:
        return None
    fig, axes = plt.subplots(
        1, len(cols), figsize=(max(11.0, 7.0 * len(cols)), 2.4 + 0.45 * len(rows)), squeeze=False
    )
    colours = [REF if spec.is_reference(r[li]) else OURS for r in rows]
    for j, (ci, axis) in enumerate(cols):
        ax = axes[0][j]
        values = [num(r[ci]) or 0.0 for r in rows]
        bars = ax.barh(range(len(rows)), values, color=colours)
        _bar_text(ax, bars, [r[ci] if num(r[ci]) is not None else "n/a" for r in rows])
        ax.set_yticks(range(len(rows)), [r[li] for r in rows] if j == 0 else [""] * len(rows), fontsize=9)
        ax.invert_yaxis()
        ax.set_title(axis, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        ax.set_axisbelow(True)
    top = _header(fig, f"{doc['script']}: {table['title']}", context_line(doc))
    _legend(fig, extra_reference=any(c == REF for c in colours))
    fig.tight_layout(rect=(0, BOTTOM_IN / fig.get_figheight(), 1, top))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def charts(docs: list[dict[str, Any]], out: Path) -> dict[tuple[str, int], Path]:
    made: dict[tuple[str, int], Path] = {}
    for doc in docs:
        stem = Path(doc["script"]).stem
        loads = [i for i, t in enumerate(doc["tables"]) if is_load_table(t)]
        drawn = [
            i for i, t in enumerate(doc["tables"]) if i in loads or (doc["script"], t["title"]) in BAR_CHARTS
        ]
        for i, table in enumerate(doc["tables"]):
            name = stem if drawn == [i] else f"{stem}-{i + 1}"
            if i in loads:
                made[(doc["script"], i)] = chart_load(doc, table, out / f"{name}.png")
            elif (spec := BAR_CHARTS.get((doc["script"], table["title"]))) is not None:
                path = chart_bars(doc, table, spec, out / f"{name}.png")
                if path is not None:
                    made[(doc["script"], i)] = path
    return made


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|")

    return [
        "| " + " | ".join(cell(h) for h in headers) + " |",
        "|" + "|".join("---" for _ in headers) + "|",
        *("| " + " | ".join(cell(v) for v in r) + " |" for r in rows),
    ]


def _f(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def comparison(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every load-table row of every script, with its multiples of the script's reference."""
    out = []
    for doc in docs:
        for table in doc["tables"]:
            if is_load_table(table):
                for r in with_ratios(doc["script"], load_rows(table)):
                    out.append({"script": doc["script"], "table": table["title"], **r})
    return out


def summary(docs: list[dict[str, Any]], made: dict[tuple[str, int], Path], out: Path) -> str:
    lines = ["# Benchmark summary", ""]
    lines.append(
        f"Rendered by `bench/report.py` from `bench/results/*.json` ({len(docs)} scripts). The machine "
        "is shared with other engineers' work and has 2 cores: absolute figures move with their load, "
        "the ratios (each measured side by side in one interleaved run) are what compares."
    )
    lines += ["", "## Machine and load", ""]
    if docs:
        m = docs[0]["machine"]
        lines += _md_table(
            ["", ""],
            [
                ["CPU", f"{m['cpus']} x {m['cpu_model']}"],
                ["memory", f"{m['memory_gib']} GiB"],
                [
                    "kernel / Python / Node / nginx",
                    f"{m['kernel']} / {m['python']} / {m['node']} / {m['nginx']}",
                ],
                ["load generator", m["load_tool"]],
            ],
        )
        lines.append("")
    rows = []
    for doc in docs:
        m = doc["machine"]
        others = [r["others_pct"] for r in comparison([doc]) if r["others_pct"] is not None]
        rows.append(
            [
                doc["script"],
                doc["started"].replace("T", " ")[:16],
                " / ".join(f"{x:.2f}" for x in m["loadavg_start"]),
                " / ".join(f"{x:.2f}" for x in m["loadavg_end"]),
                f"{min(others):.0f}-{max(others):.0f}%" if others else "-",
                m["commit"] or "-",
                " ".join(doc["argv"]) or "(defaults)",
            ]
        )
    lines += _md_table(
        [
            "script",
            "started (UTC)",
            "load avg 1/5/15 at start",
            "at end",
            "others' CPU in runs",
            "commit",
            "options",
        ],
        rows,
    )
    lines += ["", "## Targets", ""]
    ratio_rows = []
    for doc in docs:
        for r in doc["ratios"]:
            verdict = (
                "n/a: " + (r["why"] or "") if r["value"] is None else ("meets" if r["ok"] else "**MISSES**")
            )
            ratio_rows.append([doc["script"], r["name"], _f(r["value"], ".2f"), r["target"], verdict])
    lines += _md_table(["script", "ratio", "value", "target", "verdict"], ratio_rows)
    lines += ["", "## connection-proxy against the references", ""]
    comp = comparison(docs)
    lines += _md_table(
        [
            "script",
            "row",
            "conns",
            "req/s",
            "x ref req/s",
            "CPU µs/req",
            "x ref CPU",
            "p99 ms",
            "errors",
            "others CPU",
        ],
        [
            [
                r["script"],
                f"**{r['label']}**" if is_ours(r["label"]) else r["label"],
                r["conns"],
                _f(r["rps"], ",.0f"),
                _f(r["rps_x_ref"], ".2f"),
                _f(r["cpu_us"], ".0f"),
                _f(r["cpu_x_ref"], ".2f"),
                _f(r["p99_ms"], ".2f"),
                _f(r["errors"], ".0f"),
                _f(r["others_pct"], ".0f") + ("%" if r["others_pct"] is not None else ""),
            ]
            for r in comp
        ],
    )
    lines += [
        "",
        "x ref: the row's figure over its script's reference row ("
        + ", ".join(f"`{s}`: {ref}" for s, ref in REFERENCE.items())
        + ") at the same connection count.",
        "",
    ]
    lines += ["## Every table", ""]
    for doc in docs:
        lines += [f"### {doc['script']}", "", "`" + context_line(doc) + "`", ""]
        for i, table in enumerate(doc["tables"]):
            lines += [f"**{table['title']}**", ""]
            chart = made.get((doc["script"], i))
            if chart is not None:
                lines += [f"![{doc['script']}: {table['title']}]({chart.relative_to(out).as_posix()})", ""]
            lines += _md_table(table["headers"], table["rows"])
            lines.append("")
    return "\n".join(lines)


CSV_FIELDS = (
    "script", "table", "label", "conns", "rps", "rps_x_ref", "cpu_us", "cpu_x_ref",
    "p50_ms", "p99_ms", "errors", "others_pct", "reference",
)  # fmt: skip


def write_all(results: Path, out: Path) -> list[Path]:
    docs = load_docs(results)
    if not docs:
        raise SystemExit(f"no results files in {results} (run the benchmarks with --results {results})")
    out.mkdir(parents=True, exist_ok=True)
    made = charts(docs, out)
    written = sorted(made.values())
    (out / "SUMMARY.md").write_text(summary(docs, made, out) + "\n")
    comp = comparison(docs)
    with open(out / "summary.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        w.writeheader()
        w.writerows({k: r.get(k) for k in CSV_FIELDS} for r in comp)
    doc = {
        "generated": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "scripts": [
            {"script": d["script"], "started": d["started"], "machine": d["machine"], "ratios": d["ratios"]}
            for d in docs
        ],
        "comparison": comp,
    }
    (out / "summary.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    return [*written, out / "SUMMARY.md", out / "summary.csv", out / "summary.json"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--results", type=Path, default=HERE / "results", help="folder of <script>.json files"
    )
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: the results folder)")
    args = parser.parse_args(argv)
    for path in write_all(args.results, args.out or args.results):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
