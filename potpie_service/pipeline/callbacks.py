"""Callbacks: a job's final event, delivered to its callback_url after it ends, with retries and backoff."""

from __future__ import annotations

import logging
from typing import Callable

import requests

from ..core.events import final_events
from ..core.job import Change
from ..core.model import JobStatus
from ..store.jobs import JobStore
from ..webhooks import UnsafeCallbackUrl, deliver

log = logging.getLogger(__name__)


class WebhookNotifier:
    """Sends a job's final event to its callback_url after it ends, retrying with backoff."""

    def __init__(self, store: JobStore, secret: str, allow_private: bool, max_attempts: int,
                 schedule: Callable[[str, int, float], None]) -> None:
        self.store = store
        self.secret = secret
        self.allow_private = allow_private
        self.max_attempts = max_attempts
        self.schedule = schedule  # (job_id, attempt, countdown): enqueue a delivery attempt

    def on_event(self, change: Change) -> None:
        """Pipeline observer: schedule the first delivery when a job with a callback finishes or fails."""
        job = change.job
        if change.ended and job.callback_url and job.status in (JobStatus.FINISHED, JobStatus.FAILED):
            self.schedule(job.id, 1, 0)

    def deliver(self, job_id: str, attempt: int) -> str:
        """One delivery attempt; returns delivered, retrying, failed or gone."""
        job = self.store.get(job_id)
        if job is None or not job.callback_url:
            return "gone"
        event, payload = final_events(job, max(job.event_seq - 1, 0))[-1]
        try:
            deliver(job.callback_url, event, payload, self.secret, self.allow_private, f"{job.id}:{payload['seq']}")
        except (requests.RequestException, UnsafeCallbackUrl) as exc:
            final = attempt >= self.max_attempts or isinstance(exc, UnsafeCallbackUrl)
            self.store.mark(job_id, webhook_status="failed" if final else "retrying", webhook_attempts=attempt,
                            webhook_error=str(exc)[:200])
            log.warning("webhook attempt %d failed: %s", attempt, exc, extra={"job_id": job_id})
            if final:
                return "failed"
            self.schedule(job_id, attempt + 1, min(60.0, 2.0 ** (attempt - 1)))  # 1, 2, 4, 8 s…
            return "retrying"
        self.store.mark(job_id, webhook_status="delivered", webhook_attempts=attempt)
        log.info("webhook delivered after %d attempt(s)", attempt, extra={"job_id": job_id})
        return "delivered"
