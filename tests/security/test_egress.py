"""The egress guard: address classification, IP-literal spellings, allow-list, host patterns."""

from __future__ import annotations

import ipaddress

import pytest

from proxy.errors import ConfigError, HostNotAllowed
from proxy.security.egress import (
    EgressPolicy,
    classify_address,
    host_matches,
    normalize_host,
    parse_ip_literal,
)

CLASSIFIED = [
    ("127.0.0.1", "loopback"),
    ("127.255.0.9", "loopback"),
    ("10.1.2.3", "private"),
    ("172.16.0.1", "private"),
    ("172.31.255.255", "private"),
    ("192.168.1.1", "private"),
    ("169.254.169.254", "cloud-metadata"),
    ("169.254.10.1", "link-local"),
    ("100.64.0.1", "cgnat"),
    ("100.127.255.254", "cgnat"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("0.0.0.0", "unspecified"),
    ("0.1.2.3", "unspecified"),
    ("255.255.255.255", "broadcast"),
    ("240.0.0.1", "reserved"),
    ("198.18.0.1", "benchmark"),
    ("192.0.2.1", "documentation"),
    ("198.51.100.7", "documentation"),
    ("203.0.113.9", "documentation"),
    ("192.0.0.8", "reserved"),
    ("::1", "loopback"),
    ("::", "unspecified"),
    ("::ffff:127.0.0.1", "ipv4-mapped:loopback"),
    ("::ffff:169.254.169.254", "ipv4-mapped:cloud-metadata"),
    ("::ffff:10.0.0.1", "ipv4-mapped:private"),
    ("::127.0.0.1", "ipv4-compatible:loopback"),
    ("::8.8.8.8", "ipv4-compatible:public"),
    ("64:ff9b::7f00:1", "nat64:loopback"),
    ("64:ff9b::a9fe:a9fe", "nat64:cloud-metadata"),
    ("64:ff9b:1::7f00:1", "nat64:loopback"),
    ("64:ff9b:1:a9fe:a9:fe00::", "nat64:cloud-metadata"),  # RFC 6052 /48 layout
    ("2002:7f00:1::", "6to4:loopback"),
    ("2002:c0a8:101::1", "6to4:private"),
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "teredo"),
    ("fe80::1", "link-local"),
    ("fe80::1%eth0", "link-local"),
    ("fec0::1", "site-local"),
    ("fc00::1", "unique-local"),
    ("fd12:3456::1", "unique-local"),
    ("fd00:ec2::254", "cloud-metadata"),
    ("ff02::1", "multicast"),
    ("2001:db8::1", "documentation"),
    ("3fff::1", "documentation"),
    ("2001:2::1", "benchmark"),
    ("100::1", "reserved"),
]

PUBLIC = [
    "8.8.8.8",
    "1.1.1.1",
    "93.184.216.34",
    "172.32.0.1",  # just outside 172.16/12
    "100.128.0.1",  # just outside 100.64/10
    "2606:4700::1111",
    "2a00:1450:4001:80b::200e",
    "::ffff:8.8.8.8",
    "64:ff9b::808:808",
    "2002:808:808::1",
]


@pytest.mark.parametrize(("text", "reason"), CLASSIFIED)
def test_classify_non_public(text: str, reason: str) -> None:
    assert classify_address(ipaddress.ip_address(text)) == reason


@pytest.mark.parametrize("text", PUBLIC)
def test_classify_public(text: str) -> None:
    assert classify_address(ipaddress.ip_address(text)) is None


LITERALS = [
    ("127.0.0.1", "127.0.0.1"),
    ("2130706433", "127.0.0.1"),
    ("0x7f000001", "127.0.0.1"),
    ("0X7F000001", "127.0.0.1"),
    ("017700000001", "127.0.0.1"),
    ("0177.0.0.1", "127.0.0.1"),
    ("0x7f.1", "127.0.0.1"),
    ("0x7f.0.0.0x1", "127.0.0.1"),
    ("127.1", "127.0.0.1"),
    ("127.0.1", "127.0.0.1"),
    ("127.0.0.1.", "127.0.0.1"),
    ("10.0x10.1", "10.16.0.1"),
    ("0", "0.0.0.0"),
    ("169.254.43518", "169.254.169.254"),
    ("127\u30020\u30020\u30021", "127.0.0.1"),  # ideographic full stops
    ("[::1]", "::1"),
    ("::1", "::1"),
    ("[::ffff:127.0.0.1]", "::ffff:7f00:1"),
    ("[fe80::1%25eth0]", "fe80::1"),
    ("fe80::1%eth0", "fe80::1"),
]


@pytest.mark.parametrize(("host", "expected"), LITERALS)
def test_parse_ip_literal(host: str, expected: str) -> None:
    assert parse_ip_literal(host) == ipaddress.ip_address(expected)


@pytest.mark.parametrize(
    "host",
    [
        "example.com",
        "localhost",
        "api.127.0.0.1.nip.io",
        "1.2.3.4.example",
        "0x7g.1",  # not hex
        "08.0.0.1",  # 8 is not an octal digit
        "256.0.0.1",  # first parts are bytes
        "1.2.3.4.5",
        "4294967296",  # 2**32
        "\u0661\u0662\u0667.0.0.1",  # Arabic-Indic digits: int() would take them, libc would not
        "+127.0.0.1",
        "",
        "[not-an-ip]",
        "::zz",
    ],
)
def test_parse_ip_literal_rejects_names_and_garbage(host: str) -> None:
    assert parse_ip_literal(host) is None


def test_parse_ip_literal_survives_huge_numbers() -> None:
    assert parse_ip_literal("9" * 5000) is None  # longer than int() converts: must not raise
    assert parse_ip_literal("0x" + "f" * 5000) is None
    assert parse_ip_literal("0" * 5000 + "177.0.0.1") == ipaddress.ip_address("127.0.0.1")


REFUSED_LITERALS = [
    "127.0.0.1",
    "10.0.0.1",
    "172.16.5.4",
    "192.168.0.1",
    "169.254.169.254",
    "100.64.0.1",
    "224.0.0.1",
    "0.0.0.0",
    "255.255.255.255",
    "2130706433",
    "0x7f.1",
    "0177.0.0.1",
    "127.1",
    "[::1]",
    "::ffff:127.0.0.1",
    "[64:ff9b::7f00:1]",
    "[2002:7f00:1::]",
    "[fe80::1]",
    "[fc00::1]",
    "[fd00:ec2::254]",
]


@pytest.mark.parametrize("host", REFUSED_LITERALS)
def test_check_literal_refuses_non_public(host: str) -> None:
    with pytest.raises(HostNotAllowed) as info:
        EgressPolicy([]).check_literal(host)
    assert "PROXY_EGRESS_ALLOW" in info.value.message
    assert info.value.code == "HOST_NOT_ALLOWED"


@pytest.mark.parametrize("host", ["8.8.8.8", "[2606:4700::1111]", "example.com", "localhost"])
def test_check_literal_passes_public_and_names(host: str) -> None:
    EgressPolicy([]).check_literal(host)  # names are judged once resolved


def test_literal_message_says_what_and_how() -> None:
    with pytest.raises(HostNotAllowed) as info:
        EgressPolicy([]).check_literal("0x7f.1")
    assert info.value.message == (
        "upstream host '0x7f.1' is a loopback address (127.0.0.1), which the egress guard "
        "refuses; allow it with PROXY_EGRESS_ALLOW if intended"
    )


def test_resolved_message_and_mapped_wording() -> None:
    with pytest.raises(HostNotAllowed) as info:
        EgressPolicy([]).check_resolved("api.example.com", "127.0.0.1")
    assert info.value.message == (
        "upstream host 'api.example.com' resolves to a loopback address (127.0.0.1), which the "
        "egress guard refuses; allow it with PROXY_EGRESS_ALLOW if intended"
    )
    with pytest.raises(HostNotAllowed) as info:
        EgressPolicy([]).check_resolved("x.test", "::ffff:a9fe:a9fe")
    assert "an IPv4-mapped cloud metadata address" in info.value.message


def test_allow_by_cidr() -> None:
    policy = EgressPolicy(["127.0.0.1/32", "10.1.0.0/16"])
    policy.check_literal("127.0.0.1")
    policy.check_literal("2130706433")  # the same address in another spelling
    policy.check_literal("[::ffff:127.0.0.1]")  # and as an IPv4-mapped IPv6 address
    policy.check_literal("10.1.200.3")
    policy.check_resolved("svc.internal", "10.1.0.9")
    with pytest.raises(HostNotAllowed):
        policy.check_literal("127.0.0.2")
    with pytest.raises(HostNotAllowed):
        policy.check_resolved("svc.internal", "10.2.0.1")
    with pytest.raises(HostNotAllowed):
        policy.check_literal("[::1]")


def test_allow_by_ip_and_ipv6_cidr() -> None:
    policy = EgressPolicy(["::1", "fd00::/8", " 192.168.1.5 "])
    policy.check_literal("[::1]")
    policy.check_resolved("x", "fd12::1")
    policy.check_literal("192.168.1.5")
    with pytest.raises(HostNotAllowed):
        policy.check_literal("192.168.1.6")


def test_allow_by_hostname() -> None:
    policy = EgressPolicy(["LocalHost", "*.svc.cluster.local"])
    policy.check_resolved("localhost", "127.0.0.1")
    policy.check_resolved("localhost.", "::1")
    policy.check_resolved("api.ns.svc.cluster.local", "10.0.0.7")
    with pytest.raises(HostNotAllowed):
        policy.check_resolved("svc.cluster.local", "10.0.0.7")  # the wildcard needs a label
    with pytest.raises(HostNotAllowed):
        policy.check_resolved("evil.example", "127.0.0.1")
    # Listing a name does not open its address to literal use.
    with pytest.raises(HostNotAllowed):
        policy.check_literal("127.0.0.1")


def test_public_resolution_always_passes() -> None:
    EgressPolicy([]).check_resolved("example.com", ipaddress.ip_address("93.184.216.34"))
    EgressPolicy([]).check_resolved("example.com", "2606:4700::1111")


def test_resolved_zone_id_and_garbage() -> None:
    with pytest.raises(HostNotAllowed):
        EgressPolicy([]).check_resolved("x", "fe80::1%eth0")
    with pytest.raises(HostNotAllowed):
        EgressPolicy([]).check_resolved("x", "not-an-address")


def test_is_allowed_host() -> None:
    policy = EgressPolicy(["127.0.0.1/32", "*.internal", "upstream.test"])
    assert policy.is_allowed_host("127.0.0.1")
    assert policy.is_allowed_host("127.0.0.1:8443")
    assert policy.is_allowed_host("UPSTREAM.test.")
    assert policy.is_allowed_host("a.b.internal")
    assert not policy.is_allowed_host("internal")
    assert not policy.is_allowed_host("127.0.0.2")
    assert not policy.is_allowed_host("api.example.com")
    assert not EgressPolicy([]).is_allowed_host("localhost")


@pytest.mark.parametrize("entry", ["10.0.0.0/33", "*", "bad host", "a..b", "::zz", "http://x/"])
def test_bad_allow_entry_is_a_config_error(entry: str) -> None:
    with pytest.raises(ConfigError) as info:
        EgressPolicy([entry])
    assert info.value.key == "PROXY_EGRESS_ALLOW"


def test_policy_is_frozen_and_hashable() -> None:
    policy = EgressPolicy(["127.0.0.1/32"])
    with pytest.raises(AttributeError):
        policy.allow = ()  # type: ignore[misc]
    assert policy == EgressPolicy(("127.0.0.1/32",))
    assert hash(policy) == hash(EgressPolicy(["127.0.0.1/32"]))


HOST_MATCHES = [
    ("api.example.com", ["api.example.com"], True),
    ("API.Example.COM", ["api.example.com"], True),
    ("api.example.com.", ["api.example.com"], True),
    ("api.example.com:443", ["api.example.com"], True),
    ("api.example.com", ["api.example.com:8443"], True),
    ("sub.example.com", ["*.example.com"], True),
    ("a.b.example.com", ["*.EXAMPLE.com."], True),
    ("example.com", ["*.example.com"], False),
    ("evilexample.com", ["*.example.com"], False),
    ("example.com.evil.io", ["example.com"], False),
    ("other.com", ["api.example.com", "*.example.com"], False),
    ("bücher.de", ["xn--bcher-kva.de"], True),
    ("xn--bcher-kva.de", ["BÜCHER.de"], True),
    ("[::1]:8080", ["::1"], True),
    ("", ["*.example.com"], False),
    ("api.example.com", [], False),
]


@pytest.mark.parametrize(("host", "patterns", "expected"), HOST_MATCHES)
def test_host_matches(host: str, patterns: list[str], expected: bool) -> None:
    assert host_matches(host, patterns) is expected


def test_normalize_host() -> None:
    assert normalize_host(" Api.Example.COM.:443 ") == "api.example.com"
    assert normalize_host("[::1]") == "::1"
