"""The layering the tree promises, checked on the source (``python -m tests.support.imports`` prints
the same graph): no import cycles, every arrow from the web edge inward, and the pure modules
loading neither aiohttp nor redis, even transitively."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support import imports

# Pure by design: they decide (injection, header parsing, limiter decisions, egress checks,
# OAuth state, crypto, destination rules) and are tested without sockets.
PURE = (
    "proxy.cache",
    "proxy.catalogue",
    "proxy.connect.sessions",
    "proxy.errors",
    "proxy.jsonin",
    "proxy.model",
    "proxy.oauth.flows",
    "proxy.oauth.state",
    "proxy.observe.outcome",
    "proxy.observe.trace",
    "proxy.pipeline.bodykind",
    "proxy.pipeline.headers",
    "proxy.pipeline.inject",
    "proxy.pipeline.urls",
    "proxy.ratelimit.gcra",
    "proxy.redisurl",
    "proxy.ratelimit.signals.core",
    "proxy.ratelimit.signals.reader",
    "proxy.ratelimit.signals.vendors",
    "proxy.ratelimit.targets",
    "proxy.runenv",
    "proxy.security.ca",
    "proxy.security.crypto",
    "proxy.security.destinations",
    "proxy.security.egress",
    "proxy.settings",
    "proxy.shapes",
    "proxy.vault.inputs",
    "proxy.vault.records",
)
IO_PACKAGES = {"aiohttp", "redis", "multidict", "yarl", "aiohttp_jinja2"}


def test_the_package_has_no_import_cycles() -> None:
    assert imports.cycles(imports.graph()) == []


def test_the_core_never_imports_the_web_edge() -> None:
    assert imports.inward_violations(imports.graph()) == []


@pytest.mark.parametrize("module", PURE)
def test_pure_modules_reach_no_io_library(module: str) -> None:
    assert imports.reaches(imports.graph(), module, IO_PACKAGES) == set()


def test_pure_modules_load_no_io_library_at_run_time() -> None:
    code = (
        "import importlib, sys\n"
        f"for m in {PURE!r}: importlib.import_module(m)\n"
        f"print(sorted(p for p in {sorted(IO_PACKAGES)!r} if p in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_graph_sees_lazy_and_type_checking_imports() -> None:
    g = imports.graph()
    # proxy.pipeline.pipeline imports these only under TYPE_CHECKING.
    assert {"proxy.vault.vault", "proxy.settings"} <= g["proxy.pipeline.pipeline"]
    assert imports.cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
