"""An unmodified HTTPS client, configured only by the environment (HTTPS_PROXY, CA bundle variables).

Usage: ``python py_client.py LIB URL|sleep:SECONDS ...`` with LIB one of requests, httpx, urllib,
aiohttp. Each URL is fetched with GET and the caller's own ``Authorization: Bearer caller-own``
header (the proxy must never pass it on); one JSON line per URL on stdout:
``{"status", "proxy_error", "body"}`` or ``{"error"}``. Nothing here names the proxy or the CA:
that is what "no code change" means.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

HEADERS = {"Authorization": "Bearer caller-own"}


def out(result: dict[str, Any]) -> None:
    print(json.dumps(result), flush=True)


def run_requests(urls: list[str]) -> None:
    import requests

    with requests.Session() as s:  # one session: keep-alive inside the tunnel
        for url in urls:
            if sleep(url):
                continue
            try:
                r = s.get(url, headers=HEADERS, timeout=20)
                out({"status": r.status_code, "proxy_error": r.headers.get("X-Proxy-Error"), "body": r.text})
            except Exception as exc:
                out({"error": f"{type(exc).__name__}: {exc}"[:500]})


def run_httpx(urls: list[str]) -> None:
    import httpx

    with httpx.Client(timeout=20) as c:
        for url in urls:
            if sleep(url):
                continue
            try:
                r = c.get(url, headers=HEADERS)
                out({"status": r.status_code, "proxy_error": r.headers.get("X-Proxy-Error"), "body": r.text})
            except Exception as exc:
                out({"error": f"{type(exc).__name__}: {exc}"[:500]})


def run_urllib(urls: list[str]) -> None:
    import urllib.error
    import urllib.request

    for url in urls:
        if sleep(url):
            continue
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=HEADERS), timeout=20) as r:
                out(
                    {
                        "status": r.status,
                        "proxy_error": r.headers.get("X-Proxy-Error"),
                        "body": r.read().decode(),
                    }
                )
        except urllib.error.HTTPError as exc:
            out(
                {
                    "status": exc.code,
                    "proxy_error": exc.headers.get("X-Proxy-Error"),
                    "body": exc.read().decode(),
                }
            )
        except Exception as exc:
            out({"error": f"{type(exc).__name__}: {exc}"[:500]})


async def run_aiohttp(urls: list[str]) -> None:
    import aiohttp

    async with aiohttp.ClientSession(trust_env=True) as s:
        for url in urls:
            if url.startswith("sleep:"):
                await asyncio.sleep(float(url[6:]))
                continue
            try:
                async with s.get(url, headers=HEADERS) as r:
                    body = await r.text()
                    out({"status": r.status, "proxy_error": r.headers.get("X-Proxy-Error"), "body": body})
            except Exception as exc:
                out({"error": f"{type(exc).__name__}: {exc}"[:500]})


def sleep(url: str) -> bool:
    if url.startswith("sleep:"):
        time.sleep(float(url[6:]))
        return True
    return False


def main() -> None:
    lib, urls = sys.argv[1], sys.argv[2:]
    if lib == "aiohttp":
        asyncio.run(run_aiohttp(urls))
    else:
        {"requests": run_requests, "httpx": run_httpx, "urllib": run_urllib}[lib](urls)


if __name__ == "__main__":
    main()
