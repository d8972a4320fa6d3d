"""gunicorn pieces of the API: its workers (gevent by default, gthread for SOCKETIO_ASYNC_MODE=threading; in both,
what gunicorn rejects itself — a request line or headers too long, a malformed request, an unknown transfer coding —
gets the API's JSON error and security headers instead of gunicorn's HTML page) and its logger (gunicorn's own
lines in the service's format).

The gevent worker imports gevent only when gunicorn loads it by name, after `python -m potpie_service api` has
patched the standard library (potpie_service/__main__.py)."""

from __future__ import annotations

import gc
import json
import logging
from typing import Any

from gunicorn import util
from gunicorn.glogging import Logger as GunicornBaseLogger
from gunicorn.http.errors import InvalidHeader, UnsupportedTransferCoding
from gunicorn.workers.gthread import ThreadWorker

from ..bootstrap import load_settings
from .errors import ApiError, error_body
from .headers import SECURITY_HEADERS

_FIELDS = {414: "request line", 431: "headers"}
_TRANSFER_CODING = "Transfer-Encoding: unsupported transfer coding"


class _UnknownTransferCoding(InvalidHeader):
    """A client error (400), where gunicorn answers 501: the client sent what this service never accepts."""

    def __init__(self) -> None:
        super().__init__("Transfer-Encoding")

    def __str__(self) -> str:
        return _TRANSFER_CODING


def write_json_error(sock: Any, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn's `util.write_error` with the API's error shape; the connection closes after it."""
    field = "Transfer-Encoding" if mesg == _TRANSFER_CODING else _FIELDS.get(status_int)
    body = json.dumps(error_body(ApiError(mesg or reason, **({"field": field} if field else {})))).encode()
    head = [f"HTTP/1.1 {status_int} {reason}", "Connection: close", "Content-Type: application/json",
            f"Content-Length: {len(body)}", *(f"{name}: {value}" for name, value in SECURITY_HEADERS)]
    util.write_nonblock(sock, ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)


# The collector's thresholds in an API worker. An API holding 10,000 sockets holds ~1.9 million objects; with
# CPython's defaults (700, 10, 10) a full collection ran every few seconds while they connected and now and then
# afterwards, each a pause of 0.5-1.8 s on 2 cores, and submit p99 at 8 clients went from ~45 ms to ~1 s whenever
# one fell in the measurement (bench/p5_fanout.py). Young collections every 10,000 allocations let a request's
# short-lived objects die before they are promoted, so the old generation grows by what really stays (sockets)
# and full collections become rare. A larger young generation costs the tail without sockets: P1's p99 at 8
# clients, four interleaved rounds each, median 9.7 ms with the defaults, 10.2 ms with these, 24.3 ms with
# (50,000, 20, 10) (bench/NOTES.md). Old cycles (a closed socket's) wait for a full collection; under reconnect
# churn (the 30-minute soak, bench/soak_socketio.py: 200 clients, 3 reconnects a second) RSS stayed within
# 82.6-83.5 MB over the second half.
GC_THRESHOLDS = (10_000, 10, 10)


class JsonErrors:
    """A gunicorn worker answering its own rejections in JSON (mixed in before gunicorn's worker class), with the
    collector tuned for a process holding many sockets."""

    def init_process(self) -> None:
        util.write_error = write_json_error  # gunicorn's only error writer, used by handle_error in this process
        gc.set_threshold(*GC_THRESHOLDS)
        super().init_process()  # type: ignore[misc]

    def load_wsgi(self) -> None:
        super().load_wsgi()  # type: ignore[misc]
        gc.freeze()  # modules, the app and its settings live as long as the process: no collection scans them

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        if isinstance(exc, UnsupportedTransferCoding):
            exc = _UnknownTransferCoding()
        super().handle_error(req, client, addr, exc)  # type: ignore[misc]


class JsonErrorWorker(JsonErrors, ThreadWorker):
    """gunicorn's threaded worker (Flask-SocketIO's threading mode): one OS thread per request and per WebSocket."""


class GunicornLogger(GunicornBaseLogger):
    """Gunicorn's own lines (start, workers, signals) in the service's format: `--logger-class` / `logger_class`."""

    def setup(self, cfg) -> None:  # noqa: ANN001 (gunicorn's Config)
        super().setup(cfg)
        if not logging.getLogger().handlers:  # the gunicorn CLI's master has not loaded the app: read settings now
            load_settings("api")
        for logger in (self.error_log, self.access_log):
            logger.handlers[:] = list(logging.getLogger().handlers)
        self.error_log.setLevel(max(self.error_log.level, logging.getLogger().level))  # LOG_LEVEL holds here too
