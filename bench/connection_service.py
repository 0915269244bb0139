"""Benchmark: the Connection Service's ``GET /connections/{t}/{c}`` against a bare aiohttp handler.

Both servers answer the same JSON document. The service runs as a real ``python -m proxy serve``
with its embedded store, caller authentication by tenant API key, decryption of the stored
secrets (through the credential cache, and once with the cache off), the per-caller quota and
the audit trail all on. Target (issue 2): at least 0.5x the bare handler's requests/s.

Run: ``python bench/connection_service.py [--quick] [--duration S]``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
# bench/proxy.py would shadow the `proxy` package: the repo root goes first, this folder last.
sys.path[:] = [str(_HERE.parent), *(p for p in sys.path if Path(p or ".").resolve() != _HERE), str(_HERE)]

import _common as c  # noqa: E402

TENANT = "bench-tenant"
CONN = "bench-conn"


def main() -> int:
    args = c.common_args(__doc__ or "").parse_args()
    duration = args.duration or (1.0 if args.quick else 5.0)
    warmup = 0.0 if args.quick else 1.0
    repeats = args.repeat or (1 if args.quick else 3)
    levels = (1, 64)
    place = c.placement()
    print(f"# machine: {c.machine_note()}")
    print("# Connection Service: GET /connections/{t}/{c}, connection-proxy vs a bare aiohttp handler")
    print(
        f"# load: {c.load_tool()}, {duration:g}s per run, warm-up {warmup:g}s, best of {repeats} interleaved "
        f"run(s) per point; {place.describe()}"
    )
    print("# service: tenant API key auth, secrets decrypted (credential cache as configured), audit on")

    results: dict[tuple[str, int], c.Measured | str] = {}
    with c.workspace("cp-bench-cs-", grace=1.0 if args.quick else 3.0) as (tmp, stack):
        services: list[tuple[str, c.Service | str]] = []
        variants = [("connection-proxy", {})]
        if not args.quick:
            variants.append(
                ("connection-proxy, cache ttl 0 (decrypt per call)", {"PROXY_CREDENTIAL_CACHE_TTL_S": "0"})
            )
        for i, (label, env) in enumerate(variants):
            try:
                services.append(
                    (label, c.start_service(stack, tmp, f"service{i}", cpus=place.server, extra_env=env))
                )
            except c.StartError as exc:
                services.append((label, f"the service did not start: {c.first_line(exc)}"))
        body = {
            "integration_id": "http_bearer",
            "parameters": {"token": "bench-secret-token-value", "base_url": "https://api.example.com/v1"},
            "rate_limits": [],
        }
        path = f"/connections/{TENANT}/{CONN}"
        targets: list[tuple[str, c.Service | None, str, dict[str, str]]] = []
        doc: object = None
        for label, s in services:
            if isinstance(s, str):
                targets.append((label, None, s, {}))
                continue
            try:
                c.put_connection(s, TENANT, CONN, body)
                key = c.mint_api_key(s, TENANT)
                hdrs = {"Authorization": f"Bearer {key}"}
                status, got = c.http("GET", s.url + path, headers=hdrs)
                if status != 200:
                    raise c.Unavailable(f"GET {path} answered {status}: {str(got)[:200]}")
                doc = doc or got
                targets.append((label, s, s.url + path, hdrs))
            except c.Unavailable as exc:
                targets.append((label, None, str(exc), {}))

        if doc is None:
            # The service is not there yet: the reference still runs on a document of the same shape.
            doc = {
                "parameters": body["parameters"],
                "integration_id": "http_bearer",
                "connection_subtype": None,
                "rate_limit": {
                    "is_limited": False,
                    "remaining": 99,
                    "reset_at": 1735900800,
                    "retry_after_ms": None,
                },
            }
        body_file = tmp / "doc.json"
        body_file.write_text(json.dumps(doc))
        bare_url, bare_proc = c.start_ref(
            stack, tmp, "bare-json", "json", "--body-file", str(body_file), cpus=place.server
        )
        # Its keys only: the values include the connection's (dummy) token.
        print(f"# document served: {len(json.dumps(doc))} bytes, keys {sorted(doc)}")

        plan: list[tuple[str, c.Proc | None, str, dict[str, str]]] = [
            ("bare aiohttp handler", bare_proc, bare_url + path, {}),
            *[(label, s.proc if s else None, url, h) for label, s, url, h in targets],
        ]
        # Repeats are interleaved across rows so a burst of outside load cannot hit one row only.
        for rep in range(repeats):
            for conns in levels:
                for label, proc, url, hdrs in plan:
                    key = (label, conns)
                    if proc is None:
                        results[key] = url  # url holds the reason
                        continue
                    m: c.Measured | str
                    try:
                        if rep == 0:
                            c.warm(url, hdrs)
                        m = c.measure(
                            url,
                            connections=conns,
                            duration=duration,
                            headers=hdrs,
                            load_cpus=place.load,
                            cpu_of=[proc],
                            warmup=warmup if rep == 0 else 0.0,
                        )
                    except (c.Unavailable, RuntimeError, ValueError) as exc:
                        m = str(exc)
                    results[key] = c.better(results.get(key), m)

    rows = [[label, str(conns), *c.load_cells(m)] for (label, conns), m in results.items()]
    print()
    c.print_table(["server", "conns", *c.LOAD_HEADERS], rows, title="GET /connections/{tenant}/{connection}")
    c.print_load_notes(results)
    by = results
    for conns in levels:
        ref, cp = by.get(("bare aiohttp handler", conns)), by.get(("connection-proxy", conns))
        name = f"connection-proxy/bare rps @{conns} conns"
        if (
            isinstance(ref, c.Measured)
            and isinstance(cp, c.Measured)
            and ref.load.rps > 0
            and not cp.load.bad
        ):
            value = cp.load.rps / ref.load.rps
            c.ratio_line(name, value, ">= 0.5", value >= 0.5)
        else:
            why = cp if isinstance(cp, str) else "errors in the connection-proxy run"
            c.ratio_line(name, None, ">= 0.5", None, str(why))
    for conns in levels:
        ref, cp = by.get(("bare aiohttp handler", conns)), by.get(("connection-proxy", conns))
        if (
            isinstance(ref, c.Measured)
            and isinstance(cp, c.Measured)
            and ref.cpu_us_per_req
            and cp.cpu_us_per_req
        ):
            print(
                f"info connection-proxy/bare throughput when CPU-bound (bare CPU/req / service CPU/req) "
                f"@{conns} conns: {ref.cpu_us_per_req / cp.cpu_us_per_req:.2f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
