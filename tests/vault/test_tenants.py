"""Tenant settings without HTTP, over a real store: the flag lands on the key record without
touching its keys, the setting's tenants are proxy-only whatever the flag says, and the cached
flag is forgotten on a change."""

from __future__ import annotations

from pathlib import Path

from proxy.catalogue import Catalogue
from proxy.observe.audit import Actor, AuditLog
from proxy.security import crypto
from proxy.settings import load_settings
from proxy.store.base import AuditQuery, Store
from proxy.vault.tenants import TenantFlags, Tenants, tenant_body
from proxy.vault.vault import Vault

ACTOR = Actor("admin:admin", "req-3")


def test_the_body_needs_proxy_only() -> None:
    assert tenant_body({"proxy_only": True}).proxy_only is True
    assert tenant_body({"proxy_only": "yes", "z": 1}).problems == {
        "proxy_only": "required: true or false",
        "z": "unknown field; known: proxy_only",
    }
    assert tenant_body({}).problems == {"proxy_only": "required: true or false"}


async def test_set_and_get_proxy_only(store: Store, tmp_path: Path) -> None:
    settings = load_settings(env={}, overrides={"data_dir": str(tmp_path)})
    vault = Vault(store, crypto.KeyRing.parse(crypto.generate_master_key_text()), Catalogue.load(), 5.0)
    flags = TenantFlags(store, ("always",), ttl_s=60.0)
    audit = AuditLog(store, settings)
    tenants = Tenants(vault, flags, audit)
    assert (await tenants.get("t1")).to_dict() == {
        "tenant_id": "t1",
        "proxy_only": False,
        "proxy_only_effective": False,
    }
    assert await flags.proxy_only("t1") is False  # cached now
    view = await tenants.set_proxy_only("t1", True, ACTOR)
    assert view.proxy_only and view.proxy_only_effective
    assert await flags.proxy_only("t1") is True  # the cache forgot the old answer
    tenant = await store.get_tenant("t1")
    assert tenant is not None and tenant.wrapped_deks and tenant.proxy_only is True
    assert (await tenants.get("always")).proxy_only_effective is True
    await audit.flush()
    page = await store.query_audit(AuditQuery(tenant_id="t1"))
    assert [(e.action, e.detail) for e in page.items] == [("tenant.update", {"proxy_only": True})]
