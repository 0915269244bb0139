"""Waiting for a condition instead of sleeping a fixed time.

A test that needs something to have happened in the background (a flush, a log line, a replica
seeing a change) polls for it: it goes on as soon as it holds, and a slow machine gets the whole
``timeout`` instead of failing at a guessed sleep. ``wait_until`` awaits async predicates (and
plain ones); ``wait_until_sync`` is for tests without an event loop::

    await wait_until(lambda: upstream.seen, timeout=2, message="the call never reached the upstream")

Both return the predicate's last (truthy) value and raise ``AssertionError`` with ``message`` at the
deadline. A sleep that is the thing under test (waiting out a rate-limit window, a TTL, a breaker,
an idle interval) stays a sleep.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def wait_until(
    predicate: Callable[[], T | Awaitable[T]],
    timeout: float = 5.0,
    interval: float = 0.02,
    message: str | Callable[[], str] = "condition not met",
) -> T:
    """Poll ``predicate`` (sync or async) every ``interval`` s until it is truthy, at most ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"after {timeout} s: {message() if callable(message) else message}")
        await asyncio.sleep(interval)


def wait_until_sync(
    predicate: Callable[[], T],
    timeout: float = 5.0,
    interval: float = 0.02,
    message: str | Callable[[], str] = "condition not met",
) -> T:
    """``wait_until`` for code without an event loop (``time.sleep`` between polls)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"after {timeout} s: {message() if callable(message) else message}")
        time.sleep(interval)


__all__ = ["wait_until", "wait_until_sync"]
