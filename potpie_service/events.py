"""Socket.IO events: their names, their payloads (built from a job record), and how they reach the rooms: as
messages the store's scripts publish with the state change they announce (`broadcast`)."""

from __future__ import annotations

import json
import logging
import time
import uuid
from datetime import datetime, timezone
from typing import Any, Mapping


from .config import Settings
from .jobs import Broadcast
from .model import MESSAGES, JobStatus

log = logging.getLogger(__name__)

STATUS_UPDATE = "status_update"
ANALYSIS_COMPLETE = "analysis_complete"
ANALYSIS_ERROR = "analysis_error"
JOIN_PROJECT = "join_project"
LEAVE_PROJECT = "leave_project"
# python-socketio servers relay pub/sub messages from any host id but their own: no server has this one
STORE_HOST_ID = "potpie-service-store"


def now_iso() -> str:
    """The current UTC time, ISO-8601 with milliseconds and a Z."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def room(job_id: str) -> str:
    """The Socket.IO room of a job (the seed's naming)."""
    return f"project_{job_id}"


def channel(settings: Settings) -> str:
    """The Redis pub/sub channel the API processes and workers share."""
    return f"psvc-{settings.queue_name}"


def status_update(job: Mapping[str, str], seq: int, **extra: Any) -> dict[str, Any]:
    """A `status_update` payload for the job's current state."""
    status = job.get("status", JobStatus.QUEUED.value)
    payload = {
        "project_id": job["id"],
        "job_id": job["id"],
        "status": status,
        "message": job.get("message") or MESSAGES.get(JobStatus(status), status),
        "progress": int(job.get("progress") or 0),
        "seq": seq,
        "timestamp": now_iso(),
    }
    payload.update(extra)
    return payload


def analysis_complete(job: Mapping[str, str], seq: int) -> dict[str, Any]:
    """The `analysis_complete` payload of a finished job."""
    return {
        "project_id": job["id"],
        "job_id": job["id"],
        "status": JobStatus.FINISHED.value,
        "data": json.loads(job.get("result") or "null"),
        "message": MESSAGES[JobStatus.FINISHED],
        "seq": seq,
        "timestamp": now_iso(),
    }


def analysis_error(job: Mapping[str, str], seq: int) -> dict[str, Any]:
    """The `analysis_error` payload of a job that finally failed."""
    return {
        "project_id": job["id"],
        "job_id": job["id"],
        "status": JobStatus.FAILED.value,
        "error": "Analysis processing failed",
        "message": job.get("failed_reason") or MESSAGES[JobStatus.FAILED],
        "attempts": int(job.get("attempts") or 0),
        "seq": seq,
        "timestamp": now_iso(),
    }


def final_events(job: Mapping[str, str], seq: int) -> list[tuple[str, dict[str, Any]]]:
    """The closing `status_update` and, for finished/failed, the final event (seq and seq+1)."""
    events = [(STATUS_UPDATE, status_update(job, seq))]
    if job.get("status") == JobStatus.FINISHED.value:
        events.append((ANALYSIS_COMPLETE, analysis_complete(job, seq + 1)))
    elif job.get("status") == JobStatus.FAILED.value:
        events.append((ANALYSIS_ERROR, analysis_error(job, seq + 1)))
    return events


def ending(settings: Settings, job: Mapping[str, str], status: JobStatus,
           fields: Mapping[str, Any]) -> tuple[dict[str, str], Broadcast]:
    """The job's record once it has ended with `fields`, and the broadcast of its final events (which
    `JobStore.finish` publishes in the script that ends it)."""
    after = {**job, **{name: str(value) for name, value in fields.items()}, "status": status.value}
    return after, broadcast(settings, after["id"], final_events(after, 0))


def replay(job: Mapping[str, str], queue_position: int | None,
           eta_seconds: float | None = None) -> list[tuple[str, dict[str, Any]]]:
    """What a socket gets on joining: the current state, and the final event if the job has ended."""
    seq = int(job.get("event_seq") or 0)
    if JobStatus(job.get("status", "queued")).terminal:
        return final_events(job, max(seq - 1, 0))
    extra: dict[str, Any] = {}
    if job.get("status") == JobStatus.QUEUED.value:
        extra = {"queue_position": queue_position, "eta_seconds": eta_seconds}
    elif job.get("status") == JobStatus.RETRYING.value:  # the same details the live `retrying` update carries
        extra = {"attempt": int(job.get("attempts") or 1) - 1, "max_attempts": int(job.get("max_attempts") or 0),
                 "retry_in": round(max(0.0, float(job.get("next_due") or 0) - time.time()), 3),
                 "error": job.get("last_error") or ""}
    return [(STATUS_UPDATE, status_update(job, seq, **extra))]


def broadcast(settings: Settings, job_id: str, events: list[tuple[str, dict[str, Any]]]) -> Broadcast:
    """`events` for the job's room as python-socketio's Redis manager publishes them (its 5.x message), for the
    store to publish in the script that commits them; each `seq` is left as a marker the script fills in
    (the first event gets the seq it takes, the next one seq + 1)."""
    nonce = uuid.uuid4().hex
    messages = tuple(json.dumps({"method": "emit", "event": name, "data": [{**payload, "seq": f"@seq:{nonce}"}],
                                 "binary": False, "namespace": "/", "room": room(job_id), "skip_sid": None,
                                 "callback": None, "host_id": STORE_HOST_ID}, separators=(",", ":"))
                     for name, payload in events)
    return Broadcast(channel(settings), nonce, messages)
