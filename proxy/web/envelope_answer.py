"""The envelope's answer, bounded: how much of the upstream body is buffered, how many envelope
calls run at once, and how the body is encoded into the JSON document without blocking the loop.

Why: the envelope (``POST /api/internal/proxy``) answers one JSON document holding the upstream's
whole body, so unlike path mode it must buffer. Unbounded, a 32 MiB upstream body became a 246 MB
answer (an escaped copy in ``body`` plus base64 in ``body_raw``), 8 concurrent calls reached 4 GB
RSS and each blocked the event loop for about a second. Now:

- at most ``envelope_max_response_bytes`` are read (a larger ``Content-Length`` is refused before
  reading; a body that grows past it stops being read at once): 502 ``UPSTREAM_RESPONSE_TOO_LARGE``
  naming the setting;
- at most ``envelope_max_concurrent`` envelope calls are in flight per process; beyond it 503
  ``SERVICE_UNAVAILABLE`` with ``Retry-After: 1`` at once rather than a queue: Runtara retries 503s
  itself, and a queued call would keep its client connection (and its request body) waiting;
- the document keeps the contract's fields: ``body_raw`` is always the exact bytes in base64;
  ``body`` is the upstream's JSON (spliced verbatim: it is never parsed into objects and dumped
  again), its text when the body is UTF-8 text, and ``null`` for a binary body (a lossy
  replacement-character copy was of no use and cost up to six bytes per byte escaped);
- deciding whether a body is JSON takes the C parser ~30 ms per MiB while holding the GIL (a
  thread would not free the loop), so above ``INLINE_MAX`` it runs in a small spawned process pool;
  base64 and text escaping run on the loop in slices with a yield between, and the document is
  streamed, so a call holds its raw body and one slice, not a second and third copy.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import aiohttp
from aiohttp import web

from proxy.errors import ServiceUnavailable, UpstreamResponseTooLarge
from proxy.pipeline.bodykind import BINARY, JSON, TEXT, classify

log = logging.getLogger("proxy.envelope")

# Bodies up to this size are classified inline (~2 ms of the C parser at most) and answered in
# one write; larger ones go to the pool and are streamed.
INLINE_MAX = 64 * 1024
# Slices written per loop turn: well under a millisecond of base64 or escaping each, so even
# envelope_max_concurrent calls encoding at once leave the loop a turn every few milliseconds.
B64_SLICE = 3 * 64 * 1024  # a multiple of 3, so slices encode independently
TEXT_SLICE = 64 * 1024  # characters
RAW_SLICE = 256 * 1024
READ_CHUNK = 64 * 1024
# One helper, at a lower priority: the JSON check is throughput work, and on a small machine a
# busy helper per core would take the CPU the event loop needs to stay responsive.
POOL_WORKERS = 1
HELPER_NICE = 10


def _lower_priority() -> None:
    with contextlib.suppress(OSError):
        os.nice(HELPER_NICE)


class EnvelopeGate:
    """How many envelope calls are in flight; over the cap a call is refused, not queued."""

    __slots__ = ("in_flight", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0

    def enter(self) -> None:
        if self.in_flight >= self.limit:
            raise ServiceUnavailable(
                f"{self.in_flight} envelope calls are in flight, the limit of envelope_max_concurrent; "
                "retry shortly, or use path mode (/proxy/{path}), which streams",
                headers={"Retry-After": "1"},
            )
        self.in_flight += 1

    def leave(self) -> None:
        self.in_flight -= 1


class BodyClassifier:
    """``proxy.pipeline.bodykind.classify`` off the loop for large bodies, in a lazily spawned pool."""

    def __init__(self) -> None:
        self._pool: ProcessPoolExecutor | None = None

    async def classify(self, data: bytearray) -> str:
        if len(data) <= INLINE_MAX:
            return classify(data)
        if self._pool is None:
            # spawn, not fork: forking a process that runs threads (the store, the executor) is unsafe.
            self._pool = ProcessPoolExecutor(
                POOL_WORKERS, mp_context=multiprocessing.get_context("spawn"), initializer=_lower_priority
            )
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, classify, data)
        except BrokenProcessPool:
            # A helper died (killed, out of memory): start a fresh pool next time; this call fails cleanly.
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
            raise ServiceUnavailable(
                "the envelope's encoding helper process failed; retry the call"
            ) from None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


async def read_body(up: aiohttp.ClientResponse, cap: int) -> bytearray:
    """The upstream body, never buffering more than ``cap`` bytes (plus one read chunk)."""
    length = up.content_length
    if length is not None and length > cap:
        raise _too_large(cap)
    buf = bytearray()
    content = up.content
    while True:
        chunk = await content.read(READ_CHUNK)
        if not chunk:
            return buf
        buf += chunk
        if len(buf) > cap:
            raise _too_large(cap)


def _too_large(cap: int) -> UpstreamResponseTooLarge:
    return UpstreamResponseTooLarge(
        f"the upstream's answer is larger than envelope_max_response_bytes ({cap} bytes), the most "
        "the envelope buffers; use path mode (/proxy/{path}), which streams bodies of any size, or "
        "raise the setting"
    )


def _head(status: int, headers: dict[str, str]) -> bytes:
    # '{"status": ..., "headers": {...}' without its closing brace; the body fields follow.
    return json.dumps({"status": status, "headers": headers}).encode()[:-1]


def _text(text: str) -> bytes:
    return json.dumps(text, ensure_ascii=False).encode()  # str from strict UTF-8: no lone surrogates


def encode_small(status: int, headers: dict[str, str], data: bytes | bytearray, kind: str) -> bytes:
    """The whole document for a small body (one write, with Content-Length)."""
    if kind == JSON:
        body = bytes(data)
    elif kind == TEXT:
        body = _text(data.decode("utf-8"))
    else:
        body = b"null"
    raw = base64.b64encode(data)
    return b"".join((_head(status, headers), b',"body":', body, b',"body_raw":"', raw, b'"}'))


async def answer(
    request: web.Request,
    classifier: BodyClassifier,
    status: int,
    headers: dict[str, str],
    data: bytearray,
) -> web.StreamResponse:
    """The envelope document for ``data``, streamed when large."""
    kind = BINARY if not data else await classifier.classify(data)
    if len(data) <= INLINE_MAX:
        return web.Response(body=encode_small(status, headers, data, kind), content_type="application/json")
    resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json; charset=utf-8"})
    try:
        await resp.prepare(request)
        await resp.write(_head(status, headers) + b',"body":')
        view = memoryview(data)
        if kind == JSON:
            for i in range(0, len(view), RAW_SLICE):
                await resp.write(view[i : i + RAW_SLICE])
                await asyncio.sleep(0)
        elif kind == TEXT:
            text = data.decode("utf-8")
            await resp.write(b'"')
            for i in range(0, len(text), TEXT_SLICE):
                await resp.write(_text(text[i : i + TEXT_SLICE])[1:-1])
                await asyncio.sleep(0)
            await resp.write(b'"')
            del text
        else:
            await resp.write(b"null")
        await resp.write(b',"body_raw":"')
        for i in range(0, len(view), B64_SLICE):
            await resp.write(base64.b64encode(view[i : i + B64_SLICE]))
            await asyncio.sleep(0)
        await resp.write(b'"}')
        await resp.write_eof()
    except ConnectionError:
        pass  # the caller went away mid-answer; nothing to tell it
    return resp
