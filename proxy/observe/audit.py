"""The audit trail writer: every credential read and admin change, without a write per request.

Events are buffered in memory and written in batches by a background task every
``audit_flush_interval_s``. Credential reads are the hot path: ``record_use`` folds repeated
uses of one connection by one actor (same action and outcome) into a single event per flush
interval carrying a count, so a busy workflow costs one dict update per call and one row per
interval. The buffer is bounded (``audit_buffer_max``); what does not fit is counted as
dropped and logged, never silently. A store failure keeps the batch for the next flush.

While the store is unreachable, calls may be answered from stale credentials (``proxy.stale``):
such uses are kept apart (their own event, ``detail.stale_credentials``), so the trail says which
calls used a copy the store could not confirm. They wait in the same bounded buffer: an outage
longer than the buffer holds drops the newest uses, counted in
``proxy_audit_events_total{result="dropped"}``; memory stays bounded, the call is not refused.

Retention: events older than ``audit_retention_days`` (0 keeps everything) are deleted by a
background task of their own, a minute after start and then hourly, in small batches.

``stop()`` flushes everything, so a graceful shutdown loses nothing. Deployments that must not
release a credential unless the read is on record set ``audit_required``: then the Connection
Service calls ``record_required``, which writes synchronously and refuses on failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

from proxy.errors import ServiceUnavailable
from proxy.model import AuditEvent
from proxy.observe import trace
from proxy.observe.metrics import AUDIT_EVENTS, AUDIT_QUEUE
from proxy.settings import Settings
from proxy.store.base import AuditStore

log = logging.getLogger("proxy.audit")

BATCH_MAX: Final = 500
PRUNE_FIRST_S: Final = 60.0
PRUNE_EVERY_S: Final = 3600.0
STOP_ATTEMPTS: Final = 3
_DROP_LOG_EVERY_S: Final = 10.0

UseKey = tuple[str, str, str | None, str, str, bool]  # actor, tenant, connection, action, outcome, stale
FlushHook = Callable[[], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Actor:
    """Who makes a change and in which request: what an admin change's audit event names."""

    name: str  # ``Caller.actor``, e.g. "admin:admin"
    request_id: str | None = None


class _Use:
    """Aggregated uses within one flush interval (mutable: updated in place on the hot path)."""

    __slots__ = ("count", "first_request_id", "first_ts", "last_request_id", "last_ts")

    def __init__(self, request_id: str | None, now: float) -> None:
        self.count = 1
        self.first_request_id = request_id
        self.last_request_id = request_id
        self.first_ts = now
        self.last_ts = now


class AuditLog:
    def __init__(self, store: AuditStore, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self.max = settings.audit_buffer_max
        self._events: list[AuditEvent] = []
        self._uses: dict[UseKey, _Use] = {}
        self._hooks: list[FlushHook] = []
        self._task: asyncio.Task[None] | None = None
        self._pruner: asyncio.Task[None] | None = None
        self._flush_lock = asyncio.Lock()
        self._dropped_since_log = 0
        self._last_drop_log = 0.0
        self._stopping = False

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        self._stopping = False
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="audit-flusher")
        if self._pruner is None and self.settings.audit_retention_days > 0:
            self._pruner = asyncio.create_task(self._prune_forever(), name="audit-retention")

    async def stop(self) -> None:
        """Stops the background tasks and writes everything still buffered (retrying a few times)."""
        self._stopping = True
        for task in (self._task, self._pruner):
            if task is None:
                continue
            # A cancellation can be swallowed by code the flush awaits (seen in the suite: the
            # flusher still sleeping after cancel(), holding shutdown 5 s): cancel again until the
            # task ends; the flusher also checks _stopping, so it ends by itself within an interval.
            while not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=0.5)
            with contextlib.suppress(asyncio.CancelledError):
                task.result()
        self._task = self._pruner = None
        for attempt in range(STOP_ATTEMPTS):
            await self.flush()
            if not self.pending:
                return
            await asyncio.sleep(0.2 * (attempt + 1))
        if self.pending:
            log.error(
                "audit trail: %d event(s) could not be written before shutdown (store unavailable)",
                self.pending,
            )
            AUDIT_EVENTS.labels(result="dropped").inc(self.pending)

    def add_flush_hook(self, hook: FlushHook) -> None:
        """Run ``hook`` after every flush (e.g. API key last-used times); failures are logged."""
        if hook not in self._hooks:
            self._hooks.append(hook)

    async def _run(self) -> None:
        interval = self.settings.audit_flush_interval_s
        while not self._stopping:
            await asyncio.sleep(interval)
            try:
                await self.flush()
            except Exception:  # the flusher must survive anything: it guards the whole trail
                log.exception("audit flush failed unexpectedly; retrying next interval")

    async def _prune_forever(self) -> None:
        # Its own task: a large first prune must not hold up the flushes behind it.
        await asyncio.sleep(PRUNE_FIRST_S)
        while True:
            await self.prune()
            await asyncio.sleep(PRUNE_EVERY_S)

    async def prune(self) -> int:
        """Delete events past the retention period; failures are logged and retried later."""
        days = self.settings.audit_retention_days
        if days <= 0:
            return 0
        try:
            n = await self.store.prune_audit(time.time() - days * 86400)
        except Exception as exc:
            log.warning("audit retention: pruning failed (%s); will retry", type(exc).__name__)
            return 0
        if n:
            log.info("audit retention: deleted %d event(s) older than %g day(s)", n, days)
        return n

    # --- recording -----------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        return len(self._events) + len(self._uses)

    def record(self, event: AuditEvent) -> None:
        """Buffer an event; never blocks. Drops (counted, logged) when the buffer is full."""
        if self.pending >= self.max:
            self._drop()
            return
        self._events.append(event)
        AUDIT_QUEUE.set(self.pending)

    def change(
        self, actor: Actor, tenant_id: str, action: str, connection_id: str | None = None, **detail: Any
    ) -> None:
        """Buffers an admin change (``detail``: ids, names and counts, never a value)."""
        self.record(
            AuditEvent(
                ts=time.time(),
                tenant_id=tenant_id,
                action=action,
                actor=actor.name,
                connection_id=connection_id,
                request_id=actor.request_id,
                detail=detail,
            )
        )

    def record_use(
        self,
        actor: str,
        tenant_id: str,
        connection_id: str | None,
        action: str,
        outcome: str,
        request_id: str | None,
    ) -> None:
        """Count one use; O(1). Uses with the same key within a flush interval become one event.
        A use answered from stale credentials (the request's context says so) is its own key."""
        ctx = trace.current()
        key = (actor, tenant_id, connection_id, action, outcome, ctx is not None and ctx.stale)
        use = self._uses.get(key)
        if use is not None:
            use.count += 1
            use.last_request_id = request_id
            use.last_ts = time.time()
            return
        if self.pending >= self.max:
            self._drop()
            return
        self._uses[key] = _Use(request_id, time.time())

    async def record_required(self, event: AuditEvent) -> None:
        """Write ``event`` now; raises ServiceUnavailable when it cannot be made durable."""
        try:
            await self.store.append_audit([event])
        except Exception as exc:
            AUDIT_EVENTS.labels(result="failed").inc()
            log.warning("required audit write failed (%s); credential withheld", type(exc).__name__)
            raise ServiceUnavailable(
                "audit trail unavailable; credential not released. Retry later; the operator "
                "must restore the store"
            ) from None
        AUDIT_EVENTS.labels(result="written").inc()

    def _drop(self) -> None:
        AUDIT_EVENTS.labels(result="dropped").inc()
        self._dropped_since_log += 1
        now = time.monotonic()
        if now - self._last_drop_log >= _DROP_LOG_EVERY_S:
            log.error(
                "audit buffer full (%d events): dropped %d event(s); the store is not keeping up",
                self.max,
                self._dropped_since_log,
            )
            self._dropped_since_log = 0
            self._last_drop_log = now

    # --- flushing ------------------------------------------------------------------------------

    def _take_uses(self) -> None:
        if not self._uses:
            return
        uses, self._uses = self._uses, {}
        for (actor, tenant, conn, action, outcome, stale), use in uses.items():
            detail: dict[str, object] = {"count": use.count}
            if stale:
                detail["stale_credentials"] = True
            if use.count > 1:
                detail.update(
                    first_request_id=use.first_request_id,
                    last_request_id=use.last_request_id,
                    last_ts=use.last_ts,
                )
            self._events.append(
                AuditEvent(
                    ts=use.first_ts,
                    tenant_id=tenant,
                    action=action,
                    actor=actor,
                    outcome=outcome,
                    connection_id=conn,
                    request_id=use.first_request_id,
                    detail=detail,
                )
            )

    async def flush(self) -> None:
        """Write what is buffered. On a store error the batch stays buffered for the next try."""
        async with self._flush_lock:
            self._take_uses()
            while self._events:
                batch = self._events[:BATCH_MAX]
                try:
                    await self.store.append_audit(batch)
                except Exception as exc:
                    AUDIT_EVENTS.labels(result="failed").inc(len(batch))
                    log.warning(
                        "audit flush of %d event(s) failed (%s); keeping them for the next flush",
                        len(batch),
                        type(exc).__name__,
                    )
                    break
                # Events recorded during the await were appended after the batch: drop the batch only.
                del self._events[: len(batch)]
                AUDIT_EVENTS.labels(result="written").inc(len(batch))
            AUDIT_QUEUE.set(self.pending)
            for hook in list(self._hooks):
                try:
                    await hook()
                except Exception:
                    log.exception("audit flush hook failed")


__all__ = ["AuditLog"]
