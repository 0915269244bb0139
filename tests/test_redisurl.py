"""``PROXY_REDIS_URL`` forms: what each parses to, and what is refused (never echoing a password)."""

from __future__ import annotations

import pytest

from proxy.errors import ConfigError
from proxy.redisurl import parse_redis_url
from proxy.settings import load_settings

SECRET = "s3cr%40t-canary"


def test_single_server_form_is_left_to_redis_py_minus_our_wait_options() -> None:
    t = parse_redis_url("redis://:pw@h:6380/2?socket_keepalive=true&wait_replicas=1&wait_timeout_ms=200")
    assert (t.kind, t.wait_replicas, t.wait_timeout_ms) == ("single", 1, 200)
    assert t.url == "redis://:pw@h:6380/2?socket_keepalive=true"
    assert parse_redis_url("unix:///run/redis.sock?db=1").url == "unix:///run/redis.sock?db=1"
    assert parse_redis_url("rediss://h").tls


def test_cluster_form() -> None:
    t = parse_redis_url(
        f"rediss+cluster://app:{SECRET}@10.0.0.1:7000,10.0.0.2,[::1]:7002/?ssl_cert_reqs=none"
    )
    assert t.kind == "cluster" and t.tls
    assert t.nodes == (("10.0.0.1", 7000), ("10.0.0.2", 6379), ("::1", 7002))
    assert (t.username, t.password) == ("app", "s3cr@t-canary")
    assert t.tls_options == (("ssl_cert_reqs", "none"),)
    assert parse_redis_url("redis+cluster://h:1/0").db == 0


def test_sentinel_form() -> None:
    t = parse_redis_url(
        f"redis+sentinel://:{SECRET}@s1:26379,s2,s3:26380/my%20master/3?sentinel_password=sp&wait_replicas=2"
    )
    assert t.kind == "sentinel" and not t.tls
    assert t.nodes == (("s1", 26379), ("s2", 26379), ("s3", 26380))
    assert (t.service, t.db, t.username, t.password) == ("my master", 3, None, "s3cr@t-canary")
    assert (t.sentinel_password, t.wait_replicas) == ("sp", 2)
    # A bare secret in the userinfo is a password, as redis-py reads redis://secret@host.
    assert parse_redis_url("redis+sentinel://pw@s1/m").password == "pw"


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://h", "must start with"),
        ("redis+cluster://h:1/3", "database 0 only"),
        ("redis+sentinel://h:1", "service name"),
        ("redis+sentinel://h:1/m/x", "/SERVICE_NAME/DB"),
        ("redis+cluster://h:99999", "port"),
        ("redis+cluster://:1", "needs a host"),
        ("redis+cluster://h?ssl_verify=no", "unknown option"),
        ("redis+cluster://h?ssl_cert_reqs=none", "rediss+"),
        ("rediss+cluster://h?ssl_cert_reqs=maybe", "required or none"),
        ("redis+cluster://h?wait_replicas=1", "not supported"),
        ("redis+sentinel://h/m?wait_replicas=x", "whole number"),
        ("redis+sentinel://h/m?wait_replicas=1&wait_replicas=2", "twice"),
    ],
)
def test_bad_urls_are_refused_naming_the_setting_without_the_password(url: str, says: str) -> None:
    url = url.replace("://", f"://u:{SECRET}@", 1) if "://" in url else url
    with pytest.raises(ConfigError) as err:
        parse_redis_url(url)
    assert err.value.key == "redis_url"
    assert says in err.value.message
    assert SECRET not in err.value.message and "s3cr@t" not in err.value.message


def test_settings_accept_the_new_forms_and_refuse_a_bad_one() -> None:
    url = "redis+sentinel://127.0.0.1:26379/cpmaster"
    assert load_settings(env={"PROXY_REDIS_URL": url}).redis_url == url
    with pytest.raises(ConfigError) as err:
        load_settings(env={"PROXY_REDIS_URL": "redis+cluster://h:1/5"})
    assert err.value.key == "redis_url"


@pytest.mark.parametrize(
    "url",
    ["redis://u:s3cr#et@host:6379", "redis://:pa/ss@host", "redis://h:6379/two", "redis+sentinel://h/m/²"],
)
def test_a_single_server_url_redis_py_would_misread_is_refused_without_quoting_it(url: str) -> None:
    """An unescaped '#' or '/' in a password makes redis-py read part of it as the port or the db,
    and its connect-time error quotes that part: refused here, naming the setting only."""
    with pytest.raises(ConfigError) as err:
        parse_redis_url(url)
    assert err.value.key == "redis_url"
    assert not any(part in err.value.message for part in ("s3cr", ":pa", "et@", "two"))
