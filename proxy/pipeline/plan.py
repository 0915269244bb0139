"""What one decrypted connection means for every call through it, computed once: the ``Plan``.

Base URL and base path, the host binding (the connection's allowed hosts, the integration's, or
the base URL's host; a runtime user connection's default's), https-only credentials and the egress
guard's literal check, the limit target, timeouts, retries and the injection. The pipeline caches a
plan per ``Credentials`` object (the vault replaces that object whenever the connection changes),
so none of this is recomputed per call.

Security invariant kept here: a base URL the destination checks refuse is recorded as the plan's
``refusal`` and raised on every call; nothing is sent for it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from aiohttp import ClientTimeout

from proxy.errors import Forbidden, HostNotAllowed, ProxyError, ValidationError
from proxy.pipeline.inject import Injection, build_injection
from proxy.pipeline.urls import split_absolute, validate_base_url
from proxy.ratelimit.targets import limit_target
from proxy.security import egress as egress_mod
from proxy.settings import Settings
from proxy.vault.records import Credentials

MAX_RETRIES = 5


def _timeout(options: Mapping[str, Any], settings: Settings) -> ClientTimeout:
    raw = options.get("timeouts") or {}
    if not isinstance(raw, Mapping):
        raw = {}

    def pick(key: str, default: float) -> float:
        value = raw.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
            return float(value)
        return default

    return ClientTimeout(
        total=pick("total_s", settings.upstream_total_timeout_s),
        sock_connect=pick("connect_s", settings.upstream_connect_timeout_s),
        sock_read=pick("read_s", settings.upstream_read_timeout_s),
    )


def _small_int(value: Any, default: int, cap: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return default
    return max(0, min(int(value), cap))


class Plan:
    """Everything about one decrypted connection that does not change per call."""

    __slots__ = (
        "base_path",
        "base_port",
        "base_scheme",
        "base_tail",
        "base_url",
        "creds",
        "host",
        "host_key",
        "host_patterns",
        "injection",
        "integration",
        "latency_labels",
        "max_wait_ms",
        "oauth",
        "proxy_only",
        "record",
        "refusal",
        "retries",
        "scope",
        "styles",
        "target",
        "timeout",
    )

    def __init__(self, creds: Credentials, egress: egress_mod.EgressPolicy, settings: Settings) -> None:
        record, integration = creds.record, creds.integration
        self.creds = creds
        self.record = record
        self.integration = integration
        base_url = integration.resolve_base_url(creds.params)
        if not base_url:
            raise ValidationError(
                f"connection {record.connection_id!r} has no base URL; set its base_url parameter",
                fields={"parameters.base_url": "required to proxy calls"},
            )
        problem = validate_base_url(base_url)
        if problem is not None:
            raise ValidationError(
                f"connection {record.connection_id!r}: the base URL {problem}",
                fields={"parameters.base_url": problem},
            )
        scheme, host, port, _ = split_absolute(base_url)
        self.base_url = base_url
        self.base_scheme = scheme
        base_parts = urlsplit(base_url)
        self.base_path = base_parts.path
        # What follows the origin when an absolute target is rebuilt in path mode's terms.
        self.base_tail = base_parts.path + (f"?{base_parts.query}" if base_parts.query else "")
        self.host = host
        self.host_key = f"{host}:{port}"
        self.base_port = port
        patterns = record.allowed_hosts
        if patterns is None:
            patterns = integration.allowed_hosts
        if creds.host_binding is not None:
            # A runtime user connection goes only where its default connection is bound.
            patterns = creds.host_binding
        self.host_patterns: tuple[str, ...] = tuple(patterns) if patterns is not None else (host,)
        # Problems of the base URL itself are found once and raised on every call.
        self.refusal: ProxyError | None = None
        try:
            check_destination(egress, self, scheme, host)
        except ProxyError as exc:
            self.refusal = exc
        self.target = limit_target(record, integration)
        self.scope = self.target.scope
        self.timeout = _timeout(record.options, settings)
        self.retries = _small_int(record.options.get("retries"), 0, MAX_RETRIES)
        self.max_wait_ms = _small_int(record.options.get("max_wait_ms"), 0, settings.max_wait_ms_cap)
        self.styles = integration.ratelimit_styles
        self.oauth = integration.auth.is_oauth2
        self.injection: Injection | None = None if self.oauth else build_injection(integration, creds.params)
        self.latency_labels = (integration.id,)
        self.proxy_only = record.proxy_only  # the tenant's flag is read per call (it is cached)


def check_destination(policy: egress_mod.EgressPolicy, plan: Plan, scheme: str, host: str) -> None:
    """Host binding, https-only credentials and the egress guard's literal check."""
    if not plan.host_patterns:
        raise HostNotAllowed(
            f"runtime user connection {plan.record.connection_id!r} has no default connection of "
            "its integration to take its destination from; reconnect it against an existing default"
        )
    if not egress_mod.host_matches(host, plan.host_patterns):
        raise HostNotAllowed(
            f"host {host!r} is not among the allowed hosts of connection {plan.record.connection_id!r} "
            f"({', '.join(plan.host_patterns)}); fix the URL, or the connection's allowed_hosts if intended"
        )
    if scheme != "https" and not policy.is_allowed_host(host):
        raise Forbidden(
            f"connection {plan.record.connection_id!r} would send its credentials over plain http "
            f"to {host!r}; credentials go over https only, except to hosts in PROXY_EGRESS_ALLOW"
        )
    policy.check_literal(host)


__all__ = ["MAX_RETRIES", "Plan", "check_destination"]
