"""Rate limits on job creation: per API key (per client IP without a valid one), counted by the store's
RateLimiter so they hold across every API process; 429 with Retry-After and the X-RateLimit headers."""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable

from flask import Flask, Response, g, request

from ..auth import Authenticator
from ..config import Settings
from ..store.jobs import JobStore
from ..store.ratelimit import RateLimiter, Verdict
from .errors import TooManyRequests, error_response

log = logging.getLogger(__name__)

# Endpoints that create work: new jobs and retries.
LIMITED_ENDPOINTS = frozenset({"api.analyze", "jobs.retry"})

def client_identity(auth: Authenticator, presented_key: Callable[[], str | None]) -> str:
    """The bucket a request counts against: its key's owner, else its IP (also when auth is disabled)."""
    owner = None if auth.disabled else auth.owner(presented_key())
    return f"key:{owner}" if owner else f"ip:{request.remote_addr or 'unknown'}"


def init_rate_limits(app: Flask, settings: Settings, auth: Authenticator, presented_key: Callable[[], str | None],
                     store: JobStore) -> RateLimiter | None:
    """Apply RATE_LIMIT to the job-creating endpoints (None when RATE_LIMIT=off)."""
    if not settings.rate_limit:
        log.warning("RATE_LIMIT=off: job creation is not rate limited")
        return None
    limiter = store.rate_limiter(settings.rate_limit)

    @app.before_request
    def count() -> Any:
        if request.endpoint not in LIMITED_ENDPOINTS or request.method == "OPTIONS":
            return None
        g.rate_limit = verdict = limiter.hit(client_identity(auth, presented_key))
        if verdict.allowed:
            return None
        return error_response(TooManyRequests(
            "Too many requests: slow down and retry after the time in the Retry-After header",
            limit=verdict.limit.text))

    @app.after_request
    def headers(response: Response) -> Response:
        verdict: Verdict | None = g.get("rate_limit")
        if verdict is not None:
            response.headers["X-RateLimit-Limit"] = str(verdict.limit.amount)
            response.headers["X-RateLimit-Remaining"] = str(verdict.remaining)
            response.headers["X-RateLimit-Reset"] = str(math.ceil(verdict.reset_at))
            if not verdict.allowed:
                response.headers["Retry-After"] = str(max(1, math.ceil(verdict.reset_at - time.time())))
        return response

    return limiter
