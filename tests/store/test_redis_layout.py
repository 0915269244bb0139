"""Redis key layout and failure behaviour, checked against a real redis-server.

Cluster safety is checked on what the server actually executes: MONITOR records every command
(including those run inside Lua scripts) during a round of store operations, and for each
top-level command the keys of it and of the script commands it ran must share one hash slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator

import pytest
import redis
import redis.asyncio as aioredis
from redis.crc import key_slot
from redis.exceptions import ResponseError

from proxy.errors import StoreLost, StoreUnavailable
from proxy.model import ApiKeyRecord, AuditEvent, ConnectionRecord, TenantRecord
from proxy.settings import Settings
from proxy.store import FLUSH_ALL, open_store
from proxy.store.base import ANY_VERSION, AuditQuery
from proxy.store.redis import RedisStore
from tests.support.redis_server import RedisServer, free_port

_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "a": "\a", "b": "\b", '"': '"', "\\": "\\"}
_LINE = re.compile(r"^\d+\.\d+ \[\d+ (?P<client>[^\]]+)\] (?P<args>.*)$")


def parse_args(text: str) -> list[str]:
    """MONITOR prints each argument as a C-style quoted string (sdscatrepr)."""
    args, i = [], 0
    while i < len(text):
        if text[i] == " ":
            i += 1
            continue
        assert text[i] == '"', text
        i += 1
        out = []
        while text[i] != '"':
            if text[i] == "\\":
                nxt = text[i + 1]
                if nxt == "x":
                    out.append(chr(int(text[i + 2 : i + 4], 16)))
                    i += 4
                    continue
                out.append(_ESCAPES[nxt])
                i += 2
                continue
            out.append(text[i])
            i += 1
        args.append("".join(out))
        i += 1
    return args


async def monitor_lines(
    url: str, stop: asyncio.Event, sink: list[tuple[str, list[str]]], monitoring: asyncio.Event
) -> None:
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"MONITOR\r\n")
    await writer.drain()
    assert (await reader.readline()).startswith(b"+OK")
    monitoring.set()
    try:
        while True:
            line = (await reader.readline()).decode("latin-1").rstrip("\r\n")
            m = _LINE.match(line.lstrip("+"))
            if m is None:
                continue
            args = parse_args(m["args"])
            sink.append((m["client"], args))
            if args[:2] == ["ECHO", "end-of-round"]:
                stop.set()
                return
    finally:
        writer.close()


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[RedisStore]:
    s = RedisStore(redis_url, timeout_s=1.0)
    await s.open()
    yield s
    await s.close()


async def a_round_of_everything(store: RedisStore) -> None:
    await store.put_tenant(TenantRecord("acme", 1), None)
    await store.put_tenant(TenantRecord("globex", 1), None)
    d = await store.put_connection(ConnectionRecord("acme", "default", "http_bearer"), None)
    u = await store.put_connection(
        ConnectionRecord(
            "acme", "u1-conn", "http_bearer", runtime_user_id="u1", default_connection_id="default"
        ),
        None,
    )
    await store.put_connection(u.evolve(runtime_user_id="u2"), u.version)
    await store.put_connection(d, ANY_VERSION)
    await store.put_connection(ConnectionRecord("globex", "default", "http_basic"), None)
    await store.find_user_connection("acme", "default", "u2")
    await store.list_connections("acme", runtime_user_id="u2")
    await store.list_connections("acme")
    await store.list_tenants()
    await store.put_api_key(ApiKeyRecord("key1", "acme", "h"))
    await store.put_api_key(ApiKeyRecord("key2", "globex", "h"))
    await store.touch_api_keys({"key1": 10.0, "key2": 11.0})
    await store.list_api_keys("acme")
    await store.append_audit(
        [AuditEvent(time.time(), t, "connection.write", "admin:x") for t in ("acme", "globex", "acme")]
    )
    await store.query_audit(AuditQuery("acme", limit=1))
    await store.prune_audit(time.time() - 3600)
    await store.put_ephemeral("connect", "token-1", {"t": "acme"}, ttl_s=60)
    await store.put_ephemeral("oauth", "state-1", {"t": "acme"}, ttl_s=60)
    await store.pop_ephemeral("oauth", "state-1")
    token = await store.acquire_lock("refresh:acme:default", ttl_s=30)
    await store.acquire_lock("rotate", ttl_s=30)
    assert token is not None
    await store.release_lock("refresh:acme:default", token)
    await store.delete_connection("acme", "u1-conn")
    await store.set_meta("kek_current", "1")
    await store.publish_invalidation("acme", None)


async def test_every_command_and_script_stays_in_one_hash_slot(store: RedisStore, redis_url: str) -> None:
    seen: list[tuple[str, list[str]]] = []
    done = asyncio.Event()
    monitoring = asyncio.Event()
    task = asyncio.create_task(monitor_lines(redis_url, done, seen, monitoring))
    await asyncio.wait_for(monitoring.wait(), 5)
    await a_round_of_everything(store)
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        await client.echo("end-of-round")
        await asyncio.wait_for(done.wait(), 5)
        await task

        async def keys_of(args: list[str]) -> list[str]:
            try:
                return list(await client.command_getkeys(*args))
            except ResponseError:  # commands without keys (PING, PUBLISH, SCRIPT, ...)
                return []

        # Redis 7.0 logs EVALSHA (or EVAL: scripts inside pipelines), then the commands its
        # script ran (from client "lua").
        groups: list[list[list[str]]] = []
        for source, args in seen:
            if source == "lua":
                assert groups and groups[-1][0][0].upper() in ("EVALSHA", "EVAL"), args
                groups[-1].append(args)
            else:
                groups.append([args])
        scripts = [g for g in groups if g[0][0].upper() in ("EVALSHA", "EVAL")]
        assert len(scripts) >= 10 and any(len(g) > 5 for g in scripts)
        multi_key = 0
        for group in groups:
            keys = [k for args in group for k in await keys_of(args)]
            slots = {key_slot(k.encode()) for k in keys}
            assert len(slots) <= 1, f"{group[0][:4]} touches several hash slots: {sorted(set(keys))}"
            multi_key += len(set(keys)) > 1
        assert multi_key >= 5

        all_keys = [k async for k in client.scan_iter(match="*")]
        tenant_tag = re.compile(r"^cp:\{t:(acme|globex)\}:")
        singles = re.compile(
            r"^cp:(meta|tenants|audit:tenants|apikey:key\d|e:(connect|oauth):[0-9a-f]{64}|lock:.+)$"
        )
        for key in all_keys:
            assert tenant_tag.match(key) or singles.match(key), f"unexpected key {key}"
            ttl = await client.pttl(key)
            if key.startswith(("cp:e:", "cp:lock:")):
                assert ttl > 0, f"{key} must expire"
            else:
                assert ttl == -1, f"{key} is durable data and must not expire"
        assert not any("token-1" in k for k in all_keys), "one-time tokens are stored hashed"
        assert {k for k in all_keys if k.startswith("cp:{t:acme}")} >= {
            "cp:{t:acme}:tenant",
            "cp:{t:acme}:c:default",
            "cp:{t:acme}:cidx",
            "cp:{t:acme}:keys",
            "cp:{t:acme}:audit",
        }
        # Deleting u1-conn removed its index entries with it.
        assert not [k for k in all_keys if "u1-conn" in k or "ru/" in k or "ruc/" in k]
    finally:
        await client.aclose()


@pytest.mark.system
async def test_dead_redis_fails_fast_and_store_recovers(store: RedisStore, redis_server: RedisServer) -> None:
    await store.put_connection(ConnectionRecord("t", "c", "x"), None)
    redis_server.stop()
    try:
        for name, op in (
            ("get_connection", store.get_connection("t", "c")),
            ("put_connection", store.put_connection(ConnectionRecord("t", "c", "x"), ANY_VERSION)),
            ("query_audit", store.query_audit(AuditQuery("t"))),
            ("acquire_lock", store.acquire_lock("l", 5)),
            ("ping", store.ping()),
        ):
            started = time.monotonic()
            with pytest.raises(StoreUnavailable) as exc:
                await op
            assert time.monotonic() - started < 1.0
            assert name in exc.value.message
    finally:
        redis_server.start()
    # This server keeps no data across restarts: it came back empty, and the store says so
    # instead of writing into it ...
    with pytest.raises(StoreLost):
        await store.put_connection(ConnectionRecord("t", "c", "x"), None)
    # ... until its data is back (a restored backup carries the identity marker): the store
    # notices within its identity check interval, and the pool reconnects by itself.
    _restore_marker(redis_server, store)
    await _until_ping(store, 3.0)
    stored = await store.put_connection(ConnectionRecord("t", "c", "x"), None)
    assert await store.get_connection("t", "c") == stored


async def _until_ping(store: RedisStore, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await store.ping()
            return
        except StoreUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


def _restore_marker(redis_server: RedisServer, store: RedisStore) -> None:
    """What restoring a backup of this store does to ``cp:meta``, for a server without data."""
    assert store.identity is not None
    redis.Redis(port=redis_server.port).hset("cp:meta", "store_id", store.identity)


@pytest.mark.system
async def test_subscriber_survives_a_redis_restart_and_flushes_everything(
    store: RedisStore, redis_server: RedisServer, redis_url: str
) -> None:
    got: asyncio.Queue[tuple[str, str | None]] = asyncio.Queue()
    await store.subscribe_invalidations(lambda t, c: got.put_nowait((t, c)))
    redis_server.stop()
    await asyncio.sleep(0.3)
    redis_server.start()
    _restore_marker(redis_server, store)
    assert await asyncio.wait_for(got.get(), 5) == (FLUSH_ALL, None)
    writer = RedisStore(redis_url)
    await writer.open()
    try:
        # The first FLUSH_ALL may be the loss being noticed, before the subscription is back:
        # write until a change is heard (at most 5 s).
        heard: set[tuple[str, str | None]] = set()
        deadline = time.monotonic() + 5
        while ("t", "after") not in heard and time.monotonic() < deadline:
            await writer.put_connection(ConnectionRecord("t", "after", "x"), ANY_VERSION)
            with contextlib.suppress(TimeoutError):
                while True:
                    heard.add(await asyncio.wait_for(got.get(), 0.3))
        assert ("t", "after") in heard
    finally:
        await writer.close()


@pytest.mark.system
async def test_errors_never_show_the_url_password() -> None:
    secret = "hunter2-s3cret"
    guarded = RedisServer()  # its own server: requiring a password must not affect other tests
    guarded.start()
    try:
        admin = aioredis.Redis.from_url(guarded.url)
        await admin.config_set("requirepass", "the-real-one")
        await admin.aclose()
        for port in (free_port(), guarded.port):  # nothing listening / wrong password
            store = RedisStore(f"redis://:{secret}@127.0.0.1:{port}/0", timeout_s=0.5)
            started = time.monotonic()
            with pytest.raises(StoreUnavailable) as exc:
                await store.open()
            assert time.monotonic() - started < 1.0
            assert "open" in exc.value.message
            assert secret not in str(exc.value) and secret not in repr(exc.value.to_body())
    finally:
        guarded.stop()


def test_open_store_picks_redis_when_configured(redis_url: str) -> None:
    store = open_store(Settings(redis_url=redis_url, redis_timeout_s=0.5))
    assert isinstance(store, RedisStore) and store.timeout_s == 0.5
