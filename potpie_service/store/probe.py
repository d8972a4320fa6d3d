"""What the API's probes read from Redis (/readyz, /health), on the probe client (connections.make_probe_redis).

A Redis that stops answering costs a probe the probe client's short timeout, never the shared client's 5 s and its
retry; and /health's reads are one round trip, so a slow Redis is paid once. Read-only: the counts are taken inside
the retention window (ZCOUNT by end time) instead of trimming the indexes, so a probe never writes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import redis

from ..core.model import JobStatus
from .keys import Keys
from .topology import sentinel_view


@dataclass(frozen=True)
class StoreHealth:
    """One /health reading of Redis: the node, the queue's counts and the workers seen recently."""

    latency_ms: float
    role: str
    replicas: int
    stats: dict[str, int]
    workers: int
    sentinel: dict[str, Any] | None = None


class StoreProbe:
    """The probes' reads, on their own short-timeout client and this queue's keys."""

    def __init__(self, client: redis.Redis, keys: Keys, retention: dict[JobStatus, int]) -> None:
        self._redis = client
        self.keys = keys
        self.retention = retention  # seconds an ended job stays in its index (JOB_TTL_*)

    def ping(self) -> float:
        """Milliseconds a PING took; raises StoreUnavailable when Redis does not answer within the timeout."""
        started = time.perf_counter()
        self._redis.ping()
        return (time.perf_counter() - started) * 1000

    def read(self, worker_max_age: float, sentinels: bool = True) -> StoreHealth:
        """The node's role and replicas, counts by state and live workers, in one round trip (StoreUnavailable when
        Redis does not answer); `sentinels`: then what each sentinel says of the master, one call a sentinel."""
        now = time.time()
        pipe = self._redis.pipeline(transaction=False)
        pipe.info("replication")
        pipe.zcard(self.keys.index("waiting"))
        pipe.zcard(self.keys.index("active"))
        for status, ttl in self.retention.items():
            pipe.zcount(self.keys.index(status.value), now - ttl, "+inf")
        pipe.zcount(self.keys.index("workers"), now - worker_max_age, "+inf")
        started = time.perf_counter()
        info, waiting, active, *ended, workers = pipe.execute()
        latency_ms = (time.perf_counter() - started) * 1000
        counts = {"waiting": int(waiting), "active": int(active)}
        counts.update({"completed" if s is JobStatus.FINISHED else s.value: int(n)
                       for s, n in zip(self.retention, ended)})
        counts["total"] = sum(counts.values())
        return StoreHealth(round(latency_ms, 2), info.get("role", "unknown"), int(info.get("connected_slaves", 0)),
                           counts, int(workers), sentinel_view(self._redis) if sentinels else None)
