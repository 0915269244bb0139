"""The generated nginx configuration: complete, accepted by real nginx, and keeping its rules."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from proxy.catalogue import Catalogue
from proxy.cli import main
from proxy.errors import ConfigError
from proxy.nginxconf import OBSERVED_HEADERS, memory_backed, render
from proxy.pipeline.decision import injectable_headers
from proxy.ratelimit.signals.core import parse_response
from proxy.settings import load_settings
from tests.support.app import REPO_ROOT
from tests.support.nginx import NGINX

TOKEN = "t" * 40


def _conf(tmp_path: Path, **settings: object) -> str:
    s = load_settings(
        env={}, overrides={"decision_token": TOKEN, "nginx_report_listen": "127.0.0.1:9999", **settings}
    )
    names = injectable_headers(Catalogue.load(), s.nginx_inject_headers)
    return render(s, names, listen="127.0.0.1:8443", service="http://127.0.0.1:8080", prefix=tmp_path)


def _nginx_t(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    conf = tmp_path / "nginx.conf"
    conf.write_text(text)
    return subprocess.run([NGINX, "-t", "-p", str(tmp_path), "-c", str(conf)], capture_output=True, text=True)


def test_nginx_accepts_it(tmp_path: Path) -> None:
    cache = Path("/dev/shm") / f"cp-test-{tmp_path.name}"
    try:
        done = _nginx_t(tmp_path, _conf(tmp_path, nginx_decision_cache_dir=str(cache)))
    finally:
        if cache.exists():
            cache.rmdir()
    assert done.returncode == 0, done.stderr
    assert "test is successful" in done.stderr


def test_rules_in_the_config(tmp_path: Path) -> None:
    conf = _conf(tmp_path, nginx_inject_headers=["X-Acme-Key"], upstream_read_timeout_s=7)
    # Never resolves a name; verifies the name it was told.
    assert "resolver" not in conf
    assert "proxy_pass $cp_proto://$cp_target$cp_uri_out;" in conf
    assert "proxy_ssl_verify on;" in conf and "proxy_ssl_name $cp_sni;" in conf
    # Caller credentials and selectors are always replaced by the decision's value.
    for header in (
        "Authorization",
        "Proxy-Authorization",
        "X-Connection-Id",
        "X-Tenant-Id",
        "X-Runtime-User-Id",
    ):
        assert f"proxy_set_header {header} $cp_h_" in conf, header
    # An operator's extra header is injectable, from its own decision variable.
    assert "proxy_set_header X-Acme-Key $cp_o_x_acme_key;" in conf
    assert "proxy_buffering off;" in conf and "proxy_request_buffering off;" in conf
    assert "proxy_read_timeout 7000ms;" in conf
    assert f'X-CP-Decision-Token "{TOKEN}"' in conf
    # Temp paths live under the prefix; the decision cache (it holds credentials) does not.
    prefix = str(tmp_path.resolve())
    for line in conf.splitlines():
        if "_temp_path " in line:
            assert prefix in line, line
    assert "syslog:server=127.0.0.1:9999" in conf
    # Every X-Proxy-* name the service defines is hidden from upstream answers.
    for name in ("X-Proxy-Error", "X-Proxy-Max-Wait-Ms", "X-Proxy-Retries"):
        assert f"proxy_hide_header {name};" in conf, name
    # ... and nginx obeys none of an upstream's X-Accel-* headers.
    (ignored,) = [x.split()[1:] for x in conf.splitlines() if "proxy_ignore_headers" in x]
    assert {"X-Accel-Redirect", "X-Accel-Limit-Rate", "X-Accel-Buffering"} <= {x.rstrip(";") for x in ignored}


def test_decision_cache_stays_in_memory(tmp_path: Path) -> None:
    conf = _conf(tmp_path, nginx_decision_cache_s=3)
    (line,) = [x for x in conf.splitlines() if "proxy_cache_path" in x]
    assert line.split()[1] == "/dev/shm/connection-proxy-nginx"  # the default, tmpfs
    assert "use_temp_path=off" in line and "inactive=3s" in line and "max_size=16m" in line
    assert str(tmp_path.resolve()) not in line
    # The key's fields are joined by LF (nginx's \n), which no header value can hold.
    (key,) = [x for x in conf.splitlines() if "proxy_cache_key" in x]
    assert "|" not in key and "\\n$http_authorization\\n" in key
    conf = _conf(tmp_path, nginx_decision_cache_s=3, nginx_decision_cache_dir="/run/cp-cache/")
    assert "proxy_cache_path /run/cp-cache levels" in conf
    # No cache at all when decisions are not to be reused.
    conf = _conf(tmp_path, nginx_decision_cache_s=0)
    assert "proxy_cache" not in conf
    done = _nginx_t(tmp_path, conf)
    assert done.returncode == 0, done.stderr
    for bad in ("var/cache", "./cache", ""):
        with pytest.raises(ConfigError) as err:
            load_settings(env={}, overrides={"nginx_decision_cache_dir": bad})
        assert err.value.key == "nginx_decision_cache_dir"
    with pytest.raises(ConfigError) as err:
        _conf(tmp_path, nginx_decision_cache_dir="/dev/shm/a;b")
    assert err.value.key == "nginx_decision_cache_dir"


def test_memory_backed_reads_the_mount_table() -> None:
    mounts = (
        "/dev/vda / ext4 rw 0 0\n"
        "tmpfs /dev/shm tmpfs rw 0 0\n"
        "tmpfs /run tmpfs rw 0 0\n"
        "/dev/vdb /run/disk ext4 rw 0 0\n"
        "none /mnt/with\\040space ramfs rw 0 0\n"
    )
    assert memory_backed(Path("/dev/shm/connection-proxy-nginx"), mounts) is True
    assert memory_backed(Path("/run/x"), mounts) is True
    assert memory_backed(Path("/run/disk/x"), mounts) is False  # the longest mount point wins
    assert memory_backed(Path("/run/diskette"), mounts) is True  # a prefix of a name is no parent
    assert memory_backed(Path("/var/cache/x"), mounts) is False
    assert memory_backed(Path("/mnt/with space/c"), mounts) is True
    assert memory_backed(Path("/x"), "") is None


def test_cli_warns_about_a_cache_dir_on_disk_or_open_to_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PROXY_DECISION_TOKEN", TOKEN)
    args = ["nginx-config", "--listen", "127.0.0.1:8443", "--service", "http://127.0.0.1:8080"]
    mounts = Path("/proc/self/mounts").read_text()
    assert memory_backed(tmp_path, mounts) is False  # pytest's tmp dir is on disk here
    monkeypatch.setenv("PROXY_NGINX_DECISION_CACHE_DIR", str(tmp_path / "cache"))
    assert main([*args, "--prefix", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "is not on tmpfs or ramfs" in err and "persistent disk" in err
    shm = Path("/dev/shm") / f"cp-test-{tmp_path.name}"
    shm.mkdir(mode=0o700)
    try:
        monkeypatch.setenv("PROXY_NGINX_DECISION_CACHE_DIR", str(shm))
        assert main([*args, "--prefix", str(tmp_path)]) == 0
        assert capsys.readouterr().err == ""
        shm.chmod(0o777)  # another user could plant decisions
        assert main([*args, "--prefix", str(tmp_path)]) == 0
        assert "not a directory of mode 0700" in capsys.readouterr().err
        monkeypatch.setenv("PROXY_NGINX_DECISION_CACHE_S", "0")  # no cache: nothing to warn of
        assert main([*args, "--prefix", str(tmp_path)]) == 0
        assert capsys.readouterr().err == ""
    finally:
        shm.rmdir()


def test_reported_headers_cover_the_styles() -> None:
    """Every header name nginx reports is one the signal parser reads, and samples of the common
    styles parse from the reported names alone."""
    samples = {
        "retry-after": "30",
        "x-ratelimit-limit": "100",
        "x-ratelimit-remaining": "0",
        "x-ratelimit-reset": "1900000000",
        "ratelimit-policy": '"default";q=100;w=60',
        "anthropic-ratelimit-requests-remaining": "0",
        "x-shopify-shop-api-call-limit": "40/40",
    }
    assert set(samples) <= set(OBSERVED_HEADERS)
    obs = parse_response(429, list(samples.items()), now=1.7e9)
    assert not obs.is_empty() and obs.blocked_until is not None


def test_keepalive_pools_take_checked_addresses_only(tmp_path: Path) -> None:
    conf = _conf(tmp_path)
    assert "cp_up_" not in conf
    s = load_settings(env={}, overrides={"decision_token": TOKEN})
    for bad in ("api.example.com=api.example.com:443", "203.0.113.5:443", "=1.2.3.4:1", "a b=1.2.3.4:1"):
        with pytest.raises(ConfigError):
            render(
                s, (), listen="127.0.0.1:1", service="http://127.0.0.1:2", prefix=tmp_path, keepalive=[bad]
            )


def test_decisions_over_the_network_need_the_opt_in(tmp_path: Path) -> None:
    """Without decision_listen nginx asks the main listener at --service: in clear over http."""
    s = load_settings(env={}, overrides={"decision_token": TOKEN})
    with pytest.raises(ConfigError) as err:
        render(s, (), listen="127.0.0.1:1", service="http://10.1.2.3:8080", prefix=tmp_path)
    assert err.value.key == "--service" and "nginx_network_ok" in err.value.message
    for url in ("http://127.0.0.1:8080", "http://[::1]:8080", "http://localhost:8080", "https://10.1.2.3"):
        assert render(s, (), listen="127.0.0.1:1", service=url, prefix=tmp_path)
    for extra in ({"nginx_network_ok": True}, {"decision_listen": "127.0.0.1:9001"}):
        s = load_settings(env={}, overrides={"decision_token": TOKEN, **extra})
        assert render(s, (), listen="127.0.0.1:1", service="http://10.1.2.3:8080", prefix=tmp_path)


def test_decision_token_is_required(tmp_path: Path) -> None:
    s = load_settings(env={}, overrides={})
    with pytest.raises(ConfigError) as err:
        render(s, (), listen="127.0.0.1:1", service="http://127.0.0.1:2", prefix=tmp_path)
    assert err.value.key == "decision_token"
    with pytest.raises(ConfigError) as err:
        load_settings(env={}, overrides={"decision_token": "short"})
    assert err.value.key == "decision_token"


def test_cli_prints_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PROXY_DECISION_TOKEN", TOKEN)
    code = main(
        [
            "nginx-config",
            "--listen",
            "127.0.0.1:8443",
            "--service",
            "http://127.0.0.1:8080",
            "--prefix",
            str(tmp_path),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert out.startswith("# Generated by `connection-proxy nginx-config`")
    assert "listen 127.0.0.1:8443;" in out and "server 127.0.0.1:8080;" in out


def test_deploy_example_is_what_the_generator_prints() -> None:
    """deploy/nginx/nginx.conf is generated (see deploy/nginx/README.md), never hand-edited."""
    example = REPO_ROOT / "deploy" / "nginx" / "nginx.conf"
    s = load_settings(
        env={},
        overrides={
            "decision_token": "REPLACE-with-your-PROXY_DECISION_TOKEN-value",
            "nginx_report_listen": "127.0.0.1:8125",
            "decision_listen": "unix:/run/connection-proxy/decide.sock",
        },
    )
    conf = render(
        s,
        injectable_headers(Catalogue.load(), ()),
        listen="0.0.0.0:8443",
        service="http://127.0.0.1:8080",
        prefix=Path("/var/lib/connection-proxy-nginx"),
    )
    assert example.read_text() == conf, "regenerate deploy/nginx/nginx.conf (deploy/nginx/README.md)"


def test_envoy_sketch_parses_and_fails_closed() -> None:
    doc = yaml.safe_load((REPO_ROOT / "deploy" / "envoy" / "envoy.yaml").read_text())
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    authz = hcm["http_filters"][0]["typed_config"]
    assert authz["failure_mode_allow"] is False
    assert authz["http_service"]["path_prefix"] == "/_decide"
