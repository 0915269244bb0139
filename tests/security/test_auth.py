"""Caller authentication against real stores: admin token, API keys, JWTs, trusted networks."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from proxy.errors import ConfigError, StoreUnavailable, Unauthenticated
from proxy.model import ApiKeyRecord, Caller
from proxy.security import auth as auth_mod
from proxy.security import crypto
from proxy.security.auth import Authenticator, bearer_token, peer_in
from proxy.settings import Settings, load_settings
from proxy.stale import StaleWindow
from proxy.store.base import Store
from proxy.store.sqlite import SqliteStore
from tests.support.gate import GatedReads

ADMIN = "admin-token-for-tests-0123456789"
HS = "hs256-shared-secret-for-tests-0123456789"


def settings(**overrides: Any) -> Settings:
    return load_settings(env={}, overrides=overrides)


async def mint(store: Store, tenant: str = "t1") -> tuple[str, str]:
    key_id, full = crypto.new_api_key()
    await store.put_api_key(
        ApiKeyRecord(
            key_id=key_id, tenant_id=tenant, secret_hash=crypto.hash_api_key(full), created_at=time.time()
        )
    )
    return key_id, full


def hdr(token: str, name: str = "Authorization") -> dict[str, str]:
    return {name: f"Bearer {token}"}


async def expect_401(auth: Authenticator, headers: dict[str, str], peer: str | None = None, **kw: Any) -> str:
    with pytest.raises(Unauthenticated) as info:
        await auth.authenticate(headers, peer, allow_trusted=kw.get("allow_trusted", False))
    assert info.value.headers.get("WWW-Authenticate", "").startswith("Bearer")
    return info.value.message


# --- header parsing and networks ---------------------------------------------------------------


def test_bearer_token_parsing() -> None:
    assert bearer_token({}) is None
    assert bearer_token({"Authorization": "bearer abc"}) == "abc"
    assert bearer_token({"Authorization": "Bearer  abc "}) == "abc"
    # Proxy-Authorization is addressed to the proxy: it wins over Authorization.
    assert bearer_token({"Authorization": "Bearer up", "Proxy-Authorization": "Bearer mine"}) == "mine"
    for bad in ("Basic dXNlcjpwYXNz", "Bearer", "Bearer   ", "token"):
        with pytest.raises(Unauthenticated):
            bearer_token({"Authorization": bad})


def test_peer_in_networks() -> None:
    nets = settings(trusted_networks=["127.0.0.1/32", "10.0.0.0/8", "fd00::/8"]).trusted_networks
    assert peer_in("127.0.0.1", nets)
    assert peer_in("10.2.3.4", nets)
    assert peer_in("::ffff:127.0.0.1", nets)  # IPv4-mapped from a dual-stack socket
    assert peer_in("fd00::1", nets)
    assert not peer_in("127.0.0.2", nets)
    assert not peer_in("192.168.1.1", nets)
    assert not peer_in(None, nets)
    assert not peer_in("not-an-ip", nets)
    assert not peer_in("127.0.0.1", ())


# --- admin token and trusted networks ----------------------------------------------------------


async def test_admin_token_and_wrong_tokens(store: Store) -> None:
    auth = Authenticator(settings(), store, ADMIN, stale=StaleWindow(0.0))
    assert await auth.authenticate(hdr(ADMIN), None, allow_trusted=False) == Caller("admin", "admin", None)
    assert (
        await auth.authenticate(hdr(ADMIN, "Proxy-Authorization"), None, allow_trusted=False)
    ).kind == "admin"
    msg = await expect_401(auth, hdr(ADMIN + "x"))
    assert ADMIN not in msg
    assert "no credentials" in await expect_401(auth, {})


async def test_trusted_network_only_without_header_and_only_where_allowed(store: Store) -> None:
    auth = Authenticator(settings(trusted_networks=["127.0.0.1/32"]), store, ADMIN, stale=StaleWindow(0.0))
    caller = await auth.authenticate({}, "127.0.0.1", allow_trusted=True)
    assert caller == Caller("trusted_network", "127.0.0.1", None)
    assert caller.may_access("any-tenant")
    await expect_401(auth, {}, "127.0.0.1", allow_trusted=False)  # admin routes never trust networks
    await expect_401(auth, {}, "10.0.0.1", allow_trusted=True)
    # A header that is present but wrong is never rescued by the network.
    await expect_401(auth, hdr("garbage"), "127.0.0.1", allow_trusted=True)


# --- API keys ----------------------------------------------------------------------------------


async def test_api_key_binds_its_tenant(store: Store) -> None:
    auth = Authenticator(settings(), store, ADMIN, stale=StaleWindow(0.0))
    key_id, full = await mint(store, "tenant-a")
    caller = await auth.authenticate(hdr(full), None, allow_trusted=False)
    assert caller == Caller("api_key", key_id, "tenant-a")
    assert caller.may_access("tenant-a") and not caller.may_access("tenant-b")
    assert caller.actor == f"api_key:{key_id}"


async def test_api_key_wrong_secret_or_unknown_id_is_401_without_echo(store: Store) -> None:
    auth = Authenticator(settings(), store, ADMIN, stale=StaleWindow(0.0))
    key_id, full = await mint(store)
    tampered = full[:-1] + ("A" if full[-1] != "A" else "B")
    msg = await expect_401(auth, hdr(tampered))
    assert tampered not in msg and full.split("_", 2)[2] not in msg
    # A correct key must still work after a failed attempt with the same id (cache holds the hash).
    assert (await auth.authenticate(hdr(full), None, allow_trusted=False)).id == key_id
    _, other = crypto.new_api_key()
    await expect_401(auth, hdr(other))


@pytest.mark.parametrize("damaged", ["not-hex", "é" * 64, ""])
async def test_a_damaged_stored_hash_refuses_the_key_cleanly(store: Store, damaged: str) -> None:
    auth = Authenticator(settings(), store, ADMIN, stale=StaleWindow(0.0))
    key_id, full = await mint(store)
    record = await store.get_api_key(key_id)
    assert record is not None
    await store.put_api_key(ApiKeyRecord(**{**record.to_dict(), "secret_hash": damaged}))
    await expect_401(auth, hdr(full))  # a 401, not a TypeError turned 500


def test_api_key_digest_is_the_stored_hash_as_bytes() -> None:
    _, full = crypto.new_api_key()
    assert crypto.api_key_digest(full) == bytes.fromhex(crypto.hash_api_key(full))


async def test_verified_keys_are_served_from_memory(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "a.sqlite3")
    await store.open()
    auth = Authenticator(settings(), store, ADMIN, stale=StaleWindow(0.0))
    _, full = await mint(store)
    await auth.authenticate(hdr(full), None, allow_trusted=False)
    await store.close()
    # The store is gone; the hot path still authenticates from the cache.
    assert (await auth.authenticate(hdr(full), None, allow_trusted=False)).tenant_id == "t1"


async def test_revocation_is_immediate_after_forget_key(store: Store) -> None:
    auth = Authenticator(settings(), store, ADMIN, stale=StaleWindow(0.0))
    key_id, full = await mint(store)
    await auth.authenticate(hdr(full), None, allow_trusted=False)
    record = await store.get_api_key(key_id)
    assert record is not None
    await store.put_api_key(ApiKeyRecord(**{**record.to_dict(), "revoked_at": time.time()}))
    auth.forget_key(key_id)
    assert "revoked" in await expect_401(auth, hdr(full))


async def test_last_used_times_are_flushed_in_batch_and_survive_a_failed_flush(tmp_path: Path) -> None:
    path = tmp_path / "lu.sqlite3"
    store = SqliteStore(path)
    await store.open()
    auth = Authenticator(settings(), store, ADMIN, stale=StaleWindow(0.0))
    key_id, full = await mint(store)
    before = time.time()
    await auth.authenticate(hdr(full), None, allow_trusted=False)
    rec = await store.get_api_key(key_id)
    assert rec is not None and rec.last_used_at is None  # nothing written on the request path
    await store.close()
    await auth.flush_usage()  # fails: kept for the next flush
    store2 = SqliteStore(path)
    await store2.open()
    auth.store = store2
    await auth.flush_usage()
    rec = await store2.get_api_key(key_id)
    assert rec is not None and rec.last_used_at is not None and rec.last_used_at >= before
    await store2.close()


# --- JWTs --------------------------------------------------------------------------------------


def hs_token(claims: dict[str, Any], secret: str = HS, alg: str = "HS256") -> str:
    return jwt.encode(claims, secret, algorithm=alg)


def claims(**extra: Any) -> dict[str, Any]:
    return {"sub": "wf-1", "tenant_id": "t9", "exp": int(time.time()) + 60, **extra}


async def test_jwt_hs256(store: Store) -> None:
    auth = Authenticator(settings(jwt_hs256_secret=HS), store, ADMIN, stale=StaleWindow(0.0))
    caller = await auth.authenticate(hdr(hs_token(claims())), None, allow_trusted=False)
    assert caller == Caller("jwt", "wf-1", "t9")
    assert "expired" in await expect_401(auth, hdr(hs_token(claims(exp=int(time.time()) - 3600))))
    no_exp = claims()
    del no_exp["exp"]
    assert "'exp'" in await expect_401(auth, hdr(hs_token(no_exp)))
    no_tenant = claims()
    del no_tenant["tenant_id"]
    assert "'tenant_id'" in await expect_401(auth, hdr(hs_token(no_tenant)))
    await expect_401(auth, hdr(hs_token(claims(tenant_id=["a", "b"]))))
    await expect_401(auth, hdr(hs_token(claims(), secret="another-secret-0123456789-abcdefgh")))
    # alg=none is never accepted.
    await expect_401(auth, hdr(jwt.encode(claims(), None, algorithm="none")))


async def test_jwt_issuer_audience_and_tenant_claim(store: Store) -> None:
    s = settings(jwt_hs256_secret=HS, jwt_issuer="https://idp", jwt_audience="proxy", jwt_tenant_claim="org")
    auth = Authenticator(s, store, ADMIN, stale=StaleWindow(0.0))
    good = claims(iss="https://idp", aud="proxy", org="acme")
    assert (await auth.authenticate(hdr(hs_token(good)), None, allow_trusted=False)).tenant_id == "acme"
    assert "audience" in await expect_401(auth, hdr(hs_token({**good, "aud": "other"})))
    assert "issuer" in await expect_401(auth, hdr(hs_token({**good, "iss": "https://evil"})))
    missing_iss = dict(good)
    del missing_iss["iss"]
    await expect_401(auth, hdr(hs_token(missing_iss)))


def forge_hs256(payload: dict[str, Any], key: bytes) -> str:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).decode().rstrip("=")

    signing = (
        b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()) + "." + b64(json.dumps(payload).encode())
    )
    return signing + "." + b64(hmac.new(key, signing.encode(), hashlib.sha256).digest())


def write_public(tmp_path: Path, name: str, private: Any) -> Path:
    path = tmp_path / name
    path.write_bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path


async def test_jwt_rs256_and_eddsa_from_key_files(store: Store, tmp_path: Path) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ed_key = ed25519.Ed25519PrivateKey.generate()
    files = [str(write_public(tmp_path, "rsa.pem", rsa_key)), str(write_public(tmp_path, "ed.pem", ed_key))]
    auth = Authenticator(settings(jwt_public_key_files=files), store, ADMIN, stale=StaleWindow(0.0))
    rs = jwt.encode(claims(), rsa_key, algorithm="RS256")
    ed = jwt.encode(claims(sub="wf-ed"), ed_key, algorithm="EdDSA")
    assert (await auth.authenticate(hdr(rs), None, allow_trusted=False)).id == "wf-1"
    assert (await auth.authenticate(hdr(ed), None, allow_trusted=False)).id == "wf-ed"
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    await expect_401(auth, hdr(jwt.encode(claims(), other, algorithm="RS256")))
    # Algorithm confusion: an HS256 token "signed" with the public key text is refused.
    pem = Path(files[0]).read_bytes()
    assert "not accepted" in await expect_401(auth, hdr(forge_hs256(claims(), pem)))


async def test_jwt_refused_when_not_configured(store: Store) -> None:
    auth = Authenticator(settings(), store, ADMIN, stale=StaleWindow(0.0))
    assert "not accepted" in await expect_401(auth, hdr(hs_token(claims())))


def test_bad_public_key_file_names_the_setting(tmp_path: Path, store: Store) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key")
    with pytest.raises(ConfigError) as info:
        Authenticator(settings(jwt_public_key_files=[str(bad)]), store, ADMIN, stale=StaleWindow(0.0))
    assert info.value.key == "jwt_public_key_files"


def test_basic_proxy_credentials_parse() -> None:
    import base64

    from proxy.errors import Unauthenticated
    from proxy.security.auth import ProxyUser, bearer_token, proxy_user

    def h(user_pass: str) -> dict[str, str]:
        return {"Proxy-Authorization": "Basic " + base64.b64encode(user_pass.encode()).decode()}

    assert proxy_user(h("c1:k")) == ProxyUser("c1")
    assert proxy_user(h("t1%2Fc1:k")) == ProxyUser("c1", "t1")
    assert proxy_user(h("t1/c1/u9:k")) == ProxyUser("c1", "t1", "u9")
    assert bearer_token(h("t1/c1:cpk_a_b%5F")) == "cpk_a_b_"  # percent-escapes decoded once
    assert proxy_user({"Proxy-Authorization": "Bearer x"}) is None
    for bad in ("c1:", "a/b/c/d:k", "bad id:k", "nocolon"):
        with pytest.raises(Unauthenticated) as info:
            proxy_user(h(bad)) if bad != "c1:" else bearer_token(h(bad))
        assert "k" not in info.value.message.split() and bad not in info.value.message


async def test_store_outage_keeps_cached_keys_working_and_revoked_keys_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stale-if-error for caller keys, through a real outage (the data directory moved away): a
    key verified before keeps authenticating, its secret still compared on every call; a key the
    replica saw revoked (a reload answered "revoked") stays refused, however stale."""
    monkeypatch.setattr(auth_mod, "KEY_CACHE_TTL_S", 0.05)
    monkeypatch.setattr(auth_mod, "NEGATIVE_TTL_S", 0.05)
    data = tmp_path / "data"
    store = SqliteStore(data / "store.sqlite3")
    await store.open()
    try:
        auth = Authenticator(settings(), store, ADMIN, stale=StaleWindow(60.0))
        _, good = await mint(store)
        bad_id, bad = await mint(store)
        for key in (good, bad):
            await auth.authenticate(hdr(key), None, allow_trusted=False)
        record = await store.get_api_key(bad_id)
        assert record is not None
        await store.put_api_key(dataclasses.replace(record, revoked_at=time.time()))  # by another replica
        await asyncio.sleep(0.1)
        await expect_401(auth, hdr(bad))  # the reload saw the revocation
        await asyncio.sleep(0.1)
        data.rename(tmp_path / "away")
        assert (await auth.authenticate(hdr(good), None, allow_trusted=False)).tenant_id == "t1"
        assert "revoked" in await expect_401(auth, hdr(bad))
        await expect_401(auth, hdr(good[:-2] + "xx"))  # a stale entry still checks the secret
        _, never_seen = crypto.new_api_key()
        with pytest.raises(StoreUnavailable, match="not cached on this replica"):
            await auth.authenticate(hdr(never_seen), None, allow_trusted=False)
    finally:
        if (tmp_path / "away").exists():
            (tmp_path / "away").rename(data)
        await store.close()


@pytest.mark.parametrize("seen", ["local", "peer"])
async def test_a_key_read_in_flight_when_it_is_revoked_is_not_cached(store: Store, seen: str) -> None:
    """The read-vs-revocation race: the store answers "valid" just before the revocation is
    written, and that answer reaches the cache after the revocation dropped the key (locally,
    ``forget_key``; from a peer, the tenant's invalidation). The call that read it may pass (it
    ran concurrently with the revocation); the next one must be refused, not served from a
    cache the revocation emptied and the late answer refilled."""
    auth = Authenticator(settings(), store, ADMIN, stale=StaleWindow(60.0))
    key_id, full = await mint(store)
    gated = GatedReads(store, "get_api_key")
    auth.store = gated  # type: ignore[assignment]
    in_flight = asyncio.create_task(auth.authenticate(hdr(full), None, allow_trusted=False))
    await asyncio.wait_for(gated.read.wait(), 10)  # the store said "valid"; not yet cached
    record = await store.get_api_key(key_id)
    assert record is not None
    await store.put_api_key(dataclasses.replace(record, revoked_at=time.time()))
    if seen == "local":
        auth.forget_key(key_id)  # what ApiKeys.revoke does after its write
    else:
        auth.on_invalidation("t1", None)  # a peer revoked it and published the tenant's invalidation
    gated.release()
    assert (await in_flight).tenant_id == "t1"
    assert "revoked" in await expect_401(auth, hdr(full))
