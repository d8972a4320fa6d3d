"""The JSON bodies of the API's answers built from the service's domain results (the routes' shared part; a body
the service builds as a description, like /status, comes from the service itself)."""

from __future__ import annotations

from typing import Any

from ..core.events import now_iso
from ..core.job import Job
from ..core.model import MESSAGES
from ..service import Submission

SOCKETIO_PATH = "/socket.io/"
JOIN_EVENT = "join_project"


def accepted(submission: Submission) -> tuple[dict[str, Any], int]:
    """POST /analyze's (and a retry's) answer and status: 202 for a new job, 200 for the one it repeats."""
    job = submission.job
    body: dict[str, Any] = {
        "success": True, "project_id": job.id, "job_id": job.id, "status": job.status.value,
        "message": MESSAGES[job.status], "websocket_endpoint": SOCKETIO_PATH,
        "socketio": {"path": SOCKETIO_PATH, "join_event": JOIN_EVENT, "room_id": job.id},
        "status_url": f"/status/{job.id}", "queue_position": submission.queue_position,
        "eta_seconds": submission.eta_seconds, "timestamp": job.created_at or now_iso(),
    }
    if submission.outcome == "duplicate":
        body["deduplicated"] = True
    elif submission.outcome == "replayed":
        body["idempotent_replay"] = True
    if job.retry_of:
        body.update(retry_of=job.retry_of, history=job.history)
    return body, 202 if submission.outcome == "created" else 200


def cancelled(job: Job) -> dict[str, Any]:
    """DELETE /jobs/<id>'s answer."""
    return {"success": True, "project_id": job.id, "job_id": job.id, "status": job.status.value,
            "timestamp": now_iso()}
