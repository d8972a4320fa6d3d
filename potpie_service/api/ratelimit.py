"""Rate limits on job creation: per API key (per client IP without a valid one), counted by the store's
RateLimiter so they hold across every API process; 429 with Retry-After and the X-RateLimit headers.

A request is counted before its view runs, except an authenticated `POST /analyze`: the submit script counts it in
the same Redis call that stores the job (one round trip, not two), and refuses it there over the limit (nothing is
stored). One refused before it gets that far (a 400, Redis away) is counted once its answer is ready."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from flask import Flask, Response, g, request

from ..auth import Authenticator
from ..config import Settings
from ..core.errors import RateLimited
from ..store.jobs import JobStore
from ..store.ratelimit import Charge, RateLimiter, Verdict
from .context import caller_owner
from .errors import TooManyRequests, error_response

log = logging.getLogger(__name__)

# Endpoints that create work: new jobs and retries.
LIMITED_ENDPOINTS = frozenset({"api.analyze", "jobs.retry"})
# Those whose authenticated requests the submit script counts (`rate_charge`).
COUNTED_BY_SUBMIT = frozenset({"api.analyze"})


def client_identity(auth: Authenticator) -> str:
    """The bucket a request counts against: its key's owner, else its IP (also when auth is disabled)."""
    owner = None if auth.disabled else caller_owner()
    return f"key:{owner}" if owner else f"ip:{request.remote_addr or 'unknown'}"


def rate_charge() -> Charge | None:
    """This request's rate-limit charge, for the submit script to count unless it is counted already (None:
    RATE_LIMIT=off)."""
    charge: Charge | None = g.get("rate_charge")
    return charge


def init_rate_limits(app: Flask, settings: Settings, auth: Authenticator, store: JobStore) -> RateLimiter | None:
    """Apply RATE_LIMIT to the job-creating endpoints (None when RATE_LIMIT=off)."""
    if not settings.rate_limit:
        log.warning("RATE_LIMIT=off: job creation is not rate limited")
        return None
    limiter = store.rate_limiter(settings.rate_limit)

    def refusal(verdict: Verdict) -> Any:
        return error_response(TooManyRequests(
            "Too many requests: slow down and retry after the time in the Retry-After header",
            limit=verdict.limit.text))

    @app.before_request
    def count() -> Any:
        if request.endpoint not in LIMITED_ENDPOINTS or request.method == "OPTIONS":
            return None
        identity = client_identity(auth)
        g.rate_charge = charge = limiter.charge(identity)
        if request.endpoint in COUNTED_BY_SUBMIT and (auth.disabled or identity.startswith("key:")):
            return None  # counted by the submit script, or by `headers` below if the request never gets there
        # a request without a valid key is counted (and refused) at once: guessing keys is limited too
        verdict = limiter.verdict(charge)
        return None if verdict.allowed else refusal(verdict)

    @app.errorhandler(RateLimited)
    def limited(_error: RateLimited) -> Any:  # the submit script found the caller over a limit
        return refusal(limiter.verdict(g.rate_charge))

    @app.after_request
    def headers(response: Response) -> Response:
        charge: Charge | None = g.get("rate_charge")
        if charge is not None:
            verdict = limiter.verdict(charge)  # counts it now if it was refused before the submit script
            response.headers["X-RateLimit-Limit"] = str(verdict.limit.amount)
            response.headers["X-RateLimit-Remaining"] = str(verdict.remaining)
            response.headers["X-RateLimit-Reset"] = str(math.ceil(verdict.reset_at))
            if not verdict.allowed:
                response.headers["Retry-After"] = str(max(1, math.ceil(verdict.reset_at - time.time())))
        return response

    return limiter
