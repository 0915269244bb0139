"""Benchmark: HTTPS_PROXY interception (CONNECT) against path mode, and what a new tunnel costs.

In one run, against one local TLS upstream (nginx on 127.0.0.2 with a trustme certificate the
service trusts via ``upstream_ca_file``; both modes pay the same upstream TLS):

- **path mode**: ``GET /proxy/...`` over one kept-alive plain-HTTP connection;
- **tunnel, kept alive**: one ``CONNECT``, then the same GETs inside the intercepted TLS tunnel
  (the client side of TLS terminated by the service, credential injected, same pipeline);
- **new tunnel, cached leaf**: ``CONNECT`` + proxy auth + TLS handshake, no request, to the
  same host each time (its leaf comes from the in-memory cache);
- **new tunnel, uncached leaf**: the same to a new host each time (``hN.bench.test``, bound by an
  ``allowed_hosts`` wildcard), so every tunnel mints a leaf (EC P-256 key + signature);
- **https:// listener** (``listen_tls_hostnames``: the listener's certificate minted from the same
  CA): a second service process on the same data dir whose listener speaks TLS, so a tunnel is
  TLS inside TLS. The same kept-alive GETs and new tunnels, with urllib3 as the client (the
  standard library speaks no TLS to a proxy); its client wall time is urllib3's pure-Python inner
  TLS layer, so compare service CPU only.

Reported: the service process's CPU (utime+stime from /proc) per call or per tunnel, and the
client-observed wall time. One sequential client: this measures cost, not throughput.

Run: ``python bench/tunnel.py [--quick]``.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent), *(p for p in sys.path if Path(p or ".").resolve() != _HERE), str(_HERE)]

import _common as c  # noqa: E402

TENANT = "bench-tenant"
CONN = "bench-conn"
UP_HOST = "127.0.0.2"


def start_tls_upstream(stack: object, tmp: Path) -> tuple[str, int, Path]:
    import trustme
    from _refservers import UPSTREAM_BODY

    nginx = c.nginx_binary()
    if nginx is None:
        raise c.Unavailable("nginx is not installed (the TLS upstream)")
    ca = trustme.CA()
    leaf = ca.issue_cert(UP_HOST)
    ndir = tmp / "upstream-nginx"
    ndir.mkdir()
    leaf.private_key_pem.write_to_path(str(ndir / "key.pem"))
    leaf.cert_chain_pems[0].write_to_path(str(ndir / "cert.pem"))
    ca_path = tmp / "upstream-ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    port = c.free_port()
    (ndir / "nginx.conf").write_text(
        c.nginx_prelude(ndir)
        + f"""http {{
    access_log off;
    client_body_temp_path {ndir}/body;
    server {{
        listen {UP_HOST}:{port} ssl backlog=1024;
        ssl_certificate {ndir}/cert.pem;
        ssl_certificate_key {ndir}/key.pem;
        keepalive_requests 1000000;
        location / {{ default_type application/json; return 200 '{UPSTREAM_BODY.decode()}'; }}
    }}
}}
"""
    )
    proc = c.spawn(
        stack, "upstream", [nginx, "-p", str(ndir), "-c", str(ndir / "nginx.conf")], tmp, load_side=True
    )  # type: ignore[arg-type]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection((UP_HOST, port), 0.5).close()
            return f"https://{UP_HOST}:{port}", port, ca_path
        except OSError:
            if not proc.alive:
                break
            time.sleep(0.05)
    raise c.StartError(f"nginx TLS upstream did not start:\n{proc.tail()}")


def per_call_path(svc: c.Service, key: str, n: int) -> tuple[float, float]:
    conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=10)
    headers = {"Authorization": f"Bearer {key}", "X-Connection-Id": CONN}

    def call() -> None:
        conn.request("GET", "/proxy/bench/items?page=1", headers=headers)
        r = conn.getresponse()
        r.read()
        assert r.status == 200, r.status

    return measure(svc, call, n)


def tunnel_conn(
    svc: c.Service, key: str, host: str, port: int, ctx: ssl.SSLContext
) -> http.client.HTTPSConnection:
    import base64

    conn = http.client.HTTPSConnection("127.0.0.1", svc.port, timeout=10, context=ctx)
    auth = base64.b64encode(f"{CONN}:{key}".encode()).decode()
    conn.set_tunnel(host, port, headers={"Proxy-Authorization": f"Basic {auth}"})
    return conn


def per_call_tunnel(
    svc: c.Service, key: str, up_port: int, ctx: ssl.SSLContext, n: int
) -> tuple[float, float]:
    conn = tunnel_conn(svc, key, UP_HOST, up_port, ctx)

    def call() -> None:
        conn.request("GET", "/bench/items?page=1")
        r = conn.getresponse()
        r.read()
        assert r.status == 200, r.status

    call()  # the CONNECT and handshake happen here, outside the measurement
    return measure(svc, call, n)


def per_new_tunnel(
    svc: c.Service, key: str, up_port: int, ctx: ssl.SSLContext, n: int, fresh: bool
) -> tuple[float, float]:
    count = iter(range(10**9))

    def tunnel() -> None:
        host = f"h{next(count)}-{time.monotonic_ns()}.bench.test" if fresh else UP_HOST
        conn = tunnel_conn(svc, key, host, up_port, ctx)
        conn.connect()  # CONNECT, 200, TLS handshake (the leaf for host), no request
        conn.close()

    return measure(svc, tunnel, n)


def start_tls_twin(stack: object, tmp: Path, svc: c.Service, extra_env: dict[str, str]) -> c.Service:
    """A second ``serve`` on ``svc``'s data dir (same store, CA, keys) with an https listener."""
    import os

    port = c.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROXY_")}
    env.update(
        PROXY_DATA_DIR=str(tmp / f"data-{svc.name}"),
        PROXY_ADMIN_TOKEN=c.ADMIN_TOKEN,
        PROXY_LISTEN=f"127.0.0.1:{port}",
        PROXY_LISTEN_TLS_HOSTNAMES="127.0.0.1",
        PROXY_SERVICE_QUOTA_PER_MINUTE="1000000000",
        **extra_env,
    )
    proc = c.spawn(stack, "cp-tls", [c.PY, "-m", "proxy", "serve"], tmp, env=env, cpus=None, cwd=c.REPO)  # type: ignore[arg-type]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return c.Service("cp-tls", f"https://127.0.0.1:{port}", port, proc)
        except OSError:
            if not proc.alive():
                break
            time.sleep(0.05)
    raise c.StartError(f"the https-listener service did not start:\n{proc.tail()}")


def _proxy_manager(svc: c.Service, key: str, ctx: ssl.SSLContext) -> object:
    import base64

    import urllib3

    auth = base64.b64encode(f"{CONN}:{key}".encode()).decode()
    return urllib3.ProxyManager(
        svc.url,
        proxy_headers={"Proxy-Authorization": f"Basic {auth}"},
        proxy_ssl_context=ctx,
        ssl_context=ctx,
    )


def per_call_tls_listener(
    svc: c.Service, key: str, up_url: str, ctx: ssl.SSLContext, n: int
) -> tuple[float, float]:
    pm: Any = _proxy_manager(svc, key, ctx)

    def call() -> None:
        r = pm.request("GET", f"{up_url}/bench/items?page=1", retries=False)
        assert r.status == 200, r.status

    call()  # the proxy TLS, CONNECT and inner handshake happen here, outside the measurement
    return measure(svc, call, n)


def per_new_tunnel_tls_listener(
    svc: c.Service, key: str, up_url: str, ctx: ssl.SSLContext, n: int
) -> tuple[float, float]:
    pm: Any = _proxy_manager(svc, key, ctx)
    pool = pm.connection_from_url(up_url)

    def tunnel() -> None:
        conn = pool._new_conn()
        pool._prepare_proxy(conn)  # TLS to the proxy, CONNECT, 200, TLS inside it; no request
        assert conn.is_verified and conn.proxy_is_verified
        conn.close()

    return measure(svc, tunnel, n)


def measure(svc: c.Service, fn: object, n: int) -> tuple[float, float]:
    """(service CPU us per op, client wall us per op) over ``n`` ops after a short warm-up."""
    for _ in range(min(50, n)):
        fn()  # type: ignore[operator]
    cpu0 = c.tree_cpu_seconds(svc.proc.pid)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()  # type: ignore[operator]
    wall = time.perf_counter() - t0
    cpu = c.tree_cpu_seconds(svc.proc.pid) - cpu0
    return cpu / n * 1e6, wall / n * 1e6


def main() -> int:
    args = c.common_args(__doc__ or "").parse_args()
    n_calls, n_tunnels = (200, 50) if args.quick else (3000, 400)
    with c.workspace("bench-tunnel-") as (tmp, stack):
        try:
            up_url, up_port, up_ca = start_tls_upstream(stack, tmp)
        except c.Unavailable as exc:
            print(f"cannot run: {exc}")
            return 1
        extra_env = {"PROXY_EGRESS_ALLOW": "127.0.0.0/8", "PROXY_UPSTREAM_CA_FILE": str(up_ca)}
        svc = c.start_service(stack, tmp, "cp", cpus=None, extra_env=extra_env)
        c.put_connection(
            svc,
            TENANT,
            CONN,
            {
                "integration_id": "http_bearer",
                "parameters": {"token": "bench-upstream-token", "base_url": up_url + "/"},
                "allowed_hosts": [UP_HOST, "*.bench.test"],
            },
        )
        key = c.mint_api_key(svc, TENANT)
        with urllib.request.urlopen(svc.url + "/ca.pem", timeout=10) as r:
            ctx = ssl.create_default_context(cadata=r.read().decode())
        tls_svc = start_tls_twin(stack, tmp, svc, extra_env)
        rows = [
            ("path mode, kept-alive connection", "call", *per_call_path(svc, key, n_calls)),
            (
                "tunnel, kept alive (intercepted TLS)",
                "call",
                *per_call_tunnel(svc, key, up_port, ctx, n_calls),
            ),
            ("new tunnel, cached leaf", "tunnel", *per_new_tunnel(svc, key, up_port, ctx, n_tunnels, False)),
            (
                "new tunnel, uncached leaf (minted)",
                "tunnel",
                *per_new_tunnel(svc, key, up_port, ctx, n_tunnels, True),
            ),
            (
                "https:// listener: tunnel kept alive (TLS in TLS)",
                "call",
                *per_call_tls_listener(tls_svc, key, up_url, ctx, n_calls),
            ),
            (
                "https:// listener: new tunnel, cached leaves",
                "tunnel",
                *per_new_tunnel_tls_listener(tls_svc, key, up_url, ctx, n_tunnels),
            ),
        ]
    print(
        f"connection-proxy tunnel bench: {n_calls} calls / {n_tunnels} tunnels per row, one sequential client"
    )
    print(c.machine_note())
    c.print_table(
        ["what", "per", "service CPU us", "client wall us"],
        [[what, per, f"{cpu:.0f}", f"{wall:.0f}"] for what, per, cpu, wall in rows],
        title="tunnel (CONNECT) against path mode",
    )
    path_cpu, tunnel_cpu = rows[0][2], rows[1][2]
    inside = tunnel_cpu / path_cpu if path_cpu else None
    c.ratio_line("tunnel/path CPU per call", inside, "<= 1.5", None if inside is None else inside <= 1.5)
    minted = rows[3][2] / rows[2][2] if rows[2][2] else None
    c.ratio_line(
        "uncached/cached new tunnel CPU", minted, "any: informational, the cost of minting a leaf", True
    )
    print(
        f"leaf minting adds ~{rows[3][2] - rows[2][2]:.0f} us of service CPU to a new tunnel; cached leaves add none"
    )
    in_tls = rows[4][2] / rows[1][2] if rows[1][2] else None
    c.ratio_line(
        "https-listener/plain-listener tunnel CPU per call",
        in_tls,
        "any: informational, the cost of the second TLS layer",
        True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
