"""A store read that answers late, on the test's signal: races between a read and a change.

``GatedReads(store, "get_api_key")`` wraps a real store: every other method passes through; the
next call of the named method reads the real store at once, then holds its answer until
``release()``. So a test can put a change (a revocation, a deletion) between the moment a value
was read and the moment the reader gets it, which is the window a cache fill races an
invalidation in::

    gated = GatedReads(store, "get_api_key")
    auth.store = gated
    task = asyncio.create_task(auth.authenticate(...))
    await gated.read.wait()        # the store has answered with the old record
    ... revoke ...                 # the change and its invalidation land now
    gated.release()
    await task

Only the first call after ``arm()`` (or construction) is held; later ones pass straight through.
Controlled concurrency for unit tests of the caches; the store underneath is the real one.
"""

from __future__ import annotations

import asyncio
from typing import Any


class GatedReads:
    def __init__(self, store: Any, method: str) -> None:
        self._store = store
        self._method = method
        self.read = asyncio.Event()  # set once the held call has its answer from the store
        self._release = asyncio.Event()
        self._armed = True

    def arm(self) -> None:
        self.read.clear()
        self._release.clear()
        self._armed = True

    def release(self) -> None:
        self._release.set()

    def __getattr__(self, name: str) -> Any:
        real = getattr(self._store, name)
        if name != self._method:
            return real

        async def held(*args: Any, **kwargs: Any) -> Any:
            answer = await real(*args, **kwargs)
            if self._armed:
                self._armed = False
                self.read.set()
                await asyncio.wait_for(self._release.wait(), 10)
            return answer

        return held
