"""Every Lua script the code loads ships with the package.

Scripts are read with ``importlib.resources`` from beside the module that names them. One missing
from the source tree fails at import; one missing from ``[tool.setuptools.package-data]`` fails only
in an installed wheel, at import, far from the change that caused it. Both are checked here.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import proxy

PACKAGE = Path(proxy.__file__).parent
ROOT = PACKAGE.parent
# A script is named as a string literal, e.g. lua("put_tenant.lua") or joinpath("limiter.lua").
NAMED = re.compile(r"""["']([\w.-]+\.lua)["']""")


def named_scripts() -> set[Path]:
    return {
        py.parent / name
        for py in PACKAGE.rglob("*.py")
        for name in NAMED.findall(py.read_text(encoding="utf-8"))
    }


def test_every_script_the_code_names_exists_beside_its_module() -> None:
    named = named_scripts()
    assert len(named) >= 2, "no script names found: has the way scripts are loaded changed?"
    assert sorted(str(p.relative_to(ROOT)) for p in named if not p.is_file()) == []


def test_every_script_is_named_and_in_the_wheel() -> None:
    scripts = set(PACKAGE.rglob("*.lua"))
    # A script no code names is dead, or named in a way this test cannot see.
    assert sorted(str(p.relative_to(ROOT)) for p in scripts - named_scripts()) == []
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    globs = pyproject["tool"]["setuptools"]["package-data"]["proxy"]
    packaged = {p for pattern in globs for p in PACKAGE.glob(pattern)}
    assert sorted(str(p.relative_to(ROOT)) for p in scripts - packaged) == []
