"""The vault over a real store: encryption at rest, row swaps, key rotation and resumable
re-encryption (interrupted halfway, rerun, nothing lost)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from proxy.catalogue import Catalogue
from proxy.errors import ConnectionNotFound, CryptoError, KeyVersionMissing, ValidationError
from proxy.model import ConnectionRecord
from proxy.security import crypto
from proxy.stale import StaleWindow
from proxy.store.base import ANY_VERSION, ExpectedVersion
from proxy.store.sqlite import SqliteStore
from proxy.vault.records import redacted_view
from proxy.vault.rotation import check_retire
from proxy.vault.vault import Vault
from tests.support.gate import GatedReads

CANARY = "canary-secret-7f3a9b"


def make_vault(store: Any, ring: crypto.KeyRing) -> Vault:
    return Vault(store, ring, Catalogue.load(), cache_ttl_s=5.0, stale=StaleWindow(0.0))


async def put(
    vault: Vault, tenant: str, cid: str, token: str = CANARY, expected: ExpectedVersion = None
) -> ConnectionRecord:
    integ = vault.catalogue.get("http_bearer")
    public, secret = await vault.encrypt_params(
        tenant, cid, integ, {"token": token, "base_url": "https://api.example.com"}
    )
    record = ConnectionRecord(
        tenant_id=tenant,
        connection_id=cid,
        integration_id="http_bearer",
        public_params=public,
        secret_params=secret,
    )
    return await vault.save(record, expected_version=expected)


async def test_secrets_are_ciphertext_at_rest_and_decrypt(store: Any) -> None:
    vault = make_vault(store, crypto.KeyRing.parse(crypto.generate_master_key_text()))
    saved = await put(vault, "t1", "c1")
    assert saved.status == "active"
    raw = json.dumps((await store.get_connection("t1", "c1")).to_dict())
    assert CANARY not in raw
    creds = await vault.credentials("t1", "c1")
    assert creds.params["token"] == CANARY
    assert CANARY not in repr(creds)
    assert CANARY not in json.dumps(redacted_view(creds.integration, saved))


async def test_ciphertext_moved_to_another_row_fails(store: Any) -> None:
    vault = make_vault(store, crypto.KeyRing.parse(crypto.generate_master_key_text()))
    a = await put(vault, "t1", "a", token="token-a")
    b = await put(vault, "t1", "b", token="token-b")
    # An attacker with write access to the store copies a's ciphertext into b.
    await store.put_connection(b.evolve(secret_params=a.secret_params), ANY_VERSION)
    await vault.invalidate("t1", "b")
    with pytest.raises(CryptoError) as info:
        await vault.credentials("t1", "b")
    assert "token-a" not in str(info.value)


async def test_pending_shell_then_unknown_connection(store: Any) -> None:
    vault = make_vault(store, crypto.KeyRing.parse(crypto.generate_master_key_text()))
    shell = ConnectionRecord(tenant_id="t1", connection_id="shell", integration_id="http_bearer")
    assert (await vault.save(shell, None)).status == "pending"
    with pytest.raises(ConnectionNotFound):
        await vault.credentials("t1", "missing")


async def test_master_key_rotation_rewraps_and_old_key_can_retire(store: Any) -> None:
    ring1 = crypto.KeyRing.parse(crypto.generate_master_key_text())
    vault = make_vault(store, ring1)
    await put(vault, "t1", "c1")
    await put(vault, "t2", "c1")

    ring2 = ring1.with_new_key()
    vault2 = make_vault(store, ring2)
    with pytest.raises(CryptoError, match="still wraps"):
        check_retire(await vault2.kek_versions_in_use(), 1)
    assert await vault2.rewrap_all() == 2
    assert await vault2.rewrap_all() == 0  # idempotent
    assert await vault2.kek_versions_in_use() == {2}
    check_retire(await vault2.kek_versions_in_use(), 1)

    # The ring without version 1 opens everything; a ring with only version 1 no longer does.
    only_new = make_vault(store, ring2.without(1))
    assert await only_new.verify_keys() == 2
    assert (await only_new.credentials("t2", "c1")).params["token"] == CANARY
    with pytest.raises(KeyVersionMissing, match="version 2"):
        await make_vault(store, crypto.KeyRing({1: ring1.get(1)})).verify_keys()


async def test_wrong_master_key_is_refused_at_verify(store: Any) -> None:
    vault = make_vault(store, crypto.KeyRing.parse(crypto.generate_master_key_text()))
    await put(vault, "t1", "c1")
    other = make_vault(store, crypto.KeyRing.parse(crypto.generate_master_key_text()))
    with pytest.raises(CryptoError, match="master key version 1"):
        await other.verify_keys()


class FlakyStore:
    """Delegates to a real store but dies after N connection writes, like a killed process."""

    def __init__(self, inner: Any, writes_before_crash: int) -> None:
        self._inner = inner
        self._left = writes_before_crash

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def put_connection(
        self, record: ConnectionRecord, expected_version: ExpectedVersion, **kw: Any
    ) -> ConnectionRecord:
        if self._left == 0:
            raise RuntimeError("simulated crash")
        self._left -= 1
        return await self._inner.put_connection(record, expected_version, **kw)


async def test_reencryption_interrupted_then_resumed_loses_nothing(store: Any) -> None:
    ring = crypto.KeyRing.parse(crypto.generate_master_key_text())
    vault = make_vault(store, ring)
    tokens = {f"c{i:02d}": f"{CANARY}-{i}" for i in range(12)}
    for cid, token in tokens.items():
        await put(vault, "t1", cid, token=token)

    assert await vault.rotate_tenant_key("t1") == 2
    crashing = make_vault(FlakyStore(store, writes_before_crash=5), ring)
    with pytest.raises(RuntimeError, match="simulated crash"):
        await crashing.reencrypt_tenant("t1")

    # Halfway: every record is either old or new, and all of them still decrypt.
    fresh = make_vault(store, ring)
    versions = set()
    for cid, token in tokens.items():
        record = await store.get_connection("t1", cid)
        versions |= {crypto.token_dek_version(t) for t in record.secret_params.values()}
        assert (await fresh.decrypt(record)).params["token"] == token
    assert versions == {1, 2}
    # Retiring now must keep version 1: records still use it.
    assert await fresh.retire_tenant_keys("t1") == []

    assert await fresh.reencrypt_tenant("t1") == 7
    assert await fresh.reencrypt_tenant("t1") == 0  # idempotent
    assert await fresh.retire_tenant_keys("t1") == [1]
    final = make_vault(store, ring)
    for cid, token in tokens.items():
        assert (await final.credentials("t1", cid)).params["token"] == token
    assert set((await store.get_tenant("t1")).wrapped_deks) == {"2"}


def _cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PROXY_DATA_DIR": str(data_dir), "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-m", "proxy", "keys", *args], env=env, capture_output=True, text=True, timeout=60
    )


@pytest.mark.system
async def test_keys_cli_rotate_status_retire(tmp_path: Path) -> None:
    from proxy.security.bootstrap import load_secrets
    from proxy.settings import load_settings

    settings = load_settings(env={"PROXY_DATA_DIR": str(tmp_path)})
    secrets = load_secrets(settings)  # dev mode: writes master.key
    s = SqliteStore(settings.store_path)
    await s.open()
    await put(make_vault(s, secrets.ring), "t1", "c1")
    await s.close()

    out = _cli(tmp_path, "rotate", "--generate")
    assert out.returncode == 0, out.stderr
    assert "added master key version 2" in out.stdout and "re-wrapped 1" in out.stdout
    assert (tmp_path / "master.key").stat().st_mode & 0o777 == 0o600
    status = _cli(tmp_path, "status")
    lines = {line.split()[2]: line for line in status.stdout.splitlines()}
    assert lines["v1"].endswith("unused") and lines["v2"].endswith("in use (newest)")
    retire = _cli(tmp_path, "retire", "1")
    assert retire.returncode == 0 and "wraps nothing" in retire.stdout
    reenc = _cli(tmp_path, "reencrypt")
    assert reenc.returncode == 0 and "1 record(s) re-encrypted" in reenc.stdout, reenc.stderr
    # A key ring missing the version in use stops everything with exit 2 and names the version.
    (tmp_path / "master.key").write_text(crypto.generate_master_key_text())
    bad = _cli(tmp_path, "status")
    assert bad.returncode == 2 and "version" in bad.stderr
    db = sqlite3.connect(settings.store_path)
    assert CANARY not in " ".join(str(r) for r in db.execute("select * from connections"))


async def test_replica_with_a_different_key_is_refused_before_any_data(store: Any) -> None:
    await make_vault(store, crypto.KeyRing.parse(crypto.generate_master_key_text())).verify_keys()
    other = make_vault(store, crypto.KeyRing.parse(crypto.generate_master_key_text()))
    with pytest.raises(CryptoError, match="version 1 is not the key this store was set up with"):
        await other.verify_keys()


async def test_every_write_through_the_vault_keeps_a_secret_at_its_destination(store: Any) -> None:
    """The one enforcement point of "a destination never changes under a kept secret": admin
    PUT/PATCH, the connect form, the OAuth callback and token refreshes all write through
    ``Vault.save``, with any expected version."""
    vault = make_vault(store, crypto.KeyRing.parse(crypto.generate_master_key_text()))
    saved = await put(vault, "t1", "c1")
    moved = saved.evolve(public_params={"base_url": "https://evil.example.com"})
    for expected in (saved.version, ANY_VERSION):
        with pytest.raises(ValidationError) as err:
            await vault.save(moved, expected)
        assert "parameters.token" in err.value.fields and CANARY not in str(err.value)
    assert (await vault.credentials("t1", "c1")).params["base_url"] == "https://api.example.com"
    # With the secret sealed again in the same write, the move is the writer's decision.
    _, secret = await vault.encrypt_params("t1", "c1", vault.catalogue.get("http_bearer"), {"token": "new"})
    stored = await vault.save(moved.evolve(secret_params=secret), saved.version)
    assert stored.public_params["base_url"] == "https://evil.example.com"


class RingFile:
    """A key source standing in for the key file: what it returns can change, reads are counted."""

    def __init__(self, ring: crypto.KeyRing) -> None:
        self.ring = ring
        self.reads = 0

    def __call__(self) -> crypto.KeyRing:
        self.reads += 1
        return self.ring


async def test_a_version_added_elsewhere_is_reread_once_then_used(
    store: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import proxy.vault.vault

    monkeypatch.setattr(proxy.vault.vault, "RING_REREAD_MIN_INTERVAL_S", 0.3)
    old = crypto.KeyRing.parse(crypto.generate_master_key_text())
    new = old.with_new_key()
    await put(make_vault(store, new), "t1", "c1")  # wrapped under version 2, as after a rotation
    source = RingFile(old)  # this replica's file does not have version 2 yet
    stale = Vault(store, old, Catalogue.load(), 5.0, ring_source=source, stale=StaleWindow(0.0))
    record = await store.get_connection("t1", "c1")
    for _ in range(5):
        with pytest.raises(KeyVersionMissing) as info:
            await stale.decrypt(record)
    assert source.reads == 1  # rate-limited: one re-read, not one per call
    assert "PROXY_MASTER_KEY_FILE" in info.value.message and "SIGHUP" in info.value.message
    assert "add it to" not in info.value.message  # the start-up advice is wrong here
    source.ring = new  # the operator copies the new file
    await asyncio.sleep(0.35)
    assert (await stale.decrypt(record)).params["token"] == CANARY
    assert source.reads == 2 and stale.ring.versions == (1, 2)


async def test_ring_from_the_environment_says_restart(store: Any) -> None:
    old = crypto.KeyRing.parse(crypto.generate_master_key_text())
    await put(make_vault(store, old.with_new_key()), "t1", "c1")
    fixed = Vault(store, old, Catalogue.load(), 5.0, ring_source=None, stale=StaleWindow(0.0))
    with pytest.raises(
        KeyVersionMissing, match="PROXY_MASTER_KEY, which cannot change while it runs: restart"
    ):
        await fixed.decrypt(await store.get_connection("t1", "c1"))
    assert await fixed.reload_ring() is False


async def test_reload_refuses_a_different_key_under_a_known_version(store: Any) -> None:
    ring = crypto.KeyRing.parse(crypto.generate_master_key_text())
    vault = Vault(store, ring, Catalogue.load(), 5.0, ring_source=RingFile(ring), stale=StaleWindow(0.0))
    await vault.verify_keys()  # records version 1's fingerprint
    await put(vault, "t1", "c1")
    assert await vault.reload_ring() is False  # same ring: nothing to do
    vault._ring_source = RingFile(crypto.KeyRing.parse(crypto.generate_master_key_text()))
    with pytest.raises(CryptoError, match="not the key this store was set up with"):
        await vault.reload_ring()
    assert vault.ring is ring
    assert (await vault.credentials("t1", "c1")).params["token"] == CANARY


@pytest.mark.parametrize("change", ["deleted here", "replaced by a peer"])
async def test_credentials_read_in_flight_during_a_change_are_not_cached(store: Any, change: str) -> None:
    """The read-vs-invalidation race: the record is read just before a deletion or replacement,
    and the decrypted copy reaches the cache after the invalidation dropped it. The next call
    must see the change, not that copy for the cache's TTL (and then stale)."""
    ring = crypto.KeyRing.parse(crypto.generate_master_key_text())
    vault, peer = make_vault(store, ring), make_vault(store, ring)
    await put(vault, "t1", "c1", "tok-old")
    gated = GatedReads(store, "get_connection")
    vault.store = gated  # type: ignore[assignment]
    in_flight = asyncio.create_task(vault.credentials("t1", "c1"))
    await asyncio.wait_for(gated.read.wait(), 10)  # the old record is read, not yet cached
    if change == "deleted here":
        assert await vault.delete("t1", "c1")  # its write, then its own invalidation
    else:
        await put(peer, "t1", "c1", "tok-new", ANY_VERSION)  # the store knows; then the message:
        await vault.invalidate("t1", "c1")
    gated.release()
    assert (await in_flight).params["token"] == "tok-old"  # concurrent with the change: either
    if change == "deleted here":
        with pytest.raises(ConnectionNotFound):
            await vault.credentials("t1", "c1")
    else:
        assert (await vault.credentials("t1", "c1")).params["token"] == "tok-new"
