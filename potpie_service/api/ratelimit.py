"""Rate limits on job creation: per API key (per client IP without a valid one), counted in Redis so they hold
across every API process; a Redis outage falls back to per-process counting instead of failing requests."""

from __future__ import annotations

import logging
from typing import Any, Callable

from flask import Flask, request
from flask_limiter import Limiter, RateLimitExceeded

from ..auth import Authenticator
from ..config import Settings
from ..connections import redis_options
from .errors import TooManyRequests, error_response

log = logging.getLogger(__name__)

# Endpoints that create work: new jobs and retries.
LIMITED_ENDPOINTS = frozenset({"api.analyze", "jobs.retry"})


def client_identity(auth: Authenticator, presented_key: Callable[[], str | None]) -> str:
    """The bucket a request counts against: its key's owner, else its IP (also when auth is disabled)."""
    owner = None if auth.disabled else auth.owner(presented_key())
    return f"key:{owner}" if owner else f"ip:{request.remote_addr or 'unknown'}"


def _exempt() -> bool:
    return request.endpoint not in LIMITED_ENDPOINTS or request.method == "OPTIONS"


def _too_many(error: RateLimitExceeded) -> Any:
    api = TooManyRequests("Too many requests: slow down and retry after the time in the Retry-After header",
                          limit=str(error.limit.limit) if error.limit else None)
    return error_response(api)


def init_rate_limits(app: Flask, settings: Settings, auth: Authenticator,
                     presented_key: Callable[[], str | None]) -> Limiter | None:
    """Attach RATE_LIMIT to the job-creating endpoints (None when RATE_LIMIT=off)."""
    if not settings.rate_limit:
        log.warning("RATE_LIMIT=off: job creation is not rate limited")
        return None
    storage_options = {**redis_options(settings), "key_prefix": f"psvc:{settings.queue_name}:ratelimit"}
    limiter = Limiter(
        lambda: client_identity(auth, presented_key),
        app=app,
        default_limits=[settings.rate_limit],
        default_limits_exempt_when=_exempt,
        storage_uri=settings.redis_url,
        storage_options=storage_options,  # the service's timeouts and TLS settings, like every Redis client
        strategy="fixed-window",
        headers_enabled=True,              # X-RateLimit-* on limited endpoints, Retry-After on 429
        swallow_errors=True,               # a limiter failure must never turn into a 500
        in_memory_fallback_enabled=True,   # Redis down: count per process until it is back
    )
    app.register_error_handler(RateLimitExceeded, _too_many)
    return limiter
