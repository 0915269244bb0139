"""The README tells the truth: its walkthrough runs, its error-code list is complete, and every
``PROXY_*`` variable the documentation names exists.

The walkthrough test runs every ``sh`` block marked ``<!-- walkthrough -->`` in README.md, in
order, with bash against a real ``serve`` (dev mode, a temporary data dir, a free port), and
checks each command's output against the ``# ->`` comment under it. Only these stand-ins differ
from what a reader runs: ``localhost:8080`` is the test's port, ``https://api.github.com`` a local
server answering ``/users/{name}`` when the stored token is injected, and ``auth.example.com`` /
``api.example.com`` the suite's real OAuth authorization server. A marker that says
``signs in at $VAR`` makes the test do what the reader does in a browser: open that link and
press the sign-in button (the authorization server approves).

Expected output: JSON where ``...`` as a value is any value, as an object's last member means
"and other members", as a list's last element "and more elements", and inside a string any
characters; anything else is compared as text, ``...`` matching any characters.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from proxy import errors
from proxy.settings import known_variables
from tests.support.app import REPO_ROOT, free_port, start_service_process
from tests.support.authserver import AuthServer, authserver_fixture, authserver_process_fixture  # noqa: F401

README = REPO_ROOT / "README.md"
MARKER = re.compile(r"<!-- walkthrough(?P<note>[^>]*)-->\s*\n```sh\n(?P<body>.*?)\n```", re.S)
SIGN_IN = re.compile(r"signs in at \$(\w+)")
TOKEN = "ghp_example_secret"  # the walkthrough's stored token the stand-in API expects


# --- reading the README ---------------------------------------------------------------------------


@dataclass
class Step:
    code: str
    expected: str | None  # the "# ->" comment, continuation lines joined


@dataclass
class Block:
    steps: list[Step]
    sign_in_var: str | None


def walkthrough_blocks(text: str) -> list[Block]:
    blocks = []
    for m in MARKER.finditer(text):
        steps: list[Step] = []
        code: list[str] = []
        lines = m["body"].splitlines()
        i = 0
        while i < len(lines):
            line = lines[i]
            if line.startswith("# -> "):
                expected = [line[5:]]
                while i + 1 < len(lines) and re.match(r"#\s{4,}\S", lines[i + 1]):
                    i += 1
                    expected.append(lines[i][1:].strip())
                steps.append(Step("\n".join(code), " ".join(expected)))
                code = []
            else:
                code.append(line)
            i += 1
        if any(c.strip() and not c.lstrip().startswith("#") for c in code):
            steps.append(Step("\n".join(code), None))
        sign_in = SIGN_IN.search(m["note"])
        blocks.append(Block(steps, sign_in[1] if sign_in else None))
    return blocks


# --- comparing --------------------------------------------------------------------------------------

_ANY, _REST = "<<any value>>", "<<more elements>>"


def _pattern(expected: str) -> Any:
    text = re.sub(r",\s*\.\.\.\s*}", "}", expected)
    text = re.sub(r",\s*\.\.\.\s*]", f', "{_REST}"]', text)
    text = re.sub(r"(?<=[:\[,])\s*\.\.\.(?=\s*[,}\]])", f' "{_ANY}"', text)
    return json.loads(text)


def _glob(pattern: str, value: str) -> bool:
    return re.fullmatch(".*".join(map(re.escape, pattern.split("..."))), value, re.S) is not None


def mismatch(pattern: Any, actual: Any, where: str = "$") -> str | None:
    """None when ``actual`` fits ``pattern``; else where and how it does not."""
    if pattern == _ANY:
        return None
    if isinstance(pattern, dict):
        if not isinstance(actual, dict):
            return f"{where}: expected an object, got {actual!r}"
        for key, sub in pattern.items():
            if key not in actual:
                return f"{where}: no member {key!r} in {sorted(actual)}"
            if (problem := mismatch(sub, actual[key], f"{where}.{key}")) is not None:
                return problem
        return None
    if isinstance(pattern, list):
        rest = bool(pattern) and pattern[-1] == _REST
        items = pattern[:-1] if rest else pattern
        if (
            not isinstance(actual, list)
            or len(actual) < len(items)
            or (not rest and len(actual) != len(items))
        ):
            return f"{where}: expected {len(items)}{'+' if rest else ''} elements, got {actual!r}"
        for n, (sub, got) in enumerate(zip(items, actual, strict=False)):
            if (problem := mismatch(sub, got, f"{where}[{n}]")) is not None:
                return problem
        return None
    if isinstance(pattern, str) and isinstance(actual, str) and "..." in pattern:
        return None if _glob(pattern, actual) else f"{where}: {actual!r} does not match {pattern!r}"
    return (
        None if pattern == actual and type(pattern) is type(actual) else f"{where}: {actual!r} != {pattern!r}"
    )


def check_output(expected: str, output: str) -> str | None:
    try:
        pattern = _pattern(expected)
    except json.JSONDecodeError:
        return None if _glob(expected, output.strip()) else f"{output.strip()!r} does not match {expected!r}"
    try:
        actual = json.loads(output)
    except json.JSONDecodeError:
        return f"not JSON: {output!r}"
    return mismatch(pattern, actual)


def test_the_comparison_fails_where_it_should() -> None:
    assert check_output('{"a": 1, ...}', '{"a": 1, "b": 2}') is None
    assert check_output('{"a": 1}', '{"a": 2}') is not None
    assert check_output('{"a": ..., "b": "x..."}', '{"a": [1], "b": "xyz"}') is None
    assert check_output('{"b": "x..."}', '{"b": "yz"}') is not None
    assert check_output('{"l": [{"k": 1}, ...]}', '{"l": [{"k": 1}, {"k": 2}]}') is None
    assert check_output('{"l": [{"k": 1}]}', '{"l": [{"k": 1}, {"k": 2}]}') is not None
    assert check_output('{"n": null}', '{"n": 0}') is not None
    assert check_output("cpk_...", "cpk_abc\n") is None and check_output("cpk_...", "x") is not None


def test_the_readme_marks_the_walkthrough_blocks() -> None:
    blocks = walkthrough_blocks(README.read_text(encoding="utf-8"))
    assert len(blocks) >= 5
    steps = [s for b in blocks for s in b.steps]
    assert sum(s.expected is not None for s in steps) >= 15
    assert [b.sign_in_var for b in blocks if b.sign_in_var] == ["OAUTH_URL"]


# --- the stand-ins ----------------------------------------------------------------------------------


class _GitHub(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        m = re.fullmatch(r"/users/(\w+)", self.path)
        ok = m is not None and self.headers.get("Authorization") == f"Bearer {TOKEN}"
        body = json.dumps(
            {"login": m[1], "id": 583231, "type": "User"} if ok and m else {"message": "Bad credentials"}
        )
        self.send_response(200 if ok else 401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def github() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _GitHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _sign_in(url: str) -> None:
    """What a browser does on the connect page of an OAuth integration: press the button."""
    with requests.Session() as browser:
        page = browser.get(url, timeout=10)
        assert page.status_code == 200 and "/oauth/start" in page.text
        done = browser.get(url + "/oauth/start", timeout=10)  # -> provider -> /oauth/callback
        assert done.status_code == 200, done.text
        assert done.url.split("?")[0].endswith("/oauth/callback")


# --- the walkthrough --------------------------------------------------------------------------------


@pytest.mark.system
def test_the_walkthrough_runs_as_written(tmp_path: Path, github: str, authserver: AuthServer) -> None:
    authserver.control(clients={"my-app": "my-app-secret"})
    port = free_port()
    text = README.read_text(encoding="utf-8")
    blocks = walkthrough_blocks(text)
    names = sorted(set(re.findall(r"^([A-Z][A-Z0-9_]*)=", text, re.M)))
    stand_ins = {
        "localhost:8080": f"127.0.0.1:{port}",
        "127.0.0.1:8080": f"127.0.0.1:{port}",
        "https://api.github.com": github,
        "https://auth.example.com": authserver.url,
        "https://api.example.com": authserver.url,
    }

    def local(s: str) -> str:
        for a, b in stand_ins.items():
            s = s.replace(a, b)
        return s

    state = tmp_path / "walkthrough.env"
    state.write_text("")
    save = "; ".join(f'printf "%s=%q\\n" {n} "${{{n}-}}" >> "$STATE"' for n in names)
    # Dev mode as with `make run`: the admin token is generated into ./var, the public URL derived.
    env = {"PROXY_ADMIN_TOKEN": "", "PROXY_PUBLIC_URL": ""}
    with start_service_process(tmp_path / "var", port=port, env=env) as sp:
        for b, block in enumerate(blocks, start=1):
            for s, step in enumerate(block.steps, start=1):
                script = f'set -eo pipefail; source "$STATE"; : > "$STATE"\n{local(step.code)}\n{save}\n'
                run = subprocess.run(
                    ["bash", "-c", script],
                    cwd=tmp_path,
                    env={"PATH": "/usr/bin:/bin", "STATE": str(state), "HOME": str(tmp_path)},
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                where = f"walkthrough block {b}, step {s}:\n{step.code}\n"
                assert run.returncode == 0, f"{where}exit {run.returncode}: {run.stderr}\n{sp.output()}"
                if step.expected is None:
                    assert '"error"' not in run.stdout, where + run.stdout
                else:
                    problem = check_output(local(step.expected), run.stdout)
                    assert problem is None, f"{where}answered {run.stdout}\n{problem}"
            if block.sign_in_var:
                values = dict(line.split("=", 1) for line in state.read_text().splitlines() if "=" in line)
                _sign_in(values[block.sign_in_var])


# --- the error codes and the variables --------------------------------------------------------------


def _codes(cls: type[errors.ProxyError]) -> set[str]:
    out = {cls.code}
    for sub in cls.__subclasses__():
        out |= _codes(sub)
    return out


def test_the_readme_lists_every_error_code() -> None:
    codes = _codes(errors.ProxyError) - {"CONFIG_ERROR"}  # stops start-up: never an answer
    assert {"NOT_FOUND", "BAD_REQUEST", "PAYLOAD_TOO_LARGE", "METHOD_NOT_ALLOWED", "NOT_SUPPORTED"} <= codes
    assert {c for c in codes if c.startswith(("CONNECT_LINK_", "OAUTH_"))}
    section = README.read_text(encoding="utf-8").split("<!-- error codes -->")[1]
    listed = set(re.findall(r"`([A-Z][A-Z_]+)`", section.split("<!-- /error codes -->")[0]))
    assert sorted(codes - listed) == [], (
        "add these codes to the README's list (between the error codes markers)"
    )
    assert sorted(listed - codes) == [], "the README lists codes proxy/errors.py does not have"


def test_the_documentation_names_only_variables_that_exist() -> None:
    known = set(known_variables())
    docs = [README, *sorted((REPO_ROOT / "docs").glob("*.md")), *sorted((REPO_ROOT / "deploy").rglob("*"))]
    docs.append(REPO_ROOT / "config" / "proxy.example.toml")
    unknown = {
        f"{path.relative_to(REPO_ROOT)}: {name}"
        for path in docs
        if path.is_file()
        for name in re.findall(
            r"\bPROXY_[A-Z0-9_]*[A-Z0-9]\b", path.read_text(encoding="utf-8", errors="replace")
        )
        if name not in known
    }
    assert sorted(unknown) == []
