"""The records the service keeps, independent of where they are kept.

These are plain frozen dataclasses with ``to_dict``/``from_dict`` so both store back ends
(SQLite and Redis) persist exactly the same JSON and behave the same. Secret connection
parameters only ever appear here as ciphertext tokens (see ``proxy.security.crypto``); decrypted values
live in ``proxy.vault.vault.Credentials`` and are never persisted.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from typing import Any

from proxy.errors import ConnectionNotAuthorized, ValidationError

# Ids end up in URLs, Redis hash tags and log lines: no braces (hash tags), slashes or controls.
# Anchored with \A...\Z, not ^...$: "$" also matches before a trailing newline, which let
# "acme\n" through every ``ID_RE.match``.
ID_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._:@+=~-]{0,199}\Z")


def check_id(kind: str, value: str) -> str:
    if not isinstance(value, str) or not ID_RE.match(value):
        raise ValidationError(
            f"{kind} must be 1-200 characters of letters, digits and . _ : @ + = ~ -, "
            "starting with a letter or digit",
            fields={kind: "invalid identifier"},
        )
    return value


class ConnectionStatus(StrEnum):
    PENDING = "pending"
    ACTIVE = "active"
    NEEDS_REAUTH = "needs_reauth"
    ERROR = "error"


# A connection in one of these holds no usable credentials until someone (re)connects it: the
# proxy and the Connection Service answer 424 CONNECTION_NOT_AUTHORIZED (``not_authorized``).
# One in ``error`` still holds its credentials: the Connection Service hands them out.
NOT_CONNECTED = frozenset({ConnectionStatus.PENDING.value, ConnectionStatus.NEEDS_REAUTH.value})


_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_WINDOW_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")


def parse_window(value: Any) -> float:
    """'1m' -> 60.0; '250ms' -> 0.25; bare numbers are seconds."""
    if isinstance(value, bool):
        raise ValueError("window must be a duration like 30s, 1m, 1h or 1d")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        m = _WINDOW_RE.match(str(value))
        if not m:
            raise ValueError("window must be a duration like 30s, 1m, 1h or 1d")
        seconds = float(m.group(1)) * _UNITS[m.group(2) or "s"]
    if not 0.001 <= seconds <= 31 * 86400:
        raise ValueError("window must be between 1ms and 31d")
    return seconds


@dataclass(frozen=True, slots=True)
class RateWindow:
    """A configured limit: at most ``limit`` calls per ``window_s`` seconds (GCRA, no bursts above)."""

    limit: int
    window_s: float
    burst: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"limit": self.limit, "window_s": self.window_s}
        if self.burst is not None:
            d["burst"] = self.burst
        return d

    @classmethod
    def parse(cls, raw: Any) -> RateWindow:
        """Accepts ``{"limit", "window"}`` and Runtara's ``{"requestsPerSecond", "burstSize"}``."""
        if not isinstance(raw, dict):
            raise ValueError('each rate limit must be an object like {"limit": 100, "window": "1m"}')
        if "requestsPerSecond" in raw:
            rps = raw["requestsPerSecond"]
            if isinstance(rps, bool) or not isinstance(rps, int | float) or rps <= 0:
                raise ValueError("requestsPerSecond must be a positive number")
            burst = raw.get("burstSize")
            if burst is not None and (isinstance(burst, bool) or not isinstance(burst, int) or burst < 1):
                raise ValueError("burstSize must be a positive integer")
            # n calls per second as an integer limit over a window that keeps the rate exact.
            if float(rps).is_integer():
                return cls(limit=int(rps), window_s=1.0, burst=burst)
            return cls(limit=max(1, round(rps * 1000)), window_s=1000.0, burst=burst)
        limit = raw.get("limit")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError("limit must be a positive integer")
        window = raw.get("window", raw.get("window_s"))
        if window is None:
            raise ValueError('window is required, e.g. "1m"')
        burst = raw.get("burst")
        if burst is not None and (isinstance(burst, bool) or not isinstance(burst, int) or burst < 1):
            raise ValueError("burst must be a positive integer")
        return cls(limit=limit, window_s=parse_window(window), burst=burst)


def parse_rate_limits(raw: Any, field_name: str = "rate_limits") -> tuple[RateWindow, ...]:
    if raw is None:
        return ()
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list):
        raise ValidationError("rate_limits must be a list", fields={field_name: "must be a list"})
    out = []
    for i, item in enumerate(raw):
        try:
            out.append(RateWindow.parse(item))
        except ValueError as exc:
            raise ValidationError(
                f"{field_name}[{i}]: {exc}", fields={f"{field_name}[{i}]": str(exc)}
            ) from None
    return tuple(out)


@dataclass(frozen=True, slots=True)
class ConnectionRecord:
    """A connection as stored. ``secret_params`` holds ciphertext tokens only."""

    tenant_id: str
    connection_id: str
    integration_id: str
    connection_subtype: str | None = None
    status: str = ConnectionStatus.PENDING.value
    status_detail: str | None = None
    public_params: dict[str, Any] = field(default_factory=dict)
    secret_params: dict[str, str] = field(default_factory=dict)
    runtime_user_id: str | None = None
    default_connection_id: str | None = None
    rate_limits: tuple[RateWindow, ...] = ()
    allowed_hosts: tuple[str, ...] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    # Proxy knobs: max_wait_ms, retries, timeouts, quota_key/quota_weight, proxy_only.
    options: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0
    updated_at: float = 0.0
    version: int = 0

    @property
    def proxy_only(self) -> bool:
        return bool(self.options.get("proxy_only", False))

    @property
    def needs_connecting(self) -> bool:
        """No usable credentials until (re)connected: see ``NOT_CONNECTED``."""
        return self.status in NOT_CONNECTED

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rate_limits"] = [w.to_dict() for w in self.rate_limits]
        d["allowed_hosts"] = list(self.allowed_hosts) if self.allowed_hosts is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ConnectionRecord:
        d = dict(d)
        d["rate_limits"] = tuple(
            RateWindow(int(w["limit"]), float(w["window_s"]), w.get("burst"))
            for w in d.get("rate_limits") or ()
        )
        hosts = d.get("allowed_hosts")
        d["allowed_hosts"] = tuple(hosts) if hosts is not None else None
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})

    def evolve(self, **changes: Any) -> ConnectionRecord:
        return replace(self, **changes)


def _reconnect_hint(record: ConnectionRecord) -> str:
    return (
        f"reconnect it: POST /admin/tenants/{record.tenant_id}/connect-sessions with "
        f'{{"integration_id": "{record.integration_id}", "connection_id": "{record.connection_id}"}} '
        "and have the user open the returned url, or set its parameters with "
        f"PATCH /admin/tenants/{record.tenant_id}/connections/{record.connection_id}"
    )


def not_authorized(record: ConnectionRecord) -> ConnectionNotAuthorized:
    """The 424 for a connection that cannot be used right now, saying what to do about it."""
    ref = f"connection {record.connection_id!r} of tenant {record.tenant_id!r}"
    detail = f" ({record.status_detail})" if record.status_detail else ""
    if record.status == ConnectionStatus.NEEDS_REAUTH.value:
        return ConnectionNotAuthorized(f"{ref} needs to be reconnected{detail}; {_reconnect_hint(record)}")
    if record.status == ConnectionStatus.ERROR.value:
        return ConnectionNotAuthorized(
            f"{ref} is in error{detail}; fix its parameters with "
            f"PUT /admin/tenants/{record.tenant_id}/connections/{record.connection_id}"
        )
    return ConnectionNotAuthorized(f"{ref} is not connected yet{detail}; {_reconnect_hint(record)}")


@dataclass(frozen=True, slots=True)
class TenantRecord:
    """Per-tenant key material: data keys (DEKs), each wrapped by a master key version."""

    tenant_id: str
    current_dek_version: int
    # dek_version -> WrappedKey.to_dict()
    wrapped_deks: dict[str, dict[str, Any]] = field(default_factory=dict)
    proxy_only: bool = False
    created_at: float = 0.0
    version: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TenantRecord:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True, slots=True)
class ApiKeyRecord:
    """A caller key bound to one tenant. Only the hash of the secret is kept."""

    key_id: str
    tenant_id: str
    secret_hash: str
    name: str | None = None
    created_at: float = 0.0
    revoked_at: float | None = None
    last_used_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ApiKeyRecord:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})

    def public_view(self) -> dict[str, Any]:
        return {
            "key_id": self.key_id,
            "tenant_id": self.tenant_id,
            "name": self.name,
            "created_at": self.created_at,
            "revoked_at": self.revoked_at,
            "last_used_at": self.last_used_at,
        }


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One audited fact. ``detail`` holds ids and counts only, never a credential value."""

    ts: float
    tenant_id: str
    action: str
    actor: str
    outcome: str = "ok"
    connection_id: str | None = None
    request_id: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    seq: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AuditEvent:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling: ``kind`` is admin, api_key, jwt or trusted_network."""

    kind: str
    id: str
    tenant_id: str | None = None

    @property
    def actor(self) -> str:
        return f"{self.kind}:{self.id}"

    def may_access(self, tenant_id: str) -> bool:
        # Admin and trusted-network callers span tenants; keys and JWTs are bound to one.
        return self.tenant_id is None or self.tenant_id == tenant_id
