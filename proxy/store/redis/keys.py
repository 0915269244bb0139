"""The Redis key layout in one place, and the helpers that build its key names.

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
"""

from __future__ import annotations

from typing import Final

from proxy.store.common import ephemeral_digest

CHANNEL: Final = "cp:invalidate"
META: Final = "cp:meta"
TENANTS: Final = "cp:tenants"
AUDIT_TENANTS: Final = "cp:audit:tenants"


def prefix(tenant_id: str) -> str:
    return f"cp:{{t:{tenant_id}}}:"


def conn_key(tenant_id: str, connection_id: str) -> str:
    return f"{prefix(tenant_id)}c:{connection_id}"


def ephemeral_key(namespace: str, key: str) -> str:
    return f"cp:e:{namespace}:{ephemeral_digest(key)}"
