"""Benchmark: connection-proxy's path mode against a bare aiohttp pass-through, nginx and no proxy.

In one run, against one local upstream (a raw asyncio server answering a small JSON body):
direct to the upstream; a bare aiohttp pass-through (the reference: the same hop, no features);
connection-proxy in path mode (tenant API key, http_bearer credential injected, credential
cache and audit on); connection-proxy with Redis at ``--workers 1`` and ``--workers 2``;
nginx with ``proxy_set_header Authorization`` when nginx is installed; and Node's ``http-proxy``
(npm, the peer a user would otherwise pick) setting the same header to the same upstream. For each: requests/s,
p50/p99 latency at 1 and 64 connections, and the CPU microseconds per request of the proxy
process(es) (utime+stime of the process and its children from /proc, over completed requests).
Targets (issue 3): connection-proxy CPU/request <= 1.3x the bare pass-through's; --workers 2 >= 1.6x
the throughput of one worker.

A/B mode, ``--ab TREE``: only the bare pass-through, this checkout's connection-proxy and the one
of the source tree TREE (e.g. an older commit unpacked with ``git archive``), interleaved, with
the order of the two swapped every repeat; it prints every run's CPU per request and the medians.
Both run without access lines unless ``--ab-access`` (then both write the default JSON line).

Run: ``python bench/proxy.py [--quick] [--duration S] [--repeat N] [--ab TREE]``.
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

_HERE = Path(__file__).resolve().parent
# bench/proxy.py would shadow the `proxy` package: the repo root goes first, this folder last.
sys.path[:] = [str(_HERE.parent), *(p for p in sys.path if Path(p or ".").resolve() != _HERE), str(_HERE)]

import _common as c  # noqa: E402
import _refservers  # noqa: E402

TENANT = "bench-tenant"
CONN = "bench-conn"
UPSTREAM_TOKEN = "bench-upstream-token"
PATH = "/bench/items?page=1"

BARE = "bare aiohttp pass-through"
CP = "connection-proxy"
# Like nginx's row (access_log off), the connection-proxy rows run without access lines
# (log_level=warning), so the issue 3 ratios compare what they always compared; this row is the
# default instead: one JSON access line per call (the output is a file, so "auto" means JSON).
CP_ACCESS = "connection-proxy + JSON access log"
QUIET = {"PROXY_LOG_LEVEL": "warning"}
W1 = "connection-proxy redis --workers 1"
W2 = "connection-proxy redis --workers 2"
NODE = "node http-proxy (npm)"
QUIET_SUFFIX = " (no access lines)"


@dataclass
class Target:
    label: str
    url: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    procs: list[c.Proc] = field(default_factory=list)
    pinned: str = ""
    missing: str = ""  # why the row cannot be measured


def nginx_conf(tmp: Path, port: int, upstream_port: int) -> Path:
    conf = tmp / "nginx.conf"
    conf.write_text(
        c.nginx_prelude(tmp)
        + f"""http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    upstream up {{ server 127.0.0.1:{upstream_port}; keepalive 128; }}
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
    return conf


def setup_connection_proxy(svc: c.Service, upstream: str) -> dict[str, str]:
    c.put_connection(
        svc,
        TENANT,
        CONN,
        {"integration_id": "http_bearer", "parameters": {"token": UPSTREAM_TOKEN, "base_url": upstream}},
    )
    key = c.mint_api_key(svc, TENANT)
    return {"Authorization": f"Bearer {key}", "X-Connection-Id": CONN}


def main() -> int:
    parser = c.common_args(__doc__ or "")
    parser.add_argument(
        "--ab",
        type=Path,
        default=None,
        metavar="TREE",
        help="A/B mode: this checkout's connection-proxy against the one in source tree TREE (default 5 repeats)",
    )
    parser.add_argument(
        "--ab-access",
        action="store_true",
        help="with --ab: both trees write the default JSON access line (measures its cost)",
    )
    args = parser.parse_args()
    ab_tree: Path | None = args.ab.resolve() if args.ab else None
    if ab_tree is not None and not (ab_tree / "proxy" / "__main__.py").is_file():
        parser.error(f"--ab {ab_tree}: no proxy/__main__.py there")
    duration = args.duration or (1.0 if args.quick else 5.0)
    warmup = 0.0 if args.quick else 1.0
    repeats = args.repeat or (1 if args.quick else 5 if ab_tree else 3)
    levels = (64,) if args.quick else (1, 64)
    place = c.placement()
    print(f"# machine: {c.machine_note()}")
    server_cpus, load_cpus = place.server, place.load
    pin_note = f"CPU {c.fmt_cpus(server_cpus)}" if server_cpus else "not pinned"
    print("# Proxy: GET /proxy/bench/items through each proxy to one local upstream")
    if ab_tree is not None:
        logs_note = (
            "the default JSON access line" if args.ab_access else "no access lines (log_level=warning)"
        )
        print(f"# A/B: this checkout against {ab_tree}, both with {logs_note}")
    print(
        f"# load: {c.load_tool()}, {duration:g}s per run, warm-up {warmup:g}s, best of {repeats} interleaved "
        f"run(s) per point; {place.describe()}"
    )
    print(
        "# the --workers rows leave the service unpinned (it needs both cores); the load generator, "
        "upstream and Redis still share CPU "
        + (c.fmt_cpus(load_cpus) if load_cpus else "with it")
        + ", so on a 2-core machine 2 workers cannot reach 2x"
    )

    targets: list[Target] = []
    results: dict[tuple[str, int], c.Measured | str] = {}
    runs: dict[tuple[str, int], list[c.Measured]] = {}  # every run, for the A/B medians
    ab_label = f"connection-proxy of {ab_tree}"
    with c.workspace("cp-bench-proxy-", grace=1.0 if args.quick else 3.0) as (tmp, stack):
        upstream, upstream_kind = c.start_upstream(stack, tmp, load_cpus)
        print(f"# upstream: {upstream_kind}")
        up_port = int(upstream.rsplit(":", 1)[1])
        common_headers = {"Authorization": "Bearer caller-key-placeholder", "X-Connection-Id": CONN}
        if ab_tree is None:
            targets.append(Target("direct (no proxy)", upstream + PATH, dict(common_headers), [], "-"))

        bare, bare_proc = c.start_ref(
            stack,
            tmp,
            "bare",
            "passthrough",
            "--upstream",
            upstream,
            "--token",
            UPSTREAM_TOKEN,
            cpus=server_cpus,
        )
        targets.append(Target(BARE, bare + "/proxy" + PATH, dict(common_headers), [bare_proc], pin_note))

        # Services are spawned first and waited for together (finish_services): their start-ups
        # overlap instead of adding up.
        starting: list[tuple[Target, c.Service]] = []

        def add_service(
            label: str,
            pinned: str,
            cpus: frozenset[int] | None,
            workers: int = 1,
            redis_url: str | None = None,
            tree: Path = c.REPO,
            env: dict[str, str] | None = None,
        ) -> None:
            t = Target(label, pinned=pinned)
            targets.append(t)
            name = "svc-" + "".join(ch for ch in label if ch.isalnum())[:40]
            svc = c.start_service(
                stack,
                tmp,
                name,
                cpus=cpus,
                workers=workers,
                redis_url=redis_url,
                tree=tree,
                extra_env=env,
                wait=False,
            )
            starting.append((t, svc))

        def finish_services() -> None:
            for t, svc in starting:
                try:
                    c.wait_service(svc)
                    t.headers = setup_connection_proxy(svc, upstream)
                    t.url = svc.url + "/proxy" + PATH
                    t.procs = [svc.proc]
                    c.warm(t.url, t.headers)
                except c.StartError as exc:
                    t.missing = f"the service did not start: {c.first_line(exc)}"
                except c.Unavailable as exc:
                    t.missing = str(exc)

        ab_env = None if args.ab_access else QUIET
        add_service(CP, pin_note, cpus=server_cpus, env=QUIET if ab_tree is None else ab_env)
        if ab_tree is not None:
            add_service(ab_label, pin_note, cpus=server_cpus, tree=ab_tree, env=ab_env)
            if args.ab_access:  # each tree also without access lines: the line's own cost, per tree
                add_service(CP + QUIET_SUFFIX, pin_note, cpus=server_cpus, env=QUIET)
                add_service(ab_label + QUIET_SUFFIX, pin_note, cpus=server_cpus, tree=ab_tree, env=QUIET)
        else:  # A/B mode measures the two trees and the reference only
            add_service(CP_ACCESS, pin_note, cpus=server_cpus)
            try:
                redis_url, _ = c.start_redis(stack, tmp, load_cpus)
            except c.StartError as exc:
                redis_url = ""
                targets += [Target(W1, missing=str(exc)), Target(W2, missing=str(exc))]
            if redis_url:
                add_service(W1, "not pinned", cpus=None, workers=1, redis_url=redis_url[:-1] + "1", env=QUIET)
                add_service(W2, "not pinned", cpus=None, workers=2, redis_url=redis_url[:-1] + "2", env=QUIET)

            nginx = c.nginx_binary()
            ng = Target("nginx proxy_set_header", pinned=pin_note)
            if nginx is None:
                ng.missing = "nginx is not installed (apt-get install nginx)"
            else:
                port = c.free_port()
                ndir = tmp / "nginx"
                ndir.mkdir()
                conf = nginx_conf(ndir, port, up_port)
                try:
                    proc = c.spawn(
                        stack, "nginx", [nginx, "-p", str(ndir), "-c", str(conf)], tmp, cpus=server_cpus
                    )
                    c.wait_http(f"http://127.0.0.1:{port}/healthz", proc)
                    ng.url, ng.headers, ng.procs = (
                        f"http://127.0.0.1:{port}/proxy" + PATH,
                        dict(common_headers),
                        [proc],
                    )
                except c.StartError as exc:
                    ng.missing = f"nginx did not start: {c.first_line(exc)}"
            targets.append(ng)

            node = Target(NODE, pinned=pin_note)
            try:
                node_url, node_proc = _refservers.start_node_http_proxy(
                    stack,
                    tmp,
                    upstream,
                    ("Authorization", f"Bearer {UPSTREAM_TOKEN}"),
                    cpus=server_cpus,
                    strip_prefix="/proxy",
                    drop_headers=("X-Connection-Id",),
                )
                node.url, node.headers, node.procs = (
                    node_url + "/proxy" + PATH,
                    dict(common_headers),
                    [node_proc],
                )
                c.warm(node.url, node.headers)
            except c.StartError as exc:
                node.missing = f"node http-proxy did not start: {c.first_line(exc)}"
            except c.Unavailable as exc:
                node.missing = str(exc)
            targets.append(node)

        finish_services()

        # Repeats are interleaved across rows so a burst of outside load cannot hit one row only.
        for rep in range(repeats):
            for conns in levels:
                # A/B: the two trees swap places every repeat, so neither always runs first.
                # (with --ab-access the four services rotate: each takes every place in turn).
                rest = targets[1:]
                turn = rep % len(rest) if ab_tree is not None and rest else 0
                order = targets if ab_tree is None else [targets[0], *rest[turn:], *rest[:turn]]
                for t in order:
                    key = (t.label, conns)
                    if t.missing:
                        results[key] = t.missing
                        continue
                    m: c.Measured | str
                    try:
                        m = c.measure(
                            t.url,
                            connections=conns,
                            duration=duration,
                            headers=t.headers,
                            load_cpus=load_cpus,
                            cpu_of=t.procs,
                            warmup=warmup if rep == 0 else 0.0,
                        )
                    except (RuntimeError, ValueError) as exc:
                        m = str(exc)
                    results[key] = c.better(results.get(key), m)
                    if isinstance(m, c.Measured) and not m.load.bad and m.cpu_us_per_req is not None:
                        runs.setdefault(key, []).append(m)

    rows = [
        [t.label, str(conns), (t.pinned or "-") if isinstance(m, str) else t.pinned, *c.load_cells(m)]
        for conns in levels
        for t in targets
        for m in [results[(t.label, conns)]]
    ]
    print()
    c.print_table(
        ["path", "conns", "proxy CPUs", *c.LOAD_HEADERS],
        rows,
        title="A/B: proxied GET" if ab_tree else "proxied GET to one local upstream",
    )
    c.print_load_notes(results)

    def ok(m: c.Measured | str | None) -> c.Measured | None:
        return m if isinstance(m, c.Measured) and not m.load.bad and m.load.requests else None

    def why(*ms: c.Measured | str | None) -> str:
        for m in ms:
            if isinstance(m, str):
                return m
        return "errors or no completed requests in the run"

    for conns in levels:
        bare_m, cp_m = results.get((BARE, conns)), results.get((CP, conns))
        b, p = ok(bare_m), ok(cp_m)
        name = f"connection-proxy/bare CPU per request @{conns} conns"
        if b and p and b.cpu_us_per_req and p.cpu_us_per_req is not None:
            v = p.cpu_us_per_req / b.cpu_us_per_req
            c.ratio_line(name, v, "<= 1.3", v <= 1.3)
        else:
            c.ratio_line(name, None, "<= 1.3", None, why(cp_m, bare_m))
    if ab_tree is not None:
        print_ab(runs, levels, [BARE, CP, ab_label])
        if args.ab_access:
            print_access_cost(runs, levels, [CP, ab_label])
        return 0
    for conns in levels:
        if conns == 1:
            continue
        w1_m, w2_m = results.get((W1, conns)), results.get((W2, conns))
        a, b2 = ok(w1_m), ok(w2_m)
        name = f"workers 2/1 rps @{conns} conns"
        if a and b2:
            v = b2.load.rps / a.load.rps
            c.ratio_line(name, v, ">= 1.6", v >= 1.6)
        else:
            c.ratio_line(name, None, ">= 1.6", None, why(w2_m, w1_m))
    for conns in levels:
        b, p = ok(results.get((BARE, conns))), ok(results.get((CP, conns)))
        if b and p:
            print(f"info connection-proxy/bare rps @{conns} conns: {p.load.rps / b.load.rps:.2f}")
    return 0


def print_ab(
    runs: dict[tuple[str, int], list[c.Measured]], levels: tuple[int, ...], labels: list[str]
) -> None:
    """Every run's CPU per request and the medians: with other work on the machine a single run
    says little, the median of interleaved runs is what compares."""
    for conns in levels:
        medians: dict[str, float] = {}
        for label in labels:
            cpu = [m.cpu_us_per_req for m in runs.get((label, conns), []) if m.cpu_us_per_req is not None]
            if not cpu:
                print(f"ab @{conns} conns {label}: no clean run")
                continue
            medians[label] = statistics.median(cpu)
            print(
                f"ab @{conns} conns {label}: CPU us/req median {medians[label]:.1f} "
                f"(runs {' '.join(f'{v:.0f}' for v in cpu)})"
            )
        a, b = medians.get(labels[1]), medians.get(labels[2])
        if a and b:
            print(f"ab @{conns} conns this checkout / {labels[2]}: {a / b:.3f} (ratio of medians)")
        # The two trees run back to back in each repeat: the ratio within a repeat cancels the
        # slower drift of other work on the machine, so its median is the steadier figure.
        mine, theirs = runs.get((labels[1], conns), []), runs.get((labels[2], conns), [])
        if mine and len(mine) == len(theirs):
            paired = [
                m.cpu_us_per_req / t.cpu_us_per_req
                for m, t in zip(mine, theirs, strict=True)
                if m.cpu_us_per_req and t.cpu_us_per_req
            ]
            if paired:
                print(
                    f"ab @{conns} conns this checkout / {labels[2]}: {statistics.median(paired):.3f} "
                    f"(median of per-repeat ratios {' '.join(f'{r:.2f}' for r in paired)})"
                )


def print_access_cost(
    runs: dict[tuple[str, int], list[c.Measured]], levels: tuple[int, ...], labels: list[str]
) -> None:
    """--ab-access: per tree, CPU per call with the JSON access line minus without it."""
    for conns in levels:
        for label in labels:
            on = [m.cpu_us_per_req for m in runs.get((label, conns), []) if m.cpu_us_per_req is not None]
            off = [
                m.cpu_us_per_req
                for m in runs.get((label + QUIET_SUFFIX, conns), [])
                if m.cpu_us_per_req is not None
            ]
            if not on or not off:
                print(f"access line @{conns} conns {label}: no clean runs")
                continue
            diff = statistics.median(on) - statistics.median(off)
            paired = [a - b for a, b in zip(on, off, strict=False)]
            print(
                f"access line @{conns} conns {label}: {diff:+.0f} us CPU per call (difference of medians; "
                f"per-repeat differences {' '.join(f'{d:+.0f}' for d in paired)}, median "
                f"{statistics.median(paired):+.0f})"
            )


if __name__ == "__main__":
    sys.exit(main())
