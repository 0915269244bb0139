"""The Node http-proxy reference of bench/_refservers.py really does the injection it is
measured for: real node, real packages from bench/node, a real upstream on 127.0.0.1 recording
what arrived."""

from __future__ import annotations

import http.server
import json
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.append(str(BENCH))  # appended: bench/proxy.py must never shadow the proxy package

import _common  # noqa: E402
import _refservers  # noqa: E402

pytestmark = pytest.mark.system  # a node process (and npm ci on a fresh checkout)

TOKEN = "node-ref-injected-token"


class _Recorder(http.server.BaseHTTPRequestHandler):
    seen: list[dict[str, Any]] = []

    def do_GET(self) -> None:
        self.seen.append({"path": self.path, "headers": dict(self.headers.items())})
        body = b'{"ok":true}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        return None


@pytest.fixture
def upstream() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    seen: list[dict[str, Any]] = []
    handler = type("Recorder", (_Recorder,), {"seen": seen})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def get(url: str, headers: dict[str, str]) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_node_http_proxy_injects_the_header_and_strips_the_rest(
    upstream: tuple[str, list[dict[str, Any]]],
) -> None:
    up_url, seen = upstream
    with _common.workspace("cp-test-node-ref-", grace=2.0) as (tmp, stack):
        url, proc = _refservers.start_node_http_proxy(
            stack,
            tmp,
            up_url,
            ("Authorization", f"Bearer {TOKEN}"),
            cpus=None,
            strip_prefix="/proxy",
            drop_headers=("X-Connection-Id",),
        )
        caller = {
            "Authorization": "Bearer caller-key-must-not-pass",
            "X-Connection-Id": "c1",
            "X-Keep": "yes",
        }
        status, body = get(f"{url}/proxy/items/7?page=2&q=a%20b", caller)
        assert (status, json.loads(body)) == (200, {"ok": True})
        # Outside the prefix nothing is forwarded.
        assert get(f"{url}/other/items", caller)[0] == 404
        assert proc.alive()
    assert not proc.alive()  # the workspace stopped it
    assert len(seen) == 1, seen
    [call] = seen
    headers = {k.lower(): v for k, v in call["headers"].items()}
    assert call["path"] == "/items/7?page=2&q=a%20b"
    assert headers["authorization"] == f"Bearer {TOKEN}"
    assert "x-connection-id" not in headers and headers["x-keep"] == "yes"
    assert "caller-key-must-not-pass" not in json.dumps(call)
