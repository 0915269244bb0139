"""Where records live: ``open_store`` picks the back end, and both back ends share these rules.

The embedded SQLite store is the zero-setup default; setting ``redis_url`` moves shared state
into Redis so several replicas agree. The helpers below hold the semantics both back ends must
implement identically (compare-and-set versions, audit filters, paging limits, token hashing),
so the contract tests cannot pass on one and drift on the other.

Back-end modules are imported lazily: importing ``proxy.store.base`` must not pull in redis.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

from proxy.errors import Conflict, ValidationError
from proxy.model import ConnectionRecord, check_id
from proxy.store.base import ANY_VERSION, AuditQuery, ExpectedVersion, InvalidationCallback, Store

if TYPE_CHECKING:
    from proxy.model import AuditEvent
    from proxy.settings import Settings

log = logging.getLogger("proxy.store")

# Delivered as the tenant id of an invalidation when the store cannot tell what changed
# (subscriber reconnected, or fell behind the change log): drop every cached entry.
FLUSH_ALL: Final = "*"
SCHEMA_VERSION_KEY: Final = "schema_version"
MAX_PAGE: Final = 1000


def open_store(settings: Settings) -> Store:
    """The configured back end, not yet opened (the caller awaits ``.open()``)."""
    if settings.redis_url:
        from proxy.store.redis import RedisStore

        return RedisStore(settings.redis_url, timeout_s=settings.redis_timeout_s)
    from proxy.store.sqlite import SqliteStore

    return SqliteStore(settings.store_path)


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, sort_keys=True)


def next_version(kind: str, ident: str, expected: ExpectedVersion, current: int | None) -> int:
    """The version to store, or ``Conflict`` when the compare-and-set does not hold."""
    if expected is ANY_VERSION:
        return (current or 0) + 1
    if expected is None:
        if current is not None:
            raise Conflict(
                f"{kind} {ident!r} already exists (version {current}); read it and replace it "
                "with its current version instead"
            )
        return 1
    if isinstance(expected, bool) or not isinstance(expected, int):
        raise TypeError("expected_version must be None, an int or ANY_VERSION")
    if current != expected:
        found = "it does not exist" if current is None else f"it is at version {current}"
        raise Conflict(
            f"{kind} {ident!r} changed since it was read (expected version {expected}, {found}); "
            "re-read it and retry"
        )
    return expected + 1


def check_connection_ids(record: ConnectionRecord) -> None:
    """Ids become key names and hash tags (Redis): refuse anything outside ``ID_RE`` on write."""
    check_id("tenant_id", record.tenant_id)
    check_id("connection_id", record.connection_id)
    if record.default_connection_id is not None:
        check_id("default_connection_id", record.default_connection_id)


def runtime_user_taken(tenant_id: str, default_connection_id: str, runtime_user_id: str) -> Conflict:
    return Conflict(
        f"tenant {tenant_id!r} already has a connection for runtime user {runtime_user_id!r} "
        f"overriding {default_connection_id!r}; update or delete that one instead"
    )


def page_limit(limit: int) -> int:
    """Pages hold 1..MAX_PAGE items; larger requests get MAX_PAGE and a cursor."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValidationError("limit must be a positive integer", fields={"limit": "must be >= 1"})
    return min(limit, MAX_PAGE)


def bad_cursor() -> ValidationError:
    return ValidationError(
        "cursor is not one this store returned; pass next_cursor from the previous page unchanged",
        fields={"cursor": "invalid cursor"},
    )


def reserved_meta(key: str) -> None:
    if key == SCHEMA_VERSION_KEY:
        raise ValidationError(f"meta key {key!r} is managed by the store itself", fields={"key": "reserved"})


def ephemeral_digest(key: str) -> str:
    """One-time tokens are stored under their SHA-256: a store dump never yields a usable token."""
    return hashlib.sha256(key.encode()).hexdigest()


def audit_json(event: AuditEvent) -> str:
    d = event.to_dict()
    d.pop("seq", None)  # assigned by the store
    return dumps(d)


def audit_matches(event: AuditEvent, q: AuditQuery) -> bool:
    """The filters of an audit query; ``since`` is inclusive and ``until`` exclusive."""
    return (
        (q.connection_id is None or event.connection_id == q.connection_id)
        and (q.action is None or event.action == q.action)
        and (q.actor is None or event.actor == q.actor)
        and (q.outcome is None or event.outcome == q.outcome)
        and (q.since is None or event.ts >= q.since)
        and (q.until is None or event.ts < q.until)
    )


async def deliver(
    callbacks: Sequence[InvalidationCallback], tenant_id: str, connection_id: str | None
) -> None:
    """Runs every callback; one failing callback must not starve the others."""
    for cb in callbacks:
        try:
            result = cb(tenant_id, connection_id)
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("invalidation callback failed for tenant %s", tenant_id)


__all__ = ["FLUSH_ALL", "Store", "open_store"]
