"""Is this API process ready to serve, and how are its dependencies: the domain side of /readyz and /health.

Readiness is this process's own ability to serve: its Redis answers a PING on the probe client within
connections.PROBE_TIMEOUT. Workers being away never makes the API unready: a submit is queued in Redis and waits
for them, which is what a queue is for. /health names every dependency's state for people and dashboards: Redis
unreachable, or a node that is not the master, is `unhealthy`; no worker, Potpie unreachable or too few replicas is
`degraded`. Both answer within about a second whatever Redis or Potpie do: Redis is read through the probe client
in one round trip (for an operator, under Sentinel, one more call a sentinel), and Potpie is checked in the
background.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any


from . import SERVICE_NAME, __version__
from .config import Settings
from .connections import PROBE_TIMEOUT
from .core.events import now_iso
from .potpie.client import PotpieClient
from .store.probe import StoreProbe
from .store import StoreUnavailable

OK, DEGRADED, UNHEALTHY = "ok", "degraded", "unhealthy"
UP, DOWN, UNKNOWN, PENDING = "up", "down", "unknown", "pending"
HEALTH_BUDGET = 1.0  # seconds /health may spend; what the Redis read leaves is how long a first Potpie check is awaited


@dataclass(frozen=True)
class Readiness:
    """Whether this process can serve now, how long its Redis took to answer, and why not."""

    ready: bool
    latency_ms: float
    reason: str = ""


@dataclass(frozen=True)
class Health:
    """The /health report: `status` (ok, degraded, unhealthy) and the body that names each dependency's state."""

    status: str
    body: dict[str, Any] = field(default_factory=dict)


def _failure(exc: StoreUnavailable) -> str:
    kind = exc.cause
    if "Timeout" in kind:
        return f"Redis did not answer within {PROBE_TIMEOUT:g} s ({kind})"
    if "No connection available" in exc.reason:  # every probe connection is waiting on Redis already
        return f"Redis did not answer in time (every probe connection busy, {kind})"
    return f"Redis unreachable ({kind})"


class PotpieWatch:
    """Potpie's reachability as /health reports it, checked in the background at most every INTERVAL seconds, so
    a slow or unreachable Potpie never holds /health up: a check in flight leaves the last result standing."""

    INTERVAL = 15.0
    TIMEOUT = 2.0

    def __init__(self, potpie: PotpieClient) -> None:
        self.potpie = potpie
        self._lock = threading.Lock()
        self._state: tuple[str, float, float] = (PENDING, 0.0, 0.0)  # status, latency ms, when (monotonic)
        self._running: threading.Event | None = None

    def state(self, wait: float = 0.0) -> dict[str, Any]:
        """The last result, starting a check when one is due; before the first result, wait up to `wait` s for it."""
        with self._lock:
            status, _, checked = self._state
            if self._running is None and (status == PENDING or time.monotonic() - checked > self.INTERVAL):
                self._running = threading.Event()
                threading.Thread(target=self._check, args=(self._running,), name="psvc-potpie-health",
                                 daemon=True).start()
            running = self._running
        if status == PENDING and running is not None and wait > 0:
            running.wait(wait)
        status, latency_ms, checked = self._state
        view: dict[str, Any] = {"status": status, "base_url": self.potpie.base_url}
        if status != PENDING:
            view.update(latency_ms=round(latency_ms, 2), checked_s_ago=round(time.monotonic() - checked, 1))
        return view

    def _check(self, done: threading.Event) -> None:
        started = time.perf_counter()
        reachable = self.potpie.health(timeout=self.TIMEOUT)  # never raises: any failure is "not reachable"
        with self._lock:
            self._state = (UP if reachable else DOWN, (time.perf_counter() - started) * 1000, time.monotonic())
            self._running = None
        done.set()


class HealthCheck:
    """The API process's readiness and its dependencies' health."""

    def __init__(self, settings: Settings, probe: StoreProbe, potpie: PotpieClient, started: float) -> None:
        self.settings = settings
        self.probe = probe
        self.potpie = PotpieWatch(potpie)
        self.started = started

    def ready(self) -> Readiness:
        """Ready while Redis answers a PING on the probe client; nothing else (workers least of all) counts."""
        started = time.perf_counter()
        try:
            return Readiness(True, round(self.probe.ping(), 2))
        except StoreUnavailable as exc:
            return Readiness(False, round((time.perf_counter() - started) * 1000, 2), _failure(exc))

    def report(self, sockets: int, details: bool = True) -> Health:
        """Every dependency with its state, and the overall status (see the module's docstring); `details`: also
        ask each sentinel what it says of the master (one call a sentinel, for an operator's eyes only)."""
        started = time.perf_counter()
        self.potpie.state()  # starts a check when one is due, before Redis is waited for
        checks = self._redis_checks(details)
        checks["potpie_api"] = self.potpie.state(wait=HEALTH_BUDGET - (time.perf_counter() - started))
        degraded = [name for name, check in checks.items() if check["status"] == DOWN]
        status = UNHEALTHY if checks["redis"]["status"] != UP else (DEGRADED if degraded else OK)
        return Health(status, {
            "status": status, "service": SERVICE_NAME, "version": __version__, "degraded": degraded, "checks": checks,
            "websocket_connections": sockets, "auth": "disabled" if self.settings.auth_disabled else "enabled",
            "uptime": round(time.time() - self.started, 1), "timestamp": now_iso(),
        })

    def _redis_checks(self, details: bool) -> dict[str, dict[str, Any]]:
        started = time.perf_counter()
        try:
            seen = self.probe.read(self.settings.worker_max_age, sentinels=details)
        except StoreUnavailable as exc:
            unknown = {"status": UNKNOWN}
            return {"redis": {"status": DOWN, "error": _failure(exc),
                              "latency_ms": round((time.perf_counter() - started) * 1000, 2)},
                    "queue": unknown, "workers": unknown, "redis_replicas": unknown}
        node: dict[str, Any] = {"status": UP, "latency_ms": seen.latency_ms, "role": seen.role,
                                "replicas": seen.replicas}
        if seen.role != "master":  # writes would fail: REDIS_URL names a replica
            node.update(status=DOWN, error=f"Redis is a {seen.role}, not the master: writes fail")
        if seen.sentinel is not None:
            node["sentinel"] = seen.sentinel
        wanted = self.settings.redis_min_replicas_ack
        return {
            "redis": node,
            "queue": {"status": UP, "stats": seen.stats},
            # No worker is degraded, never unready: submits queue and wait (potpie_workers_alive, its alert).
            "workers": {"status": UP if seen.workers else DOWN, "alive": seen.workers,
                        "seen_within_s": self.settings.worker_max_age},
            # Fewer replicas than REDIS_MIN_REPLICAS_ACK: submits answer 503 until one is back.
            "redis_replicas": {"status": UP if seen.replicas >= wanted else DOWN, "connected": seen.replicas,
                               "required": wanted},
        }
