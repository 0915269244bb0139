"""The import graph of ``proxy/``, read from the source: every import, lazy and TYPE_CHECKING ones
included (a cycle hidden in a function body is still a cycle).

Run ``python -m tests.support.imports`` for the graph, its cycles and its layering problems; the
architecture tests assert on the same functions, so what the command shows is what CI checks.
"""

from __future__ import annotations

import ast
import functools
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "proxy"
EDGE_PREFIXES = ("proxy.web", "proxy.cli", "proxy.__main__")


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    out: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            out.add(target)
            # "from proxy import vault" imports the module proxy.vault.
            out.update(f"{target}.{alias.name}" for alias in node.names)
    return out


def graph() -> dict[str, set[str]]:
    """module -> every module it imports (``proxy.*`` names resolved to existing modules; others
    kept as their top-level package, e.g. ``aiohttp``). Read once per process (the source does not
    change under a test run); each call gets its own copy."""
    return {name: set(deps) for name, deps in _graph().items()}


@functools.cache
def _graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    out: dict[str, set[str]] = {}
    for name, path in files.items():
        raw = _imports(ast.parse(path.read_text(), str(path)), name, path.name == "__init__.py")
        deps: set[str] = set()
        for target in raw:
            if target.startswith("proxy"):
                if target in files and target != name:
                    deps.add(target)
            elif target:
                deps.add(target.split(".")[0])
        out[name] = deps
    return out


def cycles(g: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in g.get(v, ()):
            if w not in g:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return sorted(found)


def inward_violations(g: Mapping[str, Iterable[str]]) -> list[tuple[str, str]]:
    """Imports from the core into the web edge (every arrow must point from the edge inward)."""
    return sorted(
        (src, dst)
        for src, deps in g.items()
        if not src.startswith(EDGE_PREFIXES)
        for dst in deps
        if dst.startswith(EDGE_PREFIXES)
    )


def reaches(g: Mapping[str, Iterable[str]], start: str, targets: set[str]) -> set[str]:
    """Which of ``targets`` (top-level packages such as ``aiohttp``) ``start`` loads, transitively."""
    seen: set[str] = set()
    todo = [start]
    hit: set[str] = set()
    while todo:
        v = todo.pop()
        if v in seen:
            continue
        seen.add(v)
        for w in g.get(v, ()):
            if w in targets:
                hit.add(w)
            elif w in g:
                todo.append(w)
    return hit


def main() -> int:
    g = graph()
    for name in sorted(g):
        inner = sorted(d for d in g[name] if d.startswith("proxy"))
        print(f"{name} -> {', '.join(inner) if inner else '(nothing of proxy)'}")
    print()
    found = cycles(g)
    print(f"cycles: {len(found)}")
    for comp in found:
        print("  " + " <-> ".join(comp))
    bad = inward_violations(g)
    print(f"core -> web edge imports: {len(bad)}")
    for src, dst in bad:
        print(f"  {src} -> {dst}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
