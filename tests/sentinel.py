"""Redis under Sentinel on loopback for the failover tests: two data nodes (AOF on, as deployed) and three
`redis-server --sentinel` processes watching them, each on a free port."""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import redis
from redis.sentinel import Sentinel

from tests.stack import RedisServer, free_port, wait_for

MASTER = "mymaster"
DOWN_AFTER_MS = 1000  # a primary silent this long is down (subjectively); two sentinels agreeing: failover


class SentinelProcess:
    """One sentinel, its config file in a directory of its own (sentinels rewrite it)."""

    def __init__(self, primary_port: int) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="psvc-sentinel-"))
        (self.dir / "sentinel.conf").write_text("\n".join([
            f"port {self.port}", "bind 127.0.0.1", f"dir {self.dir}",
            f"sentinel monitor {MASTER} 127.0.0.1 {primary_port} 2",
            f"sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}",
            f"sentinel failover-timeout {MASTER} 10000", f"sentinel parallel-syncs {MASTER} 1", ""]))
        self.proc: subprocess.Popen | None = None

    def start(self) -> "SentinelProcess":
        binary = shutil.which("redis-server")
        assert binary, "redis-server not found"
        self.proc = subprocess.Popen([binary, str(self.dir / "sentinel.conf"), "--sentinel"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: redis.Redis(port=self.port, socket_timeout=1).ping(), 10, what=f"sentinel {self.port}")
        return self

    def cleanup(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


class RedisHA:
    """A primary and a replica under three sentinels. `url` is the first primary (what the tests' own helpers
    start from); `client()` always writes to whichever node the sentinels name now."""

    def __init__(self) -> None:
        self.nodes = [RedisServer(appendonly=True).start()]
        self.nodes.append(RedisServer(appendonly=True,
                                      extra=["--replicaof", "127.0.0.1", str(self.nodes[0].port)]).start())
        wait_for(lambda: self.nodes[1].client().info("replication")["master_link_status"] == "up", 10,
                 what="the replica to sync")
        self.sentinels = [SentinelProcess(self.nodes[0].port).start() for _ in range(3)]
        wait_for(lambda: all(self._sees_everyone(s.port) for s in self.sentinels), 20,
                 what="every sentinel to see the replica and the other sentinels")

    def _sees_everyone(self, port: int) -> bool:
        state = redis.Redis(port=port, socket_timeout=1).sentinel_master(MASTER)
        return state["num-slaves"] >= 1 and state["num-other-sentinels"] >= 2

    @property
    def url(self) -> str:
        return self.nodes[0].url

    @property
    def sentinels_setting(self) -> str:
        """REDIS_SENTINELS for the service."""
        return ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)

    def master_port(self) -> int:
        """The primary's port as the sentinels name it now."""
        return Sentinel([("127.0.0.1", s.port) for s in self.sentinels], socket_timeout=1).discover_master(MASTER)[1]

    def primary(self) -> RedisServer:
        return next(node for node in self.nodes if node.port == self.master_port())

    def replica(self) -> RedisServer:
        return next(node for node in self.nodes if node.port != self.master_port())

    def client(self) -> redis.Redis:
        return self.primary().client()

    def rejoin(self, node: RedisServer) -> None:
        """Start a node that was killed again, as a replica of the primary now (what an operator's or a chart's
        start script does: a node that came back as a primary of its own would briefly accept writes)."""
        node.extra = ["--replicaof", "127.0.0.1", str(self.master_port())]
        node.start()
        wait_for(self.in_sync, 20, what="the rejoined node to sync")

    def promoted(self, node: RedisServer) -> bool:
        """Whether the sentinels name `node` the primary and it says so itself."""
        return self.master_port() == node.port and node.client().info("replication")["role"] == "master"

    def in_sync(self) -> bool:
        """The replica follows the primary, link up, nothing to catch up."""
        primary, replica = self.primary().client().info("replication"), self.replica().client().info("replication")
        return (replica.get("role") == "slave" and replica.get("master_link_status") == "up"
                and primary.get("connected_slaves", 0) >= 1
                and primary["master_repl_offset"] == replica["slave_repl_offset"])

    def cleanup(self) -> None:
        for sentinel in self.sentinels:
            sentinel.cleanup()
        for node in self.nodes:
            node.cleanup()
