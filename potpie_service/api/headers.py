"""The headers of the API's answers: the security headers every answer carries (engine.io's and gunicorn's own
rejections included), the request id and CORS."""

from __future__ import annotations

import uuid
from typing import Any

SECURITY_HEADERS = (("X-Content-Type-Options", "nosniff"), ("X-Frame-Options", "DENY"),
                    ("Referrer-Policy", "no-referrer"),
                    ("Content-Security-Policy", "default-src 'none'; frame-ancestors 'none'"),
                    ("Cross-Origin-Resource-Policy", "same-origin"))


class SecurityHeaders:
    """WSGI layer over everything, engine.io included (its `/socket.io/` answers never pass through Flask's
    after_request): adds the headers a response lacks, so a view may set its own (the board's CSP)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            present = {name.lower() for name, _ in headers}
            headers.extend((name, value) for name, value in SECURITY_HEADERS if name.lower() not in present)
            secure = environ.get("wsgi.url_scheme") == "https" or environ.get("HTTP_X_FORWARDED_PROTO") == "https"
            if secure and "strict-transport-security" not in present:
                headers.append(("Strict-Transport-Security", "max-age=31536000; includeSubDomains"))
            return start_response(status, headers, exc_info)

        return self.app(environ, start)


def request_id_of(incoming: str) -> str:
    """The request's id: the client's X-Request-ID when short and printable, else a new one."""
    return incoming if 0 < len(incoming) <= 64 and incoming.isprintable() else uuid.uuid4().hex


def cors_headers(origin: str | None, allowed: frozenset[str]) -> dict[str, str]:
    """CORS headers for a request from `origin` when CORS_ORIGINS lets it in (none otherwise)."""
    if not origin or ("*" not in allowed and origin not in allowed):
        return {}
    return {"Access-Control-Allow-Origin": "*" if "*" in allowed else origin,
            "Access-Control-Allow-Headers": "Authorization, Content-Type, X-API-Key",
            "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS", "Vary": "Origin"}
