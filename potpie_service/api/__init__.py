"""The API application factory: Flask + Flask-SocketIO on the shared Redis message queue."""

from __future__ import annotations

import logging
import sys
from typing import Any

from flask import Flask, request
from flask.json.provider import DefaultJSONProvider
from flask_socketio import SocketIO
from werkzeug.exceptions import HTTPException, MethodNotAllowed
from werkzeug.middleware.proxy_fix import ProxyFix

from ..auth import Authenticator, missing_keys_problem
from ..config import Settings
from ..core.errors import ServiceError
from ..core.submission import MAX_BODY_BYTES
from ..health import HealthCheck
from ..potpie.client import PotpieClient
from ..queue import dispatcher, first_steps, make_celery, run_stopper
from ..service import JobService
from ..store import StoreUnavailable, make_probe, make_store
from ..connections import api_timeout, socketio_manager_args, tls_problem
from ..tokens import TokenCipher
from . import jobs_routes, routes, sockets
from .context import EXTENSION, ApiContext, ConnectionCount, request_id
from .edge import EdgeLimits, RequestLimits
from .engineio_pings import PingWheel
from .errors import ApiError, error_response, refusal_for
from .headers import SecurityHeaders
from .metrics import ApiMetrics
from .ratelimit import make_limiter
from .request_path import RequestPath, RoutedRequest
from .rooms import IndexedRedisManager
from .sessions import SessionGuard
from .websocket import bound_websockets, decline_compression

log = logging.getLogger(__name__)


def _socket_origins(configured: tuple[str, ...]) -> Any:
    """Socket.IO origin policy: same origin only by default; `*` explicitly; else the list plus the same origin."""
    if not configured:
        return None
    if "*" in configured:
        return "*"
    allowed = set(configured)

    def allow(origin: str | None, environ: dict[str, Any]) -> bool:
        own = {f"{environ.get('wsgi.url_scheme', 'http')}://{environ.get('HTTP_HOST', '')}"}
        if "HTTP_X_FORWARDED_HOST" in environ or "HTTP_X_FORWARDED_PROTO" in environ:
            scheme = environ.get("HTTP_X_FORWARDED_PROTO", "http").split(",")[0].strip()
            own.add(f"{scheme}://{environ.get('HTTP_X_FORWARDED_HOST', environ.get('HTTP_HOST', '')).split(',')[0]}")
        return origin in allowed or origin in own

    return allow


def _install_error_handlers(app: Flask) -> None:
    """Every error a request can meet answered in the API's JSON shape, with its status."""

    @app.errorhandler(ServiceError)
    def service_error(error: ServiceError) -> Any:  # a domain refusal or the HTTP layer's own, with its status
        return error_response(error)

    @app.errorhandler(StoreUnavailable)
    def redis_error(error: StoreUnavailable) -> Any:  # Redis away where a view did not name it: a 503
        return error_response(refusal_for(error, request_id()))

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> Any:
        code = error.code or 500
        names = {404: "Not found", 405: "Method not allowed", 413: "Payload too large"}
        api = ApiError(names.get(code, error.name), path=request.path)
        api.status = code
        response, status = error_response(api)
        if isinstance(error, MethodNotAllowed) and error.valid_methods:  # RFC 9110: a 405 lists what is allowed
            response.headers["Allow"] = ", ".join(error.valid_methods)
        return response, status

    @app.errorhandler(Exception)
    def unexpected(error: Exception) -> Any:  # the last line of defence: log it, answer JSON, never a traceback
        return error_response(refusal_for(error, request_id()))


def preflight(settings: Settings) -> None:
    """Refuse to start an API open to anyone or unable to trust Redis: exit 2 with one line (api command, wsgi)."""
    problem = missing_keys_problem(settings.api_keys, settings.auth_disabled) or tls_problem(settings)
    if problem:
        print(f"potpie-service api: {problem}", file=sys.stderr)
        raise SystemExit(2)


def create_app(settings: Settings | None = None) -> Flask:
    """Build the API app; the Socket.IO server is `app.extensions["socketio"]`."""
    settings = settings or Settings.from_env()
    app = Flask("potpie_service")
    app.request_class = RoutedRequest  # notes the URL rule it was routed to, for the request path's route label
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES * 4  # hard stop; /analyze checks 16 KiB itself
    if isinstance(app.json, DefaultJSONProvider):
        app.json.sort_keys = False  # answers keep the order the service builds them in
    auth = Authenticator(settings.api_keys, settings.ops_api_keys, settings.auth_disabled)
    store = make_store(settings, api_timeout(settings))
    celery = make_celery(settings)
    potpie = PotpieClient(settings.potpie_base_url, settings.potpie_api_key, settings.request_timeout, attempts=1)
    service = JobService(settings, store, dispatcher(celery, settings), TokenCipher(settings.token_encryption_key),
                         first_steps(celery, settings), run_stopper(celery, settings))
    count = ConnectionCount()
    metrics = ApiMetrics(settings, store, count)  # /metrics: the cluster's families and this process's own
    app.extensions["metrics"] = metrics
    # Every request of the app takes one path: request id, CORS, timing, metrics, access line (request_path.py).
    # Installed before Flask-SocketIO wraps the app, so engine.io's /socket.io/ traffic goes around it.
    app.wsgi_app = RequestPath(app.wsgi_app, metrics, frozenset(settings.cors_origins))  # type: ignore[method-assign]
    manager_url, manager_options = socketio_manager_args(settings)
    manager = IndexedRedisManager(manager_url, channel=store.channel, redis_options=manager_options)
    cors: Any = _socket_origins(settings.cors_origins)
    decline_compression()  # ~140 KB a socket for frames of a few hundred bytes (api/websocket.py)
    # async_handlers=False: a socket's events are handled one at a time, in its own reader (api/sessions.py)
    socketio = SocketIO(app, async_mode=settings.socketio_async_mode, client_manager=manager,
                        cors_allowed_origins=cors, ping_interval=20, ping_timeout=20, logger=False,
                        engineio_logger=False, max_http_buffer_size=settings.socketio_max_message_bytes,
                        async_handlers=False)
    health = HealthCheck(settings, make_probe(settings), potpie, service.started)
    app.extensions[EXTENSION] = ApiContext(settings, service, auth, count, socketio, health,
                                           make_limiter(settings, store))
    app.register_blueprint(routes.bp)
    sockets.register(socketio, service, auth, count)
    app.register_blueprint(jobs_routes.bp)
    _install_error_handlers(app)
    SessionGuard(socketio.server, settings, metrics.refused)  # sockets must authenticate, behave, or go
    PingWheel(socketio.server.eio)  # one task sends every session's pings (api/engineio_pings.py)
    if settings.socketio_async_mode == "gevent":  # a WebSocket is a Link, not greenlets (api/engineio_transport.py)
        from .engineio_transport import green_websockets

        green_websockets(socketio.server.eio, settings.socketio_max_message_bytes, metrics.refused,
                         settings.api_connections)
    else:
        bound_websockets(socketio.server.eio, settings.socketio_max_message_bytes, metrics.refused)
    metrics.count_sessions(lambda: len(socketio.server.eio.sockets))
    edge = EdgeLimits.of(settings, body_max_bytes=app.config["MAX_CONTENT_LENGTH"])
    app.wsgi_app = RequestLimits(app.wsgi_app, edge, metrics)  # type: ignore[method-assign]
    app.wsgi_app = SecurityHeaders(app.wsgi_app)  # type: ignore[method-assign]
    if settings.trusted_proxies:  # client IP and scheme from X-Forwarded-* set by that many proxies in front
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings.trusted_proxies,  # type: ignore[method-assign]
                                x_proto=settings.trusted_proxies)
    if settings.auth_disabled:
        log.warning("AUTH IS DISABLED (AUTH_DISABLED=true): anyone who can reach this API can use it")
    return app
