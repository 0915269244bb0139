"""The shared store: Redis, so every replica sees the same connections, keys, audit and locks.

Key layout (Redis Cluster-safe: every multi-key command or script touches ONE hash slot)::

    cp:meta                          hash    meta key -> value (incl. schema_version)
    cp:tenants                       set     tenant registry (written BEFORE the record)
    cp:{t:T}:tenant                  hash    v=version d=record JSON
    cp:{t:T}:c:<cid>                 hash    v, d, and the indexed values ru/dc/in of that version
    cp:{t:T}:cidx                    zset    every connection id, score 0 (ZRANGEBYLEX paging)
    cp:{t:T}:ru/<runtime_user_id>    zset    ids with that runtime user (list filter)
    cp:{t:T}:dc/<default_cid>        zset    ids overriding that default connection
    cp:{t:T}:in/<integration_id>     zset    ids of that integration
    cp:{t:T}:ruc/<default_cid>/<ru>  string  the runtime user connection id (unique)
    cp:{t:T}:keys                    set     API key ids of the tenant (written BEFORE the record)
    cp:{t:T}:audit                   stream  audit events, XADD MAXLEN ~ 1,000,000; cursor = entry id
    cp:audit:tenants                 set     tenants with an audit stream (for retention)
    cp:{t:T}:auditseq                string  per-tenant audit sequence counter
    cp:apikey:<key_id>               hash    d=record JSON, u=last_used_at (monotonic)
    cp:e:<ns>:<sha256(key)>          string  one-time token JSON, PX TTL (the token itself is not stored)
    cp:lock:<name>                   string  owner token, PX TTL
    channel cp:invalidate            JSON {"t": tenant, "c": connection or null}

Tenant ids are confined to ``proxy.model.ID_RE`` (no braces), so ``{t:T}`` is always the hash
tag. ``/`` cannot occur in ids, which keeps ``ruc/<default_cid>/<ru>`` unambiguous. Scripts
declare the record key and derive its index keys from the same ``cp:{t:T}:`` prefix, so they
stay in the declared key's slot. Versions live in their own hash field, so scripts never
re-encode JSON (Lua's cjson would round timestamps).

Two writes span two slots and are done as two single-slot steps, index FIRST: a crash between
them leaves an index entry without a record, which readers skip. The other order could leave a
live API key that ``list_api_keys`` does not show, so an admin could not find and revoke it.

Invalidation: every connection/tenant write PUBLISHes from inside its script (atomic with the
write). Own writes are delivered too. The subscriber reconnects with backoff; after any
reconnect it cannot know what it missed and delivers ``(FLUSH_ALL, None)``.

Failures (refused, timed out, error replies) raise ``StoreUnavailable`` naming the operation,
never the URL (it may carry a password). A dead Redis fails fast: timeouts are never retried;
a command that meets a dead pooled connection is repeated once on a fresh one only when it is
safe to repeat (``proxy.store.redisconn``).

Lost data: ``cp:meta`` carries the store's identity marker (``store_id``), written once. Every
new connection reads it before carrying a command (``_on_connect``: a Redis restarted empty is
caught before the first write reaches it), and a watcher re-reads it every
``IDENTITY_CHECK_S`` (a ``FLUSHDB`` leaves connections up). Missing or changed, the store
refuses every operation with ``StoreLost`` until the marker is back (a restored backup) or an
operator accepts the loss (``accept_loss``), and delivers ``FLUSH_ALL`` so no cache outlives
the data it came from. ``cp:meta`` is its own slot, so no script can check the marker
atomically in Cluster; the write that matters, a connection's ciphertexts, is instead checked
atomically against its tenant's key record (same slot), see ``put_connection``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import secrets
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any, Final, NoReturn, TypeAlias

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from proxy.errors import ConfigError, Conflict, StoreLost, StoreUnavailable
from proxy.model import ID_RE, ApiKeyRecord, AuditEvent, ConnectionRecord, TenantRecord, check_id
from proxy.store.base import (
    ANY_VERSION,
    FLUSH_ALL,
    AuditQuery,
    ExpectedVersion,
    InvalidationCallback,
    Page,
    Store,
)
from proxy.store.common import (
    SCHEMA_VERSION_KEY,
    STORE_ID_KEY,
    STORE_REPLACES_KEY,
    audit_json,
    audit_matches,
    bad_cursor,
    check_connection_ids,
    deliver,
    dumps,
    ephemeral_digest,
    judge_identity,
    key_record_changed,
    new_identity,
    next_version,
    page_limit,
    redis_lost,
    reserved_meta,
    runtime_user_taken,
)
from proxy.store.redisconn import client_options, retry_safe

log = logging.getLogger("proxy.store.redis")
# The client runs with decode_responses=True, so every reply is str; redis-py's hints type replies
# as ``bytes | str`` and cannot express that. The client is therefore untyped at this one boundary,
# and every value is parsed and checked (``_loads``, ``int``) right where it is read.
Client: TypeAlias = Any

SCHEMA_VERSION: Final = 1
CHANNEL: Final = "cp:invalidate"
META: Final = "cp:meta"
TENANTS: Final = "cp:tenants"
AUDIT_MAXLEN: Final = 1_000_000
AUDIT_TENANTS: Final = "cp:audit:tenants"
AUDIT_CHUNK: Final = 500
AUDIT_SCAN_BUDGET: Final = 50_000
MAX_BATCH: Final = 1000
# A subscription that hears nothing (not even PONG) for this long is treated as dead.
PUBSUB_PING_S: Final = 5.0
KEEPALIVE: Final = "keepalive"
PUBSUB_DEAD_S: Final = 15.0
# How often a running store re-reads its identity marker (a FLUSHDB closes no connection).
IDENTITY_CHECK_S: Final = 1.0

_PUT_CONNECTION = """
local rec, cidx = KEYS[1], KEYS[2]
local mode, expected, json, cid = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local ru, dc, integ, prefix = ARGV[5], ARGV[6], ARGV[7], ARGV[8]
-- The ciphertexts are written only while the tenant key record still holds the wrapped data keys
-- they were sealed under (same slot: the tenant record shares the prefix's hash tag).
if ARGV[11] ~= '' then
  local t = redis.call('HGET', prefix .. 'tenant', 'd')
  if not t then return {'nokeys', 0} end
  local wrapped = cjson.decode(t)['wrapped_deks']
  if type(wrapped) ~= 'table' then return {'nokeys', 0} end
  for v, blob in pairs(cjson.decode(ARGV[11])) do
    local w = wrapped[v]
    if type(w) ~= 'table' or w['blob'] ~= blob then return {'nokeys', 0} end
  end
end
local cur = redis.call('HMGET', rec, 'v', 'ru', 'dc', 'in')
local curv = cur[1] and tonumber(cur[1])
if (mode == 'new' and curv) or (mode == 'ver' and curv ~= tonumber(expected)) then
  return {'conflict', curv or -1}
end
if ru ~= '' and dc ~= '' then
  local holder = redis.call('GET', prefix .. 'ruc/' .. dc .. '/' .. ru)
  if holder and holder ~= cid then return {'taken', holder} end
end
if curv then
  local oru, odc, oin = cur[2] or '', cur[3] or '', cur[4] or ''
  if oru ~= '' and oru ~= ru then redis.call('ZREM', prefix .. 'ru/' .. oru, cid) end
  if odc ~= '' and odc ~= dc then redis.call('ZREM', prefix .. 'dc/' .. odc, cid) end
  if oin ~= '' and oin ~= integ then redis.call('ZREM', prefix .. 'in/' .. oin, cid) end
  if oru ~= '' and odc ~= '' and (oru ~= ru or odc ~= dc) then
    local k = prefix .. 'ruc/' .. odc .. '/' .. oru
    if redis.call('GET', k) == cid then redis.call('DEL', k) end
  end
end
local newv = (curv or 0) + 1
redis.call('HSET', rec, 'v', newv, 'd', json, 'ru', ru, 'dc', dc, 'in', integ)
redis.call('ZADD', cidx, 0, cid)
if ru ~= '' then redis.call('ZADD', prefix .. 'ru/' .. ru, 0, cid) end
if dc ~= '' then redis.call('ZADD', prefix .. 'dc/' .. dc, 0, cid) end
if integ ~= '' then redis.call('ZADD', prefix .. 'in/' .. integ, 0, cid) end
if ru ~= '' and dc ~= '' then redis.call('SET', prefix .. 'ruc/' .. dc .. '/' .. ru, cid) end
redis.call('PUBLISH', ARGV[9], ARGV[10])
return {'ok', newv}
"""

_DELETE_CONNECTION = """
local rec, cidx = KEYS[1], KEYS[2]
local cid, prefix = ARGV[1], ARGV[2]
local cur = redis.call('HMGET', rec, 'v', 'ru', 'dc', 'in')
if not cur[1] then return 0 end
local oru, odc, oin = cur[2] or '', cur[3] or '', cur[4] or ''
if oru ~= '' then redis.call('ZREM', prefix .. 'ru/' .. oru, cid) end
if odc ~= '' then redis.call('ZREM', prefix .. 'dc/' .. odc, cid) end
if oin ~= '' then redis.call('ZREM', prefix .. 'in/' .. oin, cid) end
if oru ~= '' and odc ~= '' then
  local k = prefix .. 'ruc/' .. odc .. '/' .. oru
  if redis.call('GET', k) == cid then redis.call('DEL', k) end
end
redis.call('DEL', rec)
redis.call('ZREM', cidx, cid)
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
"""

_FIND_USER_CONNECTION = """
local cid = redis.call('GET', KEYS[1])
if not cid then return false end
return redis.call('HMGET', ARGV[1] .. 'c:' .. cid, 'v', 'd')
"""

_PUT_TENANT = """
local curv = redis.call('HGET', KEYS[1], 'v')
curv = curv and tonumber(curv)
local mode, expected = ARGV[1], ARGV[2]
if (mode == 'new' and curv) or (mode == 'ver' and curv ~= tonumber(expected)) then
  return {'conflict', curv or -1}
end
local newv = (curv or 0) + 1
redis.call('HSET', KEYS[1], 'v', newv, 'd', ARGV[3])
redis.call('PUBLISH', ARGV[4], ARGV[5])
return {'ok', newv}
"""

# last_used_at (field u) never moves backwards, neither by touch nor by writing a stale copy.
_PUT_API_KEY = """
local cur, u = redis.call('HGET', KEYS[1], 'u'), ARGV[2]
if cur and cur ~= '' and (u == '' or tonumber(cur) > tonumber(u)) then u = cur end
redis.call('HSET', KEYS[1], 'd', ARGV[1], 'u', u)
return 1
"""

_TOUCH_API_KEY = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local cur = redis.call('HGET', KEYS[1], 'u')
if cur and cur ~= '' and tonumber(cur) >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'u', ARGV[1])
return 1
"""

# Entry ids are max(event ts, previous id) in ms: arrival order is kept, and id >= ts always, so
# ``since`` maps exactly onto an id lower bound.
_APPEND_AUDIT = """
local key, maxlen = KEYS[1], ARGV[1]
local n = (#ARGV - 1) / 2
local first = redis.call('INCRBY', KEYS[2], n) - n
local last = 0
if redis.call('EXISTS', key) == 1 then
  local info = redis.call('XINFO', 'STREAM', key)
  for j = 1, #info, 2 do
    if info[j] == 'last-generated-id' then last = tonumber(string.match(info[j + 1], '^(%d+)')) end
  end
end
for i = 1, n do
  local ms = tonumber(ARGV[2 * i])
  if ms < last then ms = last end
  last = ms
  redis.call('XADD', key, 'MAXLEN', '~', maxlen, string.format('%d-*', ms),
    's', string.format('%d', first + i), 'e', ARGV[2 * i + 1])
end
return n
"""

_RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _prefix(tenant_id: str) -> str:
    return f"cp:{{t:{tenant_id}}}:"


def _conn_key(tenant_id: str, connection_id: str) -> str:
    return f"{_prefix(tenant_id)}c:{connection_id}"


_STREAM_ID_RE = re.compile(r"\A([0-9]{1,20})(?:-([0-9]{1,20}))?\Z")
_U64 = 1 << 64


def _stream_id(text: str) -> tuple[int, int]:
    """A stream entry id as Redis accepts it; ValueError otherwise. (``int`` alone takes "-1",
    " 1", "1_0" and ids past 64 bits, which Redis then refuses with an error.)"""
    m = _STREAM_ID_RE.match(text)
    if m is None:
        raise ValueError("not a stream id")
    ms, seq = int(m.group(1)), int(m.group(2) or 0)
    if ms >= _U64 or seq >= _U64:
        raise ValueError("not a stream id")
    return ms, seq


def _loads(text: str) -> dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise StoreUnavailable("redis store holds a malformed record; restore it from a backup")
    return value


def _connection(v: str | None, d: str | None) -> ConnectionRecord | None:
    if v is None or d is None:
        return None
    return ConnectionRecord.from_dict({**_loads(d), "version": int(v)})


def _api_key(d: str | None, u: str | None) -> ApiKeyRecord | None:
    if d is None:
        return None
    return ApiKeyRecord.from_dict({**_loads(d), "last_used_at": float(u) if u else None})


def _conflict(kind: str, ident: str, expected: ExpectedVersion, current: int) -> NoReturn:
    """The script refused the write: explain with the same words as every back end."""
    next_version(kind, ident, expected, None if current < 0 else current)
    raise Conflict(f"{kind} {ident!r} changed concurrently; re-read it and retry")


def _cas_args(expected: ExpectedVersion) -> tuple[str, str]:
    if expected is ANY_VERSION:
        return "any", ""
    if expected is None:
        return "new", ""
    if isinstance(expected, bool) or not isinstance(expected, int):
        raise TypeError("expected_version must be None, an int or ANY_VERSION")
    return "ver", str(expected)


class RedisStore(Store):
    name = "redis"

    def __init__(self, url: str, *, timeout_s: float = 0.25) -> None:
        self._url = url
        self.timeout_s = timeout_s
        self._client: Client | None = None
        self._callbacks: list[InvalidationCallback] = []
        self._listener: asyncio.Task[None] | None = None
        self._closing = False
        self._scripts: dict[str, Any] = {}
        self._lost: StoreLost | None = None
        self._accepting = False
        self._watcher: asyncio.Task[None] | None = None
        self._flushes: set[asyncio.Task[None]] = set()

    # --- plumbing ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _guard(self, op: str, *, safe: bool = False) -> Iterator[Client]:
        """The client for one operation. ``safe``: its commands may be repeated once on a fresh
        connection (reads, and writes whose repeat changes nothing; see proxy.store.redisconn)."""
        if self._client is None:
            raise StoreUnavailable(f"redis store is closed ({op}); open it first")
        if self._lost is not None:
            raise self._lost
        try:
            if safe:
                with retry_safe():
                    yield self._client
            else:
                yield self._client
        except (RedisError, OSError) as exc:
            if self._lost is not None:  # the connection was refused by the identity check
                raise self._lost from None
            # Only the class name: the URL (and so a password) never reaches the message.
            raise StoreUnavailable(
                f"redis store unavailable during {op} ({type(exc).__name__}); check that Redis is "
                "running and reachable at the configured PROXY_REDIS_URL"
            ) from exc

    def _registered(self, r: Client, source: str) -> Any:
        """Script objects are kept: EVALSHA, loading the source only on NOSCRIPT."""
        script = self._scripts.get(source)
        if script is None:
            script = self._scripts[source] = r.register_script(source)
        return script

    async def _script(
        self, op: str, source: str, keys: list[str], args: list[Any], *, safe: bool = False
    ) -> Any:
        with self._guard(op, safe=safe) as r:
            return await self._registered(r, source)(keys=keys, args=args)

    # --- identity ---------------------------------------------------------------------------
    async def _on_connect(self, conn: Any) -> None:
        """Runs on every new connection before its first command: a Redis that came back empty
        (or another Redis at the same address) is refused before anything is written to it."""
        await conn.on_connect()
        if self.identity is None or self._accepting:  # open() / accept_loss() set the marker
            return
        await conn.send_command("HMGET", META, STORE_ID_KEY, STORE_REPLACES_KEY, check_health=False)
        found, replaces = await conn.read_response()
        self._judge(found, replaces)
        if self._lost is not None:
            raise RedisConnectionError("the store's identity marker does not match")

    def _judge(self, found: str | None, replaces: str | None) -> None:
        mine = self.identity
        if mine is None:
            return
        verdict = judge_identity(mine, found, replaces)
        if verdict is None:
            if self._lost is None:
                self._lost = redis_lost(mine, found)
                log.error("%s", self._lost.message)
                self._flush_caches()
            return
        if verdict != mine:
            log.warning(
                "store identity %s was replaced by %s (an operator accepted a data loss); adopting "
                "it and dropping every cache",
                mine,
                verdict,
            )
            self.identity = verdict
        elif self._lost is None:
            return
        else:
            log.warning("store identity %s is back (restored); serving again", mine)
        self._lost = None
        self._flush_caches()

    def _flush_caches(self) -> None:
        """Nothing cached from a store that vanished may be used against what replaced it."""
        task = asyncio.get_running_loop().create_task(deliver(self._callbacks, FLUSH_ALL, None))
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    async def _watch_identity(self) -> None:
        while not self._closing:
            await asyncio.sleep(IDENTITY_CHECK_S)
            client = self._client
            if client is None:
                return
            try:
                async with asyncio.timeout(max(self.timeout_s * 4, 1.0)):
                    with retry_safe():
                        found, replaces = await client.hmget(META, [STORE_ID_KEY, STORE_REPLACES_KEY])
            except (RedisError, OSError, TimeoutError):
                continue  # unreachable is reported by every operation; a new connection re-checks
            self._judge(found, replaces)

    async def accept_loss(self) -> str:
        if self._client is None:
            raise StoreUnavailable("redis store is closed (accept_loss); open it first")
        new = new_identity()
        self._accepting = True
        try:
            pipe = self._client.pipeline(transaction=True)
            pipe.hsetnx(META, SCHEMA_VERSION_KEY, str(SCHEMA_VERSION))
            pipe.hset(META, mapping={STORE_ID_KEY: new, STORE_REPLACES_KEY: self.identity or ""})
            await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(
                f"redis store unavailable during accept_loss ({type(exc).__name__}); check that "
                "Redis is running and reachable at the configured PROXY_REDIS_URL"
            ) from exc
        finally:
            self._accepting = False
        log.warning("store accepted as it is now: new identity %s replaces %s", new, self.identity)
        self._judge(new, self.identity)
        return new

    # --- lifecycle --------------------------------------------------------------------------
    async def open(self) -> None:
        if self._client is not None:
            return
        self._closing = False
        self._client = aioredis.Redis.from_url(
            self._url,
            decode_responses=True,
            redis_connect_func=self._on_connect,
            **client_options(self.timeout_s),
        )
        try:
            with self._guard("open", safe=True) as r:
                await r.hsetnx(META, SCHEMA_VERSION_KEY, str(SCHEMA_VERSION))
                # A store opened without a marker is taken as new (a first start, or one from
                # before markers existed): nothing here can tell it from a Redis that lost its
                # data before this process started, so say so loudly when it has no tenants.
                marked = await r.hsetnx(META, STORE_ID_KEY, new_identity())
                found, identity = await r.hmget(META, [SCHEMA_VERSION_KEY, STORE_ID_KEY])
                tenants = await r.scard(TENANTS)
            if not (found or "").isdigit() or int(found or 0) > SCHEMA_VERSION:
                raise ConfigError(
                    "redis_url",
                    f"this Redis holds connection-proxy data of schema {found!r}, newer than the "
                    f"{SCHEMA_VERSION} this version knows; upgrade connection-proxy or use another database",
                )
            if marked:
                log.warning(
                    "redis store had no identity marker: marked it as store %s (%d tenants). If this "
                    "Redis held connection-proxy data before, that data is lost: restore the backup "
                    "before writing",
                    identity,
                    int(tenants),
                )
            self.identity = str(identity)
            self._watcher = asyncio.create_task(self._watch_identity(), name="redis-identity")
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        self._closing = True
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.wait({self._watcher}, timeout=2.0)
            self._watcher = None
        if self._listener is not None:
            self._listener.cancel()
            # Bounded: a client library that turns the cancellation into a connection error
            # must not keep shutdown waiting (the listener also checks _closing and stops).
            await asyncio.wait({self._listener}, timeout=2.0)
            self._listener = None
        self._callbacks.clear()
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()  # type: ignore[attr-defined, unused-ignore]

    async def ping(self) -> None:
        with self._guard("ping", safe=True) as r:
            await r.ping()

    # --- meta -------------------------------------------------------------------------------
    async def get_meta(self, key: str) -> str | None:
        with self._guard("get_meta", safe=True) as r:
            value = await r.hget(META, key)
        return None if value is None else str(value)

    async def set_meta(self, key: str, value: str) -> None:
        reserved_meta(key)
        with self._guard("set_meta", safe=True) as r:
            await r.hset(META, key, value)

    # --- tenants ----------------------------------------------------------------------------
    async def get_tenant(self, tenant_id: str) -> TenantRecord | None:
        if not ID_RE.match(tenant_id):
            return None
        with self._guard("get_tenant", safe=True) as r:
            v, d = await r.hmget(_prefix(tenant_id) + "tenant", ["v", "d"])
        if v is None or d is None:
            return None
        return TenantRecord.from_dict({**_loads(d), "version": int(v)})

    async def put_tenant(self, record: TenantRecord, expected_version: ExpectedVersion) -> TenantRecord:
        t = check_id("tenant_id", record.tenant_id)
        mode, expected = _cas_args(expected_version)
        with self._guard("put_tenant", safe=True) as r:  # SADD: a repeat changes nothing
            await r.sadd(TENANTS, t)  # registry first: see module docstring
        status, value = await self._script(
            "put_tenant",
            _PUT_TENANT,
            [_prefix(t) + "tenant"],
            [mode, expected, dumps(record.to_dict()), CHANNEL, dumps({"t": t, "c": None})],
        )
        if status != "ok":
            _conflict("tenant", t, expected_version, int(value))
        return replace(record, version=int(value))

    async def list_tenants(self) -> list[TenantRecord]:
        with self._guard("list_tenants", safe=True) as r:
            ids = sorted(await r.smembers(TENANTS))
            pipe = r.pipeline(transaction=False)
            for t in ids:
                pipe.hmget(_prefix(t) + "tenant", ["v", "d"])
            rows = await pipe.execute() if ids else []
        return [
            TenantRecord.from_dict({**_loads(d), "version": int(v)})
            for v, d in rows
            if v is not None and d is not None
        ]

    # --- connections ------------------------------------------------------------------------
    async def get_connection(self, tenant_id: str, connection_id: str) -> ConnectionRecord | None:
        if not ID_RE.match(tenant_id):
            return None
        with self._guard("get_connection", safe=True) as r:
            v, d = await r.hmget(_conn_key(tenant_id, connection_id), ["v", "d"])
        return _connection(v, d)

    async def put_connection(
        self,
        record: ConnectionRecord,
        expected_version: ExpectedVersion,
        *,
        key_check: Mapping[str, str] | None = None,
    ) -> ConnectionRecord:
        check_connection_ids(record)
        t, c = record.tenant_id, record.connection_id
        mode, expected = _cas_args(expected_version)
        status, value = await self._script(
            "put_connection",
            _PUT_CONNECTION,
            [_conn_key(t, c), _prefix(t) + "cidx"],
            [
                mode,
                expected,
                dumps(record.to_dict()),
                c,
                record.runtime_user_id or "",
                record.default_connection_id or "",
                record.integration_id or "",
                _prefix(t),
                CHANNEL,
                dumps({"t": t, "c": c}),
                dumps(dict(key_check)) if key_check else "",
            ],
        )
        if status == "nokeys":
            raise key_record_changed(t)
        if status == "taken":
            raise runtime_user_taken(t, record.default_connection_id or "", record.runtime_user_id or "")
        if status != "ok":
            _conflict("connection", c, expected_version, int(value))
        return record.evolve(version=int(value))

    async def delete_connection(self, tenant_id: str, connection_id: str) -> bool:
        if not ID_RE.match(tenant_id):
            return False
        deleted = await self._script(
            "delete_connection",
            _DELETE_CONNECTION,
            [_conn_key(tenant_id, connection_id), _prefix(tenant_id) + "cidx"],
            [connection_id, _prefix(tenant_id), CHANNEL, dumps({"t": tenant_id, "c": connection_id})],
        )
        return bool(deleted)

    async def list_connections(
        self,
        tenant_id: str,
        *,
        runtime_user_id: str | None = None,
        integration_id: str | None = None,
        default_connection_id: str | None = None,
        cursor: str | None = None,
        limit: int = 100,
    ) -> Page:
        limit = page_limit(limit)
        if not ID_RE.match(tenant_id):
            return Page([], None)
        p = _prefix(tenant_id)
        # Walk the narrowest index; the record itself is authoritative for every filter.
        if runtime_user_id is not None:
            index = f"{p}ru/{runtime_user_id}"
        elif default_connection_id is not None:
            index = f"{p}dc/{default_connection_id}"
        elif integration_id is not None:
            index = f"{p}in/{integration_id}"
        else:
            index = f"{p}cidx"
        start = "-" if cursor is None else f"({cursor}"
        batch = min(max(limit + 1, 50), MAX_BATCH)
        items: list[ConnectionRecord] = []
        with self._guard("list_connections", safe=True) as r:
            while len(items) <= limit:
                ids = await r.zrangebylex(index, start, "+", start=0, num=batch)
                if not ids:
                    break
                pipe = r.pipeline(transaction=False)
                for cid in ids:
                    pipe.hmget(p + "c:" + cid, ["v", "d"])
                for v, d in await pipe.execute():
                    rec = _connection(v, d)
                    if rec is not None and (
                        (runtime_user_id is None or rec.runtime_user_id == runtime_user_id)
                        and (integration_id is None or rec.integration_id == integration_id)
                        and (
                            default_connection_id is None
                            or rec.default_connection_id == default_connection_id
                        )
                    ):
                        items.append(rec)
                if len(ids) < batch:
                    break
                start = "(" + ids[-1]
        more = len(items) > limit
        items = items[:limit]
        return Page(items, items[-1].connection_id if more else None)

    async def find_user_connection(
        self, tenant_id: str, default_connection_id: str, runtime_user_id: str
    ) -> ConnectionRecord | None:
        if not ID_RE.match(tenant_id):
            return None
        p = _prefix(tenant_id)
        row = await self._script(
            "find_user_connection",
            _FIND_USER_CONNECTION,
            [f"{p}ruc/{default_connection_id}/{runtime_user_id}"],
            [p],
            safe=True,
        )
        return _connection(row[0], row[1]) if row else None

    # --- API keys ---------------------------------------------------------------------------
    async def put_api_key(self, record: ApiKeyRecord) -> None:
        t = check_id("tenant_id", record.tenant_id)
        with self._guard("put_api_key", safe=True) as r:
            await r.sadd(_prefix(t) + "keys", record.key_id)  # index first: see module docstring
        last = "" if record.last_used_at is None else repr(float(record.last_used_at))
        await self._script(
            "put_api_key",
            _PUT_API_KEY,
            [f"cp:apikey:{record.key_id}"],
            [dumps(record.to_dict()), last],
            safe=True,  # the same fields again; last_used_at only moves forward
        )

    async def get_api_key(self, key_id: str) -> ApiKeyRecord | None:
        with self._guard("get_api_key", safe=True) as r:
            d, u = await r.hmget(f"cp:apikey:{key_id}", ["d", "u"])
        return _api_key(d, u)

    async def list_api_keys(self, tenant_id: str) -> list[ApiKeyRecord]:
        if not ID_RE.match(tenant_id):
            return []
        with self._guard("list_api_keys", safe=True) as r:
            ids = list(await r.smembers(_prefix(tenant_id) + "keys"))
            pipe = r.pipeline(transaction=False)
            for key_id in ids:
                pipe.hmget(f"cp:apikey:{key_id}", ["d", "u"])
            rows = await pipe.execute() if ids else []
        keys = [k for k in (_api_key(d, u) for d, u in rows) if k is not None and k.tenant_id == tenant_id]
        return sorted(keys, key=lambda k: (k.created_at, k.key_id))

    async def touch_api_keys(self, last_used: dict[str, float]) -> None:
        if not last_used:
            return
        with self._guard("touch_api_keys", safe=True) as r:
            script = self._registered(r, _TOUCH_API_KEY)
            pipe = r.pipeline(transaction=False)
            for key_id, ts in last_used.items():
                await script(keys=[f"cp:apikey:{key_id}"], args=[repr(float(ts))], client=pipe)
            await pipe.execute()

    # --- audit ------------------------------------------------------------------------------
    async def append_audit(self, events: Sequence[AuditEvent]) -> None:
        by_tenant: dict[str, list[Any]] = defaultdict(list)
        for e in events:
            by_tenant[check_id("tenant_id", e.tenant_id)] += [max(0, int(e.ts * 1000)), audit_json(e)]
        if not by_tenant:
            return
        with self._guard("append_audit") as r:
            script = self._registered(r, _APPEND_AUDIT)
            pipe = r.pipeline(transaction=False)
            for t, blobs in by_tenant.items():
                p = _prefix(t)
                for i in range(0, len(blobs), 2 * AUDIT_CHUNK):
                    chunk = blobs[i : i + 2 * AUDIT_CHUNK]
                    await script(keys=[p + "audit", p + "auditseq"], args=[AUDIT_MAXLEN, *chunk], client=pipe)
            pipe.sadd(AUDIT_TENANTS, *by_tenant)
            await pipe.execute()

    async def prune_audit(self, before_ts: float) -> int:
        # Entry ids are >= their event's ts in ms (see _APPEND_AUDIT): trimming below the cutoff
        # id never removes a newer event (one that arrived late may stay a little longer).
        cutoff = f"{max(0, math.floor(before_ts * 1000))}-0"
        with self._guard("prune_audit", safe=True) as r:
            total = 0
            for t in sorted(await r.smembers(AUDIT_TENANTS)):
                total += int(await r.xtrim(_prefix(t) + "audit", minid=cutoff, approximate=False))
            return total

    async def query_audit(self, query: AuditQuery) -> Page:
        """Newest first by entry id. ``since`` bounds the id range; ``until`` and the other
        filters are applied to decoded events (an event that arrived after newer ones sits above
        its ts, so no exact upper id bound exists). A scan stops after AUDIT_SCAN_BUDGET entries
        and then returns a short (possibly empty) page whose cursor resumes where it stopped."""
        limit = page_limit(query.limit)
        end = "+"
        if query.cursor is not None:
            try:
                _stream_id(query.cursor)
            except ValueError:
                raise bad_cursor() from None
            end = f"({query.cursor}"
        start = "-" if query.since is None else str(max(0, math.floor(query.since * 1000)))
        if not ID_RE.match(query.tenant_id):
            return Page([], None)
        key = _prefix(query.tenant_id) + "audit"
        batch = min(max(2 * (limit + 1), 100), MAX_BATCH)
        items: list[tuple[str, AuditEvent]] = []
        scanned, last_id, exhausted = 0, None, False
        with self._guard("query_audit", safe=True) as r:
            while len(items) <= limit and scanned < AUDIT_SCAN_BUDGET:
                entries = await r.xrevrange(key, max=end, min=start, count=batch)
                for entry_id, fields in entries:
                    event = AuditEvent.from_dict({**_loads(fields["e"]), "seq": int(fields["s"])})
                    if audit_matches(event, query):
                        items.append((entry_id, event))
                scanned += len(entries)
                if len(entries) < batch:
                    exhausted = True
                    break
                last_id = entries[-1][0]
                end = f"({last_id}"
        if len(items) > limit:
            return Page([e for _, e in items[:limit]], items[limit - 1][0])
        return Page([e for _, e in items], None if exhausted else last_id)

    # --- one-time tokens --------------------------------------------------------------------
    async def put_ephemeral(self, namespace: str, key: str, value: dict[str, Any], ttl_s: float) -> None:
        with self._guard("put_ephemeral", safe=True) as r:
            await r.set(_ephemeral_key(namespace, key), dumps(value), px=_ttl_ms(ttl_s))

    async def get_ephemeral(self, namespace: str, key: str) -> dict[str, Any] | None:
        with self._guard("get_ephemeral", safe=True) as r:
            value = await r.get(_ephemeral_key(namespace, key))
        return None if value is None else _loads(value)

    async def pop_ephemeral(self, namespace: str, key: str) -> dict[str, Any] | None:
        with self._guard("pop_ephemeral") as r:
            value = await r.getdel(_ephemeral_key(namespace, key))
        return None if value is None else _loads(value)

    # --- locks ------------------------------------------------------------------------------
    async def acquire_lock(self, name: str, ttl_s: float) -> str | None:
        token = secrets.token_urlsafe(18)
        with self._guard("acquire_lock") as r:
            ok = await r.set(f"cp:lock:{name}", token, nx=True, px=_ttl_ms(ttl_s))
        return token if ok else None

    async def release_lock(self, name: str, token: str) -> bool:
        return bool(await self._script("release_lock", _RELEASE_LOCK, [f"cp:lock:{name}"], [token]))

    # --- invalidation -----------------------------------------------------------------------
    async def publish_invalidation(self, tenant_id: str, connection_id: str | None) -> None:
        with self._guard("publish_invalidation", safe=True) as r:
            await r.publish(CHANNEL, dumps({"t": tenant_id, "c": connection_id}))

    async def subscribe_invalidations(self, callback: InvalidationCallback) -> None:
        with self._guard("subscribe_invalidations") as r:
            client = r
        self._callbacks.append(callback)
        if self._listener is not None:
            return
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            # Subscribed before returning, so no write after this call can be missed.
            await pubsub.subscribe(CHANNEL)
        except (RedisError, OSError) as exc:
            log.warning("invalidation subscribe failed (%s); retrying in the background", type(exc).__name__)
            await _quiet_close(pubsub)
            self._listener = asyncio.create_task(self._listen(client, None), name="redis-invalidations")
        else:
            self._listener = asyncio.create_task(self._listen(client, pubsub), name="redis-invalidations")

    async def _listen(self, client: Client, pubsub: Any) -> None:
        """Keeps one subscription alive. Any reconnect delivers FLUSH_ALL: messages published
        while the link was down are lost, so caches cannot trust anything they hold."""
        backoff = 0.05
        while not self._closing:
            if pubsub is None:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                try:
                    await pubsub.subscribe(CHANNEL)
                except (RedisError, OSError):
                    await _quiet_close(pubsub)
                    pubsub = None
                    continue
                log.info("invalidation subscription restored; flushing caches")
                await deliver(self._callbacks, FLUSH_ALL, None)
            since = time.monotonic()
            try:
                await self._read(client, pubsub)
            except (RedisError, OSError) as exc:
                log.warning("invalidation subscription lost (%s); reconnecting", type(exc).__name__)
            except Exception:
                log.exception("invalidation listener failed; reconnecting")
            finally:
                await _quiet_close(pubsub)
                pubsub = None
            if time.monotonic() - since > PUBSUB_DEAD_S:
                backoff = 0.05  # it was healthy for a while: reconnect quickly

    async def _read(self, client: Client, pubsub: Any) -> None:
        """Delivers messages until the connection fails. A silent link is probed by publishing a
        keepalive on the channel itself: hearing it back proves the subscribed connection works
        end to end (redis-py does not surface PING replies on a subscribed connection)."""
        last_heard = last_ping = time.monotonic()
        while True:
            msg = await pubsub.get_message(timeout=1.0)
            now = time.monotonic()
            if msg is None:
                if now - last_heard > PUBSUB_DEAD_S:
                    raise ConnectionError("keepalive not heard back on the invalidation channel")
                # At most one probe per interval, however often get_message returns early.
                if now - last_heard > PUBSUB_PING_S and now - last_ping > PUBSUB_PING_S:
                    last_ping = now
                    await client.publish(CHANNEL, KEEPALIVE)
                continue
            last_heard = now
            if msg.get("type") != "message" or msg.get("data") == KEEPALIVE:
                continue
            try:
                data = json.loads(msg["data"])
                tenant_id, connection_id = str(data["t"]), data.get("c")
            except (ValueError, KeyError, TypeError):
                log.warning("ignoring a malformed invalidation message")
                continue
            await deliver(self._callbacks, tenant_id, None if connection_id is None else str(connection_id))


async def _quiet_close(pubsub: Any) -> None:
    with contextlib.suppress(Exception):
        await pubsub.aclose()


def _ephemeral_key(namespace: str, key: str) -> str:
    return f"cp:e:{namespace}:{ephemeral_digest(key)}"


def _ttl_ms(ttl_s: float) -> int:
    return max(1, math.ceil(ttl_s * 1000))
