"""API errors: the domain's refusals (core/errors.py) and the HTTP layer's own, each with its status, in one JSON
shape: `{success:false, error, details}`."""

from __future__ import annotations

import logging
from typing import Any

from flask import Response, jsonify

from ..core.errors import Conflict, NotFound, RateLimited, ServiceError, Unavailable, ValidationError
from ..store import StoreUnavailable

log = logging.getLogger(__name__)


class ApiError(ServiceError):
    """A refusal of the HTTP layer itself, with its status."""

    status = 400


class Unauthorized(ApiError):
    """No valid API key (401)."""

    status = 401


class PayloadTooLarge(ApiError):
    """The body is over the limit (413)."""

    status = 413


class UnsupportedMediaType(ApiError):
    """The body is not JSON (415)."""

    status = 415


class TooManyRequests(ApiError):
    """Over the rate limit (429, with Retry-After)."""

    status = 429


DOMAIN_STATUS = {ValidationError: 400, NotFound: 404, Conflict: 409, RateLimited: 429, Unavailable: 503}


def status_of(error: ServiceError) -> int:
    """The HTTP status an error answers with."""
    if isinstance(error, ApiError):
        return error.status
    return next((status for kind, status in DOMAIN_STATUS.items() if isinstance(error, kind)), 400)


def error_body(error: ServiceError) -> dict[str, Any]:
    """The JSON body every error answer has."""
    return {"success": False, "error": error.error, "details": error.details}


def refusal_for(error: Exception, request_id: str | None) -> ServiceError:
    """What an exception answers with: a refusal as it is; Redis unavailable (the store's StoreUnavailable) where a
    view did not name it, a 503; anything else, the last line of defence, a logged 500 (JSON, never a traceback)."""
    if isinstance(error, ServiceError):
        return error
    if isinstance(error, StoreUnavailable):
        log.error("Redis unavailable: %s", error.reason, extra={"request_id": request_id})
        return Unavailable("Redis connection failed")
    log.error("unhandled error", exc_info=error, extra={"request_id": request_id})
    internal = ApiError("Internal server error", request_id=request_id)
    internal.status = 500
    return internal


def error_headers(error: ServiceError) -> dict[str, str]:
    """The headers an error answer carries besides the JSON body's."""
    if isinstance(error, Unauthorized):
        return {"WWW-Authenticate": 'Bearer realm="potpie-service"'}
    if isinstance(error, Unavailable):  # Redis away or failing over: worth another try soon
        return {"Retry-After": "2"}
    return {}


def error_response(error: ServiceError) -> tuple[Response, int]:
    """The JSON response for an error."""
    response = jsonify(error_body(error))
    response.headers.update(error_headers(error))
    return response, status_of(error)
