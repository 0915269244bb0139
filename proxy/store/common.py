"""The rules both back ends share, so the contract tests cannot pass on one and drift on the other:
compare-and-set versions, audit filters, paging limits, token hashing, identity verdicts, the
wording of conflicts and losses. Back ends import this module, never ``proxy.store`` itself
(which picks a back end, and so imports them).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import secrets
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

from proxy.errors import Conflict, KeyRecordChanged, StoreLost, ValidationError
from proxy.model import ConnectionRecord, check_id
from proxy.store.base import ANY_VERSION, AuditQuery, ExpectedVersion, InvalidationCallback

if TYPE_CHECKING:
    from proxy.model import AuditEvent

log = logging.getLogger("proxy.store")

SCHEMA_VERSION_KEY: Final = "schema_version"
# The store's identity marker (see Store.identity) and the marker it replaced on accept_loss.
STORE_ID_KEY: Final = "store_id"
STORE_REPLACES_KEY: Final = "store_id_replaces"
MANAGED_META: Final = frozenset({SCHEMA_VERSION_KEY, STORE_ID_KEY, STORE_REPLACES_KEY})
MAX_PAGE: Final = 1000


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
    if key in MANAGED_META:
        raise ValidationError(f"meta key {key!r} is managed by the store itself", fields={"key": "reserved"})


def new_identity() -> str:
    return secrets.token_hex(16)


def judge_identity(mine: str, found: str | None, replaces: str | None) -> str | None:
    """What an instance that opened ``mine`` makes of the marker it reads now: ``mine`` (all
    well), the new marker (an operator accepted the loss of ``mine``: adopt it), or None (lost)."""
    if found == mine:
        return mine
    if found is not None and replaces == mine:
        return found
    return None


def store_lost(kind: str, mine: str, what: str, recover: str) -> StoreLost:
    return StoreLost(
        f"the {kind} store is not the one this replica opened (identity {mine!r}): {what}. Reads "
        f"and writes are refused so nothing is written over the ciphertexts it held. {recover} "
        "(see 'Lost store data' in the README)"
    )


def redis_lost(mine: str, found: str | None) -> StoreLost:
    if found is None:
        what = "its identity marker is gone, so Redis lost its data (flushed, or restarted empty)"
    else:
        what = f"it now carries identity {found!r}: another store answers at that address"
    return store_lost(
        "redis",
        mine,
        what,
        "Restore the Redis backup (replicas resume by themselves once their identity is back), "
        "or accept the store as it is now with POST /admin/store/accept-loss",
    )


def key_check_holds(tenant: dict[str, Any] | None, check: Mapping[str, str]) -> bool:
    """Whether a tenant record (its JSON) still holds the wrapped data keys of ``check``."""
    if tenant is None:
        return False
    wrapped = tenant.get("wrapped_deks")
    if not isinstance(wrapped, dict):
        return False
    for version, blob in check.items():
        entry = wrapped.get(version)
        if not isinstance(entry, dict) or entry.get("blob") != blob:
            return False
    return True


def key_record_changed(tenant_id: str) -> KeyRecordChanged:
    return KeyRecordChanged(
        f"the key record of tenant {tenant_id!r} changed or vanished while the write was prepared "
        "(the store lost or replaced it); nothing was written: retry the request"
    )


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
