"""What the API does, below the HTTP layer: submit a job, describe it, count the queue, check health."""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from typing import Any, Callable

import redis

from . import SERVICE_NAME, __version__, analysis
from .api.errors import Conflict, NotFound, ServiceUnavailable, ValidationError
from .api.validation import AnalyzeRequest
from .config import Settings
from .events import ending, now_iso
from .jobs import Dedup, JobStore
from .metrics import MetricsRecorder
from .model import MESSAGES, JobStatus
from .potpie import PotpieClient
from .tokens import TokenCipher
from .webhooks import UnsafeCallbackUrl, check_url

log = logging.getLogger(__name__)

Dispatch = Callable[[str, int, float], None]
DURATIONS_MAX_AGE = 1.0  # seconds an API process reuses the recent durations behind ETAs


class JobService:
    """Job operations for one owner at a time; the views call these and nothing else."""

    def __init__(self, settings: Settings, store: JobStore, dispatch: Dispatch, cipher: TokenCipher,
                 potpie: PotpieClient) -> None:
        self.settings = settings
        self.store = store
        self.dispatch = dispatch
        self.cipher = cipher
        self.potpie = potpie
        self.observe: Callable[[str, dict[str, str]], None] = MetricsRecorder(store.redis, store.prefix).observe
        self.started = time.time()
        self._potpie_checked: tuple[float, bool, float] = (0.0, False, 0.0)
        self._durations: tuple[float, list[float]] = (0.0, [])  # (read at, monotonic), for ETAs

    def submit(self, owner: str, request: AnalyzeRequest, idempotency_key: str | None = None,
               extra: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
        """Queue a new analysis job, or find the one it repeats; return (HTTP status, body)."""
        if request.github_token and not self.cipher.enabled:
            raise ValidationError("github_token cannot be accepted: the server has no TOKEN_ENCRYPTION_KEY",
                                  field="github_token")
        if request.callback_url:
            try:
                check_url(request.callback_url, self.settings.webhook_allow_private)
            except UnsafeCallbackUrl as exc:
                raise ValidationError(str(exc), field="callback_url") from None
        job_id = uuid.uuid4().hex
        created = now_iso()
        fields = {
            "id": job_id, "owner": owner, "repo": request.repo, "branch": request.branch,
            "question": request.question, "status": JobStatus.QUEUED.value, "progress": 0,
            "message": MESSAGES[JobStatus.QUEUED], "attempts": 0, "max_attempts": self.settings.max_retries + 1,
            "created_at": created, "created_ts": time.time(), "seq": 0, "event_seq": 0,
            "has_github_token": 1 if request.github_token else 0, "callback_url": request.callback_url or "",
            **(extra or {}),
        }
        sealed = self.cipher.encrypt(request.github_token) if request.github_token else ""
        try:
            submitted = self.store.submit(job_id, owner, fields, sealed, int(self.settings.parse_timeout) + 86400,
                                          self._dedup(request, idempotency_key))
        except redis.RedisError as exc:
            log.error("cannot queue the job: Redis unavailable (%s)", type(exc).__name__)
            raise ServiceUnavailable("Redis connection failed: the job was not queued; try again later") from None
        if submitted.outcome == "conflict":
            raise Conflict("Idempotency-Key was already used with a different request", field="Idempotency-Key",
                           job_id=submitted.job_id)
        if submitted.outcome != "created":
            record = self.job(owner, submitted.job_id)
            body = self._accepted(record, self.queue_position(record))
            body["deduplicated" if submitted.outcome == "duplicate" else "idempotent_replay"] = True
            return 200, body
        for admitted in submitted.admitted:
            self._dispatch_first(admitted)
        log.info("job queued for %s@%s", request.repo, request.branch, extra={"job_id": job_id})
        return 202, self._accepted(fields, submitted.queue_position)

    def _dedup(self, request: AnalyzeRequest, idempotency_key: str | None) -> Dedup:
        identity = json.dumps([request.repo, request.branch, request.question, request.callback_url or ""])
        digest = hashlib.sha256(identity.encode()).hexdigest()
        return Dedup(
            request_key=digest if self.settings.dedup_enabled else "",
            idempotency_key=hashlib.sha256(idempotency_key.encode()).hexdigest() if idempotency_key else "",
            request_hash=digest,
        )

    def _accepted(self, record: dict[str, Any], position: int | None) -> dict[str, Any]:
        job_id = record["id"]
        return {
            "success": True, "project_id": job_id, "job_id": job_id, "status": record["status"],
            "message": MESSAGES[JobStatus(record["status"])], "websocket_endpoint": "/socket.io/",
            "socketio": {"path": "/socket.io/", "join_event": "join_project", "room_id": job_id},
            "status_url": f"/status/{job_id}", "queue_position": position,
            "eta_seconds": self.eta(record, position), "timestamp": record.get("created_at") or now_iso(),
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
        except redis.RedisError:  # an ApiError here, not the app's handler: Socket.IO joins call this too
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
        position = self.queue_position(record)
        body: dict[str, Any] = {
            "success": True, "project_id": record["id"], "job_id": record["id"], "status": record["status"],
            "message": record.get("message"), "progress": int(record.get("progress") or 0),
            "queue_position": position, "eta_seconds": self.eta(record, position),
            "attempts": int(record.get("attempts") or 0),
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

    def _recent_durations(self) -> list[float]:
        """The last jobs' durations, read at most once a second while there are some (a Redis trip per submit)."""
        read_at, durations = self._durations
        if not durations or time.monotonic() - read_at > DURATIONS_MAX_AGE:
            durations = self.store.recent_durations()
            self._durations = (time.monotonic(), durations)
        return durations

    def eta(self, record: dict[str, Any], position: int | None) -> float | None:
        """Seconds until the job should finish (see analysis.eta_seconds)."""
        status = record.get("status", "queued")
        durations = [] if JobStatus(status).terminal else self._recent_durations()
        admitted = float(record["admitted_at"]) if record.get("admitted_at") else None
        return analysis.eta_seconds(status, position, admitted, durations, self.settings.max_concurrent_jobs,
                                    time.time())

    def cancel(self, owner: str, job_id: str | None) -> dict[str, Any]:
        """Cancel a queued or running job: free its slot, tell its room; a running step stops at its next commit."""
        record = self.job(owner, job_id)
        if JobStatus(record["status"]).terminal:
            raise Conflict(f"the job has already ended ({record['status']})", field="job_id", status=record["status"])
        fields = {"message": MESSAGES[JobStatus.CANCELLED], "finished_at": now_iso(), "cancelled_by": owner}
        after, news = ending(self.settings, record, JobStatus.CANCELLED, fields)  # the end itself tells the room
        seq, admitted = self.store.finish(record["id"], "", JobStatus.CANCELLED, fields, broadcast=news)
        if seq < 0:
            raise Conflict("the job has already ended", field="job_id")
        self.observe("ended", {**after, "previous_status": record["status"],
                               "previous_since": record.get("status_since", "")})
        for admitted_id in admitted:
            self._dispatch_first(admitted_id)
        log.info("job cancelled", extra={"job_id": record["id"]})
        return {"success": True, "project_id": record["id"], "job_id": record["id"],
                "status": JobStatus.CANCELLED.value, "timestamp": now_iso()}

    def list_jobs(self, owner: str, status: str | None, page: int, per_page: int) -> dict[str, Any]:
        """A page of the owner's jobs, newest first (status=failed: the dead-letter list)."""
        total, records = self.store.owner_jobs(owner, status, (page - 1) * per_page, per_page)
        jobs = []
        for record in records:
            position = self.queue_position(record)
            jobs.append({
                "job_id": record["id"], "project_id": record["id"], "repo": record["repo"],
                "branch": record["branch"], "question": record.get("question", ""), "status": record["status"],
                "progress": int(record.get("progress") or 0), "queue_position": position,
                "eta_seconds": self.eta(record, position), "attempts": int(record.get("attempts") or 0),
                "created_at": record.get("created_at"), "finished_at": record.get("finished_at") or None,
                "failed_reason": record.get("failed_reason") or None, "retry_of": record.get("retry_of") or None,
            })
        return {"success": True, "jobs": jobs, "page": page, "per_page": per_page, "total": total,
                "status": status, "timestamp": now_iso()}

    def retry(self, owner: str, job_id: str | None, github_token: str | None) -> tuple[int, dict[str, Any]]:
        """Run a failed or cancelled job again as a new job that keeps the history."""
        record = self.job(owner, job_id)
        if record["status"] not in (JobStatus.FAILED.value, JobStatus.CANCELLED.value):
            raise Conflict(f"only failed or cancelled jobs can be retried (this one is {record['status']})",
                           field="job_id", status=record["status"])
        if record.get("has_github_token") == "1" and not github_token:
            raise ValidationError("the original job had a GitHub token, which was deleted when it ended: "
                                  "send it again as github_token", field="github_token")
        history = json.loads(record.get("history") or "[]") + [record["id"]]
        request = AnalyzeRequest(record["repo"], record["branch"], record.get("question", ""), github_token,
                                 record.get("callback_url") or None)
        status, body = self.submit(owner, request, extra={"retry_of": record["id"], "history": json.dumps(history)})
        body.update(retry_of=record["id"], history=history)
        return status, body

    def queue_stats(self) -> dict[str, Any]:
        """The `/queue/stats` body: counts only."""
        stats = self.store.stats()  # a Redis failure is the app's 503 (api/__init__.py)
        workers = self.store.workers_alive(self.worker_max_age)
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
