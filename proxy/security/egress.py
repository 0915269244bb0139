"""The egress guard: which upstream addresses the proxy may connect to.

The proxy makes outbound calls to URLs that tenants configure, so without a guard a connection's
``base_url`` could point at the proxy's own loopback services, the cloud metadata endpoint or the
private network behind it (SSRF). This module decides, without any I/O, whether an address is
public and whether the operator's allow-list (``PROXY_EGRESS_ALLOW``) lets a non-public one
through. It is applied twice: to IP literals in the URL (``check_literal``, because aiohttp does
not resolve literals) and to every address DNS returns (``check_resolved``, see
``proxy.pipeline.upstream.resolver``), so DNS rebinding cannot slip past.

It also holds ``host_matches`` for a connection's own ``allowed_hosts`` patterns, so that host
normalisation (case, trailing dot, IDNA, ports) is done one way in one place.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TypeAlias

from proxy.errors import ConfigError, HostNotAllowed

try:  # the encoder yarl uses, so we match the very name aiohttp will connect to
    import idna as _idna
except ImportError:  # pragma: no cover - idna ships with yarl, a dependency of aiohttp
    _idna = None  # type: ignore[assignment]

__all__ = [
    "EgressPolicy",
    "IPAddress",
    "classify_address",
    "host_matches",
    "normalize_host",
    "parse_ip_literal",
]

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address

_N4 = ipaddress.IPv4Network
_N6 = ipaddress.IPv6Network

# Ordered: the first match names the reason, so specific ranges come before the ranges that
# contain them (the metadata address before link-local, broadcast before reserved).
_V4_TABLE: tuple[tuple[ipaddress.IPv4Network, str], ...] = (
    (_N4("169.254.169.254/32"), "cloud-metadata"),
    (_N4("0.0.0.0/8"), "unspecified"),  # Linux connects 0.0.0.0 to the local host
    (_N4("127.0.0.0/8"), "loopback"),
    (_N4("10.0.0.0/8"), "private"),
    (_N4("172.16.0.0/12"), "private"),
    (_N4("192.168.0.0/16"), "private"),
    (_N4("169.254.0.0/16"), "link-local"),
    (_N4("100.64.0.0/10"), "cgnat"),
    (_N4("224.0.0.0/4"), "multicast"),
    (_N4("255.255.255.255/32"), "broadcast"),
    (_N4("240.0.0.0/4"), "reserved"),
    (_N4("198.18.0.0/15"), "benchmark"),
    (_N4("192.0.2.0/24"), "documentation"),
    (_N4("198.51.100.0/24"), "documentation"),
    (_N4("203.0.113.0/24"), "documentation"),
    (_N4("192.0.0.0/24"), "reserved"),
    (_N4("192.88.99.0/24"), "reserved"),  # deprecated 6to4 relay anycast
)

_V6_METADATA = int(ipaddress.IPv6Address("fd00:ec2::254"))
_V6_TABLE: tuple[tuple[ipaddress.IPv6Network, str], ...] = (
    (_N6("2001::/32"), "teredo"),  # embeds an obfuscated client address; never needed upstream
    (_N6("2001:db8::/32"), "documentation"),
    (_N6("3fff::/20"), "documentation"),
    (_N6("2001:2::/48"), "benchmark"),
    (_N6("100::/64"), "reserved"),  # discard-only
    (_N6("fe80::/10"), "link-local"),
    (_N6("fec0::/10"), "site-local"),
    (_N6("fc00::/7"), "unique-local"),
    (_N6("ff00::/8"), "multicast"),
)
_NAT64_WKP = _N6("64:ff9b::/96")
_NAT64_LOCAL = _N6("64:ff9b:1::/48")
_SIXTOFOUR = _N6("2002::/16")
_V4_COMPAT = _N6("::/96")


def classify_address(ip: IPAddress) -> str | None:
    """Why ``ip`` is not a public destination (a short reason), or None when it is public.

    IPv6 forms that carry an IPv4 address (mapped, compatible, NAT64, 6to4) are judged by the
    address they carry, since that is where the packets end up.
    """
    if isinstance(ip, ipaddress.IPv4Address):
        for net, reason in _V4_TABLE:
            if ip in net:
                return reason
        # Anything else IANA marks non-global (new special-purpose blocks) is refused too.
        return None if ip.is_global else "reserved"

    n = int(ip)  # drops any zone id, which says nothing about where the address leads
    if n == 1:
        return "loopback"
    if n == 0:
        return "unspecified"
    if n == _V6_METADATA:
        return "cloud-metadata"
    bare = ipaddress.IPv6Address(n)
    mapped = bare.ipv4_mapped
    if mapped is not None:
        inner = classify_address(mapped)
        return None if inner is None else f"ipv4-mapped:{inner}"
    if bare in _V4_COMPAT:
        inner = classify_address(ipaddress.IPv4Address(n & 0xFFFFFFFF))
        # Deprecated (RFC 4291): nothing legitimate uses it, so a public payload is still refused.
        return f"ipv4-compatible:{inner or 'public'}"
    if bare in _NAT64_WKP:
        inner = classify_address(ipaddress.IPv4Address(n & 0xFFFFFFFF))
        return None if inner is None else f"nat64:{inner}"
    if bare in _NAT64_LOCAL:
        # The local-use prefix may be deployed as /48 .. /96; check the two common layouts
        # (RFC 6052 /48: bits 48-63 and 72-87; /96: the last 32 bits).
        # The layout not in use reads as zeros, so a zero candidate only counts when both are.
        layouts = (n & 0xFFFFFFFF, (((n >> 64) & 0xFFFF) << 16) | ((n >> 40) & 0xFFFF))
        for v4 in [v for v in layouts if v] or [0]:
            inner = classify_address(ipaddress.IPv4Address(v4))
            if inner is not None:
                return f"nat64:{inner}"
        return None
    if bare in _SIXTOFOUR:
        inner = classify_address(ipaddress.IPv4Address((n >> 80) & 0xFFFFFFFF))
        return None if inner is None else f"6to4:{inner}"
    for net6, reason in _V6_TABLE:
        if bare in net6:
            return reason
    return None if bare.is_global else "reserved"


# --- IP literals in the many spellings resolvers accept ---------------------------------------

# Full-width and ideographic full stops: URL parsers map them to "." before anything else.
_DOTS = str.maketrans({"\u3002": ".", "\uff0e": ".", "\uff61": "."})
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
_DEC_DIGITS = frozenset("0123456789")
_OCT_DIGITS = frozenset("01234567")


def _ipv4_part(part: str) -> int | None:
    """One part of a legacy IPv4 literal (decimal, 0x-hex, 0-octal), as inet_aton reads it."""
    if part[:2] in ("0x", "0X"):
        digits = part[2:]
        # An empty "0x" is 0 in the WHATWG URL parser.
        return int(digits, 16) if not digits or set(digits) <= _HEX_DIGITS else None
    if not part or not set(part) <= _DEC_DIGITS:  # ASCII only: int() would accept other digits
        return None
    if len(part) > 1 and part[0] == "0":
        return int(part, 8) if set(part) <= _OCT_DIGITS else None
    # More than 10 digits exceeds 2**32 anyway, and int() refuses very long decimal strings.
    return int(part) if len(part) <= 10 else None


def _parse_ipv4(host: str) -> ipaddress.IPv4Address | None:
    parts = host.split(".")
    if len(parts) > 1 and parts[-1] == "":
        parts.pop()  # one trailing dot is allowed, as in a fully qualified name
    if not 1 <= len(parts) <= 4:
        return None
    values: list[int] = []
    for part in parts:
        value = _ipv4_part(part)
        if value is None:
            return None
        values.append(value)
    *head, last = values
    if any(v > 255 for v in head) or last >= 256 ** (5 - len(values)):
        return None
    number = last
    for i, v in enumerate(head):
        number += v << (8 * (3 - i))
    return ipaddress.IPv4Address(number)


def parse_ip_literal(host: str) -> IPAddress | None:
    """The address a bare host (no port) denotes when it is an IP literal, else None.

    Accepts every spelling libc's ``inet_aton`` or a browser turns into an address:
    ``2130706433``, ``0x7f000001``, ``0177.0.0.1``, ``0x7f.1``, ``127.1``, ``127.0.1``,
    ``[::1]``, ``fe80::1%eth0`` (the zone id is dropped). Real host names give None.
    """
    host = host.strip().translate(_DOTS)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif not host:
        return None
    if ":" in host:
        try:
            return ipaddress.IPv6Address(host.partition("%")[0])
        except ValueError:
            return None
    if not host.isascii():
        return None
    return _parse_ipv4(host)


# --- host names and patterns -----------------------------------------------------------------


def _strip_port(host: str) -> str:
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end != -1 else host
    if host.count(":") == 1:
        return host.partition(":")[0]
    return host


def normalize_host(host: str) -> str:
    """A host as the connector will use it: no port, lower case, IDNA-encoded, no final dot."""
    host = _strip_port(host.strip().translate(_DOTS)).rstrip(".")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host.isascii():
        return host.lower()
    try:
        if _idna is not None:
            return _idna.encode(host, uts46=True).decode("ascii")
        return host.encode("idna").decode("ascii").lower()
    except UnicodeError:
        return host.lower()  # not a valid name: it will match no ASCII pattern


def _normalize_pattern(pattern: str) -> str:
    pattern = pattern.strip()
    if pattern.startswith("*."):
        return "*." + normalize_host(pattern[2:])
    return normalize_host(pattern)


def _match_one(host: str, pattern: str) -> bool:
    if pattern.startswith("*."):
        suffix = pattern[1:]  # ".example.com": the wildcard needs at least one label
        return host.endswith(suffix) and len(host) > len(suffix)
    return host == pattern


def host_matches(host: str, patterns: Iterable[str]) -> bool:
    """Whether ``host`` matches one of ``patterns``: exact names or ``*.suffix`` wildcards.

    ``*.example.com`` matches ``a.example.com`` and ``a.b.example.com`` but not
    ``example.com``. Case, ports, IDNA and a trailing dot are normalised on both sides.
    """
    name = normalize_host(host)
    if not name:
        return False
    return any(_match_one(name, _normalize_pattern(p)) for p in patterns)


# --- the policy -------------------------------------------------------------------------------

_NAME_RE = re.compile(r"(\*\.)?[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*")

_PREFIX_WORDS = {
    "ipv4-mapped": "IPv4-mapped",
    "ipv4-compatible": "IPv4-compatible",
    "nat64": "NAT64",
    "6to4": "6to4",
}
_REASON_WORDS = {
    "cloud-metadata": "cloud metadata",
    "cgnat": "carrier-grade NAT",
    "public": "public",
}


def describe_reason(reason: str) -> str:
    """``"ipv4-mapped:loopback"`` -> ``"an IPv4-mapped loopback"``, for messages."""
    prefix, _, inner = reason.rpartition(":")
    words = _REASON_WORDS.get(inner, inner)
    if prefix:
        words = f"{_PREFIX_WORDS.get(prefix, prefix)} {words}"
    article = "an" if words[0].lower() in "aeiou" else "a"
    return f"{article} {words}"


def _refusal(host: str, verb: str, reason: str, ip: IPAddress) -> HostNotAllowed:
    return HostNotAllowed(
        f"upstream host {host!r} {verb} {describe_reason(reason)} address ({ip}), which the "
        f"egress guard refuses; allow it with PROXY_EGRESS_ALLOW if intended"
    )


@dataclass(frozen=True)
class EgressPolicy:
    """The egress guard with the operator's allow-list.

    ``allow`` entries are host names (exact or ``*.suffix``) or IP addresses / CIDRs; a bad
    entry raises ``ConfigError`` for ``PROXY_EGRESS_ALLOW``. Public addresses always pass.
    """

    allow: Sequence[str] = ()
    _networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = field(
        init=False, repr=False, compare=False
    )
    _names: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        names: list[str] = []
        for raw in self.allow:
            entry = raw.strip()
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
                continue
            except ValueError:
                pass
            if "/" in entry or ":" in entry.strip("[]"):
                raise ConfigError("PROXY_EGRESS_ALLOW", f"{entry!r} is not a valid IP or CIDR")
            pattern = _normalize_pattern(entry)
            if not _NAME_RE.fullmatch(pattern):
                raise ConfigError(
                    "PROXY_EGRESS_ALLOW",
                    f"{entry!r} is neither a host name, a '*.suffix' pattern nor an IP or CIDR",
                )
            names.append(pattern)
        object.__setattr__(self, "allow", tuple(self.allow))
        object.__setattr__(self, "_networks", tuple(networks))
        object.__setattr__(self, "_names", tuple(names))

    def _ip_allowed(self, ip: IPAddress) -> bool:
        if isinstance(ip, ipaddress.IPv6Address):
            ip = ipaddress.IPv6Address(int(ip))  # zone ids do not take part in CIDR matching
            mapped = ip.ipv4_mapped
            # ::ffff:a.b.c.d is the same destination as a.b.c.d, so one allow entry covers both.
            if mapped is not None and self._ip_allowed(mapped):
                return True
        return any(ip.version == net.version and ip in net for net in self._networks)

    def is_allowed_host(self, host: str) -> bool:
        """Whether the operator listed ``host`` (by name, or as an IP inside an allowed CIDR)."""
        ip = parse_ip_literal(_strip_port(host.strip()))
        if ip is not None:
            return self._ip_allowed(ip)
        name = normalize_host(host)
        return any(_match_one(name, pattern) for pattern in self._names)

    def check_literal(self, host: str) -> None:
        """Refuse ``host`` when it is a non-public IP literal (in any spelling) not allowed.

        Host names pass here; their addresses are checked by ``check_resolved`` once known.
        """
        ip = parse_ip_literal(host)
        if ip is None:
            return
        reason = classify_address(ip)
        if reason is not None and not self._ip_allowed(ip):
            raise _refusal(host, "is", reason, ip)

    def check_resolved(self, host: str, ip: IPAddress | str) -> None:
        """Refuse a non-public address ``host`` resolved to, unless the name or address is allowed."""
        if isinstance(ip, str):
            try:
                ip = ipaddress.ip_address(ip)
            except ValueError:
                raise HostNotAllowed(
                    f"upstream host {host!r} resolved to something that is not an IP address; "
                    f"the egress guard refuses it"
                ) from None
        reason = classify_address(ip)
        if reason is None or self._ip_allowed(ip) or self.is_allowed_host(host):
            return
        raise _refusal(host, "resolves to", reason, ip)
