"""Shared harness for the benchmarks: free ports, pinned subprocesses, CPU accounting, load runs.

Every benchmark starts what it measures as real processes on 127.0.0.1 (the service via
``python -m proxy serve``, references from ``bench/_refservers.py``), measures them from outside
and stops them again. Numbers are only honest when the load generator does not steal the
measured server's CPU, so on a machine with >= 2 cores the server under test is pinned to CPU 0
and the load generator (and upstream) to the others; where that is impossible the output says so.
The load side also runs at a raised priority where permitted (``LOAD_NICE``): rows whose service
spans every core (``--workers``) would otherwise starve the upstream and the load generator they
share a core with, and measure that starvation instead of the service.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _results  # bench/ is on sys.path for every benchmark

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
PY = sys.executable
ADMIN_TOKEN = "bench-admin-token-0123456789abcdef"
CLK_TCK = os.sysconf("SC_CLK_TCK")
NCPU = len(os.sched_getaffinity(0))
_results.capture_stdout()  # the header lines of a run go into its results file

# --- placement ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """Which CPUs the server under test and the load side (generator, upstream, Redis) get."""

    server: frozenset[int] | None
    load: frozenset[int] | None

    def describe(self) -> str:
        favoured = (
            f"; load side at nice {LOAD_NICE}" if FAVOUR_LOAD else "; load side at normal priority (not root)"
        )
        if self.server is None:
            return f"not pinned ({NCPU} CPU(s) shared by server, load generator and upstream){favoured}"
        return (
            f"server under test pinned to CPU {fmt_cpus(self.server)}; load generator, upstream and "
            f"Redis pinned to CPU {fmt_cpus(self.load or frozenset())}{favoured}"
        )


# Raising a priority needs root (or CAP_SYS_NICE); without it the load side runs as is.
LOAD_NICE = -10
FAVOUR_LOAD = os.geteuid() == 0


def favour_load() -> None:
    """preexec hook for load-side processes: run ahead of the service under test."""
    if FAVOUR_LOAD:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, 0, LOAD_NICE)


def fmt_cpus(cpus: frozenset[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))


def placement() -> Placement:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return Placement(None, None)
    return Placement(frozenset(cpus[:1]), frozenset(cpus[1:]))


# --- ports and processes -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _proc_stats() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, utime+stime ticks) for every process visible in /proc."""
    out: dict[int, tuple[int, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                raw = fh.read().decode("ascii", "replace")
        except OSError:
            continue
        rest = raw[raw.rfind(")") + 2 :].split()
        # fields after "comm": state(3) ppid(4) ... utime(14) stime(15)
        out[int(entry)] = (int(rest[1]), int(rest[11]) + int(rest[12]))
    return out


def tree_cpu_seconds(*roots: int) -> float:
    """CPU time (user+system) of the ``roots`` and all their live descendants, in seconds."""
    stats = _proc_stats()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    seen: set[int] = set()
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        todo.extend(children.get(pid, ()))
    return sum(stats[pid][1] for pid in seen if pid in stats) / CLK_TCK


class Proc:
    """A subprocess in its own session, optionally pinned, with its output in a log file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        logdir: Path,
        *,
        env: Mapping[str, str] | None = None,
        cpus: frozenset[int] | None = None,
        load_side: bool = False,
        cwd: Path = REPO,
    ) -> None:
        self.name = name
        self.logpath = logdir / f"{name}.log"
        self._log = open(self.logpath, "wb")  # noqa: SIM115 - closed in stop()
        pin = sorted(cpus) if cpus else None

        def pre() -> None:
            if pin:
                os.sched_setaffinity(0, pin)
            if load_side:
                favour_load()

        self.popen = subprocess.Popen(
            list(argv),
            env=dict(env) if env is not None else None,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=pre,
            start_new_session=True,
            cwd=cwd,  # so `python -m proxy` finds that tree's package, never bench/proxy.py
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.pid)

    def tail(self, n: int = 15) -> str:
        try:
            lines = self.logpath.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def stop(self, grace: float = 10.0) -> None:
        stop_all([self], grace)


def stop_all(procs: Sequence[Proc], grace: float = 3.0) -> None:
    """SIGTERM every process group at once, SIGKILL what is still there after ``grace`` seconds.

    A process that ignores SIGTERM is reported (a graceful-stop bug worth knowing about) but never
    left running: the benchmark must clean up after itself.
    """
    live = [p for p in procs if p.alive()]
    for p in live:
        # The process group is the one this Proc created (start_new_session): workers included.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in live:
        try:
            p.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"note: {p.name} did not exit within {grace:g}s of SIGTERM; killed", flush=True)
        # Leftover children (a worker that outlived its parent) go too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.popen.wait(timeout=5)
    for p in procs:
        p._log.close()


class StartError(RuntimeError):
    """A process of the benchmark did not come up; the message carries its log tail."""


def wait_http(url: str, proc: Proc, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise StartError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status < 500:
                    return
        except urllib.error.HTTPError as exc:
            if exc.code < 500:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise StartError(f"{proc.name} not answering {url} after {timeout:.0f}s:\n{proc.tail()}")


def listening_sockets(port: int) -> int:
    """How many sockets listen on 127.0.0.1:port (one per worker with SO_REUSEPORT)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as fh:
            for line in fh.readlines()[1:]:
                parts = line.split()
                if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                    count += 1
    return count


def wait_listeners(port: int, n: int, proc: Proc, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while listening_sockets(port) < n:
        if not proc.alive() or time.monotonic() > deadline:
            raise StartError(f"{proc.name}: {n} listeners expected on port {port}:\n{proc.tail()}")
        time.sleep(0.05)


_REGISTRY: dict[int, list[Proc]] = {}


@contextlib.contextmanager
def workspace(prefix: str, grace: float = 3.0) -> Iterator[tuple[Path, contextlib.ExitStack]]:
    """A temp dir and an exit stack; every process spawned with that stack is stopped (all at
    once) on the way out, and SIGTERM unwinds like Ctrl-C so nothing is left running."""

    def on_term(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, on_term)
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    procs: list[Proc] = []
    try:
        with contextlib.ExitStack() as stack:
            _REGISTRY[id(stack)] = procs
            try:
                yield tmp, stack
            finally:
                del _REGISTRY[id(stack)]
                stop_all(procs, grace)
    finally:
        signal.signal(signal.SIGTERM, old)
        shutil.rmtree(tmp, ignore_errors=True)


def spawn(stack: contextlib.ExitStack, *args: Any, **kwargs: Any) -> Proc:
    """Start a Proc that the workspace owning ``stack`` stops (all together) on the way out."""
    proc = Proc(*args, **kwargs)
    _REGISTRY[id(stack)].append(proc)
    return proc


# --- the service and references ----------------------------------------------------------------


@dataclass
class Service:
    name: str
    url: str
    port: int
    proc: Proc
    workers: int = 1


def start_service(
    stack: contextlib.ExitStack,
    tmp: Path,
    name: str,
    *,
    cpus: frozenset[int] | None,
    workers: int = 1,
    redis_url: str | None = None,
    extra_env: Mapping[str, str] | None = None,
    wrapper: Sequence[str] = (),
    tree: Path = REPO,
    wait: bool = True,
) -> Service:
    """``python -m proxy serve`` of the source ``tree`` (default this checkout; another one, e.g.
    an unpacked older commit, for an A/B run: ``-m`` imports the package of the working
    directory ahead of the editable install). ``wait=False`` returns once the process is
    spawned (several then start side by side); ``wait_service`` waits for it to serve."""
    port = free_port()
    data = tmp / f"data-{name}"
    data.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROXY_")}
    env.update(
        PROXY_DATA_DIR=str(data),
        PROXY_ADMIN_TOKEN=ADMIN_TOKEN,
        PROXY_EGRESS_ALLOW="127.0.0.1/32",
        PROXY_LISTEN=f"127.0.0.1:{port}",
        # The per-caller quota of the Connection Service would cap a benchmark at 100/s; raise it
        # (the quota check itself still runs on every request).
        PROXY_SERVICE_QUOTA_PER_MINUTE="1000000000",
    )
    if redis_url:
        env["PROXY_REDIS_URL"] = redis_url
    env.update(extra_env or {})
    argv = [*wrapper, PY, "-m", "proxy", "serve"]  # wrapper: e.g. prlimit, which execs the service
    if workers > 1:
        argv += ["--workers", str(workers)]
    proc = spawn(stack, name, argv, tmp, env=env, cpus=cpus, cwd=tree)
    svc = Service(name, f"http://127.0.0.1:{port}", port, proc, workers)
    if wait:
        wait_service(svc)
    return svc


def wait_service(svc: Service) -> None:
    """Until ``svc`` answers ``/healthz`` and every worker listens (StartError if it died)."""
    wait_http(f"{svc.url}/healthz", svc.proc)
    if svc.workers > 1:
        wait_listeners(svc.port, svc.workers, svc.proc)


def nginx_binary() -> str | None:
    return shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)


def nginx_prelude(ndir: Path) -> str:
    """The top of an nginx.conf that runs in the foreground with everything under ``ndir``."""
    for d in ("body", "proxy", "fastcgi", "uwsgi", "scgi", "logs"):
        (ndir / d).mkdir(exist_ok=True)
    user = "user root;\n" if os.geteuid() == 0 else ""
    return (
        f"{user}worker_processes 1;\ndaemon off;\npid {ndir}/nginx.pid;\n"
        f"error_log {ndir}/logs/error.log warn;\nevents {{ worker_connections 4096; }}\n"
    )


def start_upstream(stack: contextlib.ExitStack, tmp: Path, cpus: frozenset[int] | None) -> tuple[str, str]:
    """The local upstream every proxied call ends at; returns (base URL, what it is).

    nginx answering the fixed JSON document when installed, else the raw-asyncio server of
    bench/_refservers.py. The upstream is environment, not the thing measured, and it shares the
    load side's CPU: a Python upstream costs ~20 us per call there, which rows whose service
    spans every core (--workers) would feel as lost throughput.
    """
    from _refservers import UPSTREAM_BODY  # bench/ is on sys.path for every benchmark

    nginx = nginx_binary()
    if nginx is not None:
        ndir = tmp / "upstream-nginx"
        ndir.mkdir()
        port = free_port()
        body = UPSTREAM_BODY.decode()
        conf = ndir / "nginx.conf"
        conf.write_text(
            nginx_prelude(ndir)
            + f"""http {{
    access_log off;
    client_body_temp_path {ndir}/body;
    server {{
        listen 127.0.0.1:{port} backlog=1024;
        keepalive_requests 1000000;
        location / {{ default_type application/json; return 200 '{body}'; }}
    }}
}}
"""
        )
        proc = spawn(
            stack, "upstream", [nginx, "-p", str(ndir), "-c", str(conf)], tmp, cpus=cpus, load_side=True
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_http(f"{url}/healthz", proc)
            return url, "nginx"
        except StartError:
            pass  # fall back to the Python upstream
    url, _ = start_ref(stack, tmp, "upstream-py", "upstream", cpus=cpus)
    return url, "python asyncio (nginx not installed)"


def start_ref(
    stack: contextlib.ExitStack, tmp: Path, name: str, mode: str, *args: str, cpus: frozenset[int] | None
) -> tuple[str, Proc]:
    """Start a reference server of bench/_refservers.py; returns its base URL."""
    port = free_port()
    proc = spawn(
        stack,
        name,
        [PY, str(BENCH / "_refservers.py"), mode, "--port", str(port), *args],
        tmp,
        cpus=cpus,
        load_side=mode == "upstream",  # the upstream is environment; the other modes are measured
    )
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/healthz", proc)
    return url, proc


def start_redis(stack: contextlib.ExitStack, tmp: Path, cpus: frozenset[int] | None) -> tuple[str, int]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise StartError("redis-server not installed (apt-get install redis-server)")
    port = free_port()
    rdir = tmp / "redis"
    rdir.mkdir(exist_ok=True)
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = spawn(
        stack, "redis", [*argv, "--dir", str(rdir), "--protected-mode", "no"], tmp, cpus=cpus, load_side=True
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2) as s:
            s.sendall(b"PING\r\n")
            if s.recv(16).startswith(b"+PONG"):
                return f"redis://127.0.0.1:{port}/0", port
        time.sleep(0.05)
    raise StartError(f"redis-server did not start:\n{proc.tail()}")


def http(
    method: str,
    url: str,
    body: Any = None,
    token: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> tuple[int, Any]:
    """One JSON request with urllib; returns (status, parsed body or text)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode(errors="replace")


class Unavailable(Exception):
    """A row that cannot be measured yet (a feature not built, a tool not installed)."""


def put_connection(svc: Service, tenant: str, cid: str, body: Mapping[str, Any]) -> dict[str, Any]:
    status, doc = http("PUT", f"{svc.url}/admin/tenants/{tenant}/connections/{cid}", body, ADMIN_TOKEN)
    if status not in (200, 201):
        raise Unavailable(f"admin PUT connection answered {status}: {str(doc)[:200]}")
    return dict(doc)


def mint_api_key(svc: Service, tenant: str) -> str:
    status, doc = http("POST", f"{svc.url}/admin/tenants/{tenant}/api-keys", {"name": "bench"}, ADMIN_TOKEN)
    if status not in (200, 201) or not isinstance(doc, dict):
        raise Unavailable(f"admin POST api-keys answered {status}: {str(doc)[:200]}")
    if not isinstance(doc.get("api_key"), str):
        raise Unavailable(f"api-keys answer has no api_key field: {sorted(doc)}")
    return str(doc["api_key"])


# --- load generation ---------------------------------------------------------------------------


@dataclass
class Load:
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    bad: int  # non-2xx answers plus socket errors
    tool: str


_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        raise ValueError(f"unparsed wrk time {text!r}")
    return float(m.group(1)) * _UNIT[m.group(2)]


def parse_wrk(out: str) -> Load:
    def grab(pattern: str) -> re.Match[str]:
        m = re.search(pattern, out)
        if not m:
            raise ValueError(f"wrk output lacks {pattern!r}:\n{out}")
        return m

    done = grab(r"(\d+) requests in ([\d.]+)(us|ms|s|m)")
    requests, seconds = int(done.group(1)), _ms(done.group(2) + done.group(3)) / 1e3
    p50 = _ms(grab(r"\n\s+50%\s+(\S+)").group(1))
    p99 = _ms(grab(r"\n\s+99%\s+(\S+)").group(1))
    bad = 0
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        bad += int(non2xx.group(1))
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if sock:
        bad += sum(int(x) for x in sock.groups())
    rps = float(grab(r"Requests/sec:\s+([\d.]+)").group(1))
    return Load(requests, seconds, rps, p50, p99, bad, "wrk")


def run_load(
    url: str,
    *,
    connections: int,
    duration: float,
    headers: Mapping[str, str] | None = None,
    cpus: frozenset[int] | None = None,
) -> Load:
    """A closed-loop load run: wrk when installed, else the Python client in bench/_loadgen.py."""
    hdrs = [arg for k, v in (headers or {}).items() for arg in ("-H", f"{k}: {v}")]
    wrk = shutil.which("wrk")
    pin = ["taskset", "-c", fmt_cpus(cpus)] if cpus and shutil.which("taskset") else []
    if wrk:
        threads = max(1, min(connections, len(cpus) if cpus else NCPU))
        secs = max(1, round(duration))
        argv = [*pin, wrk, "--latency", f"-t{threads}", f"-c{connections}", f"-d{secs}s", "--timeout", "10s"]
        out = subprocess.run(
            [*argv, *hdrs, url], capture_output=True, text=True, timeout=secs + 30, preexec_fn=favour_load
        )
        if out.returncode != 0:
            raise RuntimeError(f"wrk failed: {out.stderr.strip()}")
        return parse_wrk(out.stdout)
    argv = [*pin, PY, str(BENCH / "_loadgen.py"), url, "-c", str(connections), "-d", str(duration), *hdrs]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, preexec_fn=favour_load)
    if out.returncode != 0:
        raise RuntimeError(f"python load client failed: {out.stderr.strip()[-500:]}")
    doc = json.loads(out.stdout)
    return Load(**doc, tool="python")


def load_tool() -> str:
    return (
        "wrk --latency" if shutil.which("wrk") else "python aiohttp client (bench/_loadgen.py; wrk missing)"
    )


def warm(url: str, headers: Mapping[str, str], n: int = 30) -> None:
    """A few requests so caches, pools and lazy imports are ready before measuring."""
    for _ in range(n):
        status, body = http("GET", url, headers=headers)
        if status != 200:
            raise Unavailable(f"GET {url} answered {status}: {str(body)[:200]}")


@dataclass
class Measured:
    load: Load
    cpu_us_per_req: float | None
    # CPU the rest of the machine (processes not started by this benchmark) used during the run,
    # as a share of all CPUs. On a shared machine a large value means the row lost CPU to others.
    others_pct: float | None = None


def _machine_busy_s() -> float:
    with open("/proc/stat") as fh:
        v = [int(x) for x in fh.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...: busy = all but idle and iowait
    return (sum(v[:8]) - v[3] - v[4]) / CLK_TCK


def _ours_s() -> float:
    """CPU of every process this benchmark started (live ones, with children) plus itself and
    the children it has waited for (wrk)."""
    live = [p.pid for procs in _REGISTRY.values() for p in procs if p.alive()]
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return tree_cpu_seconds(*live) + me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def measure(
    url: str,
    *,
    connections: int,
    duration: float,
    headers: Mapping[str, str],
    load_cpus: frozenset[int] | None,
    cpu_of: Sequence[Proc] = (),
    warmup: float = 0.0,
) -> Measured:
    """Warm up, then one measured load run; CPU of ``cpu_of`` (with children) per completed request
    and the share of the machine other processes took meanwhile."""
    if warmup > 0:
        run_load(url, connections=connections, duration=warmup, headers=headers, cpus=load_cpus)
    before = sum(p.cpu_seconds() for p in cpu_of)
    busy0, ours0, t0 = _machine_busy_s(), _ours_s(), time.monotonic()
    load = run_load(url, connections=connections, duration=duration, headers=headers, cpus=load_cpus)
    busy1, ours1, t1 = _machine_busy_s(), _ours_s(), time.monotonic()
    after = sum(p.cpu_seconds() for p in cpu_of)
    others = max(0.0, (busy1 - busy0) - (ours1 - ours0)) / ((t1 - t0) * (os.cpu_count() or 1)) * 100
    per = (after - before) / load.requests * 1e6 if cpu_of and load.requests else None
    return Measured(load, per, others)


def fmt_others(m: Measured) -> str:
    return "-" if m.others_pct is None else f"{m.others_pct:.0f}%"


LOAD_HEADERS = ("req/s", "p50 ms", "p99 ms", "CPU us/req", "errors", "others CPU")


def load_cells(m: Measured | str) -> list[str]:
    """The LOAD_HEADERS cells of one measured point ("-" for a point that could not be run)."""
    if isinstance(m, str):
        return ["-"] * len(LOAD_HEADERS)
    cpu = f"{m.cpu_us_per_req:.0f}" if m.cpu_us_per_req is not None else "-"
    return [
        f"{m.load.rps:.0f}",
        f"{m.load.p50_ms:.2f}",
        f"{m.load.p99_ms:.2f}",
        cpu,
        str(m.load.bad),
        fmt_others(m),
    ]


def print_load_notes(results: Mapping[tuple[str, int], Measured | str]) -> None:
    """What a load table's reader needs under it: the others-CPU legend, missing and bad points."""
    print(
        "(others CPU: share of the whole machine used during the run by processes this benchmark did not start)"
    )
    for (label, conns), m in results.items():
        if isinstance(m, str):
            print(f"not available: {label} @ {conns} conns: {m}")
        elif m.load.bad:
            print(f"warning: {label} @ {conns} conns: {m.load.bad} non-2xx answers or socket errors")
    print()


# --- output ------------------------------------------------------------------------------------


def machine_note() -> str:
    """The 1-minute load average: other work on the machine competes for the same CPUs."""
    load1 = os.getloadavg()[0]
    warn = " -- the machine is busy with other work: expect noisy numbers" if load1 > 0.5 * NCPU else ""
    return f"load average {load1:.2f} on {NCPU} CPU(s){warn}"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]], title: str = "") -> None:
    """Print an aligned table (and keep it for ``--results``; ``title`` names it there)."""
    _results.table(title, headers, rows)
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            str(c).ljust(w) if i == 0 else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    print(line(headers))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(line(r))
    sys.stdout.flush()


def ratio_line(name: str, value: float | None, target: str, ok: bool | None, why: str = "") -> None:
    _results.ratio(name, value, target, ok, why)
    if value is None:
        print(f"ratio {name}: n/a (target {target}) -- not available: {why}", flush=True)
        return
    verdict = "meets target" if ok else "MISSES target"
    print(f"ratio {name}: {value:.2f} (target {target}) {verdict}", flush=True)


class _Parser(argparse.ArgumentParser):
    """Parses the common options; ``--results DIR`` arms writing DIR/<script>.json at exit."""

    def parse_args(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        ns = super().parse_args(*args, **kwargs)
        if getattr(ns, "results", None) is not None:
            _results.save_at_exit(ns.results)
        return ns


def common_args(description: str) -> Any:
    parser = _Parser(description=description)
    parser.add_argument(
        "--results",
        type=Path,
        default=None,
        metavar="DIR",
        help="also write the tables, ratios and machine context to DIR/<script>.json (bench/report.py reads them)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny run for smoke tests (numbers meaningless)")
    parser.add_argument("--duration", type=float, default=None, help="seconds per measured load run")
    parser.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="runs per point, interleaved across rows; the best (highest req/s) is kept (default 3, quick 1)",
    )
    return parser


def better(old: Measured | str | None, new: Measured | str) -> Measured | str:
    """Of two runs of one point keep the least disturbed: no errors first, then the higher req/s
    (on a shared machine, other work only ever lowers a run's throughput)."""
    if not isinstance(new, Measured):
        return old if old is not None else new
    if not isinstance(old, Measured):
        return new
    return new if (new.load.bad == 0, new.load.rps) > (old.load.bad == 0, old.load.rps) else old


def first_line(exc: BaseException) -> str:
    """The most telling line of a start failure: the last non-blank line of the log tail."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__
