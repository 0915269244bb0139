"""``SqliteStore``: the embedded back end, assembled from one mixin per concern of the contract.

All state lives in ``SqliteCore`` (the mixins share one connection, worker thread and change-log
poller); each mixin holds the operations of one part of ``proxy.store.base``.
"""

from __future__ import annotations

from proxy.store.base import Store
from proxy.store.sqlite.audit import SqliteAudit
from proxy.store.sqlite.changes import SqliteChanges
from proxy.store.sqlite.connections import SqliteConnections
from proxy.store.sqlite.lifecycle import SqliteLifecycle
from proxy.store.sqlite.tenants import SqliteTenants
from proxy.store.sqlite.tokens import SqliteTokens


class SqliteStore(
    SqliteLifecycle,
    SqliteTenants,
    SqliteConnections,
    SqliteAudit,
    SqliteTokens,
    SqliteChanges,
    Store,
):
    name = "sqlite"
