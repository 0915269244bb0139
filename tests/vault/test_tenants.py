"""Tenant settings without HTTP, over a real store: the flag lands on the key record without
touching its keys, the setting's tenants are proxy-only whatever the flag says, and the cached
flag is forgotten on a change."""

from __future__ import annotations

import asyncio
from pathlib import Path

from proxy.observe.audit import Actor, AuditLog
from proxy.security import crypto
from proxy.settings import load_settings
from proxy.stale import StaleWindow
from proxy.store.base import AuditQuery, Store
from proxy.vault.tenants import TenantFlags, Tenants, tenant_body
from tests.support.gate import GatedReads
from tests.vault.test_vault import make_vault

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
    vault = make_vault(store, crypto.KeyRing.parse(crypto.generate_master_key_text()))
    flags = TenantFlags(store, ("always",), ttl_s=60.0, stale=StaleWindow(0.0))
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


async def test_a_flag_read_in_flight_when_the_tenant_turns_proxy_only_is_not_cached(
    store: Store, tmp_path: Path
) -> None:
    """A ``proxy_only`` flag read just before the tenant is made proxy-only, answered after the
    change forgot the cached flag, must not put "not proxy-only" back for the cache's TTL: the
    Connection Service would hand out secrets the operator just fenced off."""
    settings = load_settings(env={}, overrides={"data_dir": str(tmp_path)})
    vault = make_vault(store, crypto.KeyRing.parse(crypto.generate_master_key_text()))
    flags = TenantFlags(store, (), ttl_s=60.0, stale=StaleWindow(0.0))
    tenants = Tenants(vault, flags, AuditLog(store, settings))
    await vault.ensure_tenant("t1")
    gated = GatedReads(store, "get_tenant")
    flags.store = gated  # type: ignore[assignment]
    in_flight = asyncio.create_task(flags.proxy_only("t1"))
    await asyncio.wait_for(gated.read.wait(), 10)
    await tenants.set_proxy_only("t1", True, ACTOR)
    gated.release()
    assert await in_flight is False  # read before the change
    assert await flags.proxy_only("t1") is True
