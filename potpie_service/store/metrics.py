"""Metrics in Redis: what the workers observe, added up and written to one hash (`MetricsRecorder`), and what
an API process reads back at scrape time (`read_snapshot`, one round trip)."""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

import redis

from ..core.job import Change
from ..core.metrics import FAMILIES, bucket, failure_class
from ..core.model import JobStatus
from .errors import StoreUnavailable
from .keys import Keys
from .scripts import Scripts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MetricsSnapshot:
    """What /metrics reads from Redis: gauges' inputs and the metrics hash."""

    waiting: int
    active: int
    oldest_created_ts: float | None
    workers: int
    submitted: int
    fields: dict[str, str]


class MetricsRecorder:
    """Writes job and Potpie-call observations into the Redis metrics hash (workers); never raises.

    Observations are added up in the process and written by a background thread every FLUSH_S (a Redis round
    trip per Potpie call and per transition cost a tenth of a green worker's CPU), so a scrape sees them at most
    that late and a process killed -9 loses at most that much of them.
    """

    FLUSH_S = 1.0

    def __init__(self, client: redis.Redis, key: str) -> None:
        self.redis = client
        self.key = key
        self._counts: dict[str, int] = {}
        self._sums: dict[str, float] = {}
        self._lock = threading.Lock()
        self._flusher: tuple[int, threading.Thread] | None = None

    def observe(self, change: Change) -> None:
        """Pipeline observer: time in the state just left; at the end also the outcome and the job's duration."""
        job = change.job
        self._histogram("potpie_job_state_duration_seconds", (change.previous.value,), change.time_in_previous)
        if not change.ended and job.status is JobStatus.RETRYING:
            self._count("potpie_job_retries_total|")
        if change.ended:
            if job.created_ts:
                self._histogram("potpie_job_duration_seconds", (job.status.value,), time.time() - job.created_ts)
            if job.status is JobStatus.FINISHED:
                self._count("potpie_jobs_finished_total|")
            elif job.status is JobStatus.FAILED:
                self._count(f"potpie_jobs_failed_total|{failure_class(job.failed_reason)}")
            elif job.status is JobStatus.CANCELLED:
                self._count("potpie_jobs_cancelled_total|")

    def upstream(self, endpoint: str, outcome: str, seconds: float) -> None:
        """PotpieClient observer: one try of one call, with its HTTP status or error kind."""
        self._histogram("potpie_upstream_request_duration_seconds", (endpoint, outcome), seconds)
        if not outcome.startswith(("2", "3")):
            self._count(f"potpie_upstream_errors_total|{endpoint},{outcome}")

    def _count(self, field: str, amount: int = 1) -> None:
        with self._lock:
            self._counts[field] = self._counts.get(field, 0) + amount
            if self._flusher is None or self._flusher[0] != os.getpid() or not self._flusher[1].is_alive():
                thread = threading.Thread(target=self._flush_forever, name="psvc-metrics", daemon=True)
                self._flusher = (os.getpid(), thread)  # a forked child starts its own
                thread.start()

    def _flush_forever(self) -> None:
        while True:
            time.sleep(self.FLUSH_S)
            self.flush()

    def _histogram(self, name: str, labels: tuple[str, ...], value: float) -> None:
        value = max(0.0, value)
        series = f"{name}|{','.join(labels)}"
        self._count(f"{series}|{bucket(FAMILIES[name].buckets, value)}")
        with self._lock:
            self._sums[f"{series}|sum"] = self._sums.get(f"{series}|sum", 0.0) + value

    def flush(self) -> None:
        """Write what was added up, in one round trip (dropped if Redis is away: part of it may have been written,
        and counting it twice would be worse)."""
        with self._lock:
            counts, sums, self._counts, self._sums = self._counts, self._sums, {}, {}
        if not counts and not sums:
            return
        pipe = self.redis.pipeline(transaction=False)
        for field, amount in counts.items():
            pipe.hincrby(self.key, field, amount)
        for field, total in sums.items():
            pipe.hincrbyfloat(self.key, field, total)
        try:
            pipe.execute()
        except (StoreUnavailable, redis.RedisError) as exc:  # metrics must never break a job; the store's own
            # calls report Redis
            log.warning("metrics not recorded: Redis unavailable (%s)", type(exc).__name__)


def read_snapshot(scripts: Scripts, keys: Keys, worker_max_age: float) -> MetricsSnapshot:
    """Run the snapshot script (store/lua/snapshot.lua) and read its reply."""
    waiting, active, oldest, workers, tickets, flat = scripts.call(
        "snapshot", [keys.index("waiting"), keys.index("active"), keys.index("workers"), keys.index("tickets"),
         keys.index("metrics")], prefix=keys.prefix, since=time.time() - worker_max_age)
    return MetricsSnapshot(int(waiting), int(active), float(oldest) if oldest else None, int(workers), int(tickets),
                           dict(zip(flat[::2], flat[1::2])))
