"""The connection service without HTTP, over a real store on both back ends: declared bodies,
problems of every kind in one ValidationError, the PATCH merge rules, compare-and-set retries,
cascade deletes with upstream revocation, and what the audit trail says."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from proxy.catalogue import Catalogue
from proxy.errors import Conflict, ConnectionNotFound, ValidationError
from proxy.model import ConnectionRecord, RateWindow
from proxy.observe.audit import Actor, AuditLog
from proxy.security import crypto
from proxy.settings import load_settings
from proxy.shapes import UNSET
from proxy.stale import StaleWindow
from proxy.store.base import ANY_VERSION, AuditQuery, ExpectedVersion, Store
from proxy.vault.connections import Connections
from proxy.vault.inputs import patch_body, put_body
from proxy.vault.records import REDACTED, Credentials
from proxy.vault.vault import Vault
from tests.support import imports

SECRET = "tok-core-secret-5c1e"
ACTOR = Actor("admin:admin", "req-1")
BEARER = {
    "integration_id": "http_bearer",
    "parameters": {"token": SECRET, "base_url": "https://api.example.com"},
}
API_KEY = {
    "integration_id": "http_api_key",
    "parameters": {"api_key": SECRET, "base_url": "https://a.example", "header_name": "X-Key"},
}


class Revocations:
    """Records what would be revoked upstream (``raising``: the provider is down)."""

    def __init__(self, raising: bool = False) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []
        self.raising = raising

    async def revoke(self, creds: Credentials) -> dict[str, str]:
        self.seen.append((creds.record.connection_id, dict(creds.params)))
        if self.raising:
            raise RuntimeError("provider down")
        return {"access_token": "revoked"}


class RacingVault(Vault):
    """A vault whose next save first lets another writer change the record (a real store write)."""

    race = False

    async def save(self, record: ConnectionRecord, expected_version: ExpectedVersion) -> ConnectionRecord:
        if self.race:
            self.race = False
            current = await self.store.get_connection(record.tenant_id, record.connection_id)
            if current is not None:
                await self.store.put_connection(current.evolve(metadata={"by": "other"}), ANY_VERSION)
        return await super().save(record, expected_version)


@pytest.fixture
async def parts(store: Store, tmp_path: Path) -> AsyncIterator[tuple[Connections, RacingVault, AuditLog]]:
    vault = RacingVault(
        store,
        crypto.KeyRing.parse(crypto.generate_master_key_text()),
        Catalogue.load(),
        5.0,
        stale=StaleWindow(0.0),
    )
    audit = AuditLog(store, load_settings(env={}, overrides={"data_dir": str(tmp_path)}))
    yield Connections(vault, Revocations(), audit), vault, audit


async def put(
    conns: Connections, cid: str, raw: dict[str, Any], if_match: int | None = None
) -> ConnectionRecord:
    plan = await conns.check_put("t1", cid, put_body(raw))
    return (await conns.put(plan, if_match, ACTOR)).record


async def audited(audit: AuditLog, store: Store) -> list[tuple[str, str | None, dict[str, Any]]]:
    await audit.flush()
    page = await store.query_audit(AuditQuery(tenant_id="t1", limit=100))
    assert all(e.actor == "admin:admin" and e.request_id == "req-1" for e in page.items)
    return [(e.action, e.connection_id, e.detail) for e in reversed(page.items)]


# --- declared bodies ---------------------------------------------------------------------------


def test_bodies_say_what_was_sent_and_convert_it() -> None:
    body = put_body(
        {
            **BEARER,
            "allowed_hosts": ["api.example.com"],
            "metadata": None,
            "rate_limits": {"limit": 5, "window": "1m"},
            "options": {"retries": 2, "proxy_only": None, "quota_rate_limits": [{"requestsPerSecond": 2}]},
        }
    )
    assert body.problems == {}
    assert body.allowed_hosts == ("api.example.com",) and body.metadata == {}
    assert body.rate_limits == (RateWindow(5, 60.0),)
    assert body.options == {"retries": 2, "quota_rate_limits": [{"limit": 2, "window_s": 1.0}]}
    assert body.connection_subtype is UNSET and "connection_subtype" not in body.settings()
    assert body.sent() == [
        "allowed_hosts",
        "integration_id",
        "metadata",
        "options",
        "parameters",
        "rate_limits",
    ]
    assert put_body({}).problems == {
        "integration_id": "required: an integration id such as http_bearer (GET /admin/integrations)"
    }
    # PATCH requires nothing and leaves integration_id for the service to compare.
    patch = patch_body({"integration_id": 5, "parameters": None})
    assert patch.problems == {} and patch.integration_id == 5 and patch.params() == {}


def test_body_problems_use_the_contracts_field_names() -> None:
    body = put_body(
        {
            "integration_id": "bad id!",
            "surprise": 1,
            "rate_limits": [{"limit": 0, "window": "1m"}],
            "allowed_hosts": "api.example.com",
            "options": {"retries": 9, "timeouts": {"nap_s": 1}, "quota_rate_limits": [{"limit": 1}]},
        }
    )
    assert set(body.problems) == {
        "integration_id",
        "surprise",
        "rate_limits[0]",
        "allowed_hosts",
        "options.retries",
        "options.timeouts.nap_s",
        "options.quota_rate_limits[0]",
    }
    assert body.problems["surprise"].startswith("unknown field; known: allowed_hosts, connection_subtype")


# --- create, replace, read -----------------------------------------------------------------------


async def test_put_creates_then_replaces_and_every_problem_is_one_error(
    parts: tuple[Connections, RacingVault, AuditLog], store: Store
) -> None:
    conns, vault, audit = parts
    created = await put(conns, "c1", BEARER)
    assert created.version == 1 and created.status == "active" and SECRET not in str(created.secret_params)
    plan = await conns.check_put("t1", "c1", put_body({**BEARER, "metadata": {"team": "ops"}}))
    written = await conns.put(plan, None, ACTOR)
    assert (
        not written.created
        and written.record.version == 2
        and written.record.created_at == created.created_at
    )
    assert conns.view(written.record)["parameters"]["token"] == REDACTED
    with pytest.raises(ValidationError) as info:
        await conns.check_put(
            "t1",
            "c2",
            put_body(
                {
                    "integration_id": "http_bearer",
                    "surprise": 1,  # the body's shape
                    "parameters": {"token": REDACTED, "base_url": "ftp://x"},  # the integration's rules
                    "runtime_user_id": "alice",
                    "default_connection_id": "missing",  # the store's answer
                }
            ),
        )
    assert set(info.value.fields) == {
        "surprise",
        "parameters.token",
        "parameters.base_url",
        "default_connection_id",
    }
    assert SECRET not in str(info.value.to_body())
    assert await vault.find_record("t1", "c2") is None
    with pytest.raises(Conflict):
        await put(conns, "c1", BEARER, if_match=1)  # the caller's condition: not retried
    assert [a for a, _, _ in await audited(audit, store)] == ["connection.create", "connection.replace"]
    with pytest.raises(ConnectionNotFound):
        await conns.get("t1", "nope")


async def test_runtime_user_pairing_rules(parts: tuple[Connections, RacingVault, AuditLog]) -> None:
    conns, _, _ = parts
    await put(conns, "crm", BEARER)
    await put(conns, "crm-alice", {**BEARER, "runtime_user_id": "alice", "default_connection_id": "crm"})
    for extra, field, problem in [
        ({"runtime_user_id": "bob"}, "default_connection_id", "must be given together"),
        ({"default_connection_id": "crm"}, "runtime_user_id", "must be given together"),
        (
            {"runtime_user_id": "bob", "default_connection_id": "x1"},
            "default_connection_id",
            "must name another",
        ),
        (
            {"runtime_user_id": "bob", "default_connection_id": "crm-alice"},
            "default_connection_id",
            "not another",
        ),
    ]:
        with pytest.raises(ValidationError) as info:
            await conns.check_put("t1", "x1", put_body({**BEARER, **extra}))
        assert problem in info.value.fields[field], extra
    page = await conns.list("t1", runtime_user_id="alice")
    assert [r.connection_id for r in page.items] == ["crm-alice"]


# --- merge -----------------------------------------------------------------------------------------


async def test_patch_merge_rules(parts: tuple[Connections, RacingVault, AuditLog], store: Store) -> None:
    conns, vault, audit = parts
    await put(conns, "c1", API_KEY)

    async def patch(raw: dict[str, Any], if_match: int | None = None) -> ConnectionRecord:
        return await conns.patch("t1", "c1", patch_body(raw), if_match, ACTOR)

    kept = await patch({"parameters": {"api_key": REDACTED}, "metadata": {"m": 1}})
    assert kept.metadata == {"m": 1}
    assert (await vault.credentials("t1", "c1")).params["api_key"] == SECRET  # the placeholder kept it
    moved = await patch({"parameters": {"header_name": None, "api_key": SECRET, "location": "query"}})
    assert moved.public_params == {"base_url": "https://a.example", "location": "query"}
    cleared = await patch({"parameters": {"api_key": None}})
    assert cleared.status == "pending" and "api_key" not in cleared.secret_params
    with pytest.raises(ValidationError) as info:
        await patch({"integration_id": "http_bearer", "options": {"retries": 9}})
    assert set(info.value.fields) == {"integration_id", "options.retries"}
    with pytest.raises(ConnectionNotFound):
        await conns.patch("t1", "nope", patch_body({}), None, ACTOR)
    events = await audited(audit, store)
    assert events[-1] == (
        "connection.update",
        "c1",
        {"version": 4, "fields": ["parameters"], "parameters": ["api_key"]},
    )


async def test_a_write_that_lost_a_race_is_redone_unless_the_caller_named_a_version(
    parts: tuple[Connections, RacingVault, AuditLog],
) -> None:
    conns, vault, _ = parts
    await put(conns, "c1", BEARER)
    vault.race = True
    merged = await conns.patch("t1", "c1", patch_body({"options": {"retries": 1}}), None, ACTOR)
    # Redone on the other writer's version: both changes are there.
    assert merged.version == 3 and merged.metadata == {"by": "other"} and merged.options == {"retries": 1}
    vault.race = True
    with pytest.raises(Conflict):
        await conns.patch("t1", "c1", patch_body({"options": {"retries": 2}}), 3, ACTOR)
    vault.race = True
    replaced = await put(conns, "c1", BEARER)
    assert replaced.version == 6  # the racing write was 5


# --- delete ------------------------------------------------------------------------------------------


async def test_delete_needs_cascade_for_dependents_and_revokes_each_upstream(
    parts: tuple[Connections, RacingVault, AuditLog], store: Store
) -> None:
    conns, vault, audit = parts
    revocations = Revocations(raising=True)
    conns = Connections(vault, revocations, audit)
    await put(conns, "crm", BEARER)
    await put(conns, "crm-alice", {**BEARER, "runtime_user_id": "alice", "default_connection_id": "crm"})
    await put(conns, "shell", {"integration_id": "http_bearer"})
    with pytest.raises(Conflict) as info:
        await conns.delete("t1", "crm", cascade=False, actor=ACTOR)
    assert "crm-alice" in info.value.message and info.value.fields == {
        "connection_id": "has runtime user connections"
    }
    await conns.delete("t1", "crm", cascade=True, actor=ACTOR)
    await conns.delete("t1", "shell", cascade=False, actor=ACTOR)
    for cid in ("crm", "crm-alice", "shell"):
        assert await vault.find_record("t1", cid) is None
    # Decrypted for the provider (a shell has nothing to revoke); a provider that fails does not
    # keep the connection.
    assert [(cid, params["token"]) for cid, params in revocations.seen] == [
        ("crm-alice", SECRET),
        ("crm", SECRET),
    ]
    deletes = [(cid, d) for a, cid, d in await audited(audit, store) if a == "connection.delete"]
    assert deletes == [
        ("crm-alice", {"version": 1, "upstream_revocation": {"error": "RuntimeError"}}),
        ("crm", {"version": 1, "upstream_revocation": {"error": "RuntimeError"}}),
        ("shell", {"version": 1, "upstream_revocation": None}),
    ]
    with pytest.raises(ConnectionNotFound):
        await conns.delete("t1", "crm", cascade=True, actor=ACTOR)


def test_the_admin_core_loads_neither_aiohttp_nor_the_web_edge() -> None:
    graph = imports.graph()
    for module in (
        "proxy.shapes",
        "proxy.vault.inputs",
        "proxy.vault.connections",
        "proxy.vault.tenants",
        "proxy.security.api_keys",
    ):
        assert imports.reaches(graph, module, {"aiohttp"}) == set(), module
