"""What the API does, below the HTTP layer: submit a job, describe it, count the queue, check health."""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any, Callable

import redis

from . import SERVICE_NAME, __version__
from .api.errors import NotFound, ServiceUnavailable, ValidationError
from .api.validation import AnalyzeRequest
from .config import Settings
from .events import now_iso
from .jobs import JobStore
from .model import MESSAGES, JobStatus
from .potpie import PotpieClient
from .tokens import TokenCipher

log = logging.getLogger(__name__)

Dispatch = Callable[[str, int, float], None]


class JobService:
    """Job operations for one owner at a time; the views call these and nothing else."""

    def __init__(self, settings: Settings, store: JobStore, dispatch: Dispatch, cipher: TokenCipher,
                 potpie: PotpieClient) -> None:
        self.settings = settings
        self.store = store
        self.dispatch = dispatch
        self.cipher = cipher
        self.potpie = potpie
        self.started = time.time()
        self._potpie_checked: tuple[float, bool, float] = (0.0, False, 0.0)

    def submit(self, owner: str, request: AnalyzeRequest) -> dict[str, Any]:
        """Queue a new analysis job; return the 202 body."""
        if request.github_token and not self.cipher.enabled:
            raise ValidationError("github_token cannot be accepted: the server has no TOKEN_ENCRYPTION_KEY",
                                  field="github_token")
        job_id = uuid.uuid4().hex
        created = now_iso()
        fields = {
            "id": job_id, "owner": owner, "repo": request.repo, "branch": request.branch,
            "question": request.question, "status": JobStatus.QUEUED.value, "progress": 0,
            "message": MESSAGES[JobStatus.QUEUED], "attempts": 0, "max_attempts": self.settings.max_retries + 1,
            "created_at": created, "created_ts": time.time(), "seq": 0, "event_seq": 0,
            "has_github_token": 1 if request.github_token else 0,
        }
        sealed = self.cipher.encrypt(request.github_token) if request.github_token else ""
        secret_ttl = int(self.settings.parse_timeout) + 86400
        try:
            submitted = self.store.submit(job_id, owner, fields, sealed, secret_ttl)
        except redis.RedisError as exc:
            log.error("cannot queue the job: Redis unavailable (%s)", type(exc).__name__)
            raise ServiceUnavailable("Redis connection failed: the job was not queued; try again later") from None
        for admitted in submitted.admitted:
            self._dispatch_first(admitted)
        log.info("job queued for %s@%s", request.repo, request.branch, extra={"job_id": job_id})
        return {
            "success": True, "project_id": job_id, "job_id": job_id, "status": JobStatus.QUEUED.value,
            "message": MESSAGES[JobStatus.QUEUED], "websocket_endpoint": "/socket.io/",
            "socketio": {"path": "/socket.io/", "join_event": "join_project", "room_id": job_id},
            "status_url": f"/status/{job_id}", "queue_position": submitted.queue_position, "timestamp": created,
        }

    def _dispatch_first(self, job_id: str) -> None:
        try:
            self.dispatch(job_id, 0, 0)
        except Exception:  # the job is stored and admitted; the workers' sweeper dispatches it later
            log.warning("could not enqueue the first step; the sweeper will", extra={"job_id": job_id},
                        exc_info=True)

    def job(self, owner: str, job_id: str | None) -> dict[str, str]:
        """The owner's job record, or NotFound (also for other owners' jobs: no existence leak)."""
        try:
            record = self.store.get(job_id) if job_id else None
        except redis.RedisError:
            raise ServiceUnavailable("Redis connection failed") from None
        if not record or record.get("owner") != owner:
            raise NotFound("Job not found", project_id=job_id)
        return record

    def queue_position(self, record: dict[str, str]) -> int | None:
        """Place in line while queued (0: admitted, starting), else None."""
        if record.get("status") != JobStatus.QUEUED.value:
            return None
        return self.store.queue_position(record["id"]) or 0

    def status(self, owner: str, job_id: str | None) -> dict[str, Any]:
        """The `/status/<id>` body."""
        record = self.job(owner, job_id)
        body: dict[str, Any] = {
            "success": True, "project_id": record["id"], "job_id": record["id"], "status": record["status"],
            "message": record.get("message"), "progress": int(record.get("progress") or 0),
            "queue_position": self.queue_position(record), "attempts": int(record.get("attempts") or 0),
            "max_attempts": int(record.get("max_attempts") or 0),
            "potpie_project_id": record.get("potpie_project_id") or None,
            "repo": record["repo"], "branch": record["branch"],
            "details": {
                "created_at": record.get("created_at"), "processed_at": record.get("processed_at") or None,
                "finished_at": record.get("finished_at") or None,
                "failed_reason": record.get("failed_reason") or None,
            },
            "timestamp": now_iso(),
        }
        if record.get("result"):
            body["result"] = json.loads(record["result"])
        return body

    def queue_stats(self) -> dict[str, Any]:
        """The `/queue/stats` body: counts only."""
        try:
            stats = self.store.stats()
            workers = self.store.workers_alive(self.worker_max_age)
        except redis.RedisError:
            raise ServiceUnavailable("Redis connection failed") from None
        return {
            "queue_name": self.settings.queue_name, "stats": stats,
            "worker_status": "running" if workers else "stopped", "workers": workers,
            "max_concurrency": self.settings.max_concurrent_jobs, "max_retries": self.settings.max_retries,
            "timestamp": now_iso(),
        }

    @property
    def worker_max_age(self) -> float:
        """A worker counts as alive if it consumed a heartbeat this recently."""
        return max(30.0, 3 * self.settings.worker_heartbeat_interval)

    def _potpie_reachable(self) -> tuple[bool, float]:
        checked_at, ok, latency = self._potpie_checked
        if time.time() - checked_at > 15:
            started = time.perf_counter()
            ok = self.potpie.health(timeout=1.0)
            latency = (time.perf_counter() - started) * 1000
            self._potpie_checked = (time.time(), ok, latency)
        return ok, latency

    def health(self, sockets: int) -> tuple[int, dict[str, Any]]:
        """(HTTP status, body): 503 when Redis or every worker is down."""
        checks: dict[str, Any] = {}
        started = time.perf_counter()
        try:
            self.store.ping()
            checks["redis"] = {"status": "up", "latency_ms": round((time.perf_counter() - started) * 1000, 2)}
            stats = self.store.stats()
            workers = self.store.workers_alive(self.worker_max_age)
            checks["queue"] = {"status": "up", "stats": stats}
            checks["workers"] = {"status": "up" if workers else "down", "alive": workers}
        except Exception as exc:  # any Redis failure means "down", never a 500 from the health check
            checks["redis"] = {"status": "down", "error": type(exc).__name__,
                               "latency_ms": round((time.perf_counter() - started) * 1000, 2)}
            checks["queue"] = {"status": "unknown"}
            checks["workers"] = {"status": "unknown"}
        potpie_ok, potpie_ms = self._potpie_reachable()
        checks["potpie_api"] = {"status": "up" if potpie_ok else "down", "latency_ms": round(potpie_ms, 2),
                                "base_url": self.settings.potpie_base_url}
        down = [name for name in ("redis", "workers") if checks[name]["status"] != "up"]
        degraded = down + ([] if potpie_ok else ["potpie_api"])
        body = {
            "status": "unhealthy" if down else ("degraded" if degraded else "ok"),
            "service": SERVICE_NAME, "version": __version__, "degraded": degraded, "checks": checks,
            "websocket_connections": sockets, "auth": "disabled" if self.settings.auth_disabled else "enabled",
            "uptime": round(time.time() - self.started, 1), "timestamp": now_iso(),
        }
        return (503 if down else 200), body
