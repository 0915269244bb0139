"""Minting and revoking tenant API keys without HTTP, over a real store: the key works at once,
only its hash is kept, and a revocation is seen at once despite the verified-key cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from proxy.errors import NotFound, Unauthenticated
from proxy.observe.audit import Actor, AuditLog
from proxy.security.api_keys import ApiKeys, api_key_body
from proxy.security.auth import Authenticator
from proxy.settings import load_settings
from proxy.stale import StaleWindow
from proxy.store.base import AuditQuery, Store

ACTOR = Actor("admin:admin", "req-9")


def test_the_body_is_a_name_or_nothing() -> None:
    assert api_key_body({}).name is None and api_key_body({"name": "ci"}).name == "ci"
    assert api_key_body({"name": None}).problems == {}
    assert api_key_body({"name": 5, "x": 1}).problems == {
        "name": "must be a string of 1-200 characters",
        "x": "unknown field; known: name",
    }


async def test_mint_list_revoke(store: Store, tmp_path: Path) -> None:
    settings = load_settings(env={}, overrides={"data_dir": str(tmp_path)})
    auth = Authenticator(settings, store, "admin-token-" + "x" * 20, stale=StaleWindow(0.0))
    audit = AuditLog(store, settings)
    keys = ApiKeys(store, auth, audit)
    record, full = await keys.mint("t1", "ci", ACTOR)
    assert full not in json.dumps(record.to_dict()) and record.name == "ci"
    caller = await auth.authenticate({"Authorization": f"Bearer {full}"}, None, allow_trusted=False)
    assert caller.tenant_id == "t1"  # the key is verified and cached
    assert [k.key_id for k in await keys.list("t1")] == [record.key_id]
    with pytest.raises(NotFound):
        await keys.revoke("t2", record.key_id, ACTOR)  # addressed within its tenant
    await keys.revoke("t1", record.key_id, ACTOR)
    await keys.revoke("t1", record.key_id, ACTOR)  # idempotent, audited once
    with pytest.raises(Unauthenticated):
        await auth.authenticate({"Authorization": f"Bearer {full}"}, None, allow_trusted=False)
    await audit.flush()
    page = await store.query_audit(AuditQuery(tenant_id="t1"))
    assert [(e.action, e.detail, e.request_id) for e in reversed(page.items)] == [
        ("api_key.create", {"key_id": record.key_id}, "req-9"),
        ("api_key.revoke", {"key_id": record.key_id}, "req-9"),
    ]
