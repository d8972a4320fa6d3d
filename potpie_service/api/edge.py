"""The HTTP edge: what a request must pass before any route sees it, engine.io's `/socket.io/` included.

gunicorn bounds the request line and each header, and reads a request's headers under its keep-alive timeout, but
once the headers are in, the body is read by whoever wants it (a Flask view, the submit path, engine.io) with no
deadline: `timeout: 0`, and under gevent nothing else would stop a client that announces a body and never sends
it. So this layer reads every body itself, before the app: at most the route's limit (413 past it, before a byte
of an oversized body is read), within REQUEST_BODY_TIMEOUT for the whole of it (408), with gunicorn's framing
errors (a bad chunk size) answered 400; the app then reads the body from memory. It also caps a request's headers
in all (REQUEST_HEADERS_MAX_BYTES, 431: gunicorn allows 100 fields of 8 KB each, and engine.io keeps a session's
request, headers and all, for the life of the session) and refuses a Socket.IO polling body engine.io could not
decode (400; engine.io would log a traceback and answer 200). A refused request's connection is closed after the
answer: the rest of its body may still be on the way."""

from __future__ import annotations

import io
import json
import socket
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Callable, Iterable, Iterator

from engineio.payload import Payload
from gunicorn.http.errors import NoMoreData, ParseException

from ..config import Settings
from .errors import ApiError, error_body
from .metrics import ApiMetrics

ROUTE = "edge"  # the route label (metrics, access line) of a request refused here: it never reached routing
WsgiApp = Callable[[dict[str, Any], Any], Iterable[bytes]]


@dataclass(frozen=True)
class EdgeLimits:
    """What the edge lets through."""

    headers_max_bytes: int
    body_timeout: float
    body_max_bytes: int  # every route but Socket.IO's
    socketio_path: str
    socketio_body_max_bytes: int

    @classmethod
    def of(cls, settings: Settings, body_max_bytes: int, socketio_path: str = "/socket.io/") -> "EdgeLimits":
        return cls(settings.request_headers_max_bytes, settings.request_body_timeout, body_max_bytes, socketio_path,
                   settings.socketio_max_message_bytes)


class Refused(Exception):
    """A request the edge answers itself: status, reason (the metrics label) and the client's message."""

    def __init__(self, status: int, reason: str, message: str, field: str) -> None:
        super().__init__(message)
        self.status, self.reason, self.message, self.field = status, reason, message, field


class Closing:
    """A refusal's body: after the server has written it, the connection is closed (the client may still be
    sending the body the answer refused, which must not be read as the next request)."""

    def __init__(self, body: bytes, sock: Any) -> None:
        self.body, self.sock = body, sock

    def __iter__(self) -> Iterator[bytes]:
        yield self.body

    def close(self) -> None:
        if self.sock is None:
            return
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # the server's next read sees the end and closes the connection
        except OSError:  # the client is gone already
            pass


class RequestLimits:
    """WSGI layer over the app and engine.io: header and body limits, the body read within its deadline."""

    def __init__(self, app: WsgiApp, limits: EdgeLimits, metrics: ApiMetrics) -> None:
        self.app, self.limits, self.metrics = app, limits, metrics

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        started = time.perf_counter()
        try:
            self._check_headers(environ)
            if environ.get("CONTENT_LENGTH", "") not in ("", "0") or "HTTP_TRANSFER_ENCODING" in environ:
                self._take_body(environ)
        except Refused as refusal:
            return self._answer(environ, start_response, refusal, started)
        return self.app(environ, start_response)

    def _check_headers(self, environ: dict[str, Any]) -> None:
        size = sum(len(name) + len(value) for name, value in environ.items() if name.startswith("HTTP_"))
        if size > self.limits.headers_max_bytes:
            raise Refused(431, "headers_too_large",
                          f"the request's headers must be at most {self.limits.headers_max_bytes} bytes in all",
                          "headers")

    def _take_body(self, environ: dict[str, Any]) -> None:
        """Read the whole body within the deadline and hand it to the app from memory."""
        socketio = environ.get("PATH_INFO", "").startswith(self.limits.socketio_path)
        limit = self.limits.socketio_body_max_bytes if socketio else self.limits.body_max_bytes
        length = environ.get("CONTENT_LENGTH", "")
        chunked = "HTTP_TRANSFER_ENCODING" in environ
        if not chunked and not length.isdigit():
            raise Refused(400, "bad_body", "Content-Length must be a number of bytes", "Content-Length")
        if not chunked and int(length) > limit:
            raise Refused(413, "body_too_large", f"the body must be at most {limit} bytes", "body")
        body = self._read(environ, None if chunked else int(length), limit)
        if socketio and environ.get("REQUEST_METHOD") == "POST" and not _engineio_payload(body):
            raise Refused(400, "bad_body", "not an Engine.IO payload (UTF-8 text packets)", "body")
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        environ.pop("HTTP_TRANSFER_ENCODING", None)

    def _read(self, environ: dict[str, Any], length: int | None, limit: int) -> bytes:
        """`length` bytes (None: to the end of a chunked body, at most `limit`), all within the body deadline."""
        stream, sock = environ["wsgi.input"], environ.get("gunicorn.socket")
        deadline = time.monotonic() + self.limits.body_timeout
        before = sock.gettimeout() if sock is not None else None
        parts, size = [], 0
        try:
            while length is None or size < length:
                if sock is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError
                    sock.settimeout(remaining)
                part = stream.read(min(65536, limit + 1 - size) if length is None else length - size)
                if not part:
                    break
                parts.append(part)
                size += len(part)
                if size > limit:
                    raise Refused(413, "body_too_large", f"the body must be at most {limit} bytes", "body")
        except TimeoutError:
            raise Refused(408, "body_timeout", f"the body did not arrive within {self.limits.body_timeout:g} s",
                          "body") from None
        except (ParseException, NoMoreData) as exc:  # gunicorn's framing errors: a bad chunk size, a cut chunk
            raise Refused(400, "bad_body", f"malformed body: {type(exc).__name__}", "body") from None
        finally:
            if sock is not None:
                sock.settimeout(before)
        if length is not None and size < length:
            raise Refused(400, "bad_body", "the body ended before its Content-Length", "body")
        return b"".join(parts)

    def _answer(self, environ: dict[str, Any], start_response: Any, refusal: Refused,
                started: float) -> Iterable[bytes]:
        body = (json.dumps(error_body(ApiError(refusal.message, field=refusal.field)), separators=(",", ":"))
                + "\n").encode()
        start_response(f"{refusal.status} {HTTPStatus(refusal.status).phrase}",
                       [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        self.metrics.refused(refusal.reason)
        self.metrics.finished(environ.get("REQUEST_METHOD", ""), ROUTE, environ.get("PATH_INFO", ""), refusal.status,
                              time.perf_counter() - started, None)
        return Closing(body, environ.get("gunicorn.socket"))


def _engineio_payload(body: bytes) -> bool:
    """Whether engine.io's own decoder takes this polling body (it would log a traceback otherwise)."""
    try:
        Payload(encoded_payload=body.decode("utf-8"))
    except (ValueError, KeyError, IndexError):  # UnicodeDecodeError is a ValueError
        return False
    return True
