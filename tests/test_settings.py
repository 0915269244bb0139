"""Settings: one frozen object; file < environment < overrides; bad values name their key."""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path

import pytest

from proxy.errors import ConfigError
from proxy.settings import CLI_VARIABLES, Settings, load_settings


def test_defaults_match_the_contract() -> None:
    s = load_settings(env={})
    assert s.listen == "127.0.0.1:8080"
    assert s.data_dir == Path("./var")
    assert s.redis_url is None
    assert s.connection_service_prefix == "/connections"
    assert s.trusted_networks == ()
    assert s.dev_mode is True


def test_settings_are_frozen() -> None:
    s = load_settings(env={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.listen_port = 1  # type: ignore[misc]


def test_environment_wins_over_file(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('listen = "127.0.0.1:9001"\nredis_url = "redis://a:1/0"\n[upstream]\nmax_per_host = 7\n')
    s = load_settings(cfg, env={"PROXY_LISTEN": "0.0.0.0:9002"})
    assert (s.listen_host, s.listen_port) == ("0.0.0.0", 9002)
    assert s.redis_url == "redis://a:1/0"
    assert s.upstream_max_per_host == 7


def test_contract_variables() -> None:
    s = load_settings(
        env={
            "PROXY_DATA_DIR": "/tmp/x",
            "PROXY_EGRESS_ALLOW": "127.0.0.1/32, api.internal",
            "PROXY_TRUSTED_NETWORKS": "10.0.0.0/8,192.168.1.7",
            "PROXY_PUBLIC_URL": "https://cp.example.com/",
            "PROXY_ADMIN_TOKEN": "x" * 20,
        }
    )
    assert s.data_dir == Path("/tmp/x")
    assert s.egress_allow == ("127.0.0.1/32", "api.internal")
    assert s.trusted_networks == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("192.168.1.7/32"),
    )
    assert s.public_url == "https://cp.example.com"


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"PROXY_LISTEN": "8080"}, "listen"),
        ({"PROXY_LISTEN": "host:99999"}, "listen"),
        ({"PROXY_REDIS_URL": "http://x"}, "redis_url"),
        ({"PROXY_TRUSTED_NETWORKS": "not-a-net"}, "trusted_networks"),
        ({"PROXY_PUBLIC_URL": "ftp://x"}, "public_url"),
        ({"PROXY_RATELIMIT_FAIL_MODE": "sometimes"}, "ratelimit_fail_mode"),
        ({"PROXY_UPSTREAM_MAX_PER_HOST": "0"}, "upstream_max_per_host"),
        ({"PROXY_CREDENTIAL_CACHE_TTL_S": "soon"}, "credential_cache_ttl_s"),
        ({"PROXY_STALE_IF_ERROR_S": "-1"}, "stale_if_error_s"),
        ({"PROXY_STALE_IF_ERROR_S": "forever"}, "stale_if_error_s"),
        ({"PROXY_DEV_MODE": "maybe"}, "dev_mode"),
        ({"PROXY_DEV_MODE": "false", "PROXY_ADMIN_TOKEN": "x" * 20}, "master_key"),
        ({"PROXY_DEV_MODE": "false", "PROXY_MASTER_KEY": "k"}, "admin_token"),
        ({"PROXY_ADMIN_TOKEN": "short"}, "admin_token"),
        ({"PROXY_AUDIT_RETENTION_DAYS": "-1"}, "audit_retention_days"),
        ({"PROXY_MAX_CONNECTIONS": "0"}, "max_connections"),
        ({"PROXY_MAX_CONNECTIONS": "lots"}, "max_connections"),
        ({"PROXY_CONNECTION_RESERVE": "-1"}, "connection_reserve"),
        ({"PROXY_HEAD_TIMEOUT_S": "0"}, "head_timeout_s"),
        ({"PROXY_ENVELOPE_MAX_RESPONSE_BYTES": "10"}, "envelope_max_response_bytes"),
        ({"PROXY_ENVELOPE_MAX_CONCURRENT": "0"}, "envelope_max_concurrent"),
    ],
)
def test_bad_values_name_the_key(env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env=env)
    assert info.value.key == key
    assert key in info.value.message


def test_unknown_file_key_is_named(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("lissten = '1.2.3.4:5'\n")
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, env={})
    assert info.value.key == "lissten"


def test_missing_and_broken_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml", env={})
    bad = tmp_path / "bad.toml"
    bad.write_text("listen = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(bad, env={})


def test_example_config_loads() -> None:
    example = Path(__file__).resolve().parent.parent / "config" / "proxy.example.toml"
    s = load_settings(example, env={})
    assert isinstance(s, Settings)
    assert s.audit_flush_interval_s == 0.5
    assert s.audit_retention_days == 90


def test_resource_bounds_have_safe_defaults_and_load_from_file_and_env(tmp_path: Path) -> None:
    s = load_settings(env={})
    assert (s.max_connections, s.connection_reserve, s.head_timeout_s) == (1024, 16, 10.0)
    assert (s.envelope_max_response_bytes, s.envelope_max_concurrent) == (10 * 1024 * 1024, 8)
    cfg = tmp_path / "c.toml"
    cfg.write_text("max_connections = 50\nhead_timeout_s = 2.5\n[envelope]\nmax_response_bytes = 4096\n")
    s = load_settings(cfg, env={"PROXY_ENVELOPE_MAX_CONCURRENT": "3"})
    assert (s.max_connections, s.head_timeout_s) == (50, 2.5)
    assert (s.envelope_max_response_bytes, s.envelope_max_concurrent) == (4096, 3)


def test_secrets_not_in_repr() -> None:
    s = load_settings(env={"PROXY_ADMIN_TOKEN": "canary-admin-token-123", "PROXY_MASTER_KEY": "canary-key"})
    assert "canary" not in repr(s)


@pytest.mark.parametrize(
    ("env", "overrides", "public_url"),
    [
        ({}, {}, "http://127.0.0.1:8080"),
        ({"PROXY_LISTEN": "127.0.0.1:9123"}, {}, "http://127.0.0.1:9123"),
        ({}, {"listen": "localhost:9124"}, "http://localhost:9124"),  # serve --listen
        ({"PROXY_LISTEN": "0.0.0.0:9125"}, {}, "http://127.0.0.1:9125"),
        ({"PROXY_LISTEN": "[::]:9126"}, {}, "http://[::1]:9126"),
        ({"PROXY_LISTEN": "[::1]:9127"}, {}, "http://[::1]:9127"),
        ({"PROXY_LISTEN": "127.0.0.1:9128", "PROXY_PUBLIC_URL": ""}, {}, "http://127.0.0.1:9128"),
        # An explicit public URL always wins over the listen address.
        (
            {"PROXY_LISTEN": "0.0.0.0:9129", "PROXY_PUBLIC_URL": "https://cp.example.com"},
            {},
            "https://cp.example.com",
        ),
    ],
)
def test_public_url_follows_the_listen_address_unless_set(
    env: dict[str, str], overrides: dict[str, str], public_url: str
) -> None:
    assert load_settings(env=env, overrides=overrides).public_url == public_url


def test_public_url_in_a_file_wins_over_the_listen_override(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('public_url = "https://cp.example.com/"\n')
    assert (
        load_settings(cfg, env={}, overrides={"listen": "127.0.0.1:9130"}).public_url
        == "https://cp.example.com"
    )


def test_an_unknown_proxy_variable_is_refused_naming_the_closest_known_one() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env={"PROXY_DEV_MOD": "false"})
    assert info.value.key == "PROXY_DEV_MOD"
    assert "did you mean PROXY_DEV_MODE?" in info.value.message


def test_the_variables_the_command_line_reads_are_not_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "proxy.toml"
    cfg.write_text('listen = "127.0.0.1:9999"\n')
    env = {name: "x" for name in CLI_VARIABLES} | {"PROXY_CONFIG": str(cfg)}
    assert load_settings(env=env).listen_port == 9999  # PROXY_CONFIG is read, the others let be


def test_an_unknown_toml_key_names_the_closest_known_one(tmp_path: Path) -> None:
    cfg = tmp_path / "proxy.toml"
    cfg.write_text("dev_mod = false\n")
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, env={})
    assert info.value.key == "dev_mod" and "did you mean dev_mode?" in info.value.message


def test_the_command_line_reads_no_proxy_variable_outside_the_one_list() -> None:
    from proxy import runenv

    assert runenv.KEY_ENV in CLI_VARIABLES
    source = (Path(__file__).resolve().parent.parent / "proxy" / "admin_client.py").read_text()
    assert 'env.get("PROXY_URL")' in source and "PROXY_URL" in CLI_VARIABLES


def test_stale_if_error_defaults_to_five_minutes_and_zero_disables() -> None:
    assert load_settings(env={}).stale_if_error_s == 300.0
    assert load_settings(env={"PROXY_STALE_IF_ERROR_S": "0"}).stale_if_error_s == 0.0
    assert load_settings(env={"PROXY_STALE_IF_ERROR_S": "42.5"}).stale_if_error_s == 42.5


def test_listener_tls_settings_from_file_and_environment(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('[listen_tls]\nhostnames = ["Proxy.Internal.", "10.0.0.5"]\n')
    s = load_settings(f, env={"PROXY_LISTEN": "0.0.0.0:8443"})
    assert s.listen_tls and s.listen_tls_hostnames == ("proxy.internal", "10.0.0.5")
    assert s.public_url == "https://127.0.0.1:8443"
    env = {"PROXY_LISTEN_TLS_CERT_FILE": "/l.pem", "PROXY_LISTEN_TLS_KEY_FILE": "/l.key"}
    s = load_settings(env=env)
    assert (s.listen_tls_cert_file, s.listen_tls_key_file) == (Path("/l.pem"), Path("/l.key"))
    assert s.public_url.startswith("https://") and not load_settings(env={}).listen_tls
    with pytest.raises(ConfigError) as err:
        load_settings(env={**env, "PROXY_LISTEN_TLS_HOSTNAMES": "a"})
    assert err.value.key == "listen_tls_hostnames"


@pytest.mark.parametrize("bad", ["a" * 32 + "$host", "a" * 32 + '";', "a" * 32 + "\\"])
def test_a_decision_token_that_nginx_would_expand_or_end_is_refused(bad: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(env={"PROXY_DECISION_TOKEN": bad})
    assert err.value.key == "decision_token" and bad not in err.value.message


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("decision_listen", "0.0.0.0:9001"),
        ("decision_listen", "[::]:9001"),
        ("decision_listen", "192.0.2.10:9001"),
        ("decision_listen", "nginx-host:9001"),
        ("nginx_report_listen", "0.0.0.0:8125"),
        ("nginx_report_listen", "[2001:db8::1]:8125"),
        ("nginx_report_listen", "10.0.0.5:8125"),
    ],
)
def test_nginx_listeners_off_loopback_need_the_opt_in(key: str, value: str) -> None:
    """Decisions carry credentials and reports teach the limiter, both in clear text."""
    with pytest.raises(ConfigError) as err:
        load_settings(env={}, overrides={key: value})
    assert err.value.key == key
    assert "nginx_network_ok" in err.value.message and "loopback" in err.value.message
    s = load_settings(env={"PROXY_NGINX_NETWORK_OK": "true"}, overrides={key: value})
    assert s.nginx_network_ok


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("decision_listen", "127.0.0.1:9001"),
        ("decision_listen", "127.5.6.7:9001"),
        ("decision_listen", "[::1]:9001"),
        ("decision_listen", "localhost:9001"),
        ("decision_listen", "unix:/run/cp/decide.sock"),
        ("nginx_report_listen", "127.0.0.1:8125"),
        ("nginx_report_listen", "[::1]:8125"),
    ],
)
def test_nginx_listeners_on_loopback_or_unix_are_fine(key: str, value: str) -> None:
    assert not load_settings(env={}, overrides={key: value}).nginx_network_ok
