"""API errors: one small hierarchy and one JSON shape, `{success:false, error, details}`."""

from __future__ import annotations

from typing import Any

from flask import Response, jsonify


class ApiError(Exception):
    """An error answered as JSON with an HTTP status."""

    status = 400

    def __init__(self, error: str, **details: Any) -> None:
        super().__init__(error)
        self.error = error
        self.details = details


class ValidationError(ApiError):
    """A request field is missing or wrong (400)."""


class Unauthorized(ApiError):
    """No valid API key (401)."""

    status = 401


class NotFound(ApiError):
    """Unknown job, or another owner's (404)."""

    status = 404


class Conflict(ApiError):
    """The request conflicts with the job's state or an earlier request (409)."""

    status = 409


class PayloadTooLarge(ApiError):
    """The body is over the limit (413)."""

    status = 413


class UnsupportedMediaType(ApiError):
    """The body is not JSON (415)."""

    status = 415


class TooManyRequests(ApiError):
    """Over the rate limit (429, with Retry-After)."""

    status = 429


class ServiceUnavailable(ApiError):
    """Redis (or the queue) cannot be reached (503)."""

    status = 503


def error_body(error: ApiError) -> dict[str, Any]:
    """The JSON body every error answer has."""
    return {"success": False, "error": error.error, "details": error.details}


def error_response(error: ApiError) -> tuple[Response, int]:
    """The JSON response for an ApiError."""
    response = jsonify(error_body(error))
    if isinstance(error, Unauthorized):
        response.headers["WWW-Authenticate"] = 'Bearer realm="potpie-service"'
    return response, error.status
