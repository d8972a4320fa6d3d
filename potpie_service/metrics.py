"""Prometheus metrics: cluster-wide job facts kept in Redis by the workers, per-process facts kept by each API.

Job counters and histograms are written to one Redis hash by whichever worker process saw the event (a prefork
child included), exactly once per event, and read back by a collector when Prometheus scrapes an API process. So
every API process exports the same cluster-wide values (aggregate them with `max`, or scrape one pod), while HTTP
latency and Socket.IO connections belong to the process that served them (aggregate with `sum`).
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import redis
from flask import Flask, Response, g, request
from prometheus_client import CollectorRegistry, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.process_collector import ProcessCollector

from . import logs
from .config import Settings
from .jobs import JobStore

log = logging.getLogger(__name__)

JOB_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
STATE_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 15, 30, 60, 300, 900, 3600)
CALL_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

# failed_reason texts (pipeline.py, potpie.py) -> failure class; the first match wins, the rest is "other".
FAILURE_CLASSES = (
    ("internal", "internal error in "),
    ("retries_exhausted", "(gave up after "),
    ("potpie_auth", "Potpie rejected the API key"),
    ("potpie_auth", "Potpie denied access"),
    ("potpie_usage_limit", "Potpie usage limit reached"),
    ("parse_error", "Potpie could not parse the repository"),
    ("parse_timeout", "Potpie did not finish parsing within PARSE_TIMEOUT"),
    ("github_token", "the GitHub token could not be read"),
    ("potpie_rejected", "Potpie "),
)
KNOWN_CLASSES = tuple(dict.fromkeys([name for name, _ in FAILURE_CLASSES] + ["other"]))


@dataclass(frozen=True)
class Family:
    """A cluster-wide metric kept in Redis."""

    name: str
    kind: str
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()


FAMILIES = {f.name: f for f in (
    Family("potpie_jobs_finished_total", "counter", "Jobs that finished with a result."),
    Family("potpie_jobs_failed_total", "counter", "Jobs that failed for good, by failure class.", ("failure_class",)),
    Family("potpie_jobs_cancelled_total", "counter", "Jobs cancelled by their owner (DELETE /jobs/<id>)."),
    Family("potpie_job_retries_total", "counter", "Job-level retries scheduled (moves into the retrying state)."),
    Family("potpie_job_duration_seconds", "histogram", "Job time from submission to its end, by final status.",
           ("status",), JOB_BUCKETS),
    Family("potpie_job_state_duration_seconds", "histogram", "Time a job spent in a state, observed as it left it.",
           ("state",), STATE_BUCKETS),
    Family("potpie_upstream_request_duration_seconds", "histogram",
           "Potpie API calls (each try), by endpoint and HTTP status or error.", ("endpoint", "status"), CALL_BUCKETS),
    Family("potpie_upstream_errors_total", "counter", "Potpie API calls that failed, by endpoint and status.",
           ("endpoint", "status")),
)}

# ARGV: prefix, workers seen since. One round trip for every gauge and the metrics hash.
_SNAPSHOT = """
local p = ARGV[1]
local head = redis.call('ZRANGE', p .. 'waiting', 0, 0)
local oldest = ''
if #head > 0 then oldest = redis.call('HGET', p .. 'job:' .. head[1], 'created_ts') or '' end
return {redis.call('ZCARD', p .. 'waiting'), redis.call('ZCARD', p .. 'active'), oldest,
        redis.call('ZCOUNT', p .. 'workers', ARGV[2], '+inf'), redis.call('GET', p .. 'tickets') or '0',
        redis.call('HGETALL', p .. 'metrics')}
"""


def failure_class(reason: str) -> str:
    """The failure class of a job's failed_reason (a bounded label value)."""
    for name, text in FAILURE_CLASSES:
        if text in reason:
            return name
    return "other"


def _float(raw: Any) -> float | None:
    try:
        return float(raw)
    except (TypeError, ValueError):
        return None


def _bucket(buckets: tuple[float, ...], value: float) -> str:
    return next((f"{bound:g}" for bound in buckets if value <= bound), "+Inf")


class MetricsRecorder:
    """Writes job and Potpie-call observations into the Redis metrics hash (workers); never raises.

    Observations are added up in the process and written by a background thread every FLUSH_S (a Redis round
    trip per Potpie call and per transition cost a tenth of a green worker's CPU), so a scrape sees them at most
    that late and a process killed -9 loses at most that much of them.
    """

    FLUSH_S = 1.0

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.redis = client
        self.key = f"{prefix}metrics"
        self._counts: dict[str, int] = {}
        self._sums: dict[str, float] = {}
        self._lock = threading.Lock()
        self._flusher: tuple[int, threading.Thread] | None = None

    def observe(self, what: str, job: dict[str, str]) -> None:
        """Pipeline observer: time in the state just left; at the end also the outcome and the job's duration."""
        now = time.time()
        since = _float(job.get("previous_since")) or _float(job.get("created_ts"))
        if since is not None:
            self._histogram("potpie_job_state_duration_seconds", (job.get("previous_status") or "queued",),
                            now - since)
        status = job.get("status", "")
        if what == "transition" and status == "retrying":
            self._count("potpie_job_retries_total|")
        if what == "ended":
            created = _float(job.get("created_ts"))
            if created is not None:
                self._histogram("potpie_job_duration_seconds", (status,), now - created)
            if status == "finished":
                self._count("potpie_jobs_finished_total|")
            elif status == "failed":
                self._count(f"potpie_jobs_failed_total|{failure_class(job.get('failed_reason', ''))}")
            elif status == "cancelled":
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
        self._count(f"{series}|{_bucket(FAMILIES[name].buckets, value)}")
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
        except redis.RedisError as exc:  # metrics must never break a job; the store's own calls report Redis
            log.warning("metrics not recorded: Redis unavailable (%s)", type(exc).__name__)


def _families(raw: dict[str, str]) -> Iterator[Metric]:
    """Turn the flat Redis hash into counter and histogram families (buckets made cumulative)."""
    series: dict[str, dict[tuple[str, ...], dict[str, float]]] = {name: {} for name in FAMILIES}
    for field, value in raw.items():
        name, _, rest = field.partition("|")
        if name not in FAMILIES:
            continue
        labels, _, part = rest.partition("|")
        key = tuple(labels.split(",")) if FAMILIES[name].labels else ()
        series[name].setdefault(key, {})[part] = float(value)
    for cls in KNOWN_CLASSES:  # every class from the first scrape, so rate() and alerts work at once
        series["potpie_jobs_failed_total"].setdefault((cls,), {"": 0.0})
    for name, family in FAMILIES.items():
        if family.kind == "counter":
            counter = CounterMetricFamily(name, family.help, labels=family.labels)
            for labels, parts in sorted(series[name].items()):
                counter.add_metric(list(labels), parts.get("", 0.0))
            if not family.labels and not series[name]:
                counter.add_metric([], 0.0)
            yield counter
            continue
        histogram = HistogramMetricFamily(name, family.help, labels=family.labels)
        for labels, parts in sorted(series[name].items()):
            total, buckets = 0.0, []
            for bound in [f"{b:g}" for b in family.buckets] + ["+Inf"]:
                total += parts.get(bound, 0.0)
                buckets.append((bound, total))
            histogram.add_metric(list(labels), buckets, parts.get("sum", 0.0))
        yield histogram


class ClusterCollector:
    """Reads the cluster-wide metrics from Redis at scrape time: one round trip."""

    def __init__(self, store: JobStore, settings: Settings) -> None:
        self.store = store
        self.max_concurrent = settings.max_concurrent_jobs
        self.worker_max_age = max(30.0, 3 * settings.worker_heartbeat_interval)
        self._snapshot = store.redis.register_script(_SNAPSHOT)

    def describe(self) -> list[Metric]:
        """Nothing to check at registration (names are fixed); avoids a Redis read there."""
        return []

    def collect(self) -> Iterable[Metric]:
        """The families, or only `potpie_metrics_redis_up 0` when Redis cannot be read."""
        now = time.time()
        up = GaugeMetricFamily("potpie_metrics_redis_up", "Whether this scrape could read Redis (1) or not (0).")
        try:
            waiting, active, oldest, workers, tickets, flat = self._snapshot(
                args=[self.store.prefix, now - self.worker_max_age])
        except redis.RedisError as exc:
            log.warning("metrics scrape: Redis unavailable (%s)", type(exc).__name__)
            up.add_metric([], 0)
            return [up]
        up.add_metric([], 1)
        oldest_ts = _float(oldest)

        def gauge(name: str, text: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, text, value=value)

        return [
            up,
            CounterMetricFamily("potpie_jobs_submitted_total", "Jobs created by POST /analyze (not duplicates).",
                                value=float(tickets)),
            *_families(dict(zip(flat[::2], flat[1::2]))),
            gauge("potpie_queue_depth", "Jobs waiting for a slot (not yet admitted).", waiting),
            gauge("potpie_queue_oldest_age_seconds", "Age of the oldest waiting job (0 when none waits).",
                  max(0.0, now - oldest_ts) if oldest_ts else 0.0),
            gauge("potpie_jobs_in_flight", "Jobs holding one of the MAX_CONCURRENT_JOBS slots.", active),
            gauge("potpie_jobs_max_concurrent", "MAX_CONCURRENT_JOBS.", self.max_concurrent),
            gauge("potpie_jobs_utilisation_ratio", "Jobs in flight / MAX_CONCURRENT_JOBS.",
                  active / self.max_concurrent),
            gauge("potpie_workers_alive", "Workers that consumed a heartbeat recently.", workers),
        ]


class ApiMetrics:
    """One API process's /metrics: cluster-wide families from Redis plus this process's own."""

    def __init__(self, settings: Settings, store: JobStore, sockets: Any) -> None:
        self.token = settings.metrics_token
        disable_created_metrics()  # no `_created` twin for every series (process-wide; the API is its own process)
        self.registry = CollectorRegistry()
        self.http = Histogram("potpie_http_request_duration_seconds", "HTTP requests served by this API process, "
                              "by method, route (URL rule) and status.", ("method", "route", "status"),
                              buckets=HTTP_BUCKETS, registry=self.registry)
        connections = Gauge("potpie_socketio_connections", "Socket.IO connections open on this API process.",
                            registry=self.registry)
        connections.set_function(lambda: sockets.value)
        ProcessCollector(registry=self.registry)
        self.registry.register(ClusterCollector(store, settings))

    def accepts(self, presented: str | None, operator: bool) -> bool:
        """METRICS_TOKEN set: the bearer must equal it; unset: any key allowed to read operational details."""
        if self.token:
            return bool(presented) and hmac.compare_digest(presented.encode(), self.token.encode())
        return operator

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one HTTP request of this process."""
        self.http.labels(method, route, str(status)).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        """The exposition body and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_PLAIN_0_0_4


QUIET_ROUTES = frozenset({"/livez", "/metrics"})


def instrument(app: Flask, settings: Settings, store: JobStore, sockets: Any) -> ApiMetrics:
    """Attach the metrics to the app; time every request, log one access line for it, tag its log lines."""
    metrics = ApiMetrics(settings, store, sockets)
    app.extensions["metrics"] = metrics
    access = logging.getLogger("potpie_service.access")

    @app.before_request
    def bind() -> None:
        g.metrics_started = time.perf_counter()
        logs.request_id.set(g.get("request_id"))

    @app.after_request
    def record(response: Response) -> Response:
        started = g.get("started") or g.get("metrics_started") or time.perf_counter()
        seconds = time.perf_counter() - started
        route = request.url_rule.rule if request.url_rule is not None else "unmatched"
        metrics.observe_request(request.method, route, response.status_code, seconds)
        if route in QUIET_ROUTES and response.status_code < 400:
            return response  # probes and scrapes: measured above, not worth a log line each
        access.info("%s %s %s %.1f ms", request.method, route, response.status_code, seconds * 1000,
                    extra={"method": request.method, "route": route, "path": request.path,
                           "status": response.status_code, "duration_ms": round(seconds * 1000, 2),
                           "request_id": g.get("request_id")})
        return response

    @app.teardown_request
    def unbind(_error: BaseException | None) -> None:
        logs.request_id.set(None)

    return metrics
