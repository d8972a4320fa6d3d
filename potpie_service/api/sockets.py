"""Socket.IO handlers: authenticate on connect, join/leave a job's room with an ack, replay its state on join."""

from __future__ import annotations

import logging
from typing import Any

from flask import request
from flask_socketio import SocketIO, join_room, leave_room

from ..auth import Authenticator
from ..core.errors import ServiceError
from ..core.events import JOIN_PROJECT, LEAVE_PROJECT, replay, room
from ..core.submission import check_job_id
from ..service import JobService
from .context import ConnectionCount

log = logging.getLogger(__name__)


def _sid() -> str:
    """The Socket.IO session of the event being handled."""
    sid: str = request.sid  # type: ignore[attr-defined]  # Flask-SocketIO sets it on the request
    return sid


def _project_id(data: Any) -> Any:
    """The seed sends the id as a bare string; also accept {project_id: ...}."""
    return data.get("project_id") if isinstance(data, dict) else data


def _presented_key(auth: Any) -> str | None:
    if isinstance(auth, dict):
        for name in ("token", "api_key", "apiKey"):
            if isinstance(auth.get(name), str):
                return auth[name]
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return request.headers.get("X-API-Key")


def register(socketio: SocketIO, service: JobService, auth: Authenticator, count: ConnectionCount) -> None:
    """Attach the handlers to the Socket.IO server."""
    owners: dict[str, str] = {}

    @socketio.on("connect")
    def connect(auth_payload: Any = None) -> bool:
        owner = auth.owner(_presented_key(auth_payload))
        if owner is None:
            log.info("socket refused: no valid API key")
            return False
        owners[_sid()] = owner
        count.add(1)
        return True

    @socketio.on("disconnect")
    def disconnect(*_: Any) -> None:
        if owners.pop(_sid(), None) is not None:
            count.add(-1)

    @socketio.on(JOIN_PROJECT)
    def join_project(data: Any = None) -> dict[str, Any]:
        job_id = check_job_id(_project_id(data))
        if job_id is None:
            return {"ok": False, "error": "invalid project_id: expected the job id returned by POST /analyze"}
        try:
            service.job(owners.get(_sid(), ""), job_id)
            join_room(room(job_id))  # join before reading: an event in between arrives twice, never zero times
            job = service.job(owners.get(_sid(), ""), job_id)
            position = service.queue_position(job)
            events = replay(job, position, service.eta(job, position))
        except ServiceError as exc:
            return {"ok": False, "error": exc.error, "project_id": job_id}
        for name, payload in events:  # for this socket only, which is on this process: no Redis round trip
            socketio.emit(name, payload, to=_sid(), ignore_queue=True)
        return {"ok": True, "project_id": job_id, "status": job.status.value, "seq": events[-1][1]["seq"]}

    @socketio.on(LEAVE_PROJECT)
    def leave_project(data: Any = None) -> dict[str, Any]:
        job_id = check_job_id(_project_id(data))
        if job_id is None:
            return {"ok": False, "error": "invalid project_id"}
        leave_room(room(job_id))
        return {"ok": True, "project_id": job_id}
