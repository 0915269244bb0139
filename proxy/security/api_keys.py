"""Tenant API keys as an operator manages them: mint (shown once), list, revoke everywhere at once.

Why it exists: minting and revoking are more than storing a record, and they used to be spelled
out in the admin handlers. A key is made of an id and a secret (``proxy.security.crypto``); only
the secret's hash is stored, so the full key exists in the mint's answer only. Revoking marks the
record (kept for the audit trail and the listing), drops this process's verified-key cache entry
at once and tells the other replicas, which cache verified keys too, to re-read the tenant's.
No aiohttp: ``proxy.web.admin.api_keys`` translates requests into these calls.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Final

from proxy.errors import NotFound
from proxy.model import ApiKeyRecord
from proxy.observe.audit import Actor, AuditLog
from proxy.security import crypto
from proxy.security.auth import Authenticator
from proxy.shapes import Nullable, Obj, Text
from proxy.store.base import Store

__all__ = ["API_KEY_SHAPE", "ApiKeyBody", "ApiKeys", "api_key_body"]

_BODY: Final = Obj({"name": Nullable(Text(1, 200), message="must be a string of 1-200 characters")})
API_KEY_SHAPE: Final = _BODY  # the declaration itself, for the OpenAPI document


@dataclass(frozen=True, slots=True)
class ApiKeyBody:
    """A mint request: an optional label. ``problems``: what the body's shape got wrong."""

    name: str | None = None
    problems: dict[str, str] = field(default_factory=dict)


def api_key_body(raw: dict[str, Any]) -> ApiKeyBody:
    values, problems = _BODY.parse(raw)
    return ApiKeyBody(**values, problems=problems)


class ApiKeys:
    def __init__(self, store: Store, auth: Authenticator, audit: AuditLog) -> None:
        self.store = store
        self.auth = auth
        self.audit = audit

    async def mint(self, tenant_id: str, name: str | None, actor: Actor) -> tuple[ApiKeyRecord, str]:
        """A new key bound to the tenant: its record, and the full key (nowhere else ever again)."""
        key_id, full = crypto.new_api_key()
        record = ApiKeyRecord(
            key_id=key_id,
            tenant_id=tenant_id,
            secret_hash=crypto.hash_api_key(full),
            name=name,
            created_at=time.time(),
        )
        await self.store.put_api_key(record)
        self.audit.change(actor, tenant_id, "api_key.create", None, key_id=key_id)
        return record, full

    async def list(self, tenant_id: str) -> list[ApiKeyRecord]:
        return await self.store.list_api_keys(tenant_id)

    async def revoke(self, tenant_id: str, key_id: str, actor: Actor) -> None:
        """Revokes the key (idempotent); ``NotFound`` unless it is a key of this tenant."""
        record = await self.store.get_api_key(key_id)
        if record is None or record.tenant_id != tenant_id:
            raise NotFound(f"API key {key_id[:40]!r} does not exist in tenant {tenant_id!r}")
        if record.revoked_at is None:
            await self.store.put_api_key(replace(record, revoked_at=time.time()))
            self.audit.change(actor, tenant_id, "api_key.revoke", None, key_id=key_id)
        self.auth.forget_key(key_id)
        # Other replicas cache verified keys too: a tenant-wide invalidation makes them re-read.
        await self.store.publish_invalidation(tenant_id, None)
