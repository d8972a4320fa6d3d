"""/metrics of an API process: the cluster-wide families read from Redis at scrape time, plus this process's
own (HTTP latency by route, Socket.IO connections); and the per-request timing and access log."""

from __future__ import annotations

import hmac
import logging
import time
from typing import Any, Callable, Iterable, Iterator

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics,
                               generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.process_collector import ProcessCollector

from ..config import Settings
from ..core.metrics import FAMILIES, HTTP_BUCKETS, KNOWN_CLASSES
from ..store.jobs import JobStore
from ..store import StoreUnavailable

log = logging.getLogger(__name__)
ACCESS = logging.getLogger("potpie_service.access")
QUIET_ROUTES = frozenset({"/livez", "/readyz", "/metrics"})
# The method label: these, and "other" for any token a client makes up (each distinct value would be a new series).
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})
# Why the edge refused a request or closed a socket (api/edge.py, api/websocket.py, api/sessions.py).
REFUSALS = ("headers_too_large", "body_too_large", "body_timeout", "bad_body", "bad_upgrade", "message_too_big",
            "malformed_packet", "unauthenticated", "connect_timeout", "event_budget")
# ACCESS_LOG: the lowest status that gets an access line. Every request is measured in the metrics either way.
ACCESS_LOG_FLOOR = {"all": 0, "errors": 400, "off": 600}


def _families(raw: dict[str, str]) -> Iterator[Metric]:
    """Turn the flat Redis hash into counter and histogram families (buckets made cumulative)."""
    series: dict[str, dict[tuple[str, ...], dict[str, float]]] = {name: {} for name in FAMILIES}
    for field, value in raw.items():
        name, _, rest = field.partition("|")
        if name not in FAMILIES:
            continue
        label_text, _, part = rest.partition("|")
        key = tuple(label_text.split(",")) if FAMILIES[name].labels else ()
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
        self.worker_max_age = settings.worker_max_age

    def describe(self) -> list[Metric]:
        """Nothing to check at registration (names are fixed); avoids a Redis read there."""
        return []

    def collect(self) -> Iterable[Metric]:
        """The families, or only `potpie_metrics_redis_up 0` when Redis cannot be read."""
        now = time.time()
        up = GaugeMetricFamily("potpie_metrics_redis_up", "Whether this scrape could read Redis (1) or not (0).")
        try:
            snap = self.store.snapshot(self.worker_max_age)
        except StoreUnavailable as exc:
            log.warning("metrics scrape: Redis unavailable (%s)", type(exc).__name__)
            up.add_metric([], 0)
            return [up]
        up.add_metric([], 1)
        waiting, active, oldest_ts = snap.waiting, snap.active, snap.oldest_created_ts

        def gauge(name: str, text: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, text, value=value)

        return [
            up,
            CounterMetricFamily("potpie_jobs_submitted_total", "Jobs created by POST /analyze (not duplicates).",
                                value=float(snap.submitted)),
            *_families(snap.fields),
            gauge("potpie_queue_depth", "Jobs waiting for a slot (not yet admitted).", waiting),
            gauge("potpie_queue_oldest_age_seconds", "Age of the oldest waiting job (0 when none waits).",
                  max(0.0, now - oldest_ts) if oldest_ts else 0.0),
            gauge("potpie_jobs_in_flight", "Jobs holding one of the MAX_CONCURRENT_JOBS slots.", active),
            gauge("potpie_jobs_max_concurrent", "MAX_CONCURRENT_JOBS.", self.max_concurrent),
            gauge("potpie_jobs_utilisation_ratio", "Jobs in flight / MAX_CONCURRENT_JOBS.",
                  active / self.max_concurrent),
            gauge("potpie_workers_alive", "Workers that consumed a heartbeat recently.", snap.workers),
        ]


class ApiMetrics:
    """One API process's /metrics: cluster-wide families from Redis plus this process's own."""

    def __init__(self, settings: Settings, store: JobStore, sockets: Any) -> None:
        self.token = settings.metrics_token
        self.access_floor = ACCESS_LOG_FLOOR[settings.access_log]
        disable_created_metrics()  # no `_created` twin for every series (process-wide; the API is its own process)
        self.registry = CollectorRegistry()
        self.http = Histogram("potpie_http_request_duration_seconds", "HTTP requests served by this API process, "
                              "by method, route (URL rule) and status.", ("method", "route", "status"),
                              buckets=HTTP_BUCKETS, registry=self.registry)
        connections = Gauge("potpie_socketio_connections", "Socket.IO connections open on this API process.",
                            registry=self.registry)
        connections.set_function(lambda: sockets.value)
        self.sessions = Gauge("potpie_socketio_sessions", "Engine.IO sessions held by this API process, those not "
                              "(yet) authenticated included.", registry=self.registry)
        self.refusals = Counter("potpie_edge_refusals_total", "Requests refused and sockets closed by this API "
                                "process's edge, by reason.", ("reason",), registry=self.registry)
        for reason in REFUSALS:  # every reason from the first scrape, so rate() and alerts work at once
            self.refusals.labels(reason)
        ProcessCollector(registry=self.registry)
        self.registry.register(ClusterCollector(store, settings))

    def accepts(self, presented: str | None, operator: bool) -> bool:
        """METRICS_TOKEN set: the bearer must equal it; unset: any key allowed to read operational details."""
        if self.token:
            return presented is not None and hmac.compare_digest(presented.encode(), self.token.encode())
        return operator

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one HTTP request of this process."""
        self.http.labels(method if method in METHODS else "other", route, str(status)).observe(seconds)

    def refused(self, reason: str) -> None:
        """Count a request refused or a socket closed by the edge (`reason` is one of REFUSALS)."""
        self.refusals.labels(reason).inc()

    def count_sessions(self, count: Callable[[], int]) -> None:
        """Read the Engine.IO session count from `count` at each scrape."""
        self.sessions.set_function(count)

    def finished(self, method: str, route: str, path: str, status: int, seconds: float,
                 request_id: str | None) -> None:
        """Count a request and write its access line, as ACCESS_LOG says (every answer goes through here)."""
        self.observe_request(method, route, status, seconds)
        if status < self.access_floor or (route in QUIET_ROUTES and status < 400):
            return  # probes and scrapes (and more, as ACCESS_LOG says): measured above, not logged
        ACCESS.info("%s %s %s %.1f ms", method, route, status, seconds * 1000,
                    extra={"method": method, "route": route, "path": path, "status": status,
                           "duration_ms": round(seconds * 1000, 2), "request_id": request_id})

    def render(self) -> tuple[bytes, str]:
        """The exposition body and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_PLAIN_0_0_4
