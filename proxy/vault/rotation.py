"""Key rotation over the vault: re-wrapping tenant data keys under the newest master key, new
tenant data keys, resumable re-encryption and retiring what nothing uses.

A mixin of ``Vault`` (it needs the vault's key caches and its checked write), kept in its own
module because it runs from the ``keys`` commands, never on a request path.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from proxy.errors import CryptoError, ValidationError
from proxy.model import ConnectionRecord, TenantRecord
from proxy.security import crypto

if TYPE_CHECKING:
    from proxy.catalogue import Catalogue, Integration
    from proxy.store.base import ExpectedVersion, Store
    from proxy.vault.records import Credentials


class KeyRotation:
    # What the rotation uses of the vault it is mixed into (declared for the type checker).
    if TYPE_CHECKING:
        store: Store
        ring: crypto.KeyRing
        catalogue: Catalogue
        _deks: dict[str, dict[int, bytes]]

        async def _tenant_keys(self, tenant_id: str, create: bool) -> tuple[int, dict[int, bytes]] | None: ...
        async def decrypt(self, record: ConnectionRecord) -> Credentials: ...
        async def encrypt_params(
            self, tenant_id: str, connection_id: str, integration: Integration, params: Mapping[str, Any]
        ) -> tuple[dict[str, Any], dict[str, str]]: ...
        async def _put_checked(
            self, record: ConnectionRecord, expected_version: ExpectedVersion
        ) -> ConnectionRecord: ...
        async def invalidate(self, tenant_id: str, connection_id: str | None) -> None: ...

    async def rewrap_all(self) -> int:
        """Re-wraps every tenant's data keys under the newest master key. Idempotent."""
        count = 0
        for tenant in await self.store.list_tenants():
            wrapped = {}
            changed = False
            for version, raw in tenant.wrapped_deks.items():
                old = crypto.WrappedKey.from_dict(raw)
                new = crypto.rewrap_dek(self.ring, tenant.tenant_id, old)
                changed |= new is not old
                wrapped[version] = new.to_dict()
            if changed:
                await self.store.put_tenant(
                    TenantRecord(**{**tenant.to_dict(), "wrapped_deks": wrapped}), tenant.version
                )
                count += 1
        return count

    async def kek_versions_in_use(self) -> set[int]:
        return {
            int(raw["kek_version"])
            for t in await self.store.list_tenants()
            for raw in t.wrapped_deks.values()
        }

    async def rotate_tenant_key(self, tenant_id: str) -> int:
        """Adds a new data key version for the tenant (if the last one is already in use)."""
        tenant = await self.store.get_tenant(tenant_id)
        if tenant is None:
            raise ValidationError(f"tenant {tenant_id!r} has no keys yet", fields={"tenant_id": "unknown"})
        new_version = max(int(v) for v in tenant.wrapped_deks) + 1
        wrapped = crypto.wrap_dek(self.ring, tenant_id, new_version, crypto.generate_dek())
        record = TenantRecord(
            **{
                **tenant.to_dict(),
                "current_dek_version": new_version,
                "wrapped_deks": {**tenant.wrapped_deks, str(new_version): wrapped.to_dict()},
            }
        )
        await self.store.put_tenant(record, tenant.version)
        await self.invalidate(tenant_id, None)  # put_tenant told the others
        return new_version

    async def reencrypt_tenant(self, tenant_id: str) -> int:
        """Re-encrypts every record still on an older data key. Resumable: each record is one
        compare-and-set write, so a run killed halfway leaves every record old-or-new, and a
        rerun continues with what is left."""
        self._deks.pop(tenant_id, None)
        keys = await self._tenant_keys(tenant_id, create=False)
        if keys is None:
            return 0
        current, _ = keys
        done = 0
        cursor: str | None = None
        while True:
            page = await self.store.list_connections(tenant_id, cursor=cursor, limit=200)
            for record in page.items:
                if all(crypto.token_dek_version(t) == current for t in record.secret_params.values()):
                    continue
                creds = await self.decrypt(record)
                integration = self.catalogue.get(record.integration_id)
                secrets = {k: v for k, v in creds.params.items() if k in record.secret_params}
                _, secret = await self.encrypt_params(tenant_id, record.connection_id, integration, secrets)
                await self._put_checked(record.evolve(secret_params=secret), record.version)
                done += 1
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        # Each put_connection told the others about its record; this covers the data keys too.
        await self.invalidate(tenant_id, None)
        await self.store.publish_invalidation(tenant_id, None)
        return done

    async def retire_tenant_keys(self, tenant_id: str) -> list[int]:
        """Drops data key versions no record uses any more; refuses nothing silently."""
        tenant = await self.store.get_tenant(tenant_id)
        if tenant is None:
            return []
        used = {tenant.current_dek_version}
        cursor: str | None = None
        while True:
            page = await self.store.list_connections(tenant_id, cursor=cursor, limit=500)
            for record in page.items:
                used |= {crypto.token_dek_version(t) for t in record.secret_params.values()}
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        unused = [int(v) for v in tenant.wrapped_deks if int(v) not in used]
        if unused:
            kept = {v: w for v, w in tenant.wrapped_deks.items() if int(v) in used}
            await self.store.put_tenant(
                TenantRecord(**{**tenant.to_dict(), "wrapped_deks": kept}), tenant.version
            )
            await self.invalidate(tenant_id, None)  # put_tenant told the others
        return unused


def check_retire(in_use: set[int], version: int) -> None:
    if version in in_use:
        raise CryptoError(
            f"master key version {version} still wraps tenant data keys; run "
            "`connection-proxy keys rotate` first so every tenant key is re-wrapped under the newest version"
        )


__all__ = ["KeyRotation", "check_retire"]
