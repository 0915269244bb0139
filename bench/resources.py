"""Benchmark: bounded resources under large envelope answers and under a slowloris.

The service runs as a real ``python -m proxy serve`` with a 1024-descriptor limit (``prlimit
--nofile=1024:1024``, the limit the problem was found on) and default settings except a short
``head_timeout_s`` (so the run is short). Two cases:

1. **large envelope answers**: 8 concurrent ``POST /api/internal/proxy`` calls, again and again,
   each for a JSON document just under ``envelope_max_response_bytes`` (10 MiB) served by a local
   upstream, while a separate process sends ``GET /healthz`` every 10 ms on its own kept-alive
   connection. Reports the service's peak RSS (``VmHWM`` of the process, and the sampled sum over
   it and its encoding helper processes) and the /healthz latency. Targets: RSS bounded (the
   figure is printed), /healthz p99 under 50 ms.
2. **slowloris**: 1100 connections each send half a request head and then nothing. Reports what
   the service did with them and whether /healthz answered on a connection opened before the
   flood and on new connections during it.

Run: ``python bench/resources.py [--quick]``. The upstream and the load run in this process and
its threads; on a shared machine the latency figures carry other people's load too.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import resource
import selectors
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
# bench/proxy.py would shadow the `proxy` package: the repo root goes first, this folder last.
sys.path[:] = [str(_HERE.parent), *(p for p in sys.path if Path(p or ".").resolve() != _HERE), str(_HERE)]

import _common as c  # noqa: E402

TENANT = "bench-org"
CONN = "bench-conn"
CAP = 10 * 1024 * 1024
CONCURRENT = 8
SLOWLORIS = 1100
HEAD_TIMEOUT_S = 3.0


def big_json(path: Path, target: int) -> int:
    item = {"id": 0, "name": "item with some text é", "tags": ["a", "b", "c"], "score": 12.5, "ok": True}
    chunk = json.dumps(item)
    n = (target - 4096) // (len(chunk.encode()) + 1)
    body = ("[" + ",".join(chunk for _ in range(n)) + "]").encode()
    path.write_bytes(body)
    return len(body)


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def tree_pids(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


class Prober(threading.Thread):
    """GET /healthz every ``interval`` s on one kept-alive connection; records latencies."""

    def __init__(self, port: int, interval: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.port, self.interval = port, interval
        self.latencies: list[float] = []
        self.failures = 0
        self.stop = threading.Event()
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        self.conn.connect()  # opened before whatever the run does next

    def run(self) -> None:
        while not self.stop.is_set():
            started = time.perf_counter()
            try:
                self.conn.request("GET", "/healthz")
                resp = self.conn.getresponse()
                resp.read()
                if resp.status == 200:
                    self.latencies.append(time.perf_counter() - started)
                else:
                    self.failures += 1
            except (OSError, http.client.HTTPException):
                self.failures += 1
                self.conn.close()
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            self.stop.wait(self.interval)
        self.conn.close()


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] * 1000


async def envelope_rounds(url: str, rounds: int) -> tuple[int, int, list[float], int]:
    import aiohttp

    ok = bad = total_bytes = 0
    durations: list[float] = []
    payload = {"url": "/doc", "connection_id": CONN}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:

        async def one() -> None:
            nonlocal ok, bad, total_bytes
            started = time.perf_counter()
            async with session.post(url, json=payload, headers={"X-Org-Id": TENANT}) as r:
                n = 0
                async for chunk in r.content.iter_chunked(
                    1 << 20
                ):  # read, never parse: the client is not measured
                    n += len(chunk)
                if r.status == 200:
                    ok += 1
                    total_bytes += n
                else:
                    bad += 1
            durations.append(time.perf_counter() - started)

        for _ in range(rounds):
            await asyncio.gather(*(one() for _ in range(CONCURRENT)))
    return ok, bad, durations, total_bytes // max(1, ok)


def check_one_answer(url: str, size: int) -> str:
    """Parse one answer outside the measurement: the contract (body parsed, body_raw exact)."""
    status, doc = c.http("POST", url, {"url": "/doc", "connection_id": CONN}, headers={"X-Org-Id": TENANT})
    if status != 200 or not isinstance(doc, dict):
        return f"answer check FAILED: HTTP {status}"
    import base64

    raw = base64.b64decode(doc["body_raw"])
    good = len(raw) == size and isinstance(doc["body"], list) and doc["body"] == json.loads(raw)
    return "answer check: body parsed JSON, body_raw exact" if good else "answer check FAILED: content"


def slowloris(port: int, n: int, wait_s: float) -> dict[str, float]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, n + 512)), hard))
    prober = Prober(port, interval=0.02)
    socks: list[socket.socket] = []
    opened = 0
    for _ in range(n):
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(("127.0.0.1", port))
        socks.append(s)
    time.sleep(0.3)
    for s in socks:
        with contextlib.suppress(OSError):
            s.send(b"GET /healthz HTTP/1.1\r\nHost: bench\r\n")  # half a head, never finished
            opened += 1
    prober.start()
    # New connections asking for /healthz during the flood.
    new_ok = new_tries = 0
    new_lat: list[float] = []
    started = time.monotonic()
    while time.monotonic() - started < wait_s:
        new_tries += 1
        t0 = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                new_ok += 1
                new_lat.append(time.perf_counter() - t0)
        except (OSError, http.client.HTTPException):
            pass
        finally:
            conn.close()
        time.sleep(0.1)
    prober.stop.set()
    prober.join()
    # Which of the half-sent connections has the service closed by now?
    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
    closed = 0
    for key, _ in sel.select(timeout=0.5):
        sock = key.fileobj
        assert isinstance(sock, socket.socket)
        try:
            if sock.recv(1) == b"":
                closed += 1
        except OSError:
            closed += 1
    sel.close()
    for s in socks:
        s.close()
    return {
        "sent": opened,
        "closed": closed,
        "old_p99": pct(prober.latencies, 99),
        "old_ok": len(prober.latencies),
        "old_fail": prober.failures,
        "new_ok": new_ok,
        "new_tries": new_tries,
        "new_p99": pct(new_lat, 99),
    }


def probe_main(port: int) -> int:
    """``--probe PORT``: probe /healthz until a line arrives on stdin; print the latencies as JSON."""
    prober = Prober(port)
    prober.start()
    sys.stdin.readline()
    prober.stop.set()
    prober.join()
    print(json.dumps({"latencies": prober.latencies, "failures": prober.failures}))
    return 0


def main() -> int:
    if sys.argv[1:2] == ["--probe"]:
        return probe_main(int(sys.argv[2]))
    args = c.common_args(__doc__ or "").parse_args()
    # --quick: a smoke run (smaller bodies, fewer connections); its numbers mean nothing.
    rounds = 1 if args.quick else 6
    body_target = 2 * 1024 * 1024 if args.quick else CAP
    flood = 300 if args.quick else SLOWLORIS
    wait_s = HEAD_TIMEOUT_S + 1.5
    print(f"# machine: {c.machine_note()}")
    print(
        f"# service: python -m proxy serve under prlimit --nofile=1024:1024, defaults but head_timeout_s="
        f"{HEAD_TIMEOUT_S:g}; {CONCURRENT} concurrent envelope calls x {rounds} rounds; "
        "the load runs in this process"
    )
    with c.workspace("cp-bench-res-", grace=3.0) as (tmp, stack):
        doc = tmp / "doc.json"
        size = big_json(doc, body_target)
        up_url, _ = c.start_ref(stack, tmp, "upstream-file", "file", "--body-file", str(doc), cpus=None)
        svc = c.start_service(
            stack,
            tmp,
            "service",
            cpus=None,
            extra_env={"PROXY_TRUSTED_NETWORKS": "127.0.0.1/32", "PROXY_HEAD_TIMEOUT_S": str(HEAD_TIMEOUT_S)},
            wrapper=("prlimit", "--nofile=1024:1024", "--"),
        )
        c.put_connection(
            svc,
            TENANT,
            CONN,
            {
                "integration_id": "http_bearer",
                "parameters": {"token": "bench-token", "base_url": up_url + "/"},
            },
        )
        plan = [ln for ln in svc.proc.tail(40).splitlines() if "max_connections" in ln]
        print(f"# start-up: {plan[-1].split(': ', 1)[-1] if plan else 'no descriptor line logged'}")
        envelope = f"{svc.url}/api/internal/proxy"
        print(f"# {check_one_answer(envelope, size)}")
        base_rss = rss_kib(svc.proc.pid)

        peak_tree = 0
        sampling = threading.Event()

        def sample() -> None:
            nonlocal peak_tree
            while not sampling.is_set():
                peak_tree = max(peak_tree, sum(rss_kib(p) for p in tree_pids(svc.proc.pid)))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        # The prober is its own process: in this one it would wait for the GIL behind the client.
        probe = subprocess.Popen(
            [c.PY, str(Path(__file__).resolve()), "--probe", str(svc.port)],
            stdout=subprocess.PIPE,
            stdin=subprocess.PIPE,
            text=True,
        )
        time.sleep(0.3)
        sampler.start()
        t0 = time.perf_counter()
        ok, bad, durations, answer_bytes = asyncio.run(envelope_rounds(envelope, rounds))
        elapsed = time.perf_counter() - t0
        out, _ = probe.communicate("stop\n", timeout=30)
        sampling.set()
        sampler.join()
        hwm = rss_kib(svc.proc.pid, "VmHWM")
        probed = json.loads(out)
        prober = Prober.__new__(Prober)
        prober.latencies, prober.failures = probed["latencies"], probed["failures"]

        p99 = pct(prober.latencies, 99)
        c.print_table(
            ["case", "figure", "value"],
            [
                ["envelope", "upstream body (MiB)", f"{size / 2**20:.2f}"],
                ["envelope", "answer size (MiB)", f"{answer_bytes / 2**20:.2f}"],
                ["envelope", "calls ok / refused-or-failed", f"{ok} / {bad}"],
                ["envelope", "call p50 / max (s)", f"{pct(durations, 50) / 1000:.2f} / {max(durations):.2f}"],
                ["envelope", "throughput (MiB body/s)", f"{ok * size / 2**20 / elapsed:.1f}"],
                ["envelope", "service RSS idle (MiB)", f"{base_rss / 1024:.0f}"],
                ["envelope", "service peak RSS, VmHWM (MiB)", f"{hwm / 1024:.0f}"],
                ["envelope", "service + helpers peak RSS (MiB)", f"{peak_tree / 1024:.0f}"],
                ["envelope", "/healthz probes ok / failed", f"{len(prober.latencies)} / {prober.failures}"],
                [
                    "envelope",
                    "/healthz p50 / p99 / max (ms)",
                    f"{pct(prober.latencies, 50):.1f} / {p99:.1f} / {pct(prober.latencies, 100):.1f}",
                ],
            ],
            title="8 concurrent ~10 MiB envelope answers",
        )
        c.ratio_line("healthz p99 ms during 8 concurrent max-size envelope calls", p99, "< 50", p99 < 50)
        c.ratio_line(
            "service peak RSS MiB (helpers included) during them", peak_tree / 1024, "bounded", ok > 0
        )

        s = slowloris(svc.port, flood, wait_s)
        c.print_table(
            ["case", "figure", "value"],
            [
                ["slowloris", "half-sent connections", f"{s['sent']:.0f}"],
                ["slowloris", f"closed by the service after {wait_s:g}s", f"{s['closed']:.0f}"],
                [
                    "slowloris",
                    "/healthz, kept-alive conn: ok / failed",
                    f"{s['old_ok']:.0f} / {s['old_fail']:.0f}",
                ],
                ["slowloris", "/healthz, kept-alive conn p99 (ms)", f"{s['old_p99']:.1f}"],
                ["slowloris", "/healthz, new conns: ok / tried", f"{s['new_ok']:.0f} / {s['new_tries']:.0f}"],
                ["slowloris", "/healthz, new conns p99 (ms)", f"{s['new_p99']:.1f}"],
            ],
            title="slowloris: half-sent connections",
        )
        alive = svc.proc.alive()
        c.ratio_line(
            "healthz answered on the kept-alive connection during the slowloris (share)",
            s["old_ok"] / max(1.0, s["old_ok"] + s["old_fail"]),
            "1.00",
            s["old_fail"] == 0 and alive,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
