"""The hot route without Flask: a well-formed, authenticated `POST /analyze` answered by a WSGI layer in front of
the app, through the same validation, service call, rate limit, headers, metrics and access line as the view.

Flask's request and response machinery cost about as much CPU as the submit itself (a same-run A/B on 2 cores:
1,313-1,354 req/s through Flask, 2,137-2,399 here). Anything this layer does not expect (no valid key, a body
that is not a small JSON object, a field the validation refuses, a bad Idempotency-Key) goes on to the Flask view
unchanged and before anything is counted or stored, so each refusal keeps one implementation, the view's. Once
the submit has run, its answer or refusal is written here: a submit is never run twice."""

from __future__ import annotations

import io
import time
from http import HTTPStatus
from typing import Any, Callable, Iterable

import redis
from flask.json.provider import JSONProvider

from .. import logs
from ..auth import Authenticator, presented_key
from ..core.errors import RateLimited, ValidationError
from ..core.submission import MAX_BODY_BYTES, AnalyzeRequest, analyze_request, idempotency_key
from ..service import JobService
from ..store.ratelimit import Charge, RateLimiter
from .errors import error_body, error_headers, refusal_for, status_of
from .headers import cors_headers, request_id_of
from .metrics import ApiMetrics
from .ratelimit import identity, limit_headers, refusal

ROUTE = "/analyze"
WsgiApp = Callable[[dict[str, Any], Any], Iterable[bytes]]


class SubmitPath:
    """WSGI layer answering the submits it can take whole; the rest, and every other route, go to `app`."""

    def __init__(self, app: WsgiApp, service: JobService, auth: Authenticator, limiter: RateLimiter | None,
                 metrics: ApiMetrics, json: JSONProvider, cors_origins: frozenset[str]) -> None:
        self.app, self.service, self.auth, self.limiter = app, service, auth, limiter
        self.metrics, self.json, self.cors_origins = metrics, json, cors_origins

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != ROUTE or environ.get("REQUEST_METHOD") != "POST":
            return self.app(environ, start_response)
        started = time.perf_counter()
        taken = self._take(environ)
        if taken is None:
            return self.app(environ, start_response)
        owner, request, key = taken
        request_id = request_id_of(environ.get("HTTP_X_REQUEST_ID", ""))
        # the caller is known, so the submit script counts the request (see api/ratelimit.py)
        charge = None if self.limiter is None else self.limiter.charge(
            identity(self.auth, owner, environ.get("REMOTE_ADDR")))
        bound = logs.request_id.set(request_id)
        try:
            status, body, headers = self._submit(owner, request, key, charge, request_id)
        finally:
            logs.request_id.reset(bound)
        headers.update({"X-Request-ID": request_id, **cors_headers(environ.get("HTTP_ORIGIN"), self.cors_origins)})
        data = (self.json.dumps(body, separators=(",", ":")) + "\n").encode()  # as Flask's jsonify writes it
        start_response(f"{status} {HTTPStatus(status).phrase}",
                       [("Content-Type", "application/json"), ("Content-Length", str(len(data))), *headers.items()])
        self.metrics.finished("POST", ROUTE, ROUTE, status, time.perf_counter() - started, request_id)
        return [data]

    def _take(self, environ: dict[str, Any]) -> tuple[str, AnalyzeRequest, str | None] | None:
        """The caller, the request and its idempotency key, when this layer can answer it (None: Flask will)."""
        content_type = environ.get("CONTENT_TYPE", "").partition(";")[0].strip().lower()
        length = environ.get("CONTENT_LENGTH", "")
        if content_type != "application/json" or not length.isdigit() or int(length) > MAX_BODY_BYTES:
            return None
        owner = self.auth.owner(presented_key(environ.get("HTTP_AUTHORIZATION", ""), environ.get("HTTP_X_API_KEY")))
        if owner is None:
            return None
        raw = environ["wsgi.input"].read(int(length))
        try:
            return owner, analyze_request(self.json.loads(raw)), idempotency_key(environ.get("HTTP_IDEMPOTENCY_KEY"))
        except (ValueError, RecursionError, ValidationError):  # the view answers, with the field it names
            environ["wsgi.input"] = io.BytesIO(raw)  # the body, read again by the view
            return None

    def _submit(self, owner: str, request: AnalyzeRequest, key: str | None, charge: Charge | None,
                request_id: str) -> tuple[int, dict[str, Any], dict[str, str]]:
        """Run the submit; its status, body and headers (a refusal's as the app's error handlers write them)."""
        try:
            status, body = self.service.submit(owner, request, key, charge=charge)
            headers: dict[str, str] = {}
        except Exception as exc:
            error = refusal_for(exc, request_id)
            if isinstance(error, RateLimited) and self.limiter is not None and charge is not None:
                # the submit script refused the caller: the limiter's verdict carries its headers
                error = refusal(self.limiter.verdict(charge))
            status, body, headers = status_of(error), error_body(error), error_headers(error)
        if self.limiter is not None and charge is not None:
            try:  # counts it now if it was refused before the submit script
                headers.update(limit_headers(self.limiter.verdict(charge)))
            except redis.RedisError:  # Redis away: the answer (a 503) goes without them, as the app's does
                pass
        return status, body, headers

