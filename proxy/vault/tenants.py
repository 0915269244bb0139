"""Tenant settings as an operator changes them: today one flag, ``proxy_only``.

Why it exists: a tenant's record is its key record (``proxy.vault.vault``: wrapped data keys),
so setting a flag on it is a compare-and-set write that must keep the keys it holds, on a record
that may not exist yet (it is created with fresh keys first). The effective flag is the record's
or the ``proxy_only_tenants`` setting's; ``TenantFlags`` caches it for the hot path and forgets it
here on a change. No aiohttp: ``proxy.web.admin.tenants`` translates requests into these calls.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Final

from proxy.cache import TtlCache
from proxy.errors import Conflict
from proxy.observe.audit import Actor, AuditLog
from proxy.shapes import Bool, Obj
from proxy.stale import StaleWindow, ttl_entry
from proxy.store.base import FLUSH_ALL, Store
from proxy.vault.vault import Vault

__all__ = ["CAS_ATTEMPTS", "TENANT_SHAPE", "TenantBody", "TenantView", "Tenants", "tenant_body"]

CAS_ATTEMPTS: Final = 3
_BODY: Final = Obj({"proxy_only": Bool("required: true or false")}, required=("proxy_only",))
TENANT_SHAPE: Final = _BODY  # the declaration itself, for the OpenAPI document

# Cleared when a put finds this many (the old "> 10000" test cleared at 10001).
TENANT_FLAGS_MAX = 10001


class TenantFlags:
    """Whether a tenant is proxy-only (its flag, or the ``proxy_only_tenants`` setting), cached
    like credentials so the hot path skips the store. One per process: the Connection Service
    (public parameters only) and the proxy (redacting echoed secrets) read the same answer, and
    a tenant update forgets it."""

    def __init__(
        self, store: Store, configured: tuple[str, ...], ttl_s: float, *, stale: StaleWindow
    ) -> None:
        self.store = store
        self.configured = frozenset(configured)
        self.ttl = max(ttl_s, 0.0)
        self._cache: TtlCache[str, bool] = TtlCache(TENANT_FLAGS_MAX)
        self.stale = stale  # while the store is down: the process's one window (proxy.stale)

    async def proxy_only(self, tenant_id: str) -> bool:
        if tenant_id in self.configured:
            return True
        now = time.monotonic()
        hit = self._cache.get(tenant_id)
        if hit is not None and hit[0] > now:
            return hit[1]
        since = self._cache.generation  # a change during the read voids its answer (proxy.cache)

        async def fetch() -> bool:
            tenant = await self.store.get_tenant(tenant_id)
            flag = bool(tenant is not None and tenant.proxy_only)
            if self.ttl > 0:
                self._cache.put(tenant_id, flag, now + self.ttl, since=since)
            return flag

        return await self.stale.load(
            "tenant_flags",
            f"tenant {tenant_id!r}",
            fetch,
            lambda: ttl_entry(self._cache, tenant_id, self.ttl),
        )

    def forget(self, tenant_id: str) -> None:
        self._cache.discard(tenant_id)

    def on_invalidation(self, tenant_id: str, connection_id: str | None) -> None:
        """A tenant-wide invalidation from any replica (a tenant write publishes one) forgets the
        tenant's flag here too: turning proxy-only on is a protection, and must not wait for this
        cache's lifetime on the other replicas."""
        if connection_id is not None:
            return
        if tenant_id == FLUSH_ALL:
            self._cache.clear()
        else:
            self._cache.discard(tenant_id)


@dataclass(frozen=True, slots=True)
class TenantBody:
    """A settings write. ``problems``: what the body's shape got wrong."""

    proxy_only: bool = False
    problems: dict[str, str] = field(default_factory=dict)


def tenant_body(raw: dict[str, Any]) -> TenantBody:
    values, problems = _BODY.parse(raw)
    return TenantBody(**values, problems=problems)


@dataclass(frozen=True, slots=True)
class TenantView:
    tenant_id: str
    proxy_only: bool
    proxy_only_effective: bool  # the flag, or the proxy_only_tenants setting

    def to_dict(self) -> dict[str, Any]:
        return {
            "tenant_id": self.tenant_id,
            "proxy_only": self.proxy_only,
            "proxy_only_effective": self.proxy_only_effective,
        }


class Tenants:
    def __init__(self, vault: Vault, flags: TenantFlags, audit: AuditLog) -> None:
        self.vault = vault
        self.store = vault.store
        self.flags = flags
        self.audit = audit

    def _view(self, tenant_id: str, proxy_only: bool) -> TenantView:
        return TenantView(tenant_id, proxy_only, proxy_only or tenant_id in self.flags.configured)

    async def get(self, tenant_id: str) -> TenantView:
        tenant = await self.store.get_tenant(tenant_id)
        return self._view(tenant_id, bool(tenant and tenant.proxy_only))

    async def set_proxy_only(self, tenant_id: str, proxy_only: bool, actor: Actor) -> TenantView:
        await self.vault.ensure_tenant(tenant_id)
        for _ in range(CAS_ATTEMPTS):
            tenant = await self.store.get_tenant(tenant_id)
            assert tenant is not None
            try:
                await self.store.put_tenant(replace(tenant, proxy_only=proxy_only), tenant.version)
                break
            except Conflict:
                continue
        else:
            raise Conflict(f"tenant {tenant_id!r} kept changing while it was being updated; retry")
        self.flags.forget(tenant_id)
        self.audit.change(actor, tenant_id, "tenant.update", None, proxy_only=proxy_only)
        return self._view(tenant_id, proxy_only)
