"""The configuration reference, generated from the settings object so it cannot drift.

``docs/configuration.md`` is this module's output: every setting ``proxy.settings`` parses, with
its TOML key, environment variable, type (and bound), default and description. Descriptions are
the attribute docstrings under each ``Settings`` field, read from the module's source (Python keeps
no attribute docstrings at run time); bounds come from the parsers themselves. A test compares the
file with a fresh rendering, so a new setting without a description, or a changed default, fails
until ``make docs`` (``python -m proxy.configref --write``) is run. Pure module.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import sys
from pathlib import Path
from typing import Any

from proxy import settings as settings_mod

DOC_PATH = Path("docs") / "configuration.md"
REGENERATE = "make docs  (or: python -m proxy.configref --write)"

# Annotation (as written in proxy/settings.py) -> how the reference names the type.
_TYPES = {
    "str": "string",
    "str | None": "string",
    "int": "integer",
    "float": "number",
    "bool": "boolean",
    "Path": "path",
    "Path | None": "path",
    "tuple[str, ...]": "list of strings",
    "tuple[Path, ...]": "list of paths",
    "tuple[IPNetwork, ...]": "list of CIDRs",
    "tuple[str, int] | None": "HOST:PORT",
}
# Defaults that are computed rather than stored in the field.
_DERIVED_DEFAULTS = {
    "listen": "127.0.0.1:8080",
    "public_url": "http://{listen} (a wildcard host becomes loopback)",
}


def field_docs() -> dict[str, str]:
    """Settings field name -> its attribute docstring (whitespace folded)."""
    tree = ast.parse(inspect.getsource(settings_mod))
    (cls,) = (n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Settings")
    docs: dict[str, str] = {}
    body = cls.body
    for node, after in zip(body, [*body[1:], None], strict=True):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            # RST literals (``x``) become Markdown ones (`x`).
            docs[node.target.id] = " ".join(after.value.value.split()).replace("``", "`")
    return docs


@dataclasses.dataclass(frozen=True)
class Entry:
    key: str
    env: str
    type: str
    default: str
    description: str
    secret: bool


def _default(key: str, value: Any) -> str:
    if key in _DERIVED_DEFAULTS:
        return _DERIVED_DEFAULTS[key]
    if value is None:
        return "unset"
    if isinstance(value, tuple):
        return "empty" if not value else ", ".join(map(str, value))
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Path) and not value.is_absolute():
        return f"./{value}"
    if isinstance(value, int) and value >= 1024 * 1024 and value % (1024 * 1024) == 0:
        return f"{value} ({value // (1024 * 1024)} MiB)"
    return str(value).lower() if key == "log_level" else str(value)


def entries() -> list[Entry]:
    """One entry per setting key, in the order ``proxy.settings`` declares them."""
    docs = field_docs()
    fields = {f.name: f for f in dataclasses.fields(settings_mod.Settings)}
    defaults = settings_mod.Settings()
    out = []
    for key, parser in settings_mod._PARSERS.items():
        names = settings_mod.COMPOSITE_KEYS.get(key, (key,))
        first = fields[names[0]]
        kind = "HOST:PORT" if key == "listen" else _TYPES.get(str(first.type), str(first.type))
        constraint = getattr(parser, "constraint", None)
        if constraint:
            kind = f"{kind}, {constraint}"
        description = docs.get(names[0], "")
        if not description:
            raise ValueError(
                f"setting {key!r} has no description: add a docstring line under its field in "
                "proxy/settings.py, then run " + REGENERATE
            )
        value = getattr(defaults, names[0]) if len(names) == 1 else None
        out.append(
            Entry(key, settings_mod.env_name(key), kind, _default(key, value), description, not first.repr)
        )
    return out


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render() -> str:
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated from proxy/settings.py by `make docs`; do not edit by hand. -->",
        "",
        "Settings come from a TOML file (`serve --config FILE`, or `PROXY_CONFIG`) and from `PROXY_*`",
        "environment variables, the environment winning over the file and command-line options",
        "(`--listen`, `--workers`) winning over both. Every value is checked at start-up; a bad one",
        "stops the process (exit status 2) with a message naming the setting. So does an unknown key",
        "in the file or an unknown `PROXY_*` variable, with the closest known name.",
        "",
        "TOML tables flatten with an underscore: `[upstream] connect_timeout_s = 5` is",
        "`upstream_connect_timeout_s`. Lists are TOML arrays, or comma-separated in the environment.",
        "Booleans accept `true/false`, `1/0`, `yes/no`, `on/off`. An empty variable means unset.",
        "Settings marked *secret* are never logged or shown; prefer a file or the environment",
        "to the TOML file for them.",
        "",
        "| setting | environment variable | type | default | description |",
        "|---|---|---|---|---|",
    ]
    for e in entries():
        kind = f"{e.type}, *secret*" if e.secret else e.type
        lines.append(
            f"| `{e.key}` | `{e.env}` | {_cell(kind)} | {_cell(e.default)} | {_cell(e.description)} |"
        )
    lines += [
        "",
        "## Variables of the command line",
        "",
        "These `PROXY_*` variables are not settings; the commands read them. Any `PROXY_*`",
        "variable not in either table is refused at start.",
        "",
        "| variable | meaning |",
        "|---|---|",
    ]
    lines += [f"| `{name}` | {_cell(text)} |" for name, text in settings_mod.CLI_VARIABLES.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m proxy.configref", description=__doc__)
    parser.add_argument("--write", action="store_true", help=f"write {DOC_PATH} instead of printing it")
    args = parser.parse_args(argv)
    text = render()
    if args.write:
        DOC_PATH.parent.mkdir(parents=True, exist_ok=True)
        DOC_PATH.write_text(text, encoding="utf-8")
        print(f"wrote {DOC_PATH}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
