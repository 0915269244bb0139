"""``PROXY_REDIS_URL`` parsed once into what the Redis clients need, checked at start-up.

Pure (imports no redis): ``proxy.settings`` validates the URL with it, so a bad Cluster or
Sentinel URL stops start-up naming ``redis_url`` instead of failing at the first command.

Forms (``rediss`` in place of ``redis`` means TLS to the data nodes, and to the sentinels)::

    redis://[USER:PASS@]HOST:PORT[/DB][?redis-py options]    one server (redis-py parses it)
    unix://[USER:PASS@]/path/to/socket[?db=N]
    redis+cluster://[USER:PASS@]HOST:PORT[,HOST:PORT...][?opts]
    redis+sentinel://[USER:PASS@]HOST:PORT[,HOST:PORT...]/SERVICE[/DB][?opts]

- Cluster: the listed nodes are only where discovery starts; every master is learned from
  ``CLUSTER SLOTS``. A Cluster has database 0 only, so a path other than ``/`` or ``/0`` is refused.
- Sentinel: the nodes are sentinels; SERVICE is the monitored master's name. USER:PASS
  authenticate to the master (and its replicas), not to the sentinels: sentinels that require
  auth take ``sentinel_username`` / ``sentinel_password`` in the query.
- Cluster and Sentinel options: ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``,
  ``ssl_cert_reqs`` (``required`` | ``none``), ``ssl_check_hostname`` (``true`` | ``false``).
  Unknown options are refused (a typo must not silently turn verification off).
- Any form: ``wait_replicas=N`` (with ``wait_timeout_ms``, default 500) makes every store write
  wait until N replicas hold it (Redis ``WAIT``) before it counts as done; a write that N replicas
  did not confirm raises ``StoreUnavailable``. Not for Cluster (see the README's scale-out part).

Percent-escapes in USER, PASS, SERVICE and option values are decoded. The URL may carry a
password: nothing here puts it into a message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, Literal
from urllib.parse import parse_qsl, unquote, urlsplit

from proxy.errors import ConfigError

Kind = Literal["single", "cluster", "sentinel"]

_KEY: Final = "redis_url"
_SCHEMES: Final[dict[str, tuple[Kind, bool]]] = {
    "redis": ("single", False),
    "rediss": ("single", True),
    "unix": ("single", False),
    "redis+cluster": ("cluster", False),
    "rediss+cluster": ("cluster", True),
    "redis+sentinel": ("sentinel", False),
    "rediss+sentinel": ("sentinel", True),
}
_DEFAULT_PORT: Final[dict[Kind, int]] = {"single": 6379, "cluster": 6379, "sentinel": 26379}
_TLS_OPTIONS: Final = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname")
_SENTINEL_OPTIONS: Final = ("sentinel_username", "sentinel_password")
_WAIT_OPTIONS: Final = ("wait_replicas", "wait_timeout_ms")


@dataclass(frozen=True)
class RedisTarget:
    """Where Redis is and how to talk to it. ``url`` is the original (single-server form only)."""

    kind: Kind
    url: str = field(repr=False)
    tls: bool = False
    nodes: tuple[tuple[str, int], ...] = ()
    service: str | None = None
    db: int = 0
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    sentinel_username: str | None = field(default=None, repr=False)
    sentinel_password: str | None = field(default=None, repr=False)
    tls_options: tuple[tuple[str, str | bool], ...] = ()
    wait_replicas: int = 0
    wait_timeout_ms: int = 500


def parse_redis_url(url: str) -> RedisTarget:
    """The parsed URL; ``ConfigError('redis_url', ...)`` saying what is wrong (never echoing it)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in _SCHEMES:
        raise ConfigError(
            _KEY,
            "must start with redis://, rediss://, unix://, redis+cluster://, rediss+cluster://, "
            "redis+sentinel:// or rediss+sentinel://",
        )
    kind, tls = _SCHEMES[scheme.lower()]
    rest, _, fragment = rest.partition("#")
    rest, _, query = rest.partition("?")
    options = _query(query)
    wait_replicas = _int_option(options, "wait_replicas", 0, 0, 16)
    wait_timeout_ms = _int_option(options, "wait_timeout_ms", 500, 1, 60_000)
    if wait_replicas and kind == "cluster":
        raise ConfigError(_KEY, "wait_replicas is not supported with redis+cluster:// (see the README)")
    if kind == "single":
        # redis-py parses the single-server form; the WAIT options are ours, so they are cut out.
        passthrough = "&".join(p for p in query.split("&") if p and p.split("=")[0] not in _WAIT_OPTIONS)
        clean = f"{scheme}://{rest}" + (f"?{passthrough}" if passthrough else "")
        _check_single(clean, scheme)
        return RedisTarget("single", clean, tls, wait_replicas=wait_replicas, wait_timeout_ms=wait_timeout_ms)
    allowed = {*_TLS_OPTIONS, *_WAIT_OPTIONS, *(_SENTINEL_OPTIONS if kind == "sentinel" else ())}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ConfigError(
            _KEY, f"unknown option(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}"
        )
    if any(k.startswith("ssl_") for k in options) and not tls:
        raise ConfigError(_KEY, "ssl_* options need a rediss+ scheme")
    userinfo, at, hostpart = rest.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
        if password is None:  # redis://secret@host means a password, as redis-py reads it
            username, password = None, unquote(user) or None
    hosts, slash, path = hostpart.partition("/")
    nodes = tuple(_node(text, _DEFAULT_PORT[kind]) for text in hosts.split(","))
    service, db = None, 0
    parts = [unquote(p) for p in path.split("/")] if slash else []
    while parts and parts[-1] == "":
        parts.pop()
    if kind == "cluster":
        if parts not in ([], ["0"]):
            raise ConfigError(_KEY, "a Redis Cluster has database 0 only: drop the /DB path")
    else:
        if not parts or not parts[0]:
            raise ConfigError(_KEY, "redis+sentinel:// needs the master's service name: .../SERVICE_NAME")
        if len(parts) > 2 or (len(parts) == 2 and not (parts[1].isascii() and parts[1].isdigit())):
            raise ConfigError(_KEY, "the sentinel path is /SERVICE_NAME or /SERVICE_NAME/DB (DB a number)")
        service, db = parts[0], int(parts[1]) if len(parts) == 2 else 0
    del fragment  # a fragment carries nothing for Redis
    return RedisTarget(
        kind,
        url,
        tls,
        nodes,
        service,
        db,
        username,
        password,
        options.get("sentinel_username"),
        options.get("sentinel_password"),
        tuple(_tls_option(k, options[k]) for k in _TLS_OPTIONS if k in options),
        wait_replicas,
        wait_timeout_ms,
    )


def _query(query: str) -> dict[str, str]:
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise ConfigError(_KEY, "the query string is malformed (expected name=value&...)") from None
    options: dict[str, str] = {}
    for k, v in pairs:
        if k in options:
            raise ConfigError(_KEY, f"option {k} is given twice")
        options[k] = v
    return options


def _int_option(options: dict[str, str], name: str, default: int, lo: int, hi: int) -> int:
    text = options.get(name)
    if text is None:
        return default
    if not (text.isascii() and text.isdigit()) or not lo <= int(text) <= hi:
        raise ConfigError(_KEY, f"{name} must be a whole number from {lo} to {hi}")
    return int(text)


def _tls_option(name: str, value: str) -> tuple[str, str | bool]:
    if name == "ssl_check_hostname":
        if value.lower() not in ("true", "false"):
            raise ConfigError(_KEY, "ssl_check_hostname must be true or false")
        return name, value.lower() == "true"
    if name == "ssl_cert_reqs" and value.lower() not in ("required", "none"):
        raise ConfigError(_KEY, "ssl_cert_reqs must be required or none")
    return name, value


def _node(text: str, default_port: int) -> tuple[str, int]:
    """``host[:port]`` or ``[v6]:port``; the port defaults to the form's usual one."""
    text = text.strip()
    if text.startswith("["):
        host, bracket, tail = text[1:].partition("]")
        if not bracket or (tail and not tail.startswith(":")):
            raise ConfigError(_KEY, "an IPv6 node is written [ADDRESS]:PORT")
        port_text = tail[1:]
    else:
        host, _, port_text = text.partition(":")
    if not host:
        raise ConfigError(_KEY, "every node needs a host: HOST:PORT[,HOST:PORT...]")
    if not port_text:
        return host, default_port
    if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
        raise ConfigError(_KEY, "a node's port must be a number from 1 to 65535")
    return host, int(port_text)


def _check_single(url: str, scheme: str) -> None:
    """Refuse a single-server URL redis-py would fail on at connect time with a message quoting
    part of it (an unescaped '#', '/' or '?' in a password ends up read as the port or the db)."""
    bad = ConfigError(
        _KEY,
        "is not a valid Redis URL: check host, port and db, and percent-encode '#', '/', '?' and '@' in the password",
    )
    try:
        parts = urlsplit(url)
        _ = parts.port
    except ValueError:
        raise bad from None
    db = parts.path.strip("/")
    if parts.fragment or (scheme != "unix" and db and not (db.isascii() and db.isdigit())):
        raise bad
