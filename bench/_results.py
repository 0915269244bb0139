"""Machine-readable results of a benchmark run, for ``bench/report.py`` (charts and SUMMARY.md).

Every benchmark prints its tables and ``ratio`` lines through ``_common``; this module keeps a
copy of each (cells as printed, so the JSON says exactly what the terminal said), the script's
whole output, and the context a reader needs to trust a figure on a shared machine: CPU model
and count, the load average when the run started and ended, the commit measured. With
``--results DIR`` (every benchmark's option) ``DIR/<script>.json`` is written when the script
exits, whatever path it exits by.
"""

from __future__ import annotations

import atexit
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

REPO = Path(__file__).resolve().parent.parent
SCHEMA = 1

_tables: list[dict[str, Any]] = []
_ratios: list[dict[str, Any]] = []
_started = dt.datetime.now(dt.UTC)
_load_start = os.getloadavg()


class _Tee:
    """stdout that also keeps what was written (the header lines say how the run was made)."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self.parts: list[str] = []

    def write(self, text: str) -> int:
        self.parts.append(text)
        return self._out.write(text)

    def flush(self) -> None:
        self._out.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._out, name)


_tee: _Tee | None = None


def capture_stdout() -> None:
    global _tee
    if _tee is None and not isinstance(sys.stdout, _Tee):
        _tee = _Tee(sys.stdout)
        sys.stdout = _tee


def table(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    _tables.append(
        {
            "title": title or f"table {len(_tables) + 1}",
            "headers": [str(h) for h in headers],
            "rows": [[str(c) for c in r] for r in rows],
        }
    )


def ratio(name: str, value: float | None, target: str, ok: bool | None, why: str = "") -> None:
    _ratios.append({"name": name, "value": value, "target": target, "ok": ok, "why": why or None})


def _run(argv: Sequence[str]) -> str:
    try:
        out = subprocess.run(list(argv), capture_output=True, text=True, timeout=10, cwd=REPO)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (out.stdout or out.stderr).strip()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    """What the numbers were measured on, and how busy it was."""
    commit = _run(["git", "rev-parse", "--short", "HEAD"])
    dirty = bool(_run(["git", "status", "--porcelain", "--untracked-files=no"]))
    return {
        "cpu_model": _cpu_model(),
        "cpus": len(os.sched_getaffinity(0)),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "node": _run(["node", "--version"]) if shutil.which("node") else None,
        "nginx": _run(["nginx", "-v"]).removeprefix("nginx version: ") if shutil.which("nginx") else None,
        "load_tool": "wrk" if shutil.which("wrk") else "python (bench/_loadgen.py)",
        "loadavg_start": [round(x, 2) for x in _load_start],
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "commit": commit + ("+dirty" if dirty and commit else ""),
    }


def document(script: str) -> dict[str, Any]:
    output = "".join(_tee.parts) if _tee is not None else ""
    return {
        "schema": SCHEMA,
        "script": script,
        "argv": sys.argv[1:],
        "started": _started.isoformat(timespec="seconds"),
        "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "context": [ln[2:] for ln in output.splitlines() if ln.startswith("# ")],
        "tables": _tables,
        "ratios": _ratios,
        "output": output,
    }


def save(directory: Path, script: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{Path(script).stem}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(document(script), indent=1, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def save_at_exit(directory: Path) -> None:
    """Write the results file when the script exits (normally, by sys.exit, or by an error)."""
    script = Path(sys.argv[0]).name
    atexit.register(lambda: print(f"# results: {save(directory, script)}", file=sys.stderr))
