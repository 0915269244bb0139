"""Every Lua script the code loads ships with the package, and so does the one integration catalogue.

Scripts are read with ``importlib.resources`` from beside the module that names them. One missing
from the source tree fails at import; one missing from ``[tool.setuptools.package-data]`` fails only
in an installed wheel, at import, far from the change that caused it. Both are checked here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

import proxy
from proxy.catalogue import BUILTIN_DIR, Catalogue

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


# --- the integration catalogue: one copy, the same whichever way the package is installed -------


def test_the_builtin_catalogue_is_package_data_and_exists_once() -> None:
    assert BUILTIN_DIR == PACKAGE / "builtin_integrations"
    files = sorted(p.name for p in BUILTIN_DIR.glob("*.toml"))
    assert files, "no built-in integration files"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    globs = pyproject["tool"]["setuptools"]["package-data"]["proxy"]
    assert sorted(p.name for g in globs for p in PACKAGE.glob(g) if p.parent == BUILTIN_DIR) == files
    # config/integrations is only a way to the same files, never a second copy.
    browse = ROOT / "config" / "integrations"
    assert browse.is_symlink() and browse.resolve() == BUILTIN_DIR


@pytest.mark.system
def test_a_wheel_installed_into_a_fresh_venv_loads_the_same_catalogue(tmp_path: Path) -> None:
    """Not editable: a wheel built from the tracked files, installed (no dependencies: they come
    from this venv's site-packages through a .pth, without its editable-install hooks)."""
    tracked = (
        subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
        .stdout.decode()
        .split("\0")
    )
    src = tmp_path / "src"
    for name in tracked:
        if name and not name.startswith(("tests/", "bench/")) and (ROOT / name).exists():
            target = src / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if (ROOT / name).is_symlink():
                target.symlink_to(os.readlink(ROOT / name))
            else:
                target.write_bytes((ROOT / name).read_bytes())
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "-w", str(tmp_path / "dist"), str(src)], check=True, timeout=120
    )
    (wheel,) = (tmp_path / "dist").glob("connection_proxy-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    py = venv / "bin" / "python"
    site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    subprocess.run([*pip, "--python", str(py), "install", "--no-deps", str(wheel)], check=True, timeout=120)
    (Path(site) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    probe = (
        "import proxy.catalogue as c; print(c.BUILTIN_DIR); "
        "print(' '.join(sorted(i.id for i in c.Catalogue.load())))"
    )
    out = subprocess.run(
        [str(py), "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True, timeout=60
    ).stdout.splitlines()
    assert out[0].startswith(site), out  # the installed copy, not this checkout
    assert out[1] == " ".join(sorted(i.id for i in Catalogue.load()))
    assert "http_bearer" in out[1].split()
