"""Reference servers the benchmarks compare connection-proxy against, run as their own processes.

- ``upstream``: a raw asyncio HTTP/1.1 server answering every request with one small JSON body.
  It parses as little as possible so the upstream costs the shared CPUs little.
- ``json``: a bare aiohttp handler returning a fixed JSON document (the Connection Service's
  reference: same framework, no auth, no store, no decryption, no audit).
- ``file``: a bare aiohttp handler answering ``GET /doc`` with the bytes of ``--body-file`` as
  they are (``--content-type``), for large-answer benchmarks.
- ``passthrough``: a bare aiohttp pass-through (the proxy's reference: the same hop with no
  features): reads the request, forwards it with one ClientSession, streams the answer back,
  with one fixed ``Authorization`` header added as the only "injection".

Node's ``http-proxy`` (npm), the peer a user would otherwise pick for "a proxy that adds a
credential header", is not a mode of this script but ``bench/node/inject_proxy.js``, started by
``start_node_http_proxy`` below (importable by any benchmark: ``bench/proxy.py``,
``bench/offload.py``); its pinned packages install once into ``bench/node/node_modules``.

Usage: ``python bench/_refservers.py MODE --port P [--body-file F] [--content-type T] [--upstream URL] [--token T]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import shutil
import signal
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # _common imports this module; the start helper below imports it lazily
    from _common import Proc

NODE_DIR = Path(__file__).resolve().parent / "node"
NODE_PROXY_JS = NODE_DIR / "inject_proxy.js"
# node_modules/.installed-from holds the lock's digest: a changed lock reinstalls.
_NODE_STAMP = NODE_DIR / "node_modules" / ".installed-from"

UPSTREAM_BODY = b'{"ok":true,"items":[1,2,3],"note":"connection-proxy bench upstream"}'
UPSTREAM_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
    + str(len(UPSTREAM_BODY)).encode()
    + b"\r\n\r\n"
    + UPSTREAM_BODY
)


class _Upstream(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = b""
        self.skip = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buf += data
        while True:
            if self.skip:  # a request body with Content-Length (chunked bodies are not expected)
                n = min(self.skip, len(self.buf))
                self.buf, self.skip = self.buf[n:], self.skip - n
                if self.skip:
                    return
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head, self.buf = self.buf[:end].lower(), self.buf[end + 4 :]
            i = head.find(b"\r\ncontent-length:")
            if i >= 0:
                self.skip = int(head[i + 17 :].split(b"\r\n", 1)[0])
            self.transport.write(UPSTREAM_RESPONSE)
            if b"\r\nconnection: close" in head:
                self.transport.close()
                return


async def serve_upstream(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Upstream, "127.0.0.1", port, backlog=1024)
    async with server:
        await _until_signal()


async def _until_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def serve_json(port: int, body_file: Path) -> None:
    from aiohttp import web

    doc = json.loads(body_file.read_text())

    async def handler(request: web.Request) -> web.Response:
        # Serialise per request, as a real handler does.
        return web.json_response(doc)

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/connections/{tenant}/{conn}", handler)
    await _run(app, port)


async def serve_file(port: int, body_file: Path, content_type: str) -> None:
    from aiohttp import web

    body = body_file.read_bytes()

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/doc", handler)
    await _run(app, port)


_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "authorization",
        "x-connection-id",
        "content-length",
    }
)


async def serve_passthrough(port: int, upstream: str, token: str) -> None:
    import aiohttp
    from aiohttp import web
    from yarl import URL

    session: aiohttp.ClientSession | None = None

    async def startup(app: web.Application) -> None:
        nonlocal session
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), auto_decompress=False, skip_auto_headers=("User-Agent",)
        )

    async def cleanup(app: web.Application) -> None:
        if session is not None:
            await session.close()

    async def handler(request: web.Request) -> web.StreamResponse:
        assert session is not None
        qs = request.rel_url.raw_query_string
        url = f"{upstream}/{request.match_info['tail']}" + (f"?{qs}" if qs else "")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        headers["Authorization"] = f"Bearer {token}"
        data = request.content if request.body_exists else None
        async with session.request(
            request.method, URL(url, encoded=True), headers=headers, data=data, allow_redirects=False
        ) as up:
            resp = web.StreamResponse(
                status=up.status,
                headers={k: v for k, v in up.headers.items() if k.lower() not in _HOP},
            )
            if up.content_length is not None:
                resp.content_length = up.content_length
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.on_startup.append(startup)
    app.on_cleanup.append(cleanup)
    app.router.add_get("/healthz", healthz)
    app.router.add_route("*", "/proxy/{tail:.*}", handler)
    await _run(app, port)


def ensure_node_packages() -> str:
    """``npm ci`` in bench/node unless node_modules already matches the lock; returns node's path.

    Raises ``_common.Unavailable`` naming the package to install when node or npm is missing.
    """
    from _common import Unavailable

    node = shutil.which("node")
    if node is None:
        raise Unavailable("node is not installed (apt-get install nodejs npm)")
    digest = hashlib.sha256((NODE_DIR / "package-lock.json").read_bytes()).hexdigest()
    with contextlib.suppress(OSError):
        if _NODE_STAMP.read_text().strip() == digest:
            return node
    npm = shutil.which("npm")
    if npm is None:
        raise Unavailable("npm is not installed (apt-get install npm), needed once for http-proxy")
    done = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund", "--silent"],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0:
        raise Unavailable(f"npm ci in {NODE_DIR} failed: {(done.stderr or done.stdout).strip()[-300:]}")
    _NODE_STAMP.write_text(digest + "\n")
    return node


def start_node_http_proxy(
    stack: contextlib.ExitStack,
    tmp: Path,
    upstream: str,
    header: tuple[str, str],
    *,
    cpus: frozenset[int] | None,
    strip_prefix: str = "",
    drop_headers: tuple[str, ...] = (),
    name: str = "node-http-proxy",
) -> tuple[str, Proc]:
    """Start Node's http-proxy forwarding to ``upstream`` with ``header`` (name, value) set on
    every call (the caller's own value of it replaced); returns (base URL, process).

    ``strip_prefix`` (e.g. ``/proxy``) is removed from the path before forwarding and anything
    else answers 404; ``drop_headers`` are removed (e.g. ``X-Connection-Id``, as nginx's row
    does). ``GET /healthz`` is answered by the proxy itself. The process belongs to the
    workspace of ``stack`` (stopped with it); ``cpus`` pins it, as a measured server.
    """
    import _common as c

    node = ensure_node_packages()
    port = c.free_port()
    argv = [node, str(NODE_PROXY_JS), "--port", str(port), "--upstream", upstream.rstrip("/")]
    argv += ["--header", f"{header[0]}: {header[1]}"]
    if strip_prefix:
        argv += ["--strip-prefix", strip_prefix]
    for h in drop_headers:
        argv += ["--drop-header", h]
    proc = c.spawn(stack, name, argv, tmp, cpus=cpus, cwd=NODE_DIR)
    url = f"http://127.0.0.1:{port}"
    c.wait_http(f"{url}/healthz", proc)
    return url, proc


async def _run(app: object, port: int) -> None:
    from aiohttp import web

    assert isinstance(app, web.Application)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
    try:
        await _until_signal()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("upstream", "json", "file", "passthrough"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--body-file", type=Path)
    parser.add_argument("--upstream")
    parser.add_argument("--token", default="bench-upstream-token")
    parser.add_argument("--content-type", default="application/json")
    args = parser.parse_args()
    if args.mode == "upstream":
        asyncio.run(serve_upstream(args.port))
    elif args.mode == "json":
        asyncio.run(serve_json(args.port, args.body_file))
    elif args.mode == "file":
        asyncio.run(serve_file(args.port, args.body_file, args.content_type))
    else:
        asyncio.run(serve_passthrough(args.port, args.upstream.rstrip("/"), args.token))


if __name__ == "__main__":
    main()
