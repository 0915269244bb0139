"""The vault: connections in, decrypted credentials out, nothing plaintext at rest.

It joins the store (where records live), the key ring (master keys) and the catalogue (which
parameters are secret). Tenant data keys are created lazily on a tenant's first write, wrapped by
the newest master key, and cached unwrapped in memory only. Decrypted credentials (and which
connection a runtime user resolves to) are cached for ``credential_cache_ttl_s`` and dropped at
once on a local change or a peer's invalidation; while the store is unreachable, expired ones
keep serving within the bounds of ``proxy.stale`` (an answered reload drops or replaces them).

The destination rules of ``proxy.security.destinations`` are applied here, where every write and every
decryption passes: ``save`` refuses a destination change under a kept secret whichever handler
wrote it, and ``decrypt`` gives a runtime user connection its default connection's destination
and host binding.

The key ring can change under a running service (rotation adds a version, retiring removes one):
``reload_ring`` re-reads the key source on SIGHUP, and a tenant key wrapped by a version this
process does not hold triggers one re-read (at most one per ``RING_REREAD_MIN_INTERVAL_S``, so a
truly missing version cannot turn every request into a file read) before the call fails.

Every acknowledged write decrypts later: a record with secrets is written only after its tokens
were opened with the cached data keys, and only if the store, in the same atomic write, still
holds the wrapped keys those came from (``_put_checked``). A cached key whose record the store
lost (Redis flushed, a file replaced) is never trusted for a write, and a tenant whose key
record is gone while its connections remain gets no new keys over their ciphertexts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from proxy.cache import TtlCache
from proxy.catalogue import Catalogue, Integration
from proxy.errors import (
    Conflict,
    ConnectionNotFound,
    CryptoError,
    KeyRecordChanged,
    KeyVersionMissing,
    ProxyError,
    StoreUnavailable,
)
from proxy.model import ConnectionRecord, ConnectionStatus, TenantRecord
from proxy.observe.metrics import CREDENTIAL_CACHE_TALLY
from proxy.security import crypto, destinations
from proxy.stale import StaleWindow, ttl_entry
from proxy.store import FLUSH_ALL
from proxy.store.base import ANY_VERSION, ExpectedVersion, Page, Store
from proxy.vault.records import Credentials, compute_status
from proxy.vault.rotation import KeyRotation

log = logging.getLogger("proxy.vault")

# A data key wrapped by an unknown master-key version re-reads the key source at most this often.
RING_REREAD_MIN_INTERVAL_S = 2.0
RESOLVE_CACHE_MAX = 4096
# Decrypted credentials held at once; full, it is cleared (proxy.cache) and what it held reloads.
CREDENTIAL_CACHE_MAX = 65536
# Labelled children looked up once: this counter moves on every proxied call.
_CACHE_HIT = ("hit",)
_CACHE_MISS = ("miss",)


class Vault(KeyRotation):
    def __init__(
        self,
        store: Store,
        ring: crypto.KeyRing,
        catalogue: Catalogue,
        cache_ttl_s: float,
        ring_source: Callable[[], crypto.KeyRing] | None = None,
        *,
        stale: StaleWindow,
    ) -> None:
        self.store = store
        self.stale = stale  # the process's one window (stale_if_error_s), shared with /readyz
        self.ring = ring
        # Re-reads the key ring (the key file); None when it cannot change (PROXY_MASTER_KEY).
        self._ring_source = ring_source
        self._ring_lock = asyncio.Lock()
        # When a re-read last failed to find a version (rate-limits looking for it again).
        self._ring_missed: dict[int, float] = {}
        self.catalogue = catalogue
        self.cache_ttl_s = cache_ttl_s
        self._deks: dict[str, dict[int, bytes]] = {}
        self._current_dek: dict[str, int] = {}
        # tenant -> dek version -> wrapped blob (base64) the cached key was unwrapped from.
        self._blobs: dict[str, dict[int, str]] = {}
        # One entry per connection read. Clearing when full also drops the Plans the pipeline
        # keeps by the identity of these objects (they are rebuilt), never a correctness issue.
        self._creds: TtlCache[tuple[str, str], Credentials] = TtlCache(CREDENTIAL_CACHE_MAX)
        # (tenant, connection, runtime user) -> the connection id to use.
        self._resolved: TtlCache[tuple[str, str, str], str] = TtlCache(RESOLVE_CACHE_MAX)
        self._tenant_locks: dict[str, asyncio.Lock] = {}

    # --- keys ----------------------------------------------------------------------------------

    async def verify_keys(self) -> int:
        """Unwraps every tenant's data keys; a wrong or missing master key stops start-up here."""
        await self._check_fingerprints()
        tenants = await self.store.list_tenants()
        for tenant in tenants:
            self._load_tenant_keys(tenant)
        return len(tenants)

    async def _check_fingerprints(self, ring: crypto.KeyRing | None = None) -> None:
        """Each master key version's (non-secret) fingerprint is recorded in the store the first
        time it is used; a replica started with a *different* key under the same version number
        (e.g. two dev-mode replicas sharing Redis) is refused before it writes anything."""
        ring = ring or self.ring
        for version in ring.versions:
            name = f"kek_fingerprint:{version}"
            mine = ring.fingerprint(version)
            recorded = await self.store.get_meta(name)
            if recorded is None:
                await self.store.set_meta(name, mine)
            elif recorded != mine:
                raise CryptoError(
                    f"master key version {version} is not the key this store was set up with "
                    f"(fingerprint {mine}, store expects {recorded}); give every replica the same "
                    "key ring (PROXY_MASTER_KEY / PROXY_MASTER_KEY_FILE)"
                )

    def _load_tenant_keys(self, tenant: TenantRecord) -> None:
        keys = {}
        for version, wrapped in tenant.wrapped_deks.items():
            keys[int(version)] = crypto.unwrap_dek(
                self.ring, tenant.tenant_id, crypto.WrappedKey.from_dict(wrapped)
            )
        self._deks[tenant.tenant_id] = keys
        self._current_dek[tenant.tenant_id] = tenant.current_dek_version
        self._blobs[tenant.tenant_id] = {int(v): str(w["blob"]) for v, w in tenant.wrapped_deks.items()}

    async def ensure_tenant(self, tenant_id: str) -> None:
        """Creates the tenant's key record if it has none yet (idempotent, race-safe)."""
        await self._tenant_keys(tenant_id, create=True)

    async def _tenant_keys(self, tenant_id: str, create: bool) -> tuple[int, dict[int, bytes]] | None:
        if tenant_id in self._deks:
            return self._current_dek[tenant_id], self._deks[tenant_id]
        lock = self._tenant_locks.setdefault(tenant_id, asyncio.Lock())
        async with lock:
            tenant = await self.store.get_tenant(tenant_id)
            if tenant is None:
                if not create:
                    return None
                tenant = await self._create_tenant(tenant_id)
            try:
                self._load_tenant_keys(tenant)
            except KeyVersionMissing as exc:
                # Rotation on another host may have wrapped it with a version added since start.
                if not await self._reread_for(exc.version):
                    raise self._missing(exc) from None
                self._load_tenant_keys(tenant)
        return self._current_dek[tenant_id], self._deks[tenant_id]

    async def reload_ring(self) -> bool:
        """Re-reads the key source (SIGHUP); True if the ring changed. A ring whose versions do
        not match the fingerprints the store recorded is refused and the old one kept."""
        async with self._ring_lock:
            return await self._reread()

    async def _reread(self) -> bool:
        if self._ring_source is None:
            return False
        ring = await asyncio.to_thread(self._ring_source)
        if repr(ring) == repr(self.ring):  # versions and fingerprints: the same keys
            return False
        await self._check_fingerprints(ring)
        old, self.ring = self.ring, ring
        log.warning("master key ring re-read: versions %s (was %s)", list(ring.versions), list(old.versions))
        return True

    async def _reread_for(self, version: int) -> bool:
        """Whether ``version`` is in the ring after at most one re-read. A version met for the
        first time is looked for at once; one the file did not have is looked for again only
        after ``RING_REREAD_MIN_INTERVAL_S``, so a missing key costs no file read per call."""
        async with self._ring_lock:
            if version in self.ring.versions:  # another call re-read it meanwhile
                return True
            if time.monotonic() - self._ring_missed.get(version, float("-inf")) < RING_REREAD_MIN_INTERVAL_S:
                return False
            try:
                await self._reread()
            except ProxyError as exc:
                log.error(
                    "master key ring re-read failed, keeping versions %s: %s",
                    list(self.ring.versions),
                    exc.message,
                )
            if version not in self.ring.versions:
                self._ring_missed[version] = time.monotonic()
                return False
        return True

    def _missing(self, exc: KeyVersionMissing) -> KeyVersionMissing:
        """The error once re-reading did not help, with advice that fits where the ring comes from."""
        have = list(self.ring.versions)
        if self._ring_source is None:
            advice = (
                f"this process took its ring (versions {have}) from PROXY_MASTER_KEY, which cannot "
                f"change while it runs: restart it with a ring that holds version {exc.version}"
            )
        else:
            advice = (
                f"the key file (PROXY_MASTER_KEY_FILE) was re-read and holds versions {have}: copy the "
                f"ring that holds version {exc.version} there on every replica; the service re-reads "
                "it on SIGHUP and when it next needs that version"
            )
        log.error("master key version %d is missing (ring has %s)", exc.version, have)
        return KeyVersionMissing(exc.version, exc.what, advice=advice)

    async def _create_tenant(self, tenant_id: str) -> TenantRecord:
        if (await self.store.list_connections(tenant_id, limit=1)).items:
            # Keys are created before a tenant's first connection, so its key record was lost:
            # new keys would leave every stored ciphertext of the tenant unreadable for good.
            raise CryptoError(
                f"tenant {tenant_id!r} has connections but no key record: the store lost it. "
                "Nothing was written; restore the store's backup"
            )
        dek = crypto.generate_dek()
        wrapped = crypto.wrap_dek(self.ring, tenant_id, 1, dek)
        record = TenantRecord(
            tenant_id=tenant_id,
            current_dek_version=1,
            wrapped_deks={"1": wrapped.to_dict()},
            created_at=time.time(),
        )
        try:
            return await self.store.put_tenant(record, expected_version=None)
        except Conflict:
            # Another replica created it first: use theirs.
            existing = await self.store.get_tenant(tenant_id)
            if existing is None:
                raise
            return existing

    def _dek_lookup(self, tenant_id: str) -> Any:
        keys = self._deks.get(tenant_id, {})

        def lookup(version: int) -> bytes:
            if version not in keys:
                raise CryptoError(
                    f"tenant {tenant_id!r} data key version {version} is unknown; "
                    "the key record is missing or was retired too early"
                )
            return keys[version]

        return lookup

    # --- writes --------------------------------------------------------------------------------

    async def encrypt_params(
        self, tenant_id: str, connection_id: str, integration: Integration, params: Mapping[str, Any]
    ) -> tuple[dict[str, Any], dict[str, str]]:
        keys = await self._tenant_keys(tenant_id, create=True)
        assert keys is not None
        dek_version, deks = keys
        public: dict[str, Any] = {}
        secret: dict[str, str] = {}
        for name, value in params.items():
            if value is None:
                continue
            if integration.is_secret(name):
                secret[name] = crypto.encrypt_value(
                    deks[dek_version], dek_version, tenant_id, connection_id, name, value
                )
            else:
                public[name] = value
        return public, secret

    async def save(self, record: ConnectionRecord, expected_version: ExpectedVersion) -> ConnectionRecord:
        integration = self.catalogue.get(record.integration_id)
        status = record.status
        if status in (ConnectionStatus.PENDING.value, ConnectionStatus.ACTIVE.value):
            status = compute_status(integration, record)
        now = time.time()
        record = record.evolve(status=status, updated_at=now, created_at=record.created_at or now)
        old = await self.store.get_connection(record.tenant_id, record.connection_id)
        destinations.check_write(integration, old, record)
        if expected_version is ANY_VERSION:
            # The rule was checked against this version: a write racing in between is a conflict.
            expected_version = old.version if old is not None else None
        stored = await self._put_checked(record, expected_version)
        # The store's write told the other replicas; this one drops its own copies now.
        await self.invalidate(record.tenant_id, record.connection_id)
        return stored

    async def _put_checked(
        self, record: ConnectionRecord, expected_version: ExpectedVersion
    ) -> ConnectionRecord:
        """The store write of a record, conditional on the key record its secrets open with."""
        if not record.secret_params:
            return await self.store.put_connection(record, expected_version)
        try:
            return await self.store.put_connection(
                record, expected_version, key_check=await self._key_check(record)
            )
        except KeyRecordChanged:
            # The cached key record is stale: a re-wrap (same keys, new blobs: the retry passes)
            # or a lost/replaced record (the reloaded keys do not open the tokens: refused).
            self._forget_keys(record.tenant_id)
        try:
            return await self.store.put_connection(
                record, expected_version, key_check=await self._key_check(record)
            )
        except KeyRecordChanged:
            self._forget_keys(record.tenant_id)
            raise

    async def _key_check(self, record: ConnectionRecord) -> dict[str, str]:
        """Opens every token with the tenant's keys (cached, else loaded) and returns the
        wrapped blobs they came from, for the store to compare atomically with the write."""
        tenant_id = record.tenant_id
        keys = await self._tenant_keys(tenant_id, create=False)
        blobs = self._blobs.get(tenant_id)
        if keys is None or blobs is None:
            raise KeyRecordChanged(
                f"tenant {tenant_id!r} has no key record in the store (it was lost); nothing was "
                "written: retry the request"
            )
        deks = keys[1]

        def lookup(version: int) -> bytes:
            if version not in deks:
                raise CryptoError(f"tenant {tenant_id!r} has no data key version {version}")
            return deks[version]

        used: set[int] = set()
        for name, token in record.secret_params.items():
            try:
                crypto.decrypt_value(lookup, tenant_id, record.connection_id, name, token)
            except CryptoError:
                self._forget_keys(tenant_id)
                raise KeyRecordChanged(
                    f"field {name!r} of connection {record.connection_id!r} (tenant {tenant_id!r}) "
                    "does not open with the tenant's key record (the store lost or replaced the "
                    "record it was sealed under); nothing was written: retry the request, and if "
                    "this persists, replace the connection with PUT"
                ) from None
            used.add(crypto.token_dek_version(token))
        return {str(v): blobs[v] for v in used}

    def _forget_keys(self, tenant_id: str) -> None:
        self._deks.pop(tenant_id, None)
        self._current_dek.pop(tenant_id, None)
        self._blobs.pop(tenant_id, None)

    async def delete(self, tenant_id: str, connection_id: str) -> bool:
        removed = await self.store.delete_connection(tenant_id, connection_id)
        await self.invalidate(tenant_id, connection_id)  # the store's delete told the others
        return removed

    async def invalidate(self, tenant_id: str, connection_id: str | None) -> None:
        # Any change in a tenant may add or remove a runtime user's connection, and the changed
        # id need not be the one a cached resolution was looked up by: drop the tenant's lot.
        if tenant_id == FLUSH_ALL:
            self._resolved.clear()
            self._creds.clear()
            self._deks.clear()
            self._current_dek.clear()
            self._blobs.clear()
            return
        self._resolved.discard_where(lambda k, _: k[0] == tenant_id)
        if connection_id is None:
            self._creds.discard_where(lambda k, _: k[0] == tenant_id)
            self._forget_keys(tenant_id)
        else:
            self._creds.discard((tenant_id, connection_id))
            # Runtime user connections carry their default's destination: drop them with it.
            self._creds.discard_where(
                lambda k, c: k[0] == tenant_id and c.record.default_connection_id == connection_id
            )

    # --- reads ---------------------------------------------------------------------------------

    async def find_record(self, tenant_id: str, connection_id: str) -> ConnectionRecord | None:
        """The stored record (ciphertexts and all), or None: for callers to whom absence is an answer."""
        return await self.store.get_connection(tenant_id, connection_id)

    async def list_records(
        self,
        tenant_id: str,
        *,
        runtime_user_id: str | None = None,
        integration_id: str | None = None,
        default_connection_id: str | None = None,
        cursor: str | None = None,
        limit: int = 100,
    ) -> Page:
        """A page of the tenant's records (``Page.items`` are ``ConnectionRecord``), filtered."""
        return await self.store.list_connections(
            tenant_id,
            runtime_user_id=runtime_user_id,
            integration_id=integration_id,
            default_connection_id=default_connection_id,
            cursor=cursor,
            limit=limit,
        )

    async def get_record(self, tenant_id: str, connection_id: str) -> ConnectionRecord:
        record = await self.find_record(tenant_id, connection_id)
        if record is None:
            raise ConnectionNotFound(
                f"connection {connection_id!r} does not exist in tenant {tenant_id!r}; "
                "create it with PUT /admin/tenants/{tenant_id}/connections/{connection_id}"
            )
        return record

    async def resolve(self, tenant_id: str, connection_id: str, runtime_user_id: str | None) -> str:
        """The connection id to use: the user's override of ``connection_id`` if one exists."""
        if not runtime_user_id:
            return connection_id
        key = (tenant_id, connection_id, runtime_user_id)
        now = time.monotonic()
        hit = self._resolved.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        since = self._resolved.generation  # an invalidation during the read voids its answer

        async def fetch() -> str:
            user = await self.store.find_user_connection(tenant_id, connection_id, runtime_user_id)
            resolved = user.connection_id if user is not None else connection_id
            if self.cache_ttl_s > 0:
                self._resolved.put(key, resolved, now + self.cache_ttl_s, since=since)
            return resolved

        what = f"the runtime user connection of {connection_id!r} (tenant {tenant_id!r})"
        return await self.stale.load(
            "resolve", what, fetch, lambda: ttl_entry(self._resolved, key, self.cache_ttl_s)
        )

    async def credentials(self, tenant_id: str, connection_id: str) -> Credentials:
        key = (tenant_id, connection_id)
        hit = self._creds.get(key)
        now = time.monotonic()
        if hit is not None and hit[0] > now:
            CREDENTIAL_CACHE_TALLY.inc(_CACHE_HIT)
            return hit[1]
        CREDENTIAL_CACHE_TALLY.inc(_CACHE_MISS)
        since = self._creds.generation  # a change landing during the read voids it (proxy.cache)

        async def fetch() -> Credentials:
            try:
                record = await self.get_record(tenant_id, connection_id)
                creds = await self.decrypt(record)
            except StoreUnavailable:
                raise  # the entry may serve stale (proxy.stale decides)
            except ProxyError:  # the store answered: never serve the old copy stale later
                self._creds.discard(key)
                raise
            if self.cache_ttl_s > 0:
                self._creds.put(key, creds, now + self.cache_ttl_s, since=since)
            return creds

        what = f"connection {connection_id!r} (tenant {tenant_id!r})"
        return await self.stale.load(
            "credentials", what, fetch, lambda: ttl_entry(self._creds, key, self.cache_ttl_s)
        )

    async def decrypt(self, record: ConnectionRecord) -> Credentials:
        integration = self.catalogue.get(record.integration_id)
        params: dict[str, Any] = {f.name: f.default for f in integration.fields if f.default is not None}
        params.update(record.public_params)
        if record.secret_params:
            keys = await self._tenant_keys(record.tenant_id, create=False)
            if keys is not None and not {
                crypto.token_dek_version(t) for t in record.secret_params.values()
            } <= set(keys[1]):
                # A peer re-encrypted with a data key this process has not loaded yet (its
                # invalidation is still on the way): read the tenant's key record again.
                self._deks.pop(record.tenant_id, None)
                keys = await self._tenant_keys(record.tenant_id, create=False)
            if keys is None:
                raise CryptoError(f"tenant {record.tenant_id!r} has encrypted data but no key record")
            lookup = self._dek_lookup(record.tenant_id)
            for name, token in record.secret_params.items():
                params[name] = crypto.decrypt_value(
                    lookup, record.tenant_id, record.connection_id, name, token
                )
        binding: tuple[str, ...] | None = None
        if record.default_connection_id and record.runtime_user_id:
            default = await self.store.get_connection(record.tenant_id, record.default_connection_id)
            if default is None or default.integration_id != record.integration_id:
                binding = ()  # nothing vouches for this user's destination: refuse every call
            else:
                params = destinations.inherit(integration, params, default)
                binding = destinations.inherited_binding(integration, default)
        return Credentials(
            record=record, integration=integration, params=MappingProxyType(params), host_binding=binding
        )


__all__ = ["ANY_VERSION", "Vault"]
