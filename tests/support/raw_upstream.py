"""A raw asyncio socket "upstream" on 127.0.0.1 that answers every request with fixed bytes.

For answers no HTTP server library would write (control characters in a header or the reason
phrase, a 70 KiB header, a ``101 Switching Protocols``): it reads the request head, writes
``response`` verbatim, keeps the connection open briefly (so the proxy reads the answer, not a
reset) and closes it. ``requests`` counts the request heads it read::

    async with raw_upstream(b"HTTP/1.1 101 Switching Protocols\\r\\n\\r\\n") as up:
        ... base_url = up.url ...
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RawUpstream:
    response: bytes
    port: int = 0
    requests: int = 0
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await reader.readuntil(b"\r\n\r\n")
            self.requests += 1
            writer.write(self.response)
            await writer.drain()
            await asyncio.sleep(0.2)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()


@contextlib.asynccontextmanager
async def raw_upstream(response: bytes) -> AsyncIterator[RawUpstream]:
    up = RawUpstream(response)
    server = await asyncio.start_server(up.handle, "127.0.0.1", 0)
    up.port = server.sockets[0].getsockname()[1]
    try:
        yield up
    finally:
        server.close()
        for task in list(up._tasks):
            task.cancel()
        await asyncio.gather(*up._tasks, return_exceptions=True)
        await server.wait_closed()


__all__ = ["RawUpstream", "raw_upstream"]
