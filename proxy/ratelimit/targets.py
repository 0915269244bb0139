"""One definition of what the limiter limits for a connection.

The proxy's admission check, the Connection Service's ``rate_limit`` object, caller-reported
observations and the admin view must all read and write the *same* state, so they all build their
``LimitTarget`` here. Pure: no aiohttp, no redis.
"""

from __future__ import annotations

import logging
from typing import Any

from proxy.catalogue import Integration
from proxy.errors import ValidationError
from proxy.model import ConnectionRecord, RateWindow, parse_rate_limits
from proxy.ratelimit.limiter import LimitTarget

log = logging.getLogger("proxy.ratelimit")


def _windows(raw: Any, where: str) -> tuple[RateWindow, ...]:
    try:
        return parse_rate_limits(list(raw) if isinstance(raw, tuple) else raw, where)
    except ValidationError:
        # Stored options were validated on write; an integration default can only be wrong
        # through a bad operator file, which must not take the proxy down.
        log.warning("ignoring invalid %s", where)
        return ()


def scope_of(record: ConnectionRecord) -> str:
    return f"{record.tenant_id}/{record.connection_id}"


def connection_of_scope(scope: str) -> tuple[str, str | None]:
    """(tenant_id, connection_id) of a ``scope_of`` scope (ids never contain "/")."""
    tenant_id, _, connection_id = scope.partition("/")
    return tenant_id, connection_id or None


def limit_target(record: ConnectionRecord, integration: Integration) -> LimitTarget:
    """Configured windows are the connection's ``rate_limits`` or else the integration's defaults.

    Options: ``quota_key`` + ``quota_rate_limits`` (a budget shared by a group of connections),
    ``quota_weight`` (this member's share), ``reserve`` (calls kept back from a learned remaining).
    """
    opts = record.options
    windows = record.rate_limits or _windows(integration.default_rate_limits, "default_rate_limits")
    quota_key = opts.get("quota_key") or None
    return LimitTarget(
        scope=scope_of(record),
        windows=windows,
        quota_key=str(quota_key) if quota_key else None,
        quota_windows=_windows(opts.get("quota_rate_limits"), "quota_rate_limits") if quota_key else (),
        weight=float(opts.get("quota_weight") or 1.0),
        reserve=int(opts.get("reserve") or 0),
    )
