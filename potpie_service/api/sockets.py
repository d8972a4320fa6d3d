"""Socket.IO handlers: authenticate on connect, join/leave a job's room with an ack, replay its state on join."""

from __future__ import annotations

import logging
from typing import Any

from flask import request
from flask_socketio import SocketIO, join_room, leave_room

from ..auth import Authenticator, presented_key
from ..core.errors import NotFound, ServiceError
from ..core.events import JOIN_PROJECT, LEAVE_PROJECT, Event, job_of_room, replay, room
from ..core.job import Job
from ..core.submission import check_job_id
from ..service import JobService
from .context import ConnectionCount
from ..store import StoreUnavailable

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
    return presented_key(request.headers.get("Authorization", ""), request.headers.get("X-API-Key"))


def register(socketio: SocketIO, service: JobService, auth: Authenticator, count: ConnectionCount) -> None:
    """Attach the handlers to the Socket.IO server, and the replay the relay asks for when it has Redis again."""
    owners: dict[str, str] = {}

    def state_of(job: Job) -> list[Event]:
        position = service.queue_position(job)
        return replay(job, position, service.eta(job, position))

    def replay_rooms() -> None:
        """Each job room on this process gets its job's current state: what the relay may have missed."""
        manager = socketio.server.manager
        for name, members in list(manager.rooms.get("/", {}).items()):
            job_id, owner = job_of_room(name), next((owners[sid] for sid in list(members) if sid in owners), None)
            if job_id is None or owner is None:
                continue
            try:
                events = state_of(service.job(owner, job_id))
            except NotFound:  # expired meanwhile: nothing to tell
                continue
            except (ServiceError, StoreUnavailable) as exc:  # Redis away again: the relay will ask once more
                log.warning("replay after the relay reconnected stopped: %s", type(exc).__name__)
                return
            for event, payload in events:
                socketio.emit(event, payload, to=name, ignore_queue=True)

    socketio.server.manager.resubscribed = replay_rooms

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
            events = state_of(job)
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
