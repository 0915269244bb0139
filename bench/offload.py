"""Benchmark: data-plane offload. nginx carries the bytes, the service decides (issue 13).

In one run, against one local upstream, every row injecting the same bearer credential:
nginx alone (``proxy_set_header Authorization``, no decision); the floor of any ``auth_request``
design (nginx alone plus an ``auth_request`` to a static ``return 200``, and the same served from
``proxy_cache``); nginx in front with the generated configuration (``connection-proxy
nginx-config``) asking the service's lean decision listener (``decision_listen``, a unix
socket) on every call (uncached: ``nginx_decision_cache_s = 0``; with and without a keep-alive pool for
the upstream's checked address, ``nginx-config --keepalive``) and with decisions cached for one
second (pooled);
this service's path mode; and Node's ``http-proxy`` doing the same injection. The measured
processes (nginx, the service, Node) share one pinned core; CPU per call is theirs together.
The nginx-in-front rows report responses to the service over UDP (learning stays on).

Targets: uncached nginx + decision >= 1.5x Node's throughput; cached <= 2x nginx alone's CPU
per call.

Run: ``python bench/offload.py [--quick] [--duration S] [--repeat N]``.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent), *(p for p in sys.path if Path(p or ".").resolve() != _HERE), str(_HERE)]

import _common as c  # noqa: E402
import _refservers as refs  # noqa: E402

from proxy.catalogue import Catalogue  # noqa: E402
from proxy.nginxconf import render  # noqa: E402
from proxy.pipeline.decision import injectable_headers  # noqa: E402
from proxy.settings import load_settings  # noqa: E402

TENANT = "bench-tenant"
CONN = "bench-conn"
UPSTREAM_TOKEN = "bench-upstream-token"
PATH = "/bench/items?page=1"
DECISION_TOKEN = "bench-decision-token-0123456789abcdefghij"

NGINX = "nginx alone (proxy_set_header)"
FLOOR = "floor: auth_request to static 200"
FLOOR_CACHED = "floor: auth_request, cached static"
UNCACHED_NEW = "nginx + decision, uncached, no pool"
UNCACHED = "nginx + decision, uncached"
CACHED = "nginx + decision, cached 1 s"
PATHMODE = "connection-proxy path mode"
NODE = "node http-proxy"


@dataclass
class Target:
    label: str
    url: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    procs: list[c.Proc] = field(default_factory=list)
    missing: str = ""


def _globals() -> str:
    return "daemon off;" + (" user root;" if os.geteuid() == 0 else "")


def nginx_alone(stack: object, tmp: Path, upstream: str, cpus: frozenset[int] | None) -> Target:
    t = Target(NGINX, headers={"Authorization": "Bearer caller-key-placeholder", "X-Connection-Id": CONN})
    nginx = c.nginx_binary()
    if nginx is None:
        t.missing = "nginx is not installed (apt-get install nginx)"
        return t
    ndir = tmp / "nginx-alone"
    ndir.mkdir()
    port = c.free_port()
    conf = ndir / "nginx.conf"
    conf.write_text(
        c.nginx_prelude(ndir)
        + f"""http {{
    access_log off;
    client_body_temp_path {ndir}/body;
    proxy_temp_path {ndir}/proxy;
    fastcgi_temp_path {ndir}/fastcgi;
    uwsgi_temp_path {ndir}/uwsgi;
    scgi_temp_path {ndir}/scgi;
    upstream up {{ server {upstream.split("//", 1)[1]}; keepalive 128; }}
    server {{
        listen 127.0.0.1:{port};
        keepalive_requests 1000000;
        location = /healthz {{ return 200 "ok"; }}
        location /proxy/ {{
            proxy_pass http://up/;
            proxy_http_version 1.1;
            proxy_buffering off;
            proxy_set_header Connection "";
            proxy_set_header X-Connection-Id "";
            proxy_set_header Authorization "Bearer {UPSTREAM_TOKEN}";
        }}
    }}
}}
"""
    )
    try:
        proc = c.spawn(stack, "nginx-alone", [nginx, "-p", str(ndir), "-c", str(conf)], tmp, cpus=cpus)  # type: ignore[arg-type]
        c.wait_http(f"http://127.0.0.1:{port}/healthz", proc)
    except c.StartError as exc:
        t.missing = f"nginx did not start: {c.first_line(exc)}"
        return t
    t.url, t.procs = f"http://127.0.0.1:{port}/proxy" + PATH, [proc]
    return t


def nginx_floor(stack: object, tmp: Path, upstream: str, cpus: frozenset[int] | None, cached: bool) -> Target:
    """nginx alone plus an ``auth_request`` whose answer costs nothing: a static ``return 200``
    location (or the same behind ``proxy_cache``, served from the cache). No decision design
    on ``auth_request`` can be cheaper: the floor under the nginx + decision rows."""
    label = FLOOR_CACHED if cached else FLOOR
    t = Target(label, headers={"Authorization": "Bearer caller-key-placeholder", "X-Connection-Id": CONN})
    nginx = c.nginx_binary()
    if nginx is None:
        t.missing = "nginx is not installed (apt-get install nginx)"
        return t
    ndir = tmp / ("nginx-floor-cached" if cached else "nginx-floor")
    ndir.mkdir()
    port = c.free_port()
    static = f'add_header X-CP-H-Authorization "Bearer {UPSTREAM_TOKEN}"; return 200;'
    decide = (
        f"proxy_pass http://127.0.0.1:{port}/_static; proxy_cache floor; proxy_cache_valid 200 10s; "
        'proxy_cache_key "$request_uri|$http_authorization|$http_x_connection_id";'
        if cached
        else static
    )
    conf = ndir / "nginx.conf"
    conf.write_text(
        c.nginx_prelude(ndir)
        + f"""http {{
    access_log off;
    client_body_temp_path {ndir}/body;
    proxy_temp_path {ndir}/proxy;
    fastcgi_temp_path {ndir}/fastcgi;
    uwsgi_temp_path {ndir}/uwsgi;
    scgi_temp_path {ndir}/scgi;
    proxy_cache_path {ndir}/cache levels=1:2 keys_zone=floor:1m inactive=60s use_temp_path=off;
    upstream up {{ server {upstream.split("//", 1)[1]}; keepalive 128; }}
    server {{
        listen 127.0.0.1:{port};
        keepalive_requests 1000000;
        location = /healthz {{ return 200 "ok"; }}
        location = /_static {{ {static} }}
        location = /_auth {{
            internal;
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            {decide}
        }}
        location /proxy/ {{
            auth_request /_auth;
            auth_request_set $cp_h_authorization $upstream_http_x_cp_h_authorization;
            proxy_pass http://up/;
            proxy_http_version 1.1;
            proxy_buffering off;
            proxy_set_header Connection "";
            proxy_set_header X-Connection-Id "";
            proxy_set_header Authorization "Bearer {UPSTREAM_TOKEN}";
        }}
    }}
}}
"""
    )
    try:
        proc = c.spawn(stack, ndir.name, [nginx, "-p", str(ndir), "-c", str(conf)], tmp, cpus=cpus)  # type: ignore[arg-type]
        c.wait_http(f"http://127.0.0.1:{port}/healthz", proc)
    except c.StartError as exc:
        t.missing = f"nginx did not start: {c.first_line(exc)}"
        return t
    t.url, t.procs = f"http://127.0.0.1:{port}/proxy" + PATH, [proc]
    return t


def service_row(
    stack: object,
    tmp: Path,
    label: str,
    upstream: str,
    cpus: frozenset[int] | None,
    cache_s: int | None,
    pool: bool = True,
) -> Target:
    """Path mode (``cache_s`` None) or the service behind generated nginx config; ``pool``: with
    a keep-alive pool for the upstream's address (``nginx-config --keepalive``)."""
    t = Target(label)
    name = "svc-" + "".join(ch for ch in label if ch.isalnum())[:30]
    env = {"PROXY_LOG_LEVEL": "warning"}
    report = None
    if cache_s is not None:
        report = ("127.0.0.1", c.free_port())
        lean = f"unix:{tmp}/{name}.sock"
        env.update(
            PROXY_DECISION_LISTEN=lean,
            PROXY_DECISION_TOKEN=DECISION_TOKEN,
            PROXY_NGINX_DECISION_CACHE_S=str(cache_s),
            PROXY_NGINX_REPORT_LISTEN=f"{report[0]}:{report[1]}",
        )
    try:
        svc = c.start_service(stack, tmp, name, cpus=cpus, extra_env=env)  # type: ignore[arg-type]
        c.put_connection(
            svc,
            TENANT,
            CONN,
            {"integration_id": "http_bearer", "parameters": {"token": UPSTREAM_TOKEN, "base_url": upstream}},
        )
        key = c.mint_api_key(svc, TENANT)
    except (c.StartError, c.Unavailable) as exc:
        t.missing = f"the service did not start: {c.first_line(exc)}"
        return t
    t.headers = {"Authorization": f"Bearer {key}", "X-Connection-Id": CONN}
    t.procs = [svc.proc]
    if cache_s is None:
        t.url = svc.url + "/proxy" + PATH
        c.warm(t.url, t.headers)
        return t
    nginx = c.nginx_binary()
    if nginx is None:
        t.missing = "nginx is not installed (apt-get install nginx)"
        return t
    # The decision cache on tmpfs, as deployed (one directory per nginx, removed afterwards).
    cache_dir = tempfile.mkdtemp(prefix=f"cp-bench-{name}-", dir="/dev/shm")
    stack.callback(shutil.rmtree, cache_dir, True)  # type: ignore[attr-defined]
    settings = load_settings(
        env={},
        overrides={
            "decision_token": DECISION_TOKEN,
            "decision_listen": lean,
            "nginx_decision_cache_s": cache_s,
            "nginx_decision_cache_dir": cache_dir,
            "nginx_report_listen": f"{report[0]}:{report[1]}" if report else "",
        },
    )
    ndir = tmp / f"nginx-{name}"
    ndir.mkdir()
    port = c.free_port()
    conf = ndir / "nginx.conf"
    names = injectable_headers(Catalogue.load(), ())
    addr = upstream.split("//", 1)[1]
    keepalive = [f"{addr.rsplit(':', 1)[0]}={addr}"] if pool else []
    conf.write_text(
        render(
            settings,
            names,
            listen=f"127.0.0.1:{port}",
            service=svc.url,
            prefix=ndir,
            workers="1",
            keepalive=keepalive,
        )
    )
    try:
        proc = c.spawn(
            stack,  # type: ignore[arg-type]
            f"nginx-{name}",
            [nginx, "-p", str(ndir), "-c", str(conf), "-g", _globals()],
            tmp,
            cpus=cpus,
        )
        c.wait_http(f"http://127.0.0.1:{port}/healthz", proc)
    except c.StartError as exc:
        t.missing = f"nginx did not start: {c.first_line(exc)}"
        return t
    t.url = f"http://127.0.0.1:{port}/proxy" + PATH
    t.procs.append(proc)
    c.warm(t.url, t.headers)
    return t


def node_row(stack: object, tmp: Path, upstream: str, cpus: frozenset[int] | None) -> Target:
    t = Target(NODE, headers={"Authorization": "Bearer caller-key-placeholder", "X-Connection-Id": CONN})
    start = getattr(refs, "start_node_http_proxy", None)
    if start is None:
        t.missing = "bench/_refservers.py has no start_node_http_proxy yet (branch bench)"
        return t
    try:
        url, proc = start(
            stack,
            tmp,
            upstream,
            ("Authorization", f"Bearer {UPSTREAM_TOKEN}"),
            cpus=cpus,
            strip_prefix="/proxy",
            drop_headers=("X-Connection-Id",),
        )
    except (c.StartError, c.Unavailable) as exc:
        t.missing = c.first_line(exc)
        return t
    t.url, t.procs = url + "/proxy" + PATH, [proc]
    return t


def main() -> int:
    args = c.common_args(__doc__ or "").parse_args()
    duration = args.duration or (1.0 if args.quick else 5.0)
    warmup = 0.0 if args.quick else 1.0
    repeats = args.repeat or (1 if args.quick else 3)
    conns = 64
    place = c.placement()
    print(f"# machine: {c.machine_note()}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"# Offload: GET /proxy/bench/items, {conns} connections, bearer credential injected")
    print(
        f"# load: {c.load_tool()}, {duration:g}s per run, warm-up {warmup:g}s, best of {repeats} "
        f"interleaved run(s); {place.describe()}; measured processes share "
        + (f"CPU {c.fmt_cpus(place.server)}" if place.server else "all CPUs (not pinned)")
    )
    results: dict[str, c.Measured | str] = {}
    with c.workspace("cp-bench-offload-", grace=1.0 if args.quick else 3.0) as (tmp, stack):
        upstream, kind = c.start_upstream(stack, tmp, place.load)
        print(f"# upstream: {kind}")
        cpus = place.server
        targets = [
            nginx_alone(stack, tmp, upstream, cpus),
            nginx_floor(stack, tmp, upstream, cpus, cached=False),
            nginx_floor(stack, tmp, upstream, cpus, cached=True),
            service_row(stack, tmp, UNCACHED_NEW, upstream, cpus, 0, pool=False),
            service_row(stack, tmp, UNCACHED, upstream, cpus, 0),
            service_row(stack, tmp, CACHED, upstream, cpus, 1),
            service_row(stack, tmp, PATHMODE, upstream, cpus, None),
            node_row(stack, tmp, upstream, cpus),
        ]
        for rep in range(repeats):
            for t in targets:
                if t.missing:
                    results[t.label] = t.missing
                    continue
                m: c.Measured | str
                try:
                    m = c.measure(
                        t.url,
                        connections=conns,
                        duration=duration,
                        headers=t.headers,
                        load_cpus=place.load,
                        cpu_of=t.procs,
                        warmup=warmup if rep == 0 else 0.0,
                    )
                except (RuntimeError, ValueError) as exc:
                    m = str(exc)
                results[t.label] = c.better(results.get(t.label), m)
    rows = [[t.label, *c.load_cells(results[t.label])] for t in targets]
    print()
    c.print_table(["front", *c.LOAD_HEADERS], rows)
    c.print_load_notes({(k, conns): v for k, v in results.items()})

    def ok(label: str) -> c.Measured | None:
        m = results.get(label)
        return m if isinstance(m, c.Measured) and not m.load.bad and m.load.requests else None

    un, node, cached, alone = ok(UNCACHED), ok(NODE), ok(CACHED), ok(NGINX)
    name = "nginx + decision (uncached) / node http-proxy rps"
    if un and node:
        v = un.load.rps / node.load.rps
        c.ratio_line(name, v, ">= 1.5", v >= 1.5)
    else:
        c.ratio_line(name, None, ">= 1.5", None, str(results.get(NODE if not node else UNCACHED)))
    name = "nginx + decision (cached) / nginx alone CPU per call"
    if cached and alone and cached.cpu_us_per_req and alone.cpu_us_per_req:
        v = cached.cpu_us_per_req / alone.cpu_us_per_req
        c.ratio_line(name, v, "<= 2", v <= 2)
    else:
        c.ratio_line(name, None, "<= 2", None, str(results.get(CACHED if not cached else NGINX)))
    floor = ok(FLOOR_CACHED)
    if floor and alone and floor.cpu_us_per_req and alone.cpu_us_per_req:
        print(
            "info floor (auth_request, cached static) / nginx alone CPU per call: "
            f"{floor.cpu_us_per_req / alone.cpu_us_per_req:.2f} (no auth_request design is below it)"
        )
    p = ok(PATHMODE)
    if un and p:
        print(f"info nginx + decision (uncached) / path mode rps: {un.load.rps / p.load.rps:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
