"""``connection-proxy nginx-config``: the nginx configuration that puts nginx in front, generated.

nginx carries the bytes, the service decides: every call to ``/proxy/{path}`` (made exactly as in
path mode) first asks the service's ``/_decide`` through ``auth_request``; the answer's ``X-CP-*``
headers name the checked upstream address, the Host/SNI name, the upstream URI and each header to
set. Hand-copied configs drift from the service's rules, so this module is the one place those
rules are written for nginx; the decision side is ``proxy.pipeline.decision``.

Invariants the generated config keeps (tests/web/test_decide.py runs it through real nginx):
- nginx never resolves a name: ``proxy_pass`` targets the IP address the egress guard checked;
  ``Host``, SNI and certificate verification use the name (``proxy_ssl_verify on``);
- the caller's credentials and selectors (``Authorization``, ``Proxy-Authorization``,
  ``X-Connection-Id``, ``X-Tenant-Id``, ``X-Runtime-User-Id``, known ``X-Proxy-*``) are always
  replaced by the decision's value, empty (removed) unless it injects one;
- refusals come back with the service's exact status, JSON body and ``Retry-After``;
- bodies stream both ways (no buffering), redirects are passed back, never rewritten or followed;
  nginx obeys no ``X-Accel-*`` header of an upstream (no internal redirect to the decision);
- secrets stay off persistent disk: the decision cache (its files hold the injected headers and,
  in their keys, the caller's credential) exists only when ``nginx_decision_cache_s > 0`` and then
  lives in ``nginx_decision_cache_dir`` (tmpfs by default), written in place
  (``use_temp_path=off``: never through the prefix's temp dir), small, and dropped once unused
  for its lifetime. nginx core has no cryptographic hash to key it by, so the key holds the raw
  caller credential; its fields are joined by LF, which no header value or request line can
  hold, so no choice of header values makes two different requests share one entry;
- the ``X-Proxy-*`` namespace is the service's both ways: the known control headers are always
  removed upstream and every name the service defines is hidden from upstream answers; the
  service's own ``X-Proxy-Error`` comes back only from the service route and nginx's own error
  locations. nginx core matches no header-name prefix, so an *unknown* ``X-Proxy-*`` header is
  handled by the decision (the call takes the service route) only when the decision is not
  served from the cache, and an unknown one in an upstream answer passes (README).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from pathlib import Path
from urllib.parse import urlsplit

from proxy.errors import ConfigError, ProxyError
from proxy.pipeline.decision import CONTROL_SET, NGINX_STRIPS
from proxy.settings import Settings
from proxy.settings_values import is_loopback

__all__ = ["OBSERVED_HEADERS", "memory_backed", "render"]

SYSTEM_CA = "/etc/ssl/certs/ca-certificates.crt"
# Every X-Proxy-* name the service defines: hidden from upstream answers (path mode drops the
# whole namespace; nginx's proxy_hide_header takes names only).
OWN_RESPONSE_HEADERS = ("X-Proxy-Error", *(_n for _n in NGINX_STRIPS if _n.startswith("x-proxy-")))
_MEMORY_FS = frozenset({"tmpfs", "ramfs"})
_PATH_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._/-")

# Response headers nginx reports back for the limiter: every name the catalogue's rate-limit
# header styles read (proxy.ratelimit.signals).
_XRL = "x-ratelimit-"
OBSERVED_HEADERS: tuple[str, ...] = (
    "retry-after",
    "retry-after-ms",
    "x-ms-retry-after-ms",
    "ratelimit",
    "ratelimit-policy",
    "ratelimit-limit",
    "ratelimit-remaining",
    "ratelimit-reset",
    *(_XRL + s for s in ("limit", "remaining", "reset", "reset-after", "used", "resource", "bucket")),
    *(f"{_XRL}{f}-{k}" for k in ("requests", "tokens") for f in ("limit", "remaining", "reset")),
    "x-rate-limit",
    "x-rate-limit-limit",
    "x-rate-limit-remaining",
    "x-rate-limit-reset",
    *(
        f"anthropic-ratelimit-{k}-{f}"
        for k in ("requests", "tokens", "input-tokens", "output-tokens")
        for f in ("limit", "remaining", "reset")
    ),
    "x-shopify-shop-api-call-limit",
    "sforce-limit-info",
    *(
        "x-hubspot-ratelimit-" + s
        for s in (
            "daily",
            "daily-remaining",
            "interval-milliseconds",
            "max",
            "remaining",
            "secondly",
            "secondly-remaining",
        )
    ),
)


def _var(name: str) -> str:
    return name.lower().replace("-", "_")


def _canon(name: str) -> str:
    return "-".join(p[:1].upper() + p[1:] for p in name.split("-"))


def _statuses() -> list[int]:
    def walk(cls: type[ProxyError]) -> Iterable[type[ProxyError]]:
        yield cls
        for sub in cls.__subclasses__():
            yield from walk(sub)

    return sorted({c.status for c in walk(ProxyError)} - {407})


def _ms(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


def _json_error(code: str, message: str) -> str:
    assert "'" not in message and '"' not in message  # inside a single-quoted nginx string
    return f'\'{{"error":"{code}","message":"{message}"}}\''


def _service(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError("--service", f"must be the service's base URL (http://HOST:PORT), got {url!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return parts.scheme, f"{host}:{port}"


def _decision_server(where: str) -> str:
    """nginx's ``server`` for ``decision_listen``; a wildcard host is reached on loopback."""
    if where.startswith("unix:"):
        return where
    host, _, port = where.rpartition(":")
    host = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]", "": "127.0.0.1"}.get(host, host)
    return f"{host}:{port}"


def memory_backed(path: Path, mounts: str) -> bool | None:
    """Whether ``path`` is on tmpfs or ramfs, by the longest mount point of ``mounts`` (the text
    of /proc/self/mounts) that contains it; None when no mount point does."""
    best: tuple[int, str] | None = None
    target = str(path).rstrip("/") + "/"
    for line in mounts.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        # /proc/self/mounts escapes space, tab, newline and backslash as octal.
        point = parts[1].encode().decode("unicode_escape").rstrip("/") + "/"
        if target.startswith(point) and (best is None or len(point) >= best[0]):
            best = (len(point), parts[2])
    return None if best is None else best[1] in _MEMORY_FS


def _pool(entry: str) -> tuple[str, str]:
    name, sep, addr = entry.partition("=")
    host, _, port = addr.rpartition(":")
    literal = host.strip("[]")
    try:
        ipaddress.ip_address(literal)
        ok = bool(sep and name and port.isdigit())
    except ValueError:
        ok = False
    if not ok or not set(name.lower()) <= set("abcdefghijklmnopqrstuvwxyz0123456789.-"):
        raise ConfigError(
            "--keepalive", f"must be NAME=IP:PORT (the address as the decision names it), got {entry!r}"
        )
    return name.lower(), addr


def render(
    settings: Settings,
    injectable: Iterable[str],
    *,
    listen: str,
    service: str,
    prefix: Path,
    workers: str = "auto",
    trusted_ca: Path | None = None,
    report: tuple[str, int] | None = None,
    keepalive: Iterable[str] = (),
) -> str:
    """The complete nginx.conf (main and http contexts), for ``nginx -p PREFIX -c FILE``.

    ``keepalive``: ``NAME=IP:PORT`` entries, each a pool of kept-alive upstream connections used
    only when a decision names exactly that checked address *and* that name (a pooled TLS
    connection was verified for its name, never reused for another); nginx cannot pool
    connections to addresses it learns per call, so without an entry each call connects anew.
    """
    token = settings.decision_token
    if not token:
        raise ConfigError(
            "decision_token",
            "nginx in front needs the decision endpoint: set PROXY_DECISION_TOKEN (32+ random "
            "characters) for the service and generate the config again",
        )
    scheme, service_addr = _service(service)
    host = urlsplit(service).hostname or ""
    # Without decision_listen nginx asks the main listener: its answers carry credentials.
    in_clear = settings.decision_listen is None and scheme == "http" and not settings.nginx_network_ok
    if in_clear and host != "localhost" and not is_loopback(host):
        raise ConfigError(
            "--service",
            f"{host!r} is not a loopback address, and decisions carry credentials in clear: "
            "give nginx a loopback or https:// URL, or set decision_listen, or set "
            "nginx_network_ok = true when a private network joins nginx and this service",
        )
    report = report or settings.nginx_report_listen
    names = [n for n in injectable if n not in CONTROL_SET]
    p = str(prefix.resolve()).rstrip("/")
    ca = str(trusted_ca or settings.upstream_ca_file or SYSTEM_CA)
    wait_s = settings.max_wait_ms_cap / 1000 + settings.upstream_connect_timeout_s + 5
    o: list[str] = []
    w = o.append

    w("# Generated by `connection-proxy nginx-config`. It holds the decision token: keep it mode 0600.")
    w(f"worker_processes {workers};")
    w(f"pid {p}/nginx.pid;")
    w(f"error_log {p}/error.log warn;")
    w("events { worker_connections 4096; }")
    w("http {")
    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        w(f"    {kind}_temp_path {p}/{kind}_temp;")
    w("    access_log off;")
    w("    server_tokens off;")
    w("    default_type application/json;")
    w("    client_max_body_size 0;")
    cache_s = settings.nginx_decision_cache_s
    if cache_s > 0:
        # The decision cache holds credentials (and the caller keys in its keys): memory-backed,
        # written in place (no temp file under the prefix), small; entries live at most
        # X-Accel-Expires seconds (+1, nginx's clock) and go once unused for the cache's lifetime.
        cache_dir = str(settings.nginx_decision_cache_dir).rstrip("/")
        if not set(cache_dir) <= _PATH_CHARS:
            raise ConfigError(
                "nginx_decision_cache_dir",
                "may hold only letters, digits and . _ / - (it is written into nginx.conf)",
            )
        w(
            f"    proxy_cache_path {cache_dir} levels=1:2 keys_zone=cp_decisions:2m max_size=16m"
            f" inactive={cache_s}s use_temp_path=off;"
        )
        # The key holds the caller's Connection, not the headers it names, whose presence sends
        # the call to the service route: such calls are always decided, never cached. (A map
        # tries no regex on an empty value: "" is listed.)
        w(
            '    map $http_connection $cp_nominates { "" ""; keep-alive ""; close "";'
            ' "~*^[\\t ,]*((keep-alive|close)[\\t ,]*)*$" ""; default 1; }'
        )
    w(f"    upstream cp_service {{ server {service_addr}; keepalive 64; }}")
    decider = "cp_service"
    if settings.decision_listen is not None:
        # The lean decision listener (proxy.web.decide_listen): kept-alive HTTP/1.1 as well.
        decider = "cp_decider"
        w(f"    upstream cp_decider {{ server {_decision_server(settings.decision_listen)}; keepalive 64; }}")
    w(f"    map $cp_route $cp_proto {{ service {scheme}; default $cp_scheme; }}")
    pools = [_pool(entry) for entry in keepalive]
    for i, (_, addr) in enumerate(pools):
        w(f"    upstream cp_up_{i} {{ server {addr}; keepalive 32; }}")
    w('    map "$cp_route|$cp_sni|$cp_addr" $cp_target {')
    w('        "~^service\\|" cp_service;')
    for i, (name, addr) in enumerate(pools):
        w(f'        "upstream|{name}|{addr}" cp_up_{i};')
    w("        default $cp_addr;")
    w("    }")
    w(f'    map $cp_route $cp_host_out {{ service "{service_addr}"; default $cp_host; }}')
    w("    map $cp_route $cp_uri_out { service $request_uri; default $cp_uri; }")
    w('    map $cp_error $cp_error_out { "" SERVICE_UNAVAILABLE; default $cp_error; }')
    # The service route's answer is path mode's own: its X-Proxy-Error is the service's.
    w('    map $cp_route $cp_own_error { service $upstream_http_x_proxy_error; default ""; }')
    for name in names:
        v = _var(name)
        w(f'    map $cp_s_{v} $cp_o_{v} {{ "1" $cp_h_{v}; default $http_{v}; }}')
    fields = ",".join(f'"{h}":"$upstream_http_{_var(h)}"' for h in OBSERVED_HEADERS)
    # Reported: calls nginx carried (a decision token) whose answer the limiter can learn from
    # (a rate-limit header or a 4xx/5xx), or every one with nginx_report = "all".
    signals = "".join(f"$upstream_http_{_var(h)}" for h in OBSERVED_HEADERS)
    w('    map $status $cp_failed { "~^[45]" 1; default ""; }')
    w(f'    map "$cp_failed{signals}" $cp_signal {{ "" ""; default 1; }}')
    gate = "1" if settings.nginx_report == "all" else "$cp_signal"
    w(f'    map "$cp_obs|{gate}" $cp_report {{ "~^\\|" ""; "~\\|$" ""; default 1; }}')
    w(
        f'    log_format cp_report escape=json \'{{"o":"$cp_obs","s":"$status","r":"$request_id","h":{{{fields}}}}}\';'
    )
    w("    server {")
    w(f"        listen {listen};")
    w("        keepalive_requests 100000;")
    w("        error_page 405 = @cp_method;")
    w("        error_page 404 = @cp_notfound;")  # nginx's own 404s (the internal location)
    # Every path is decided: nginx matches locations on the decoded, normalised path, the
    # decision reads the raw $request_uri exactly as path mode does ("/proxy/%2e%2e/x" included).
    w("        location / {")
    w("            auth_request /_cp_decide;")
    own = [
        "route",
        "scheme",
        "addr",
        "host",
        "sni",
        "uri",
        "obs",
        "status",
        "body",
        "error",
        "retry_after",
        "retry_after_ms",
        "request_id",
    ]
    for v in own:
        w(f"            auth_request_set $cp_{v} $upstream_http_x_cp_{v};")
    for name in ("connection", *CONTROL_SET, *NGINX_STRIPS, *names):
        v = _var(name)
        w(f"            auth_request_set $cp_h_{v} $upstream_http_x_cp_h_{v};")
        if name in names:
            w(f"            auth_request_set $cp_s_{v} $upstream_http_x_cp_s_{v};")
    w("            error_page 403 = @cp_refused;")
    w("            error_page 500 = @cp_unavailable;")
    w("            error_page 502 = @cp_unreachable;")
    w("            error_page 504 = @cp_timeout;")
    w("            proxy_pass $cp_proto://$cp_target$cp_uri_out;")
    w("            proxy_http_version 1.1;")
    w("            proxy_set_header Host $cp_host_out;")
    # Empty, except for the service route: there path mode reads the caller's own Connection.
    w("            proxy_set_header Connection $cp_h_connection;")
    for name in (*CONTROL_SET, *NGINX_STRIPS):
        w(f"            proxy_set_header {_canon(name)} $cp_h_{_var(name)};")
    for name in names:
        w(f"            proxy_set_header {_canon(name)} $cp_o_{_var(name)};")
    w("            proxy_ssl_server_name on;")
    w("            proxy_ssl_name $cp_sni;")
    w("            proxy_ssl_verify on;")
    w("            proxy_ssl_verify_depth 8;")
    w(f"            proxy_ssl_trusted_certificate {ca};")
    w("            proxy_buffering off;")
    w("            proxy_request_buffering off;")
    w("            proxy_redirect off;")
    w("            proxy_next_upstream off;")
    w(f"            proxy_connect_timeout {_ms(settings.upstream_connect_timeout_s)};")
    w(f"            proxy_read_timeout {_ms(settings.upstream_read_timeout_s)};")
    w(f"            proxy_send_timeout {_ms(settings.upstream_read_timeout_s)};")
    # The X-Proxy-* namespace belongs to the service: an upstream cannot forge its errors.
    for name in OWN_RESPONSE_HEADERS:
        w(f"            proxy_hide_header {_canon(name)};")
    w("            add_header X-Proxy-Error $cp_own_error always;")
    # An upstream's answer is relayed, never obeyed: its X-Accel-Redirect would redirect nginx
    # internally (to /_cp_decide, whose answer holds the credential), the others would set
    # nginx's rate, buffering or charset. (nginx hides X-Accel-* from the caller by default.)
    w(
        "            proxy_ignore_headers X-Accel-Redirect X-Accel-Expires X-Accel-Limit-Rate"
        " X-Accel-Buffering X-Accel-Charset;"
    )
    w("            proxy_hide_header Proxy-Authenticate;")
    w("            proxy_hide_header Trailer;")
    if report is not None:
        w(
            f"            access_log syslog:server={report[0]}:{report[1]},tag=cp,nohostname cp_report if=$cp_report;"
        )
    w("        }")
    w("        location = /_cp_decide {")
    w("            internal;")
    w(f"            proxy_pass {scheme if decider == 'cp_service' else 'http'}://{decider}/_decide;")
    w("            proxy_http_version 1.1;")
    w("            proxy_method GET;")
    w("            proxy_pass_request_body off;")
    w('            proxy_set_header Content-Length "";')
    w('            proxy_set_header Transfer-Encoding "";')
    w('            proxy_set_header Connection "";')
    w(f'            proxy_set_header Host "{service_addr}";')
    w("            proxy_set_header X-Original-Method $request_method;")
    w("            proxy_set_header X-Original-URI $request_uri;")
    w("            proxy_set_header X-CP-Caller-Connection $http_connection;")
    w("            proxy_set_header X-CP-Front nginx;")
    w(f'            proxy_set_header X-CP-Decision-Token "{token}";')
    w("            proxy_buffer_size 16k;")
    w("            proxy_buffers 4 16k;")
    w(f"            proxy_connect_timeout {_ms(settings.upstream_connect_timeout_s)};")
    w(f"            proxy_read_timeout {_ms(wait_s)};")
    if cache_s > 0:
        _cache_key(w)
    w("        }")
    w("        location @cp_refused {")
    w("            add_header X-Proxy-Error $cp_error_out always;")
    w("            add_header Retry-After $cp_retry_after always;")
    w("            add_header Retry-After-Ms $cp_retry_after_ms always;")
    w("            add_header X-Request-Id $cp_request_id always;")
    for status in _statuses():
        w(f"            if ($cp_status = {status}) {{ return {status} $cp_body; }}")
    w(
        "            return 503 "
        + _json_error("SERVICE_UNAVAILABLE", "the decision service refused without saying why; check its log")
        + ";"
    )
    w("        }")
    for loc, status, code, msg in (
        ("unavailable", 503, "SERVICE_UNAVAILABLE", "the decision service is unreachable; retry shortly"),
        (
            "unreachable",
            502,
            "UPSTREAM_UNREACHABLE",
            "the call to the upstream failed; check the base URL of the connection, or retry",
        ),
        ("timeout", 504, "UPSTREAM_TIMEOUT", "the upstream did not answer in time"),
        (
            "method",
            405,
            "METHOD_NOT_ALLOWED",
            "this method is refused (TRACE would echo the injected credential)",
        ),
        ("notfound", 404, "NOT_FOUND", "no such endpoint; calls are made as in path mode, /proxy/{path}"),
    ):
        w(f"        location @cp_{loc} {{")
        w(f"            add_header X-Proxy-Error {code} always;")
        w(f"            return {status} {_json_error(code, msg)};")
        w("        }")
    w("    }")
    w("}")
    return "\n".join(o) + "\n"


def _cache_key(w: Callable[[str], None]) -> None:
    w("            proxy_cache cp_decisions;")
    w("            proxy_cache_methods GET HEAD POST;")
    # Everything a decision depends on besides the URI: the caller's key and selectors, the
    # controls, the cookies it may merge and the headers the caller's Connection names. Joined by
    # LF (\\n in an nginx quoted string), which no request line or header value can hold.
    key = "\\n".join(
        [
            "$request_method",
            "$request_uri",
            "$http_authorization",
            "$http_proxy_authorization",
            "$http_x_connection_id",
            "$http_x_tenant_id",
            "$http_x_runtime_user_id",
            "$http_x_org_id",
            "$http_x_proxy_max_wait_ms",
            "$http_x_proxy_retries",
            "$http_cookie",
            "$http_connection",
        ]
    )
    w(f'            proxy_cache_key "{key}";')
    w("            proxy_cache_bypass $cp_nominates;")
    w("            proxy_no_cache $cp_nominates;")
    w("            proxy_cache_lock off;")
    # A cached decision is read from its file on every call: keep the descriptors open (opening,
    # stating and closing it was ~20% of a cached call's CPU, bench/offload.py). Never stale: the
    # cache node records the file's inode, and a replaced entry (a new decision) is reopened;
    # expiry is read from the entry itself. Descriptors of dropped entries close within 2 s.
    w("            open_file_cache max=1024 inactive=2s;")
    w("            open_file_cache_valid 1s;")
    w("            open_file_cache_errors off;")
