"""How one setting's raw value (a TOML value or an environment string) becomes a typed value.

Each parser takes the setting's key and the raw value and returns the typed value or raises
``ConfigError`` naming that key, so every message says which setting to fix. Number and choice
parsers are small classes rather than closures because the configuration reference
(``proxy.configref``) reads their bounds and options to document them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from pathlib import Path
from typing import Any

from proxy.errors import ConfigError
from proxy.redisurl import parse_redis_url

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def string(key: str, v: Any) -> str:
    if not isinstance(v, str):
        raise ConfigError(key, "must be a string")
    return v


def opt_string(key: str, v: Any) -> str | None:
    if v is None or v == "":
        return None
    return string(key, v)


def boolean(key: str, v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in {"1", "true", "yes", "on"}:
        return True
    if isinstance(v, str) and v.strip().lower() in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(key, "must be true or false")


def number(key: str, v: Any, kind: type, minimum: float) -> Any:
    if isinstance(v, bool):
        raise ConfigError(key, f"must be a number >= {minimum}")
    try:
        n = kind(v)
    except (TypeError, ValueError):
        raise ConfigError(key, f"must be a number >= {minimum}, got {v!r}") from None
    if n < minimum:
        raise ConfigError(key, f"must be >= {minimum}, got {n}")
    return n


class Number:
    """A number parser that also tells the configuration reference its bound."""

    def __init__(self, kind: type[int] | type[float], minimum: float) -> None:
        self.kind, self.minimum = kind, minimum
        self.constraint = f">= {minimum}"

    def __call__(self, key: str, v: Any) -> Any:
        return self.kind(number(key, v, self.kind, self.minimum))


def integer(minimum: int) -> Callable[[str, Any], int]:
    return Number(int, minimum)


def floating(minimum: float) -> Callable[[str, Any], float]:
    return Number(float, minimum)


def str_list(key: str, v: Any) -> tuple[str, ...]:
    if isinstance(v, str):
        return tuple(p.strip() for p in v.split(",") if p.strip())
    if isinstance(v, list) and all(isinstance(p, str) for p in v):
        return tuple(p.strip() for p in v if p.strip())
    raise ConfigError(key, "must be a list of strings or a comma-separated string")


def opt_path(key: str, v: Any) -> Path | None:
    return Path(string(key, v)) if opt_string(key, v) else None


def absolute_path(key: str, v: Any) -> Path:
    text = string(key, v).strip()
    if not text.startswith("/"):
        raise ConfigError(key, f"must be an absolute path (starting with /), got {text!r}")
    return Path(text)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback IP literal (names and wildcards are not)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def paths(key: str, v: Any) -> tuple[Path, ...]:
    return tuple(Path(p) for p in str_list(key, v))


def networks(key: str, v: Any) -> tuple[IPNetwork, ...]:
    out = []
    for item in str_list(key, v):
        try:
            out.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ConfigError(key, f"{item!r} is not an IP network (use CIDR, e.g. 10.0.0.0/8)") from None
    return tuple(out)


def listen(key: str, v: Any) -> tuple[str, int]:
    text = string(key, v).strip()
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(key, f"must be HOST:PORT (e.g. 127.0.0.1:8080), got {text!r}")
    return host.strip("[]"), int(port)


def listen_or_unix(key: str, v: Any) -> str:
    """``HOST:PORT`` (normalised, IPv6 in brackets) or ``unix:/absolute/path``."""
    text = string(key, v).strip()
    if text.startswith("unix:"):
        if not text[5:].startswith("/"):
            raise ConfigError(key, f"a unix socket is unix:/absolute/path, got {text!r}")
        return text
    host, port = listen(key, text)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def url(key: str, v: Any) -> str | None:
    if v is None or v == "":
        return None  # unset: the default applies (public_url: derived from listen)
    text = string(key, v).rstrip("/")
    if not text.startswith(("http://", "https://")):
        raise ConfigError(key, "must be an absolute http(s) URL")
    return text


def default_public_url(host: str, port: int, scheme: str = "http") -> str:
    """Where the service is reached when no ``public_url`` is set: its own listen address.

    Connect links and the OAuth redirect URI are built from it, so a service listening on
    another port than the default must not hand out links to 127.0.0.1:8080. A wildcard listen
    address is no address a browser can open; its loopback stands in for it.
    """
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    if ":" in host:
        host = f"[{host}]"  # an IPv6 literal in a URL
    return f"{scheme}://{host}:{port}"


def redis_url(key: str, v: Any) -> str | None:
    text = opt_string(key, v)
    if text is not None:
        parse_redis_url(text)  # one server, redis+cluster:// or redis+sentinel:// (proxy.redisurl)
    return text


def prefix(key: str, v: Any) -> str:
    text = "/" + string(key, v).strip("/")
    if text == "/":
        raise ConfigError(key, "must be a non-empty path such as /connections")
    return text


class Choice:
    """A parser of one of a few words (case-insensitive); the reference lists them."""

    def __init__(self, *options: str, upper: bool = False, blank: str | None = None) -> None:
        self.options, self.upper, self.blank = options, upper, blank
        self.constraint = "one of " + ", ".join(options)

    def __call__(self, key: str, v: Any) -> str:
        if v == "" and self.blank is not None:
            return self.blank
        text = string(key, v).strip().lower()
        if text not in self.options:
            raise ConfigError(key, f"must be one of {', '.join(self.options)}")
        return text.upper() if self.upper else text


def choice(*options: str) -> Callable[[str, Any], str]:
    return Choice(*options)
