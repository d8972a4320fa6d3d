"""Domain errors: what a use case refuses, and why. The API maps each to an HTTP status (api/errors.py)."""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """A refusal with a message a person understands and details naming what caused it (e.g. `field`).
    `rate_counts`: the rate-limit counters' replies when the refused request was counted already (for the answer's
    headers; it is not counted again)."""

    rate_counts: list[int] | None = None

    def __init__(self, error: str, **details: Any) -> None:
        super().__init__(error)
        self.error = error
        self.details = details


class ValidationError(ServiceError):
    """A request field is missing or wrong."""


class NotFound(ServiceError):
    """No such job, or another owner's (the two look the same)."""


class Conflict(ServiceError):
    """The request conflicts with the job's state or with an earlier request."""


class Unavailable(ServiceError):
    """A dependency (Redis) cannot be reached or answered too late; the message says whether anything may have been
    done (a submit Redis never answered may have been queued)."""


class RateLimited(ServiceError):
    """The caller is over a rate limit (RATE_LIMIT); nothing was done."""

    def __init__(self, error: str, rate_counts: list[int] | None = None, **details: Any) -> None:
        super().__init__(error, **details)
        self.rate_counts = rate_counts
