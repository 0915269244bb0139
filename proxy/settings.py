"""One frozen, validated settings object for the whole service.

Settings come from an optional TOML file and from ``PROXY_*`` environment variables, the
environment winning. Every value is validated here, once, at start-up; a bad value raises
``ConfigError`` naming the key, so the process stops before it listens. Nothing else in the
service reads the environment.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxy.errors import ConfigError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Settings:
    listen_host: str = "127.0.0.1"
    listen_port: int = 8080
    data_dir: Path = Path("./var")
    redis_url: str | None = field(default=None, repr=False)  # may carry a password
    redis_timeout_s: float = 0.25
    # Dev mode: with no master key configured, generate one (and an admin token) into data_dir.
    # Production deployments set dev_mode = false so a missing key stops start-up instead.
    dev_mode: bool = True
    master_key: str | None = field(default=None, repr=False)
    master_key_file: Path | None = None
    # Accept a key file readable by its group (never by others): for Kubernetes, whose secret
    # volumes with an fsGroup are mode 0440. Off by default.
    master_key_file_group_readable: bool = False
    admin_token: str | None = field(default=None, repr=False)
    # Unset, load_settings derives it from listen_host:listen_port (see default_public_url).
    public_url: str = "http://127.0.0.1:8080"
    egress_allow: tuple[str, ...] = ()
    trusted_networks: tuple[IPNetwork, ...] = ()
    connection_service_prefix: str = "/connections"
    integrations_dirs: tuple[Path, ...] = ()
    credential_cache_ttl_s: float = 5.0
    # Per-caller quota of the Connection Service itself (requests per minute per caller).
    service_quota_per_minute: int = 6000
    audit_required: bool = False
    audit_flush_interval_s: float = 0.5
    audit_buffer_max: int = 10000
    audit_retention_days: float = 90.0
    ratelimit_fail_mode: str = "open"
    upstream_connect_timeout_s: float = 5.0
    upstream_read_timeout_s: float = 60.0
    upstream_total_timeout_s: float = 300.0
    upstream_max_per_host: int = 256
    max_wait_ms_cap: int = 30000
    jwt_hs256_secret: str | None = field(default=None, repr=False)
    jwt_public_key_files: tuple[Path, ...] = ()
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_tenant_claim: str = "tenant_id"
    connect_session_ttl_s: int = 3600
    proxy_only_tenants: tuple[str, ...] = ()
    log_level: str = "INFO"
    # json, text, or auto: json when stderr is not a terminal (see proxy.observe.logformat).
    log_format: str = "auto"
    workers: int = 1
    # Resource bounds (per process). Client connections served at once; beyond them a few more
    # (connection_reserve) are accepted only to answer /healthz, the rest are closed at once.
    max_connections: int = 1024
    connection_reserve: int = 16
    # A connection that has not sent a complete request head this long after connecting (or
    # after the first byte of its next head) is closed: slowloris.
    head_timeout_s: float = 10.0
    # The envelope buffers the upstream's answer to wrap it in JSON: the most it buffers, and
    # how many envelope calls run at once (beyond it: 503 with Retry-After).
    envelope_max_response_bytes: int = 10 * 1024 * 1024
    envelope_max_concurrent: int = 8
    # CONNECT interception (proxy.security.ca): the CA that mints leaves for tunnelled hosts. The
    # certificate file may hold older CA certificates too (rotation overlap: all are exported).
    # Unset in dev mode: generated into data_dir.
    ca_cert_file: Path | None = None
    ca_key_file: Path | None = None
    # Extra CA bundle the service trusts for its own upstream TLS, beside the system roots.
    upstream_ca_file: Path | None = None

    @property
    def listen(self) -> str:
        return f"{self.listen_host}:{self.listen_port}"

    @property
    def store_path(self) -> Path:
        return self.data_dir / "proxy.sqlite3"


# --- parsing -----------------------------------------------------------------------------------


def _str(key: str, v: Any) -> str:
    if not isinstance(v, str):
        raise ConfigError(key, "must be a string")
    return v


def _opt_str(key: str, v: Any) -> str | None:
    if v is None or v == "":
        return None
    return _str(key, v)


def _bool(key: str, v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in {"1", "true", "yes", "on"}:
        return True
    if isinstance(v, str) and v.strip().lower() in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(key, "must be true or false")


def _number(key: str, v: Any, kind: type, minimum: float) -> Any:
    if isinstance(v, bool):
        raise ConfigError(key, f"must be a number >= {minimum}")
    try:
        n = kind(v)
    except (TypeError, ValueError):
        raise ConfigError(key, f"must be a number >= {minimum}, got {v!r}") from None
    if n < minimum:
        raise ConfigError(key, f"must be >= {minimum}, got {n}")
    return n


def _int(minimum: int) -> Callable[[str, Any], int]:
    return lambda key, v: int(_number(key, v, int, minimum))


def _float(minimum: float) -> Callable[[str, Any], float]:
    return lambda key, v: float(_number(key, v, float, minimum))


def _list(key: str, v: Any) -> tuple[str, ...]:
    if isinstance(v, str):
        return tuple(p.strip() for p in v.split(",") if p.strip())
    if isinstance(v, list) and all(isinstance(p, str) for p in v):
        return tuple(p.strip() for p in v if p.strip())
    raise ConfigError(key, "must be a list of strings or a comma-separated string")


def _opt_path(key: str, v: Any) -> Path | None:
    return Path(_str(key, v)) if _opt_str(key, v) else None


def _paths(key: str, v: Any) -> tuple[Path, ...]:
    return tuple(Path(p) for p in _list(key, v))


def _networks(key: str, v: Any) -> tuple[IPNetwork, ...]:
    out = []
    for item in _list(key, v):
        try:
            out.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ConfigError(key, f"{item!r} is not an IP network (use CIDR, e.g. 10.0.0.0/8)") from None
    return tuple(out)


def _listen(key: str, v: Any) -> tuple[str, int]:
    text = _str(key, v).strip()
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(key, f"must be HOST:PORT (e.g. 127.0.0.1:8080), got {text!r}")
    return host.strip("[]"), int(port)


def _url(key: str, v: Any) -> str | None:
    if v is None or v == "":
        return None  # unset: the default applies (public_url: derived from listen)
    text = _str(key, v).rstrip("/")
    if not text.startswith(("http://", "https://")):
        raise ConfigError(key, "must be an absolute http(s) URL")
    return text


def default_public_url(host: str, port: int) -> str:
    """Where the service is reached when no ``public_url`` is set: its own listen address.

    Connect links and the OAuth redirect URI are built from it, so a service listening on
    another port than the default must not hand out links to 127.0.0.1:8080. A wildcard listen
    address is no address a browser can open; its loopback stands in for it.
    """
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    if ":" in host:
        host = f"[{host}]"  # an IPv6 literal in a URL
    return f"http://{host}:{port}"


def _redis_url(key: str, v: Any) -> str | None:
    text = _opt_str(key, v)
    if text is not None and not text.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(key, "must start with redis://, rediss:// or unix://")
    return text


def _prefix(key: str, v: Any) -> str:
    text = "/" + _str(key, v).strip("/")
    if text == "/":
        raise ConfigError(key, "must be a non-empty path such as /connections")
    return text


def _choice(*options: str) -> Callable[[str, Any], str]:
    def parse(key: str, v: Any) -> str:
        text = _str(key, v).strip().lower()
        if text not in options:
            raise ConfigError(key, f"must be one of {', '.join(options)}")
        return text

    return parse


def _log_level(key: str, v: Any) -> str:
    return _choice("debug", "info", "warning", "error")(key, v).upper()


# key -> (Settings attribute(s), parser). The TOML key and the env name (PROXY_ + upper) agree.
_PARSERS: dict[str, Callable[[str, Any], Any]] = {
    "listen": _listen,
    "data_dir": lambda k, v: Path(_str(k, v)),
    "redis_url": _redis_url,
    "redis_timeout_s": _float(0.001),
    "dev_mode": _bool,
    "master_key": _opt_str,
    "master_key_file": lambda k, v: Path(_str(k, v)) if _opt_str(k, v) else None,
    "master_key_file_group_readable": _bool,
    "admin_token": _opt_str,
    "public_url": _url,
    "egress_allow": _list,
    "trusted_networks": _networks,
    "connection_service_prefix": _prefix,
    "integrations_dirs": _paths,
    "credential_cache_ttl_s": _float(0.0),
    "service_quota_per_minute": _int(1),
    "audit_required": _bool,
    "audit_flush_interval_s": _float(0.01),
    "audit_buffer_max": _int(100),
    "audit_retention_days": _float(0.0),
    "ratelimit_fail_mode": _choice("open", "closed"),
    "upstream_connect_timeout_s": _float(0.001),
    "upstream_read_timeout_s": _float(0.001),
    "upstream_total_timeout_s": _float(0.001),
    "upstream_max_per_host": _int(1),
    "max_wait_ms_cap": _int(0),
    "jwt_hs256_secret": _opt_str,
    "jwt_public_key_files": _paths,
    "jwt_issuer": _opt_str,
    "jwt_audience": _opt_str,
    "jwt_tenant_claim": _str,
    "connect_session_ttl_s": _int(60),
    "proxy_only_tenants": _list,
    "log_level": _log_level,
    "log_format": lambda k, v: "auto" if v == "" else _choice("auto", "json", "text")(k, v),
    "workers": _int(1),
    "max_connections": _int(1),
    "connection_reserve": _int(0),
    "head_timeout_s": _float(0.01),
    "envelope_max_response_bytes": _int(1024),
    "envelope_max_concurrent": _int(1),
    "ca_cert_file": _opt_path,
    "ca_key_file": _opt_path,
    "upstream_ca_file": _opt_path,
}


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """TOML tables flatten to underscore keys: [upstream] connect_timeout_s -> upstream_connect_timeout_s."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, f"{name}_"))
        else:
            out[name] = v
    return out


def load_settings(
    config_file: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build the settings: defaults < TOML file < PROXY_* environment < explicit overrides."""
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    path = config_file or env.get("PROXY_CONFIG")
    if path:
        try:
            with open(path, "rb") as fh:
                raw.update(_flatten(tomllib.load(fh)))
        except FileNotFoundError:
            raise ConfigError("config", f"file {str(path)!r} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("config", f"{path} is not valid TOML: {exc}") from None
        unknown = sorted(set(raw) - set(_PARSERS))
        if unknown:
            raise ConfigError(unknown[0], f"unknown setting in {path}; known: {', '.join(_PARSERS)}")
    for key in _PARSERS:
        name = f"PROXY_{key.upper()}"
        if name in env:
            raw[key] = env[name]
    raw.update(dict(overrides or {}))

    values: dict[str, Any] = {}
    for key, v in raw.items():
        parsed = _PARSERS[key](key, v)
        if key == "listen":
            values["listen_host"], values["listen_port"] = parsed
        elif parsed is None and key == "public_url":
            continue
        else:
            values[key] = parsed
    if "public_url" not in values:
        defaults = Settings()
        values["public_url"] = default_public_url(
            values.get("listen_host", defaults.listen_host), values.get("listen_port", defaults.listen_port)
        )
    settings = Settings(**values)
    _cross_check(settings)
    return settings


def _cross_check(s: Settings) -> None:
    if s.master_key and s.master_key_file:
        raise ConfigError("master_key", "set either master_key or master_key_file, not both")
    if not s.dev_mode and not (s.master_key or s.master_key_file):
        raise ConfigError(
            "master_key",
            "dev_mode is off and no master key is configured: set PROXY_MASTER_KEY or "
            "PROXY_MASTER_KEY_FILE (32 random bytes, base64), e.g. from `connection-proxy keys generate`",
        )
    if not s.dev_mode and not s.admin_token:
        raise ConfigError("admin_token", "dev_mode is off and PROXY_ADMIN_TOKEN is not set")
    if s.admin_token is not None and len(s.admin_token) < 16:
        raise ConfigError("admin_token", "must be at least 16 characters")
    if s.upstream_connect_timeout_s > s.upstream_total_timeout_s:
        raise ConfigError("upstream_connect_timeout_s", "must not exceed upstream_total_timeout_s")
