"""Real multi-process Redis topologies on free loopback ports: a Cluster and a Sentinel set-up.

``RedisClusterSet``: three masters in cluster mode, made a cluster by ``redis-cli --cluster
create``, the way an operator does it. ``SentinelSet``: one master, replicas, three
``redis-sentinel`` processes watching it (quorum 2), with ``failover()`` asking a sentinel for a
manual failover and waiting until the new master is in place. Nothing here is mocked; the tests
of the Cluster and Sentinel URL forms (``tests/store/test_redis_cluster.py``,
``tests/store/test_redis_sentinel.py``) run the store and the limiter against them.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from tests.support.redis_server import RedisServer, free_port

SERVICE = "cpmaster"


def _wait(what: str, check: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            if check():  # type: ignore[operator]
                return
        except (redis.RedisError, OSError) as exc:
            last = exc
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not happen within {timeout} s (last error: {last!r})")


def _admin(port: int) -> redis.Redis:  # type: ignore[type-arg, unused-ignore]
    return redis.Redis(host="127.0.0.1", port=port, decode_responses=True, socket_timeout=5)


def cluster_port() -> int:
    """A free port P with P + 10000 free too (the cluster bus), both below 65536."""
    for _ in range(200):
        port = random.randint(20000, 45000)
        try:
            for p in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


class RedisClusterSet:
    """Three masters, no replicas: every slot served, keys of different tags on different nodes."""

    def __init__(self, masters: int = 3) -> None:
        self.nodes = [
            RedisServer(
                cluster_port(),
                args=[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                ],
            )
            for _ in range(masters)
        ]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self) -> None:
        for n in self.nodes:
            n.start()
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RuntimeError(
                "redis-cli not found: install Debian's redis-server (apt-get install redis-server)"
            )
        subprocess.run(
            [cli, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes), "--cluster-yes"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=60,
        )
        for n in self.nodes:
            _wait("cluster_state:ok", lambda n=n: _admin(n.port).cluster("info")["cluster_state"] == "ok")

    def flushall(self) -> None:
        for n in self.nodes:
            _admin(n.port).flushall()

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()
            shutil.rmtree(n.dir, ignore_errors=True)


class SentinelSet:
    """One master, ``replicas`` replicas, three sentinels (quorum 2), all on loopback."""

    def __init__(self, replicas: int = 1) -> None:
        # No 5-s wait before a full sync (any of them may become the master a replica syncs from).
        fast = ["--repl-diskless-sync-delay", "0"]
        self.master = RedisServer(args=fast)
        self.replicas = [
            RedisServer(args=[*fast, "--replicaof", "127.0.0.1", str(self.master.port)])
            for _ in range(replicas)
        ]
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.dir = Path(tempfile.mkdtemp(prefix="cp-sentinel-"))
        self.sentinels: list[subprocess.Popen[bytes]] = []

    @property
    def servers(self) -> list[RedisServer]:
        return [self.master, *self.replicas]

    def url(self, query: str = "") -> str:
        nodes = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://{nodes}/{SERVICE}" + (f"?{query}" if query else "")

    def start(self) -> None:
        for s in self.servers:
            s.start()
        _wait(
            "replicas in sync",
            lambda: self._online(self.master.port) == len(self.replicas),
        )
        binary = shutil.which("redis-sentinel")
        if binary is None:
            raise RuntimeError(
                "redis-sentinel not found: install Debian's redis-sentinel (apt-get install redis-sentinel)"
            )
        for port in self.sentinel_ports:
            conf = self.dir / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {self.dir}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.master.port} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                f"sentinel failover-timeout {SERVICE} 10000\n"
                f"sentinel parallel-syncs {SERVICE} 1\n"
            )
            self.sentinels.append(
                subprocess.Popen([binary, str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )
        for port in self.sentinel_ports:
            # A manual failover needs every sentinel to know the replicas and each other.
            _wait(
                f"sentinel {port} sees the set",
                lambda port=port: (
                    len(_admin(port).sentinel_slaves(SERVICE)) == len(self.replicas)
                    and len(_admin(port).sentinel_sentinels(SERVICE)) == 2
                ),
                timeout=30,
            )

    @staticmethod
    def _online(port: int) -> int:
        info = _admin(port).info("replication")
        return sum(
            1
            for k, v in info.items()
            if k.startswith("slave") and isinstance(v, dict) and v["state"] == "online"
        )

    def flushall(self) -> None:
        """Empties the master and waits until its replicas are empty too."""
        master = _admin(self.master_port())
        master.flushall()
        master.wait(len(self.replicas), 5000)

    def master_port(self) -> int:
        _host, port = _admin(self.sentinel_ports[0]).sentinel_get_master_addr_by_name(SERVICE)
        return int(port)

    def failover(self, *, crash: bool = False) -> tuple[int, int]:
        """``SENTINEL FAILOVER`` (or, ``crash``, killing the master: the sentinels notice it down
        after 1 s and elect a new one); returns (old, new) master ports once the new master takes
        writes and every surviving server replicates from it."""
        old = self.master_port()
        if crash:
            next(s for s in self.servers if s.port == old).stop()
        else:
            _admin(self.sentinel_ports[0]).execute_command("SENTINEL", "FAILOVER", SERVICE)
        _wait("a new master", lambda: self.master_port() != old)
        new = self.master_port()
        _wait("the new master takes writes", lambda: _admin(new).info("replication")["role"] == "master")
        if not crash:
            _wait("the old master follows", lambda: _admin(old).info("replication")["role"] == "slave")
        survivors = len(self.replicas) - (1 if crash else 0)
        _wait("the new master's replicas in sync", lambda: self._online(new) == survivors)
        return old, new

    def stop(self) -> None:
        for proc in self.sentinels:
            proc.kill()
            proc.wait(timeout=10)
        self.sentinels.clear()
        for s in self.servers:
            s.stop()
            shutil.rmtree(s.dir, ignore_errors=True)
        shutil.rmtree(self.dir, ignore_errors=True)
