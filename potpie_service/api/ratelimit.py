"""Rate limits on job creation: per API key (per client IP without a valid one), counted by the store's
RateLimiter so they hold across every API process; 429 with Retry-After and the X-RateLimit headers.

`@rate_limited` is the policy of the two routes that create work (POST /analyze, POST /jobs/<id>/retry). A caller
with a valid key is counted by the submit script itself, in the same Redis call that stores the job (one round
trip, not two), which refuses over the limit with nothing stored; one refused before that (a 400, Redis away) is
counted once its answer is ready (and answered 429 when that puts it over), and one without a valid key is counted
before anything runs, so guessing keys is limited too."""

from __future__ import annotations

import functools
import logging
import math
import time
from typing import Any, Callable

from flask import Response, current_app, g, request

from ..auth import Authenticator
from ..config import Settings
from ..core.errors import RateLimited, ServiceError
from ..store.jobs import JobStore
from ..store.ratelimit import Charge, RateLimiter, Verdict
from .context import caller_owner, context
from .errors import TooManyRequests, error_response

log = logging.getLogger(__name__)


def make_limiter(settings: Settings, store: JobStore) -> RateLimiter | None:
    """RATE_LIMIT's limiter (None when RATE_LIMIT=off)."""
    if not settings.rate_limit:
        log.warning("RATE_LIMIT=off: job creation is not rate limited")
        return None
    return store.rate_limiter(settings.rate_limit)


def identity(auth: Authenticator, owner: str | None, remote_addr: str | None) -> str:
    """The bucket a request counts against: its key's owner, else its IP (also when auth is disabled)."""
    return f"key:{owner}" if owner and not auth.disabled else f"ip:{remote_addr or 'unknown'}"


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


def charge() -> Charge | None:
    """This request's rate-limit charge, for the submit script to count (None: RATE_LIMIT=off, or a route that is
    not limited)."""
    found: Charge | None = g.get("rate_charge")
    return found


def paid(counts: list[int] | None) -> None:
    """What the submit script counted for this request (`Submission.rate_counts`), for the answer's headers."""
    g.rate_counts = counts


def rate_limited(view: Callable[..., Any]) -> Callable[..., Any]:
    """The route creates work: count its requests against RATE_LIMIT, and answer with the X-RateLimit headers."""

    @functools.wraps(view)
    def limited(*args: Any, **kwargs: Any) -> Any:
        limiter = context().limiter
        if limiter is None:
            return view(*args, **kwargs)
        auth, owner = context().auth, caller_owner()
        g.rate_charge = this = limiter.charge(identity(auth, owner, request.remote_addr))
        counts: list[int] | None = None
        if owner is None and not auth.disabled:  # no valid key: counted (and refused) before anything runs
            counts = limiter.pay(this)
            verdict = limiter.verdict(counts)
            if not verdict.allowed:
                return _headed(error_response(refusal(verdict)), verdict)
        try:
            response = current_app.make_response(view(*args, **kwargs))
            counts = g.get("rate_counts", counts)
        except RateLimited as exc:  # the submit script found the caller over a limit: nothing was stored
            counts = exc.rate_counts or limiter.pay(this)
            response = current_app.make_response(error_response(refusal(limiter.verdict(counts))))
        except Exception as exc:  # refused before the submit script counted it (unless it says it did): counted
            # now, and over the limit the caller hears that first, as from the script; else the app's answer
            counts = exc.rate_counts if isinstance(exc, ServiceError) and exc.rate_counts else counts
            counts = counts if counts is not None else limiter.pay(this)
            verdict = limiter.verdict(counts)
            answer = current_app.handle_user_exception(exc) if verdict.allowed else error_response(refusal(verdict))
            response = current_app.make_response(answer)
        return _headed(response, limiter.verdict(counts if counts is not None else limiter.pay(this)))

    return limited


def _headed(answer: Any, verdict: Verdict) -> Response:
    response = current_app.make_response(answer)
    response.headers.update(limit_headers(verdict))
    return response
