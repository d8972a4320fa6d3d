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


def identity(auth: Authenticator, owner: str | None, remote_addr: str | None) -> str:
    """The bucket a request counts against: its key's owner, else its IP (also when auth is disabled)."""
    return f"key:{owner}" if owner and not auth.disabled else f"ip:{remote_addr or 'unknown'}"


def client_identity(auth: Authenticator) -> str:
    """This request's bucket (see `identity`)."""
    return identity(auth, None if auth.disabled else caller_owner(), request.remote_addr)


def counted_by_submit(auth: Authenticator, bucket: str) -> bool:
    """Whether the submit script counts this `POST /analyze` (its caller known), not the request hooks."""
    return auth.disabled or bucket.startswith("key:")


def refusal(verdict: Verdict) -> TooManyRequests:
    """The 429 for a caller over `verdict`'s limit."""
    return TooManyRequests("Too many requests: slow down and retry after the time in the Retry-After header",
                           limit=verdict.limit.text)


def limit_headers(verdict: Verdict) -> dict[str, str]:
    """The X-RateLimit headers of an answer (and Retry-After when the caller is over the limit)."""
    headers = {"X-RateLimit-Limit": str(verdict.limit.amount), "X-RateLimit-Remaining": str(verdict.remaining),
               "X-RateLimit-Reset": str(math.ceil(verdict.reset_at))}
    if not verdict.allowed:
        headers["Retry-After"] = str(max(1, math.ceil(verdict.reset_at - time.time())))
    return headers


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

    @app.before_request
    def count() -> Any:
        if request.endpoint not in LIMITED_ENDPOINTS or request.method == "OPTIONS":
            return None
        bucket = client_identity(auth)
        g.rate_charge = charge = limiter.charge(bucket)
        if request.endpoint in COUNTED_BY_SUBMIT and counted_by_submit(auth, bucket):
            return None  # counted by the submit script, or by `headers` below if the request never gets there
        # a request without a valid key is counted (and refused) at once: guessing keys is limited too
        verdict = limiter.verdict(charge)
        return None if verdict.allowed else error_response(refusal(verdict))

    @app.errorhandler(RateLimited)
    def limited(_error: RateLimited) -> Any:  # the submit script found the caller over a limit
        return error_response(refusal(limiter.verdict(g.rate_charge)))

    @app.after_request
    def headers(response: Response) -> Response:
        charge: Charge | None = g.get("rate_charge")
        if charge is not None:  # counts it now if it was refused before the submit script
            response.headers.update(limit_headers(limiter.verdict(charge)))
        return response

    return limiter
