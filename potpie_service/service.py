"""What the API does, below the HTTP layer: submit a job, describe it, cancel or retry it, count the queue (health:
health.py). It returns what happened and raises domain errors (core/errors.py); only api/ knows HTTP."""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Literal

from .config import Settings
from .core import analysis
from .core.errors import Conflict, NotFound, RateLimited, Unavailable, ValidationError
from .core.events import final_events, now_iso
from .core.job import Change, Job, JobUpdate
from .core.model import MESSAGES, JobStatus
from .celery_message import StepMessage
from .core.submission import AnalyzeRequest
from .store import NotReplicated, StoreUnavailable
from .store.jobs import Dedup, JobStore
from .store.ratelimit import Charge
from .tokens import TokenCipher
from .webhooks import UnsafeCallbackUrl, check_url

log = logging.getLogger(__name__)

Dispatch = Callable[[str, int, float], None]
DURATIONS_MAX_AGE = 1.0  # seconds an API process reuses the recent durations behind ETAs
Outcome = Literal["created", "duplicate", "replayed"]


@dataclass(frozen=True)
class Submission:
    """What a submit did: created a job, or found the one it repeats (an identical request still running, or the
    same Idempotency-Key); the job, its place in line and ETA, and the rate-limit counts the submit paid."""

    outcome: Outcome
    job: Job
    queue_position: int | None
    eta_seconds: float | None
    rate_counts: list[int] | None = None


class JobService:
    """Job operations for one owner at a time; the views call these and nothing else."""

    def __init__(self, settings: Settings, store: JobStore, dispatch: Dispatch, cipher: TokenCipher,
                 first_step: Callable[[str], StepMessage] | None = None,
                 stop_run: Callable[[str], None] | None = None) -> None:
        self.settings = settings
        self.store = store
        self.dispatch = dispatch
        self.stop_run = stop_run  # queues the stop of the agent run a cancelled job leaves (queue.run_stopper)
        self.first_step = first_step  # a job's first step, for the submit script to push (celery_message.FirstSteps)
        self.cipher = cipher
        self.observe: Callable[[Change], None] = store.recorder().observe
        self.started = time.time()
        self._durations: tuple[float, list[float]] = (-DURATIONS_MAX_AGE, [])  # (read at, monotonic), for ETAs

    def submit(self, owner: str, request: AnalyzeRequest, idempotency_key: str | None = None,
               retry_of: Job | None = None, charge: Charge | None = None) -> Submission:
        """Queue a new analysis job, or find the one it repeats. A rate-limit `charge` is counted by the same Redis
        call, which refuses (RateLimited) over the limit; its counts come back in the Submission."""
        if request.github_token and not self.cipher.enabled:
            raise ValidationError("github_token cannot be accepted: the server has no TOKEN_ENCRYPTION_KEY",
                                  field="github_token")
        if request.callback_url:
            try:
                check_url(request.callback_url, self.settings.webhook_allow_private)
            except UnsafeCallbackUrl as exc:
                raise ValidationError(str(exc), field="callback_url") from None
        job = Job(id=uuid.uuid4().hex, owner=owner, repo=request.repo, branch=request.branch,
                  question=request.question, message=MESSAGES[JobStatus.QUEUED],
                  max_attempts=self.settings.max_retries + 1, created_at=now_iso(), created_ts=time.time(),
                  has_github_token=bool(request.github_token), callback_url=request.callback_url or "",
                  commit_id=request.commit_id or "", commit_source="request" if request.commit_id else "",
                  retry_of=retry_of.id if retry_of else "",
                  history=[*retry_of.history, retry_of.id] if retry_of else [])
        sealed = self.cipher.encrypt(request.github_token) if request.github_token else ""
        try:
            submitted = self.store.submit(job, sealed, int(self.settings.parse_timeout) + 86400,
                                          self._dedup(request, idempotency_key),
                                          self.first_step(job.id) if self.first_step else None, charge)
        except NotReplicated as exc:
            log.error("cannot queue the job: %s (REDIS_MIN_REPLICAS_ACK)", exc)
            refused = Unavailable(f"the job was not queued: {exc} (REDIS_MIN_REPLICAS_ACK={exc.wanted}); nothing "
                                  "was kept, try again later")
            refused.rate_counts = exc.rate_counts  # the request was counted: it is not counted again
            raise refused from None
        except StoreUnavailable as exc:
            log.error("cannot queue the job: Redis unavailable (%s)", exc.cause)
            if exc.sent:  # sent, then no answer: it may have run, or may yet (the script refuses past its deadline)
                raise Unavailable("Redis did not answer in time: the job may have been queued; retry with the same "
                                  "Idempotency-Key to get it if it was (a late arrival past the deadline is "
                                  "refused)", retry_with="Idempotency-Key") from None
            raise Unavailable("Redis connection failed: the job was not queued; try again later") from None
        if submitted.outcome == "late":
            log.error("cannot queue the job: Redis answered past the submit's deadline")
            raise Unavailable("Redis answered too late: the job was not queued; try again later")
        if submitted.outcome == "limited":
            raise RateLimited("Too many requests: slow down and retry after the time in the Retry-After header",
                              rate_counts=submitted.rate_counts)
        if submitted.outcome == "conflict":
            raise Conflict("Idempotency-Key was already used with a different request", field="Idempotency-Key",
                           job_id=submitted.job_id)
        if submitted.outcome != "created":
            existing = self.job(owner, submitted.job_id)
            position = self.queue_position(existing)
            outcome: Outcome = "duplicate" if submitted.outcome == "duplicate" else "replayed"
            return Submission(outcome, existing, position, self.eta(existing, position), submitted.rate_counts)
        for admitted in submitted.admitted:  # others let in (and the job itself if the submit WAITed)
            self._dispatch_first(admitted)
        log.info("job queued for %s@%s", request.repo, request.branch, extra={"job_id": job.id})
        return Submission("created", job, submitted.queue_position, self.eta(job, submitted.queue_position),
                          submitted.rate_counts)

    def _dedup(self, request: AnalyzeRequest, idempotency_key: str | None) -> Dedup:
        identity = json.dumps([request.repo, request.branch, request.question, request.callback_url or "",
                               request.commit_id or ""])
        digest = hashlib.sha256(identity.encode()).hexdigest()
        return Dedup(
            request_key=digest if self.settings.dedup_enabled else "",
            idempotency_key=hashlib.sha256(idempotency_key.encode()).hexdigest() if idempotency_key else "",
            request_hash=digest,
        )

    def _dispatch_first(self, job_id: str) -> None:
        try:
            self.dispatch(job_id, 0, 0)
        except Exception:  # the job is stored and admitted; the workers' sweeper dispatches it later
            log.warning("could not enqueue the first step; the sweeper will", extra={"job_id": job_id},
                        exc_info=True)

    def job(self, owner: str, job_id: str | None) -> Job:
        """The owner's job, or NotFound (also for other owners' jobs: no existence leak)."""
        try:
            job = self.store.get(job_id) if job_id else None
        except StoreUnavailable:  # a domain error here, not the app's handler: Socket.IO joins call this too
            raise Unavailable("Redis connection failed") from None
        if job is None or job.owner != owner:
            raise NotFound("Job not found", project_id=job_id)
        return job

    def queue_position(self, job: Job) -> int | None:
        """Place in line while queued (0: admitted, starting), else None."""
        if job.status is not JobStatus.QUEUED:
            return None
        return self.store.queue_position(job.id) or 0

    def status(self, owner: str, job_id: str | None) -> dict[str, Any]:
        """The `/status/<id>` body."""
        job = self.job(owner, job_id)
        position = self.queue_position(job)
        body: dict[str, Any] = {
            "success": True, "project_id": job.id, "job_id": job.id, "status": job.status.value,
            "message": job.message, "progress": job.progress,
            "queue_position": position, "eta_seconds": self.eta(job, position),
            "attempts": job.attempts, "max_attempts": job.max_attempts,
            "potpie_project_id": job.potpie_project_id or None, "repo": job.repo, "branch": job.branch,
            "commit_id": job.commit_id or None, "commit": analysis.commit_info(job) if job.commit_source else None,
            "potpie_calls": job.potpie_calls,
            "details": {"created_at": job.created_at or None, "processed_at": job.processed_at or None,
                        "finished_at": job.finished_at or None, "failed_reason": job.failed_reason or None},
            "timestamp": now_iso(),
        }
        if job.progress_estimated and job.status is JobStatus.PARSING:
            body["progress_estimated"] = True  # from the time spent against recent parses: Potpie reports none
        if job.result is not None:
            body["result"] = job.result
        return body

    def _recent_durations(self) -> list[float]:
        """The last jobs' durations, read at most once a second (a Redis round trip; once per submit, while none had
        finished, it cost a submit 14% of its CPU)."""
        read_at, durations = self._durations
        if time.monotonic() - read_at > DURATIONS_MAX_AGE:  # none yet is an answer too: kept as long
            durations = self.store.recent_durations()
            self._durations = (time.monotonic(), durations)
        return durations

    def eta(self, job: Job, position: int | None) -> float | None:
        """Seconds until the job should finish (see analysis.eta_seconds)."""
        durations = [] if job.terminal else self._recent_durations()
        return analysis.eta_seconds(job.status, position, job.admitted_at or None, durations,
                                    self.settings.max_concurrent_jobs, time.time())

    def cancel(self, owner: str, job_id: str | None) -> Job:
        """Cancel a queued or running job: free its slot, tell its room, abort its Potpie call in flight."""
        job = self.job(owner, job_id)
        if job.terminal:
            raise Conflict(f"the job has already ended ({job.status.value})", field="job_id", status=job.status.value)
        update: JobUpdate = {"message": MESSAGES[JobStatus.CANCELLED], "finished_at": now_iso(), "cancelled_by": owner}
        previous, since = job.status, job.status_since
        job.apply({**update, "status": JobStatus.CANCELLED})
        news = self.store.broadcast(job.id, final_events(job, 0))  # the end itself tells the room
        seq, admitted = self.store.finish(job, "", JobStatus.CANCELLED, update, news=news)
        if seq < 0:
            raise Conflict("the job has already ended", field="job_id")
        self.observe(Change(True, job, previous, since))
        for admitted_id in admitted:
            self._dispatch_first(admitted_id)
        if self.stop_run is not None and job.conversation_id:  # its agent run, if one is going, is stopped
            try:
                self.stop_run(job.id)
            except Exception:  # the broker is away: the cancel stands; the run ends on Potpie's side by itself
                log.warning("could not queue the stop of the job's agent run", extra={"job_id": job.id},
                            exc_info=True)
        log.info("job cancelled", extra={"job_id": job.id})
        return job

    def list_jobs(self, owner: str, status: JobStatus | None, page: int, per_page: int) -> dict[str, Any]:
        """A page of the owner's jobs, newest first (status=failed: the dead-letter list)."""
        total, jobs = self.store.owner_jobs(owner, status, (page - 1) * per_page, per_page)
        rows = []
        for job in jobs:
            position = self.queue_position(job)
            rows.append({
                "job_id": job.id, "project_id": job.id, "repo": job.repo, "branch": job.branch,
                "question": job.question, "status": job.status.value, "progress": job.progress,
                "queue_position": position, "eta_seconds": self.eta(job, position), "attempts": job.attempts,
                "created_at": job.created_at or None, "finished_at": job.finished_at or None,
                "failed_reason": job.failed_reason or None, "retry_of": job.retry_of or None,
            })
        return {"success": True, "jobs": rows, "page": page, "per_page": per_page, "total": total,
                "status": status.value if status else None, "timestamp": now_iso()}

    def retry(self, owner: str, job_id: str | None, github_token: str | None,
              charge: Charge | None = None) -> Submission:
        """Run a failed or cancelled job again as a new job that keeps the history (`retry_of`, `history`)."""
        job = self.job(owner, job_id)
        if job.status not in (JobStatus.FAILED, JobStatus.CANCELLED):
            raise Conflict(f"only failed or cancelled jobs can be retried (this one is {job.status.value})",
                           field="job_id", status=job.status.value)
        if job.has_github_token and not github_token:
            raise ValidationError("the original job had a GitHub token, which was deleted when it ended: "
                                  "send it again as github_token", field="github_token")
        request = AnalyzeRequest(job.repo, job.branch, job.question, github_token, job.callback_url or None,
                                 job.commit_id or None)  # the same commit again: the retry is reproducible
        return self.submit(owner, request, retry_of=job, charge=charge)

    def queue_stats(self) -> dict[str, Any]:
        """The `/queue/stats` body: counts only."""
        stats = self.store.stats()  # a Redis failure is the app's 503 (api/__init__.py)
        workers = self.store.workers_alive(self.settings.worker_max_age)
        return {
            "queue_name": self.settings.queue_name, "stats": stats,
            "worker_status": "running" if workers else "stopped", "workers": workers,
            "max_concurrency": self.settings.max_concurrent_jobs, "max_retries": self.settings.max_retries,
            "timestamp": now_iso(),
        }

