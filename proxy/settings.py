"""One frozen, validated settings object for the whole service.

Settings come from an optional TOML file and from ``PROXY_*`` environment variables, the
environment winning. Every value is validated here, once, at start-up; a bad value raises
``ConfigError`` naming the key, so the process stops before it listens. Nothing else in the
service reads the environment; an unknown ``PROXY_*`` variable is refused like an unknown TOML
key (the command line's own variables are listed once, in ``CLI_VARIABLES``).

A new setting is a field of ``Settings`` with a docstring under it (its description in the
configuration reference) and a parser in ``_PARSERS``; then ``make docs`` regenerates
``docs/configuration.md`` (``tests/test_configref.py`` fails until it is current).
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxy import settings_values as sv
from proxy.errors import ConfigError
from proxy.settings_values import IPNetwork, default_public_url


@dataclass(frozen=True, slots=True)
class Settings:
    """Every setting, with its default. The string under each field is its description in the
    configuration reference (``docs/configuration.md``, made by ``make docs``), which a test
    keeps current: a field without one fails it."""

    listen_host: str = "127.0.0.1"
    """Where to listen, as HOST:PORT (the ``--listen`` option of ``serve`` wins)."""
    listen_port: int = 8080
    data_dir: Path = Path("./var")
    """Folder of the embedded SQLite store and, in dev mode only, the generated master key,
    admin token and CA."""
    redis_url: str | None = field(default=None, repr=False)  # may carry a password
    """When set, shared state (connections, rate-limit state, locks, audit) lives in this Redis
    instead of the embedded store; every replica must point at the same one. One server
    (``redis://``, ``rediss://``, ``unix://``), a Cluster (``redis+cluster://H:P[,H:P...]``) or
    Sentinel (``redis+sentinel://H:P[,H:P...]/SERVICE``); ``?wait_replicas=N`` for writes
    that survive a failover (README, "Redis: one server, Cluster or Sentinel")."""
    redis_timeout_s: float = 0.25
    """Timeout of one Redis command (store and rate limiter)."""
    dev_mode: bool = True
    """With no master key configured, generate one (and an admin token and a CA) into
    ``data_dir``. Production sets it false, so a missing key stops start-up instead."""
    master_key: str | None = field(default=None, repr=False)
    """The master key ring inline (``VERSION:BASE64`` entries, comma-separated; one bare key
    is version 1). Cannot change while the process runs: prefer ``master_key_file``."""
    master_key_file: Path | None = None
    """File holding the master key ring (lines of ``VERSION:BASE64``, mode 0600), re-read on
    SIGHUP; made by ``connection-proxy keys generate``."""
    master_key_file_group_readable: bool = False
    """Accept a key file readable by its group (never by others): Kubernetes secret volumes
    with an ``fsGroup`` are mode 0440."""
    admin_token: str | None = field(default=None, repr=False)
    """Bearer token of the admin API (at least 16 characters). Dev mode generates one into
    ``data_dir`` when unset."""
    public_url: str = "http://127.0.0.1:8080"
    """The service's external base URL: connect-page links and the OAuth redirect URI
    ``{public_url}/oauth/callback``. Unset: ``http://`` + listen (a wildcard host becoming
    loopback), right for dev mode only."""
    egress_allow: tuple[str, ...] = ()
    """Hosts or CIDRs the egress guard lets through although private or loopback (e.g.
    ``127.0.0.1/32``); credentials travel over plain http only to these."""
    trusted_networks: tuple[IPNetwork, ...] = ()
    """CIDRs whose callers may use the Connection Service and the Runtara envelope without an
    auth header (Runtara sends none). Empty: every caller authenticates."""
    connection_service_prefix: str = "/connections"
    """Where the Runtara Connection Service is mounted
    (``RUNTARA_CONNECTION_SERVICE_URL=http://HOST:8080/connections``)."""
    integrations_dirs: tuple[Path, ...] = ()
    """Extra directories of integration files (``*.toml``, like the built-ins in
    ``proxy/builtin_integrations/``)."""
    credential_cache_ttl_s: float = 5.0
    """How long decrypted credentials stay cached in memory; admin changes invalidate them at
    once (other replicas within a second, via Redis pub/sub)."""
    stale_if_error_s: float = 300.0
    """While the store is unreachable, cached credentials, caller keys and resolutions keep serving
    this long after their last successful load (stale-if-error; see the README); 0 disables."""
    service_quota_per_minute: int = 6000
    """The Connection Service's own quota per caller, in requests per minute (beyond: 429)."""
    audit_required: bool = False
    """A credential leaves the Connection Service only once its release is durably recorded."""
    audit_flush_interval_s: float = 0.5
    """How often the aggregated audit buffer is written to the store."""
    audit_buffer_max: int = 10000
    """Audit events held in memory between flushes; beyond it events are dropped (and counted)."""
    audit_retention_days: float = 90.0
    """Audit events older than this are deleted (hourly); 0 keeps the trail forever."""
    ratelimit_fail_mode: str = "open"
    """When Redis fails: ``open`` falls back to an in-process limiter, ``closed`` answers 503."""
    upstream_connect_timeout_s: float = 5.0
    """Timeout of connecting to an upstream (a connection's ``options.timeouts`` may lower it)."""
    upstream_read_timeout_s: float = 60.0
    """Longest pause while reading an upstream's answer."""
    upstream_total_timeout_s: float = 300.0
    """Longest a whole upstream call may take."""
    upstream_max_per_host: int = 256
    """Concurrent calls per upstream host and process; beyond it callers get a fast 503."""
    max_wait_ms_cap: int = 30000
    """The longest a caller may ask the proxy to wait for a rate limit (``X-Proxy-Max-Wait-Ms``)."""
    jwt_hs256_secret: str | None = field(default=None, repr=False)
    """Shared secret of HS256 caller JWTs (unset: HS256 JWTs are refused)."""
    jwt_public_key_files: tuple[Path, ...] = ()
    """PEM public keys of RS256/ES256/EdDSA caller JWTs."""
    jwt_issuer: str | None = None
    """When set, caller JWTs must carry this ``iss``."""
    jwt_audience: str | None = None
    """When set, caller JWTs must carry this ``aud``."""
    jwt_tenant_claim: str = "tenant_id"
    """The JWT claim naming the caller's tenant."""
    connect_session_ttl_s: int = 3600
    """How long a connect link stays valid."""
    proxy_only_tenants: tuple[str, ...] = ()
    """Tenants whose connections never release secrets through the Connection Service (only
    their non-secret parameters); the proxy injects them instead."""
    log_level: str = "INFO"
    """``debug``, ``info``, ``warning`` (turns off the access lines) or ``error``."""
    log_format: str = "auto"
    """``json``, ``text`` or ``auto``: JSON when stderr is not a terminal (systemd, containers)."""
    workers: int = 1
    """Processes of ``serve`` sharing the port (SO_REUSEPORT), at least 1 (the ``--workers``
    option wins). With more than one, set ``redis_url`` so rate limits are shared."""
    max_connections: int = 1024
    """Client connections one process serves at once."""
    connection_reserve: int = 16
    """Connections accepted beyond ``max_connections`` only to answer ``/healthz``; the rest
    are closed at once."""
    head_timeout_s: float = 10.0
    """A connection that has not sent a complete request head this long after connecting (or
    after the first byte of its next head) is closed (slowloris)."""
    max_request_body_bytes: int = 10 * 1024 * 1024
    """The largest request body the admin API, the Connection Service and the connect pages
    read (beyond: 413). Path and forward mode stream bodies and are not bound by it."""
    envelope_max_request_bytes: int = 32 * 1024 * 1024
    """The largest request body the Runtara envelope carries (before base64; beyond: 413)."""
    envelope_max_response_bytes: int = 10 * 1024 * 1024
    """The largest upstream answer the envelope buffers to wrap it in JSON (beyond: 502
    ``UPSTREAM_RESPONSE_TOO_LARGE``; path mode streams any size)."""
    envelope_max_concurrent: int = 8
    """Envelope calls running at once per process (beyond: 503 with ``Retry-After: 1``)."""
    ca_cert_file: Path | None = None
    """CONNECT interception CA certificate(s), PEM; may hold older CA certificates too (the
    rotation overlap: all are exported). Unset in dev mode: generated into ``data_dir``."""
    ca_key_file: Path | None = None
    """The CA's private key (EC, PEM) that signs the leaves for tunnelled hosts."""
    upstream_ca_file: Path | None = None
    """Extra CA bundle the service trusts for its own upstream TLS, beside the system roots."""
    listen_tls_cert_file: Path | None = None
    """The listener over TLS (``https://`` proxy URLs): its certificate chain, PEM, from your
    PKI; with ``listen_tls_key_file``. Re-read on SIGHUP. Unset (and no
    ``listen_tls_hostnames``): plain HTTP."""
    listen_tls_key_file: Path | None = None
    """The private key (PEM, unencrypted) of ``listen_tls_cert_file``."""
    listen_tls_hostnames: tuple[str, ...] = ()
    """Instead of files: mint the listener's certificates from the CA (``ca_cert_file``, or dev
    mode's) for these host names or IPs, chosen by SNI; the first when a client sends none."""
    decision_token: str | None = field(default=None, repr=False)
    """nginx in front: the shared secret nginx sends to ``/_decide`` (at least 32 characters),
    which answers credentials to its holder only. Unset: the decision endpoint is off."""
    decision_listen: str | None = None
    """Where a lean listener serves only ``/_decide`` for nginx (``HOST:PORT``, or
    ``unix:/path`` for a unix socket); the generated nginx config then asks it there, without the
    main listener's routing and middleware. Unset: ``/_decide`` on the main listener only."""
    nginx_inject_headers: tuple[str, ...] = ()
    """Header names your own integrations inject credentials into, beyond the catalogue's, that
    the generated nginx config can set (other names take the service route)."""
    nginx_decision_cache_s: int = 1
    """Seconds nginx may reuse a safe decision (no window, nothing learned, bounded by the
    in-process caches); 0: every call is decided, and the generated config has no cache."""
    # /dev/shm is world-writable: nginx-config warns about a directory another user made, and
    # README says to create it 0700 for nginx's user before nginx starts.
    nginx_decision_cache_dir: Path = Path("/dev/shm/connection-proxy-nginx")  # noqa: S108
    """Absolute directory of nginx's decision cache. Its files hold injected credentials and
    caller keys in plain text: keep it on a memory-backed filesystem (tmpfs, ramfs), never on
    persistent disk, owned by nginx's user, mode 0700; ``nginx-config`` warns when it can see
    otherwise."""
    nginx_report_listen: tuple[str, int] | None = None
    """UDP HOST:PORT where nginx reports responses (syslog) for the limiter and the audit;
    unset: no reports."""
    nginx_report: str = "signals"
    """Which responses nginx reports: ``signals`` (rate-limit headers or a 4xx/5xx: what the
    limiter learns from) or ``all`` (every response: an audited outcome per call, more CPU)."""
    nginx_network_ok: bool = False
    """Let ``decision_listen`` and ``nginx_report_listen`` use a non-loopback address. Decisions
    (which carry credentials) and reports then cross the network in clear: only on a private
    network between nginx and this service. False: loopback addresses or unix sockets only."""

    @property
    def listen_tls(self) -> bool:
        return self.listen_tls_cert_file is not None or bool(self.listen_tls_hostnames)

    @property
    def listen(self) -> str:
        return f"{self.listen_host}:{self.listen_port}"

    @property
    def store_path(self) -> Path:
        return self.data_dir / "proxy.sqlite3"


# key -> parser. The TOML key and the env name (PROXY_ + upper) agree; each key is the Settings
# field of that name, except these, which set several fields.
COMPOSITE_KEYS: dict[str, tuple[str, ...]] = {"listen": ("listen_host", "listen_port")}
_PARSERS: dict[str, Callable[[str, Any], Any]] = {
    "listen": sv.listen,
    "data_dir": lambda k, v: Path(sv.string(k, v)),
    "redis_url": sv.redis_url,
    "redis_timeout_s": sv.floating(0.001),
    "dev_mode": sv.boolean,
    "master_key": sv.opt_string,
    "master_key_file": lambda k, v: Path(sv.string(k, v)) if sv.opt_string(k, v) else None,
    "master_key_file_group_readable": sv.boolean,
    "admin_token": sv.opt_string,
    "public_url": sv.url,
    "egress_allow": sv.str_list,
    "trusted_networks": sv.networks,
    "connection_service_prefix": sv.prefix,
    "integrations_dirs": sv.paths,
    "credential_cache_ttl_s": sv.floating(0.0),
    "stale_if_error_s": sv.floating(0.0),
    "service_quota_per_minute": sv.integer(1),
    "audit_required": sv.boolean,
    "audit_flush_interval_s": sv.floating(0.01),
    "audit_buffer_max": sv.integer(100),
    "audit_retention_days": sv.floating(0.0),
    "ratelimit_fail_mode": sv.choice("open", "closed"),
    "upstream_connect_timeout_s": sv.floating(0.001),
    "upstream_read_timeout_s": sv.floating(0.001),
    "upstream_total_timeout_s": sv.floating(0.001),
    "upstream_max_per_host": sv.integer(1),
    "max_wait_ms_cap": sv.integer(0),
    "jwt_hs256_secret": sv.opt_string,
    "jwt_public_key_files": sv.paths,
    "jwt_issuer": sv.opt_string,
    "jwt_audience": sv.opt_string,
    "jwt_tenant_claim": sv.string,
    "connect_session_ttl_s": sv.integer(60),
    "proxy_only_tenants": sv.str_list,
    "log_level": sv.Choice("debug", "info", "warning", "error", upper=True),
    "log_format": sv.Choice("auto", "json", "text", blank="auto"),
    "workers": sv.integer(1),
    "max_connections": sv.integer(1),
    "connection_reserve": sv.integer(0),
    "head_timeout_s": sv.floating(0.01),
    "max_request_body_bytes": sv.integer(1024),
    "envelope_max_request_bytes": sv.integer(1024),
    "envelope_max_response_bytes": sv.integer(1024),
    "envelope_max_concurrent": sv.integer(1),
    "ca_cert_file": sv.opt_path,
    "ca_key_file": sv.opt_path,
    "upstream_ca_file": sv.opt_path,
    "listen_tls_cert_file": sv.opt_path,
    "listen_tls_key_file": sv.opt_path,
    "listen_tls_hostnames": lambda k, v: tuple(h.lower().rstrip(".") for h in sv.str_list(k, v)),
    "decision_token": sv.opt_string,
    "decision_listen": lambda k, v: sv.listen_or_unix(k, v) if sv.opt_string(k, v) else None,
    "nginx_inject_headers": sv.str_list,
    "nginx_decision_cache_s": sv.integer(0),
    "nginx_report_listen": lambda k, v: sv.listen(k, v) if sv.opt_string(k, v) else None,
    "nginx_report": sv.choice("signals", "all"),
    "nginx_decision_cache_dir": sv.absolute_path,
    "nginx_network_ok": sv.boolean,
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
            raise ConfigError(
                unknown[0],
                f"unknown setting in {path}{_closest(unknown[0], _PARSERS)}; known: {', '.join(_PARSERS)}",
            )
    check_environment(env)
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
        tls = values.get("listen_tls_cert_file") is not None or bool(values.get("listen_tls_hostnames"))
        values["public_url"] = default_public_url(
            values.get("listen_host", defaults.listen_host),
            values.get("listen_port", defaults.listen_port),
            "https" if tls else "http",
        )
    settings = Settings(**values)
    _cross_check(settings)
    return settings


# PROXY_* variables that are not settings: read by the command line, never by the service's
# settings. Together with PROXY_<KEY> for every key above they are every PROXY_* variable there
# is; any other one is refused at start (a typo such as PROXY_DEV_MOD must not be ignored).
CLI_VARIABLES: dict[str, str] = {
    "PROXY_CONFIG": "the TOML settings file, when no --config option is given",
    "PROXY_CALLER_KEY": "`connection-proxy run`: the caller credential (tenant API key or JWT)",
    "PROXY_URL": "`connection-proxy admin`: the service's base URL (before PROXY_PUBLIC_URL and PROXY_LISTEN)",
    "PROXY_WORKER_CHILD": "internal: set by `serve --workers N` in the environment of its worker processes",
}


def env_name(key: str) -> str:
    return f"PROXY_{key.upper()}"


def known_variables() -> list[str]:
    return [env_name(k) for k in _PARSERS] + list(CLI_VARIABLES)


def _closest(name: str, known: Iterable[str]) -> str:
    match = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean {match[0]}?)" if match else ""


def check_environment(env: Mapping[str, str]) -> None:
    known = known_variables()
    for name in sorted(env):
        if name.startswith("PROXY_") and name not in known:
            raise ConfigError(
                name,
                f"unknown environment variable{_closest(name, known)}; every PROXY_* variable must "
                "be a setting (docs/configuration.md lists them) or one the command line reads "
                f"({', '.join(CLI_VARIABLES)}): unset it or fix its name",
            )


_TOKEN_CHARS = re.compile(r"[A-Za-z0-9._~+/=-]+")


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
    if (s.listen_tls_cert_file is None) != (s.listen_tls_key_file is None):
        raise ConfigError(
            "listen_tls_cert_file", "set both listen_tls_cert_file and listen_tls_key_file, or neither"
        )
    if s.listen_tls_cert_file is not None and s.listen_tls_hostnames:
        raise ConfigError(
            "listen_tls_hostnames",
            "set either listen_tls_cert_file/listen_tls_key_file (a certificate you provide) or "
            "listen_tls_hostnames (minted from the CA), not both",
        )
    if s.decision_token is not None and len(s.decision_token) < 32:
        raise ConfigError("decision_token", "must be at least 32 characters (e.g. 32 random bytes, base64)")
    # The token is written into the generated nginx config: '$', '"', ';' or '\\' would be expanded
    # or end the directive there.
    if s.decision_token is not None and not _TOKEN_CHARS.fullmatch(s.decision_token):
        raise ConfigError("decision_token", "may hold only letters, digits and . _ ~ + / = - (base64 or hex)")
    if s.decision_listen is not None and s.decision_listen.startswith("unix:") and s.workers > 1:
        raise ConfigError("decision_listen", "a unix socket serves one process: use HOST:PORT with --workers")
    if not s.nginx_network_ok:
        _loopback_only("decision_listen", s.decision_listen, "decisions carry credentials")
        report = s.nginx_report_listen
        _loopback_only("nginx_report_listen", report and f"{report[0]}:{report[1]}", "reports")
    if s.upstream_connect_timeout_s > s.upstream_total_timeout_s:
        raise ConfigError("upstream_connect_timeout_s", "must not exceed upstream_total_timeout_s")


def _loopback_only(key: str, where: str | None, what: str) -> None:
    """nginx <-> service traffic is plain text: a non-loopback address needs ``nginx_network_ok``."""
    if where is None or where.startswith("unix:"):
        return
    host = where.rpartition(":")[0].strip("[]")
    if host.lower() != "localhost" and not sv.is_loopback(host):
        raise ConfigError(
            key,
            f"{host!r} is not a loopback address, and {what} in clear text: use 127.0.0.1, ::1 or "
            "unix:/path with nginx on this machine, or set nginx_network_ok = true "
            "(PROXY_NGINX_NETWORK_OK) when a private network joins nginx and this service",
        )
