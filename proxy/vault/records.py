"""What the vault hands out and shows: decrypted ``Credentials``, the status rule, the redacted
admin view. Pure data and rules, kept apart from the vault's I/O so handlers and tests can use
them without a store.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from proxy.catalogue import Integration
from proxy.model import ConnectionRecord, ConnectionStatus

REDACTED = "********"


@dataclass(frozen=True, slots=True)
class Credentials:
    """A connection with its parameters decrypted. Lives in memory only; repr is redacted."""

    record: ConnectionRecord
    integration: Integration
    params: Mapping[str, Any]
    # A runtime user connection's calls are bound to its default's hosts (None: its own binding).
    host_binding: tuple[str, ...] | None = None

    def __repr__(self) -> str:
        return f"Credentials({self.record.tenant_id}/{self.record.connection_id}, params=<redacted>)"

    def public_params(self) -> dict[str, Any]:
        return {k: v for k, v in self.params.items() if not self.integration.is_secret(k)}


def compute_status(integration: Integration, record: ConnectionRecord) -> str:
    """pending until every required field is present; needs_reauth/error are sticky until a write."""
    present = set(record.public_params) | set(record.secret_params)
    if integration.missing_required(present):
        return ConnectionStatus.PENDING.value
    return ConnectionStatus.ACTIVE.value


def redacted_view(integration: Integration, record: ConnectionRecord) -> dict[str, Any]:
    """The admin view: public parameter values, and only the *names* of secret ones."""
    params: dict[str, Any] = dict(record.public_params)
    for name in record.secret_params:
        params[name] = REDACTED
    return {
        "tenant_id": record.tenant_id,
        "connection_id": record.connection_id,
        "integration_id": record.integration_id,
        "connection_subtype": record.connection_subtype,
        "status": record.status,
        "status_detail": record.status_detail,
        "parameters": params,
        "secret_fields_set": sorted(record.secret_params),
        "missing_fields": integration.missing_required(set(record.public_params) | set(record.secret_params)),
        "runtime_user_id": record.runtime_user_id,
        "default_connection_id": record.default_connection_id,
        "rate_limits": [w.to_dict() for w in record.rate_limits],
        "allowed_hosts": list(record.allowed_hosts) if record.allowed_hosts is not None else None,
        "metadata": record.metadata,
        "options": record.options,
        "created_at": record.created_at,
        "updated_at": record.updated_at,
        "version": record.version,
        **served_by(integration),
    }


def served_by(integration: Integration) -> dict[str, Any]:
    """Who hands this connection's credentials out, and a notice when the proxy never does.

    A connection of an integration id nobody described is still stored (Runtara's custom agents
    read theirs from the Connection Service), so an admin answer must say it will not be proxied
    rather than let a typo in ``integration_id`` pass silently.
    """
    if integration.proxyable:
        return {"served_by": ["proxy", "connection_service"], "notice": None}
    if not integration.catalogued:
        notice = (
            f"integration {integration.id!r} is not in the catalogue (GET /admin/integrations): the "
            "connection is stored and served to the Connection Service only, and every parameter is "
            "kept secret; the proxy refuses it with INTEGRATION_NOT_PROXYABLE"
        )
    else:
        notice = f"integration {integration.id!r} is served to the Connection Service only, never proxied"
    return {"served_by": ["connection_service"], "notice": notice}


__all__ = ["REDACTED", "Credentials", "compute_status", "redacted_view", "served_by"]
