"""What the views and socket handlers share: the app's `ApiContext`, reached through `context()`, and the few
request helpers every view uses (the caller's key and owner, the JSON body)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from flask import current_app, g, request
from flask_socketio import SocketIO

from ..auth import Authenticator, presented_key as key_presented
from ..config import Settings
from ..core.errors import ValidationError
from ..core.submission import MAX_BODY_BYTES
from ..health import HealthCheck
from ..service import JobService
from ..store.ratelimit import RateLimiter
from .request_path import REQUEST_ID
from .errors import PayloadTooLarge, Unauthorized, UnsupportedMediaType

EXTENSION = "potpie"


class ConnectionCount:
    """Open Socket.IO connections of this process (feeds /health and metrics)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value = 0

    def add(self, delta: int) -> None:
        """Count a connection opened (+1) or closed (-1)."""
        with self._lock:
            self.value += delta


@dataclass
class ApiContext:
    """The API process's long-lived objects, kept in `app.extensions["potpie"]`."""

    settings: Settings
    service: JobService
    auth: Authenticator
    sockets: ConnectionCount
    socketio: SocketIO
    health: HealthCheck
    limiter: RateLimiter | None  # RATE_LIMIT's (api/ratelimit.py); None when off


def context() -> ApiContext:
    """The running app's context."""
    found: ApiContext = current_app.extensions[EXTENSION]
    return found


def request_id() -> str:
    """This request's id (api/request_path.py gives every request one)."""
    found: str = request.environ.get(REQUEST_ID, "")
    return found


def presented_key() -> str | None:
    """The API key from `Authorization: Bearer` or `X-API-Key`."""
    return key_presented(request.headers.get("Authorization", ""), request.headers.get("X-API-Key"))


def caller_owner() -> str | None:
    """The owner of the presented key (None: no valid key), worked out once per request (the rate limit and the
    view both ask)."""
    if "caller_owner" not in g:
        g.caller_owner = context().auth.owner(presented_key())
    owner: str | None = g.caller_owner
    return owner


def require_owner() -> str:
    """The caller's owner name, or 401."""
    owner = caller_owner()
    if owner is None:
        raise Unauthorized("A valid API key is required (Authorization: Bearer <key> or X-API-Key)")
    return owner


def json_body() -> Any:
    """The request's JSON body: 413 over MAX_BODY_BYTES, 415 if not JSON, 400 if malformed."""
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise PayloadTooLarge(f"the body must be at most {MAX_BODY_BYTES} bytes", field="body")
    if not request.is_json:
        raise UnsupportedMediaType("the body must be JSON (Content-Type: application/json)", field="body")
    raw = request.get_data(cache=True)
    if len(raw) > MAX_BODY_BYTES:
        raise PayloadTooLarge(f"the body must be at most {MAX_BODY_BYTES} bytes", field="body")
    try:
        body = request.get_json(silent=True)
    except RecursionError:  # json's C decoder recurses: thousands of nested brackets fit in 16 KiB
        body = None
    if body is None:
        raise ValidationError("the body is not valid JSON (or nested too deeply)", field="body")
    return body
