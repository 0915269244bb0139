"""The audit trail in Redis: one stream per tenant (entry id = cursor), appended by script, read
newest first with the filters applied to decoded events, pruned by id."""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, Final

from proxy.model import ID_RE, AuditEvent, check_id
from proxy.store.base import AuditQuery, AuditStore, Page
from proxy.store.common import audit_json, audit_matches, bad_cursor, page_limit
from proxy.store.redis.core import MAX_BATCH, RedisCore, loads, lua, queue_script
from proxy.store.redis.keys import AUDIT_TENANTS, prefix

AUDIT_MAXLEN: Final = 1_000_000
AUDIT_CHUNK: Final = 500
AUDIT_SCAN_BUDGET: Final = 50_000
APPEND_AUDIT: Final = lua("append_audit.lua")

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


class RedisAudit(RedisCore, AuditStore):
    async def append_audit(self, events: Sequence[AuditEvent]) -> None:
        by_tenant: dict[str, list[Any]] = defaultdict(list)
        for e in events:
            by_tenant[check_id("tenant_id", e.tenant_id)] += [max(0, int(e.ts * 1000)), audit_json(e)]
        if not by_tenant:
            return
        with self._guard("append_audit") as r:
            pipe = r.pipeline(transaction=False)
            for t, blobs in by_tenant.items():
                p = prefix(t)
                for i in range(0, len(blobs), 2 * AUDIT_CHUNK):
                    chunk = blobs[i : i + 2 * AUDIT_CHUNK]
                    queue_script(pipe, APPEND_AUDIT, [p + "audit", p + "auditseq"], [AUDIT_MAXLEN, *chunk])
            pipe.sadd(AUDIT_TENANTS, *by_tenant)
            await self._confirm("append_audit", pipe)

    async def prune_audit(self, before_ts: float) -> int:
        # Entry ids are >= their event's ts in ms (see append_audit.lua): trimming below the cutoff
        # id never removes a newer event (one that arrived late may stay a little longer).
        cutoff = f"{max(0, math.floor(before_ts * 1000))}-0"
        with self._guard("prune_audit", safe=True) as r:
            total = 0
            for t in sorted(await r.smembers(AUDIT_TENANTS)):
                pipe = r.pipeline(transaction=False).xtrim(
                    prefix(t) + "audit", minid=cutoff, approximate=False
                )
                total += int((await self._confirm("prune_audit", pipe))[0])
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
        key = prefix(query.tenant_id) + "audit"
        batch = min(max(2 * (limit + 1), 100), MAX_BATCH)
        items: list[tuple[str, AuditEvent]] = []
        scanned, last_id, exhausted = 0, None, False
        with self._guard("query_audit", safe=True) as r:
            while len(items) <= limit and scanned < AUDIT_SCAN_BUDGET:
                entries = await r.xrevrange(key, max=end, min=start, count=batch)
                for entry_id, fields in entries:
                    event = AuditEvent.from_dict({**loads(fields["e"]), "seq": int(fields["s"])})
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
