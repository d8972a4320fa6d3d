"""The one path every HTTP request of the app takes: its request id (the client's X-Request-ID when short and
printable, else a new one) on the answer and on every log line written meanwhile, CORS headers for an allowed
origin, its time and status in the metrics, and its access line (as ACCESS_LOG says).

A WSGI layer around Flask (inside Flask-SocketIO's, which hands `/socket.io/` to engine.io before it), so it is the
same work for every route, its errors and Flask's own 404/405 included, and a route added later cannot skip it. The
route label is the URL rule Flask matched ("unmatched" for a path no rule serves): Flask sets `request.url_rule`
when it routes a request, and `RoutedRequest` (the app's request class) notes it in the environ, which outlives the
request object (tests/test_request_path.py guards that Flask still sets it).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable

from flask import Request
from werkzeug.routing import Rule

from .. import logs
from .headers import cors_headers, request_id_of
from .metrics import ApiMetrics

WsgiApp = Callable[[dict[str, Any], Any], Iterable[bytes]]
REQUEST_ID = "psvc.request_id"  # the environ key views and error handlers read the request id from
ROUTE = "psvc.route"  # the URL rule Flask matched, noted by RoutedRequest


class RoutedRequest(Request):
    """Flask's request, noting in the environ which URL rule it was routed to."""

    _rule: Rule | None = None

    @property
    def url_rule(self) -> Rule | None:
        return self._rule

    @url_rule.setter
    def url_rule(self, rule: Rule | None) -> None:
        self._rule = rule
        if rule is not None:
            self.environ[ROUTE] = rule.rule


class RequestPath:
    """WSGI layer: request id, CORS, timing, metrics and the access line, for every request of the app."""

    def __init__(self, app: WsgiApp, metrics: ApiMetrics, cors_origins: frozenset[str]) -> None:
        self.app, self.metrics, self.cors_origins = app, metrics, cors_origins

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        started = time.perf_counter()
        request_id = environ[REQUEST_ID] = request_id_of(environ.get("HTTP_X_REQUEST_ID", ""))
        extra = [("X-Request-ID", request_id), *cors_headers(environ.get("HTTP_ORIGIN"), self.cors_origins).items()]
        answered: list[int] = []

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            answered.append(int(status[:3]))
            return start_response(status, headers + extra, exc_info)

        bound = logs.request_id.set(request_id)
        try:
            body = self.app(environ, start)
        finally:
            logs.request_id.reset(bound)
        self.metrics.finished(environ.get("REQUEST_METHOD", ""), environ.get(ROUTE, "unmatched"),
                              environ.get("PATH_INFO", ""), answered[-1] if answered else 500,
                              time.perf_counter() - started, request_id)
        return body
