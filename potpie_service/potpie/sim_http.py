"""The simulator's HTTP side: a threaded HTTP/1.1 keep-alive server that answers as Potpie's FastAPI app does.

What the client sees of Potpie's server code of record (shared/potpie/API-FACTS.md §8.5): every error body is
rewritten to a fixed text with a `code` and a `request_id` (only 422's validation list survives), every answer
carries `X-Request-ID` (the request's own when it is 1-128 characters of [A-Za-z0-9._-], else a new UUID4), and an
agent reply is a chunked `text/event-stream` of JSON objects written back to back that simply ends, however the run
ended.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterable

# status -> (detail, code) as Potpie's api_errors.py writes them (§8.5)
_SANITIZED = {400: ("Invalid request.", "invalid_request"), 401: ("Authentication required.",
              "authentication_required"), 403: ("Access denied.", "access_denied"),
              404: ("Resource not found.", "not_found"), 405: ("Method not allowed.", "method_not_allowed"),
              409: ("The request conflicts with the current state.", "conflict"),
              429: ("Too many requests. Please try again later.", "rate_limited")}
_OTHER_4XX = ("The request could not be completed.", "request_failed")
_INTERNAL = ("An internal error occurred. Please try again later.", "internal_error")
_UNAVAILABLE = ("Service temporarily unavailable. Please try again later.", "service_unavailable")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")


class ApiError(Exception):
    """An HTTP error as the server code raises it; its text is replaced on the way out (see `error_body`)."""

    def __init__(self, status: int, detail: Any, headers: dict[str, str] | None = None) -> None:
        super().__init__(str(detail))
        self.status, self.detail, self.headers = status, detail, headers or {}


def error_body(status: int, detail: Any, request_id: str) -> bytes:
    """The sanitized error body Potpie's server sends: a fixed text by status (a 422 keeps its list)."""
    if status == 422:
        text, code = (detail if isinstance(detail, list) else "Invalid request."), "validation_error"
    elif status in _SANITIZED:
        text, code = _SANITIZED[status]
    elif status < 500:
        text, code = _OTHER_4XX
    else:
        text, code = _UNAVAILABLE if 502 <= status <= 504 else _INTERNAL
    return json.dumps({"detail": text, "code": code, "request_id": request_id}, separators=(",", ":")).encode()


def request_id_of(incoming: str | None) -> str:
    """The request's own X-Request-ID when well-formed, else a new UUID4 (§8.5)."""
    return incoming if incoming and _REQUEST_ID.fullmatch(incoming) else str(uuid.uuid4())


@dataclass
class Reply:
    """A response: a JSON value or raw bytes, or a stream of parts (written chunked; cut without a terminator when
    `truncate`)."""

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    stream: Iterable[bytes] | None = None
    truncate: bool = False


TYPE_CHECKS = {  # kind -> (check, pydantic msg, pydantic type); a trailing "!" on a kind marks the field required
    "str": (lambda v: isinstance(v, str), "Input should be a valid string", "string_type"),
    "list": (lambda v: isinstance(v, list), "Input should be a valid list", "list_type"),
    "list[str]": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
                  "Input should be a valid list of strings", "list_type"),
}


def invalid(loc: list[Any], msg: str, kind: str) -> ApiError:
    """Build a 422 validation error in FastAPI's shape."""
    return ApiError(422, [{"loc": loc, "msg": msg, "type": kind}])


def validate(raw: bytes, fields: dict[str, str]) -> dict[str, Any]:
    """Decode a JSON object body and check it against {name: kind} like pydantic, raising 422."""
    if not raw.strip():
        raise invalid(["body"], "Field required", "missing")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise invalid(["body", 0], f"JSON decode error: {exc}", "json_invalid") from exc
    if not isinstance(body, dict):
        raise invalid(["body"], "Input should be a valid dictionary or object", "model_attributes_type")
    errors = []
    for name, kind in fields.items():
        value, (check, msg, err) = body.get(name), TYPE_CHECKS[kind.rstrip("!")]
        if value is None and kind.endswith("!"):
            errors.append({"loc": ["body", name], "msg": "Field required", "type": "missing"})
        elif value is not None and not check(value):
            errors.append({"loc": ["body", name], "msg": msg, "type": err})
    if errors:
        raise ApiError(422, errors)
    return body


Dispatcher = Callable[[str, str, Any, bytes], Reply]


class Server(ThreadingHTTPServer):
    """Threaded HTTP server with a deep accept backlog and quiet error handling."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024
    verbose = False

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Print handler tracebacks only in verbose mode."""
        if self.verbose:
            super().handle_error(request, client_address)


class Handler(BaseHTTPRequestHandler):
    """Turns HTTP/1.1 keep-alive requests into `dispatch` calls (set on a subclass, with `latency`/`calling`)."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else each reply waits ~40 ms for the client's delayed ACK
    dispatch: Dispatcher
    latency: Callable[[], float]  # seconds added to every answer
    calling: Callable[[str, int], None]  # (path, +1/-1): an API request starts or ends
    verbose: Callable[[], bool]

    def _handle(self) -> None:
        """Read the body, dispatch, wait the configured latency, and write the reply."""
        length = self.headers.get("Content-Length", "0")
        raw = self.rfile.read(int(length)) if length.isdigit() and int(length) > 0 else b""
        request_id = request_id_of(self.headers.get("X-Request-ID"))
        self.calling(self.path, +1)
        try:
            try:
                reply = type(self).dispatch(self.command, self.path, self.headers, raw)
            except ApiError as exc:
                reply = Reply(exc.status, error_body(exc.status, exc.detail, request_id), exc.headers)
            except Exception as exc:  # noqa: BLE001 - a simulator bug must still answer the way the server would
                self.log_message("internal error: %r", exc)
                reply = Reply(500, error_body(500, "", request_id))
            pause = type(self).latency()
            if pause > 0:
                time.sleep(pause)
            self._send(reply, request_id)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            self.calling(self.path, -1)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

    def _send(self, reply: Reply, request_id: str) -> None:
        """Write a reply with Content-Length, or chunked for streams."""
        self.send_response(reply.status)
        self.send_header("X-Request-ID", request_id)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        if reply.stream is None:
            data = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
            if "Content-Type" not in reply.headers:
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for part in reply.stream:  # the generator paces the parts and ends early when its run is stopped
            self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.flush()
        self.close_connection = reply.truncate or self.close_connection
        self.wfile.write(b"" if reply.truncate else b"0\r\n\r\n")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class names it `format`
        """Log to stderr only when the simulator is verbose."""
        if type(self).verbose():
            super().log_message(format, *args)
