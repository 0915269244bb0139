"""The serve command's process-level tuning, and what a new user sees of the command line: help
without markup, a usage for a bare command group, refusals of values that would be ignored (the
commands themselves run as real processes in tests/web and tests/vault/test_vault.py)."""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.cli import GC_GEN0_THRESHOLD, _tune_collector, build_parser


async def test_the_collector_is_tuned_for_a_server_once_started() -> None:
    before = gc.get_threshold()
    try:
        await _tune_collector(None)
        gen0, gen1, gen2 = gc.get_threshold()
        assert gen0 == GC_GEN0_THRESHOLD > before[0]
        assert (gen1, gen2) == before[1:]  # the older generations keep their settings
        assert gc.get_freeze_count() > 0  # the start-up heap is out of the collector's way
        assert gc.collect() >= 0  # collection still works
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


# --- what a new user sees: help, no arguments, bad values ---------------------------------------


def _parsers(p: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield p
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from _parsers(child)


def test_no_help_text_shows_markup() -> None:
    helps = {p.prog: p.format_help() for p in _parsers(build_parser())}
    assert len(helps) > 20  # every command and sub-command was walked
    assert {prog: h for prog, h in helps.items() if "`" in h} == {}


def cli(*args: str, env: dict[str, str] | None = None, tmp: Path) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PROXY_")}
    clean.update({"PROXY_DATA_DIR": str(tmp), **(env or {})})
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args], env=clean, cwd=tmp, capture_output=True, text=True, timeout=60
    )


@pytest.mark.system
@pytest.mark.parametrize(
    ("args", "expect"),
    [
        ((), ["serve", "keys", "admin", "backup", "give one of the commands above"]),
        (("keys",), ["rotate", "retire", "connection-proxy keys: give one of the commands above"]),
        (("admin", "connections"), ["put", "list", "connection-proxy admin connections: give one"]),
    ],
)
def test_a_command_group_alone_prints_its_usage(
    args: tuple[str, ...], expect: list[str], tmp_path: Path
) -> None:
    result = cli(*args, tmp=tmp_path)
    assert result.returncode == 2
    assert "the following arguments are required" not in result.stderr
    for text in expect:
        assert text in result.stderr


@pytest.mark.system
@pytest.mark.parametrize(
    ("args", "env", "expect"),
    [
        (
            ("serve", "--workers", "0"),
            {},
            "argument --workers: must be a whole number of processes, at least 1",
        ),
        (("serve",), {"PROXY_WORKERS": "0"}, "setting 'workers': must be >= 1, got 0"),
        (
            ("serve",),
            {"PROXY_DEV_MOD": "false"},
            "setting 'PROXY_DEV_MOD': unknown environment variable (did you mean PROXY_DEV_MODE?)",
        ),
        (
            ("admin", "tenants", "list"),
            {"PROXY_ULR": "http://127.0.0.1:1"},
            "setting 'PROXY_ULR': unknown environment variable (did you mean PROXY_URL?)",
        ),
    ],
)
def test_commands_refuse_what_they_would_otherwise_ignore(
    args: tuple[str, ...], env: dict[str, str], expect: str, tmp_path: Path
) -> None:
    result = cli(*args, env=env, tmp=tmp_path)
    assert result.returncode == 2, result.stderr
    assert expect in result.stderr
    assert not (tmp_path / "proxy.sqlite3").exists()  # refused before anything started
