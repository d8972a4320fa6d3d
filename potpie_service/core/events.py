"""Socket.IO events: their names, the rooms they go to, and their payloads, built from a job."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

from .analysis import commit_info
from .job import Job
from .model import MESSAGES, JobStatus

STATUS_UPDATE = "status_update"
ANALYSIS_COMPLETE = "analysis_complete"
ANALYSIS_ERROR = "analysis_error"
JOIN_PROJECT = "join_project"
LEAVE_PROJECT = "leave_project"

Event = tuple[str, dict[str, Any]]  # (name, payload)


def now_iso() -> str:
    """The current UTC time, ISO-8601 with milliseconds and a Z."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


ROOM_PREFIX = "project_"


def room(job_id: str) -> str:
    """The Socket.IO room of a job (the seed's naming)."""
    return ROOM_PREFIX + job_id


def job_of_room(name: object) -> str | None:
    """The job whose room `name` is, or None for any other room (a socket's own)."""
    return name.removeprefix(ROOM_PREFIX) if isinstance(name, str) and name.startswith(ROOM_PREFIX) else None


def status_update(job: Job, seq: int, **extra: Any) -> dict[str, Any]:
    """A `status_update` payload for the job's current state."""
    payload: dict[str, Any] = {
        "project_id": job.id,
        "job_id": job.id,
        "status": job.status.value,
        "message": job.message or MESSAGES[job.status],
        "progress": job.progress,
        "seq": seq,
        "timestamp": now_iso(),
    }
    if job.progress_estimated and job.status is JobStatus.PARSING:
        payload["progress_estimated"] = True  # from the time spent against recent parses: Potpie reports none
    if job.commit_source:
        payload["commit"] = commit_info(job)
    payload.update(extra)
    return payload


def analysis_complete(job: Job, seq: int) -> dict[str, Any]:
    """The `analysis_complete` payload of a finished job."""
    return {
        "project_id": job.id,
        "job_id": job.id,
        "status": JobStatus.FINISHED.value,
        "data": job.result,
        "message": MESSAGES[JobStatus.FINISHED],
        "seq": seq,
        "timestamp": now_iso(),
    }


def analysis_error(job: Job, seq: int) -> dict[str, Any]:
    """The `analysis_error` payload of a job that finally failed."""
    return {
        "project_id": job.id,
        "job_id": job.id,
        "status": JobStatus.FAILED.value,
        "error": "Analysis processing failed",
        "message": job.failed_reason or MESSAGES[JobStatus.FAILED],
        "attempts": job.attempts,
        "seq": seq,
        "timestamp": now_iso(),
    }


def final_events(job: Job, seq: int) -> list[Event]:
    """The closing `status_update` and, for finished/failed, the final event (seq and seq+1)."""
    events = [(STATUS_UPDATE, status_update(job, seq))]
    if job.status is JobStatus.FINISHED:
        events.append((ANALYSIS_COMPLETE, analysis_complete(job, seq + 1)))
    elif job.status is JobStatus.FAILED:
        events.append((ANALYSIS_ERROR, analysis_error(job, seq + 1)))
    return events


def replay(job: Job, queue_position: int | None, eta_seconds: float | None = None) -> list[Event]:
    """What a socket gets on joining: the current state, and the final event if the job has ended."""
    if job.terminal:
        return final_events(job, max(job.event_seq - 1, 0))
    extra: dict[str, Any] = {}
    if job.status is JobStatus.QUEUED:
        extra = {"queue_position": queue_position, "eta_seconds": eta_seconds}
    elif job.status is JobStatus.RETRYING:  # the same details the live `retrying` update carries
        extra = retry_details(job, max(0.0, job.next_due - time.time()))
    return [(STATUS_UPDATE, status_update(job, job.event_seq, **extra))]


def retry_details(job: Job, retry_in: float) -> dict[str, Any]:
    """What a `retrying` update adds: the attempt that failed, how many there may be, when the next starts."""
    return {"attempt": max(job.attempts - 1, 0), "max_attempts": job.max_attempts, "retry_in": round(retry_in, 3),
            "error": job.last_error}
