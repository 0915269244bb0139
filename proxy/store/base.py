"""The storage contract both back ends (embedded SQLite, shared Redis) implement.

One behaviour, two back ends: the contract test suite (tests/store/test_contract.py) runs the
same cases against both. Records are the JSON of ``proxy.model`` dataclasses; the store never
sees a plaintext secret.

Concurrency: every mutable record carries a ``version``. ``put_*`` with ``expected_version``
is a compare-and-set: ``None`` means "must not exist yet", an int means "must still be at this
version", ``ANY_VERSION`` overwrites. A lost race raises ``Conflict``. The stored version is
always the previous one plus one.

The contract is split by concern (lifecycle, identity, meta, tenants, connections, API keys,
audit, one-time tokens, locks, invalidation); ``Store`` is all of them. Every method raises
``StoreUnavailable`` when the back end cannot be reached, and ``StoreLost`` once the store is no
longer the one opened (see ``IdentityStore``).
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from proxy.model import ApiKeyRecord, AuditEvent, ConnectionRecord, TenantRecord


class _AnyVersion:
    def __repr__(self) -> str:
        return "ANY_VERSION"


ANY_VERSION: Final = _AnyVersion()
ExpectedVersion = int | None | _AnyVersion

InvalidationCallback = Callable[[str, str | None], Awaitable[None] | None]
# Delivered as the tenant id of an invalidation when the store cannot tell what changed
# (subscriber reconnected, or fell behind the change log): drop every cached entry.
FLUSH_ALL: Final = "*"


@dataclass(frozen=True, slots=True)
class AuditQuery:
    tenant_id: str
    connection_id: str | None = None
    action: str | None = None
    actor: str | None = None
    outcome: str | None = None
    since: float | None = None
    until: float | None = None
    # Paging: events strictly older than this cursor (opaque string from a previous page).
    cursor: str | None = None
    limit: int = 100


@dataclass(frozen=True, slots=True)
class Page:
    items: list[Any]
    next_cursor: str | None


class StoreLifecycle(abc.ABC):
    """Opening, closing and answering readiness probes."""

    name: str = "store"

    @abc.abstractmethod
    async def open(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raises StoreUnavailable unless the back end answers (StoreLost once it lost its data)."""


class IdentityStore(abc.ABC):
    """Lost-data detection.

    Every store carries a random marker written once, when it is first opened. An instance
    remembers the marker it opened and keeps checking it; one that finds it missing or changed
    (Redis flushed or restarted empty, the SQLite file deleted or replaced) refuses every
    operation with ``StoreLost`` instead of writing new data over what it can no longer see."""

    identity: str | None = None

    @abc.abstractmethod
    async def accept_loss(self) -> str:
        """The operator's decision to carry on with the store as it is now: marks it with a new
        identity (recording the one it replaces, so running instances adopt it) and returns it."""


class MetaStore(abc.ABC):
    """Metadata: schema version, key-ring bookkeeping."""

    @abc.abstractmethod
    async def get_meta(self, key: str) -> str | None: ...

    @abc.abstractmethod
    async def set_meta(self, key: str, value: str) -> None: ...


class TenantStore(abc.ABC):
    """Tenant records: settings and the wrapped data keys the tenant's secrets are sealed under."""

    @abc.abstractmethod
    async def get_tenant(self, tenant_id: str) -> TenantRecord | None: ...

    @abc.abstractmethod
    async def put_tenant(self, record: TenantRecord, expected_version: ExpectedVersion) -> TenantRecord:
        """CAS write; returns the stored record (version bumped)."""

    @abc.abstractmethod
    async def list_tenants(self) -> list[TenantRecord]: ...


class ConnectionStore(abc.ABC):
    """Connection records (secrets as ciphertext only) and the runtime-user overrides."""

    @abc.abstractmethod
    async def get_connection(self, tenant_id: str, connection_id: str) -> ConnectionRecord | None: ...

    @abc.abstractmethod
    async def put_connection(
        self,
        record: ConnectionRecord,
        expected_version: ExpectedVersion,
        *,
        key_check: Mapping[str, str] | None = None,
    ) -> ConnectionRecord:
        """CAS write of the whole record, keeping the runtime-user index in step atomically.

        ``key_check`` maps data key versions to the wrapped-key blobs the record's secrets were
        sealed under: the write happens only if the tenant record holds exactly those, checked
        in the same atomic step (else ``KeyRecordChanged``, nothing written)."""

    @abc.abstractmethod
    async def delete_connection(self, tenant_id: str, connection_id: str) -> bool: ...

    @abc.abstractmethod
    async def list_connections(
        self,
        tenant_id: str,
        *,
        runtime_user_id: str | None = None,
        integration_id: str | None = None,
        default_connection_id: str | None = None,
        cursor: str | None = None,
        limit: int = 100,
    ) -> Page:
        """Ordered by connection_id; cursor is the last id of the previous page."""

    @abc.abstractmethod
    async def find_user_connection(
        self, tenant_id: str, default_connection_id: str, runtime_user_id: str
    ) -> ConnectionRecord | None:
        """The runtime user connection overriding ``default_connection_id`` for that user."""


class ApiKeyStore(abc.ABC):
    """Caller API keys (the records hold the hash of a key, never the key)."""

    @abc.abstractmethod
    async def put_api_key(self, record: ApiKeyRecord) -> None: ...

    @abc.abstractmethod
    async def get_api_key(self, key_id: str) -> ApiKeyRecord | None: ...

    @abc.abstractmethod
    async def list_api_keys(self, tenant_id: str) -> list[ApiKeyRecord]: ...

    @abc.abstractmethod
    async def touch_api_keys(self, last_used: dict[str, float]) -> None:
        """Batch update of last-used times (monotonic: never moves a time backwards)."""


class AuditStore(abc.ABC):
    """The audit trail: appended in batches, read per tenant, pruned by age."""

    @abc.abstractmethod
    async def append_audit(self, events: Sequence[AuditEvent]) -> None: ...

    @abc.abstractmethod
    async def query_audit(self, query: AuditQuery) -> Page:
        """Newest first."""

    @abc.abstractmethod
    async def prune_audit(self, before_ts: float) -> int:
        """Delete audit events older than ``before_ts`` (epoch seconds), every tenant; returns
        how many went. Idempotent, so replicas may prune concurrently."""


class EphemeralStore(abc.ABC):
    """One-time tokens: connect sessions, OAuth state."""

    @abc.abstractmethod
    async def put_ephemeral(self, namespace: str, key: str, value: dict[str, Any], ttl_s: float) -> None: ...

    @abc.abstractmethod
    async def get_ephemeral(self, namespace: str, key: str) -> dict[str, Any] | None: ...

    @abc.abstractmethod
    async def pop_ephemeral(self, namespace: str, key: str) -> dict[str, Any] | None:
        """Atomic read-and-delete: of two concurrent callers, exactly one gets the value."""


class LockStore(abc.ABC):
    """Locks: single-flight token refresh, key rotation."""

    @abc.abstractmethod
    async def acquire_lock(self, name: str, ttl_s: float) -> str | None:
        """Returns an owner token, or None when someone else holds the lock."""

    @abc.abstractmethod
    async def release_lock(self, name: str, token: str) -> bool:
        """Releases only if ``token`` still owns the lock."""


class InvalidationStore(abc.ABC):
    """Cache invalidation across replicas: what changed, or ``FLUSH_ALL`` when it cannot tell."""

    @abc.abstractmethod
    async def publish_invalidation(self, tenant_id: str, connection_id: str | None) -> None: ...

    @abc.abstractmethod
    async def subscribe_invalidations(self, callback: InvalidationCallback) -> None:
        """Starts delivering other replicas' invalidations to ``callback`` until close()."""


class Store(
    StoreLifecycle,
    IdentityStore,
    MetaStore,
    TenantStore,
    ConnectionStore,
    ApiKeyStore,
    AuditStore,
    EphemeralStore,
    LockStore,
    InvalidationStore,
):
    """Async storage: the whole contract, as both back ends implement it. A component that needs
    one concern takes only that part (``AuditStore``, ``LockStore``, ...); any ``Store`` is each."""
