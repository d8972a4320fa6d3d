"""Logging: one JSON object per line (or plain text), with job and request ids, and secrets masked."""

from __future__ import annotations

import json
import logging
import re
import sys
from contextvars import ContextVar
from datetime import datetime, timezone


# Tokens that must never reach a log line, whatever code path produced it (a second line of defence).
_SECRET_PATTERNS = [
    re.compile(r"\b(gh[pousr]_[A-Za-z0-9]{8,}|github_pat_[A-Za-z0-9_]{8,})"),
    re.compile(r"\bsk-[A-Za-z0-9]{8,}"),
    re.compile(r"(?i)(x-api-key|authorization|github_token|password)(['\"]?\s*[:=]\s*['\"]?)([^\s'\",}]+)"),
    re.compile(r"(rediss?://[^:/@\s]*:)([^@\s]+)(@)"),
]
_EXTRA_FIELDS = ("job_id", "request_id", "seq", "event", "method", "route", "path", "status", "duration_ms")
_CLIENT_FIELDS = frozenset({"path", "request_id"})  # extras a client chose: masked like the message

# The request (API) or job (worker task) being handled by this thread; stamped on every record logged meanwhile.
request_id: ContextVar[str | None] = ContextVar("request_id", default=None)
job_id: ContextVar[str | None] = ContextVar("job_id", default=None)


def mask(text: str) -> str:
    """Replace anything that looks like a token, key or password with ***."""
    text = _SECRET_PATTERNS[0].sub("***", text)
    text = _SECRET_PATTERNS[1].sub("***", text)
    text = _SECRET_PATTERNS[2].sub(lambda m: m.group(1) + m.group(2) + "***", text)
    return _SECRET_PATTERNS[3].sub(lambda m: m.group(1) + "***" + m.group(3), text)


class ContextFilter(logging.Filter):
    """Adds the current request id and job id to records that do not carry their own."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in (("request_id", request_id), ("job_id", job_id)):
            value = var.get()
            if value and getattr(record, name, None) is None:
                setattr(record, name, value)
        return True


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "timestamp": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": mask(record.getMessage()),
        }
        for name in _EXTRA_FIELDS:
            if hasattr(record, name):
                value = getattr(record, name)
                entry[name] = mask(value) if name in _CLIENT_FIELDS and isinstance(value, str) else value
        if record.exc_info:
            entry["exception"] = mask(self.formatException(record.exc_info))
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """Plain text, masked, with the job id when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        for name, label in (("job_id", "job"), ("request_id", "request")):
            if getattr(record, name, None):
                line += f" [{label} {getattr(record, name)}]"
        return mask(line)


def setup_logging(level: str, fmt: str) -> None:
    """Route every logger (ours, Celery's, Flask's) through one masked handler on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.captureWarnings(True)  # Python warnings (e.g. Celery's) become records in the same format
    for noisy in ("werkzeug", "engineio.server", "socketio.server", "urllib3"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
