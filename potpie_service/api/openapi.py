"""The OpenAPI 3 document of the HTTP API, served at `GET /openapi.json`; the one place every route is described.

To document a new endpoint, add it to `PATHS` with `_op(...)`, reusing the schemas in `SCHEMAS`
and the error responses from `_errors(...)`.
"""

from __future__ import annotations

import copy
from typing import Any

from .. import SERVICE_NAME, __version__
from ..core.model import JobStatus
from ..core.submission import (BRANCH_PATTERN, CALLBACK_URL_PATTERN, COMMIT_PATTERN, LIST_STATUSES, MAX_BODY_BYTES,
                               MAX_QUESTION, QUESTION_PATTERN, REPO_PATTERN, TOKEN_PATTERN)

Schema = dict[str, Any]

_TIMESTAMP: Schema = {"type": "string", "format": "date-time"}
_JOB_ID: Schema = {"type": "string", "pattern": "^[a-f0-9]{32}$", "example": "3f2b6c0e9a1d4e5f8a7b6c5d4e3f2a1b"}
_NULLABLE_STR: Schema = {"type": ["string", "null"]}
_COUNT: Schema = {"type": "integer", "minimum": 0}
_COMMIT: Schema = {
    "type": ["object", "null"], "required": ["id", "pinned", "source", "note"],
    "description": "The commit analysed: pinned by the request (`request`) or read from GitHub (`github`), or not "
                   "pinned (`note` says why: Potpie then analyses the branch as it already holds it)",
    "properties": {"id": _NULLABLE_STR, "pinned": {"type": "boolean"},
                   "source": {"enum": ["request", "github", None]}, "note": _NULLABLE_STR}}
_CALLS: Schema = {"type": "object", "additionalProperties": _COUNT,
                  "description": "Potpie requests made for the job, by endpoint (retries included)"}

SCHEMAS: dict[str, Schema] = {
    "Error": {
        "type": "object", "required": ["success", "error", "details"],
        "properties": {
            "success": {"const": False},
            "error": {"type": "string", "description": "What went wrong, for people"},
            "details": {"type": "object", "description": "`field` names the offending input when there is one",
                        "properties": {"field": {"type": "string"}}},
        },
    },
    "AnalyzeRequest": {
        "type": "object", "required": ["repo"], "additionalProperties": False,
        "properties": {
            "repo": {"type": "string", "pattern": f"^{REPO_PATTERN}$", "example": "octocat/Hello-World",
                     "description": "GitHub `owner/name`"},
            "branch": {"type": ["string", "null"], "pattern": f"^(?:{BRANCH_PATTERN})?$", "default": "main",
                       "description": "A git branch name (git check-ref-format rules; letters, digits and "
                                      ". _ - / + @; at most 255); empty or null means main"},
            "commit_id": {"type": ["string", "null"], "pattern": f"^{COMMIT_PATTERN}$",
                          "description": "The commit to analyse (7-40 hex digits), forwarded to Potpie; without "
                                         "it the worker pins the branch head when a GitHub token is at hand"},
            "question": {"type": ["string", "null"], "maxLength": MAX_QUESTION, "default": "",
                         "pattern": f"^{QUESTION_PATTERN}$",
                         "description": "What to ask about the code; no control characters but tab and newline"},
            "github_token": {"type": ["string", "null"], "pattern": f"^{TOKEN_PATTERN}$", "writeOnly": True,
                             "description": "Reads the branch head from GitHub to pin the commit; not sent to "
                                            "Potpie (unless POTPIE_FORWARD_GITHUB_TOKEN). Encrypted at rest, "
                                            "readable only by the worker, deleted when the job ends; never "
                                            "returned, logged or queued in plaintext"},
            "callback_url": {"type": ["string", "null"], "pattern": f"^{CALLBACK_URL_PATTERN}$",
                             "description": "A webhook called when the job ends: http(s), an ASCII host name or "
                                            "IPv4 address resolving to public addresses only, no credentials"},
        },
    },
    "Accepted": {
        "type": "object",
        "required": ["success", "project_id", "job_id", "status", "message", "status_url", "queue_position",
                     "timestamp"],
        "properties": {
            "success": {"const": True}, "project_id": _JOB_ID, "job_id": _JOB_ID,
            "status": {"enum": [status.value for status in JobStatus]}, "message": {"type": "string"},
            "websocket_endpoint": {"type": "string"},
            "socketio": {"type": "object", "properties": {
                "path": {"type": "string"}, "join_event": {"type": "string"}, "room_id": _JOB_ID}},
            "status_url": {"type": "string"}, "queue_position": {"type": ["integer", "null"], "minimum": 0},
            "eta_seconds": {"type": ["number", "null"], "minimum": 0}, "timestamp": _TIMESTAMP,
            "deduplicated": {"const": True}, "idempotent_replay": {"const": True},
        },
    },
    "JobStatus": {
        "type": "object",
        "required": ["success", "project_id", "job_id", "status", "progress", "queue_position", "attempts",
                     "max_attempts", "repo", "branch", "details", "timestamp"],
        "properties": {
            "success": {"const": True}, "project_id": _JOB_ID, "job_id": _JOB_ID,
            "status": {"enum": [status.value for status in JobStatus]},
            "message": _NULLABLE_STR, "progress": {"type": "integer", "minimum": 0, "maximum": 100},
            "queue_position": {"type": ["integer", "null"], "minimum": 0,
                               "description": "Place in line while queued (0: starting), else null"},
            "eta_seconds": {"type": ["number", "null"], "minimum": 0},
            "attempts": _COUNT, "max_attempts": _COUNT, "potpie_project_id": _NULLABLE_STR,
            "repo": {"type": "string"}, "branch": {"type": "string"}, "commit_id": _NULLABLE_STR,
            "commit": _COMMIT, "potpie_calls": _CALLS,
            "progress_estimated": {"const": True, "description": "While parsing: the progress is estimated from "
                                                                 "the time spent against recent parses"},
            "details": {"type": "object", "required": ["created_at", "processed_at", "finished_at", "failed_reason"],
                        "properties": {"created_at": _NULLABLE_STR, "processed_at": _NULLABLE_STR,
                                       "finished_at": _NULLABLE_STR, "failed_reason": _NULLABLE_STR}},
            "result": {"$ref": "#/components/schemas/Result"},
            "timestamp": _TIMESTAMP,
        },
    },
    "Result": {
        "type": "object", "description": "Present once the job finished",
        "required": ["project_id", "repo", "branch", "answer", "citations", "snippets", "snippets_count",
                     "analysis_response", "metadata"],
        "properties": {
            "project_id": _JOB_ID, "potpie_project_id": _NULLABLE_STR, "repo": {"type": "string"},
            "branch": {"type": "string"}, "commit_id": _NULLABLE_STR, "commit": _COMMIT,
            "question": {"type": "string"}, "parsing_status": _NULLABLE_STR,
            "answer": {"type": "string"}, "citations": {"type": "array", "items": {"type": "string"}},
            "snippets": {"type": "array", "items": {"type": "object"}}, "snippets_count": _COUNT,
            "analysis_response": {"type": "object"}, "metadata": {"type": "object"},
        },
    },
    "QueueStats": {
        "type": "object",
        "required": ["queue_name", "stats", "worker_status", "workers", "max_concurrency", "max_retries",
                     "timestamp"],
        "properties": {
            "queue_name": {"type": "string"},
            "stats": {"type": "object", "additionalProperties": _COUNT,
                      "required": ["waiting", "active", "completed", "failed", "total"]},
            "worker_status": {"enum": ["running", "stopped"]}, "workers": _COUNT,
            "max_concurrency": _COUNT, "max_retries": _COUNT, "timestamp": _TIMESTAMP,
        },
    },
    "Health": {
        "type": "object", "required": ["status", "timestamp"],
        "description": "Without an API key only `status`, `timestamp` and a hint in `details`",
        "properties": {
            "status": {"enum": ["ok", "degraded", "unhealthy"]}, "timestamp": _TIMESTAMP,
            "details": {"type": "string"}, "service": {"type": "string"}, "version": {"type": "string"},
            "degraded": {"type": "array", "items": {"type": "string"}}, "checks": {"type": "object"},
            "websocket_connections": _COUNT, "auth": {"enum": ["enabled", "disabled"]},
            "uptime": {"type": "number", "minimum": 0},
        },
    },
    "Info": {
        "type": "object", "required": ["status", "service", "version", "timestamp", "uptime"],
        "properties": {"status": {"const": "ok"}, "service": {"type": "string"}, "version": {"type": "string"},
                       "timestamp": _TIMESTAMP, "uptime": {"type": "number", "minimum": 0}},
    },
    "Live": {"type": "object", "required": ["status"], "properties": {"status": {"const": "ok"}}},
    "Ready": {
        "type": "object", "required": ["status", "redis_latency_ms"],
        "properties": {"status": {"enum": ["ready", "unready"]}, "redis_latency_ms": {"type": "number", "minimum": 0},
                       "reason": {"type": "string"}},
    },
    "JobSummary": {
        "type": "object", "required": ["job_id", "project_id", "repo", "branch", "status", "progress", "attempts"],
        "properties": {
            "job_id": _JOB_ID, "project_id": _JOB_ID, "repo": {"type": "string"}, "branch": {"type": "string"},
            "question": {"type": "string"}, "status": {"enum": [status.value for status in JobStatus]},
            "progress": {"type": "integer", "minimum": 0, "maximum": 100},
            "queue_position": {"type": ["integer", "null"], "minimum": 0},
            "eta_seconds": {"type": ["number", "null"], "minimum": 0}, "attempts": _COUNT,
            "created_at": _NULLABLE_STR, "finished_at": _NULLABLE_STR, "failed_reason": _NULLABLE_STR,
            "retry_of": {"anyOf": [_JOB_ID, {"type": "null"}]},
        },
    },
    "JobList": {
        "type": "object", "required": ["success", "jobs", "page", "per_page", "total", "status", "timestamp"],
        "properties": {
            "success": {"const": True}, "jobs": {"type": "array", "items": {"$ref": "#/components/schemas/JobSummary"}},
            "page": {"type": "integer", "minimum": 1}, "per_page": {"type": "integer", "minimum": 1, "maximum": 100},
            "total": _COUNT, "status": {"enum": [*LIST_STATUSES, None]}, "timestamp": _TIMESTAMP,
        },
    },
    "Cancelled": {
        "type": "object", "required": ["success", "project_id", "job_id", "status", "timestamp"],
        "properties": {"success": {"const": True}, "project_id": _JOB_ID, "job_id": _JOB_ID,
                       "status": {"const": JobStatus.CANCELLED.value}, "timestamp": _TIMESTAMP},
    },
    "RetryRequest": {
        "type": "object", "additionalProperties": False,
        "properties": {"github_token": {"type": ["string", "null"], "pattern": f"^{TOKEN_PATTERN}$",
                                        "writeOnly": True, "description": "Required if the failed job had one"}},
    },
}

_ERROR_TEXT = {
    400: "Invalid input; `details.field` names the field", 401: "No valid API key",
    409: "Conflicts with the job's state, or an Idempotency-Key reused with a different request",
    404: "No such job for this API key (other owners' jobs look the same as missing ones)",
    413: f"Body over {MAX_BODY_BYTES} bytes", 415: "Body is not JSON", 429: "Over RATE_LIMIT for this key or IP",
    503: "Redis (the job store or queue) is unreachable",
}
_RETRY_AFTER = {"Retry-After": {"description": "Seconds until the limit resets", "schema": {"type": "string"}}}


def _json(schema: str, description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"description": description, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}
    if headers:
        body["headers"] = headers
    return body


def _errors(*codes: int) -> dict[str, Any]:
    return {str(code): _json("Error", _ERROR_TEXT[code], _RETRY_AFTER if code == 429 else None) for code in codes}


def _op(summary: str, responses: dict[str, Any], secured: bool = True, **extra: Any) -> dict[str, Any]:
    operation: dict[str, Any] = {"summary": summary, "responses": responses, **extra}
    if not secured:
        operation["security"] = []
    return operation


_JOB_ID_PARAM = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"},
                 "description": "The id returned by POST /analyze (32 hex digits)"}
_JSON_BODY = "Body over 16 KiB (413) or not JSON (415) are refused as for POST /analyze"


def _query(name: str, schema: Schema, description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


def _raw(media_type: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {media_type: {"schema": {"type": "string"}}}}

PATHS: dict[str, Any] = {
    "/": {"get": _op("Service name, version and uptime", {"200": _json("Info", "Running")}, secured=False)},
    "/livez": {"get": _op("Liveness probe", {"200": _json("Live", "The process answers")}, secured=False)},
    "/readyz": {"get": _op(
        "Readiness probe: this process's Redis answers a PING within 0.5 s (workers do not count)",
        {"200": _json("Ready", "Ready to serve"), "503": _json("Ready", "Redis does not answer; `reason` says how")},
        secured=False)},
    "/health": {"get": _op(
        "Every dependency's state; details only with an API key (client or ops)",
        {"200": _json("Health", "ok, or degraded: no worker alive, Potpie unreachable or too few Redis replicas"),
         "503": _json("Health", "unhealthy: Redis unreachable (or not the master)")},
        security=[{}, {"bearer": []}, {"apiKey": []}])},
    "/analyze": {"post": _op(
        "Queue an analysis of a GitHub repository",
        {"202": _json("Accepted", "Queued; follow it on Socket.IO (join_project) or GET /status/{job_id}"),
         "200": _json("Accepted", "An existing job: a repeated Idempotency-Key or a duplicate request"),
         **_errors(400, 401, 409, 413, 415, 429, 503)},
        parameters=[{"name": "Idempotency-Key", "in": "header", "required": False,
                     "schema": {"type": "string", "pattern": "^[\x21-\x7e]{1,200}$"}}],
        requestBody={"required": True, "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/AnalyzeRequest"}}}})},
    "/status/{job_id}": {"get": _op(
        "A job's status, progress and, once finished, its result",
        {"200": _json("JobStatus", "The job"), **_errors(401, 404, 503)}, parameters=[_JOB_ID_PARAM])},
    "/queue/stats": {"get": _op("Queue counts and live workers",
                                {"200": _json("QueueStats", "Counts"), **_errors(401, 503)})},
    "/openapi.json": {"get": _op("This document", {"200": {
        "description": "OpenAPI 3.1", "content": {"application/json": {"schema": {"type": "object"}}}}},
        secured=False)},
    "/metrics": {"get": _op(
        "Prometheus metrics (METRICS_TOKEN, an ops key or a client key as bearer)",
        {"200": _raw("text/plain", "Prometheus text exposition format"), **_errors(401)})},
    "/jobs": {"get": _op(
        "The caller's jobs, newest first; ?status=failed is the dead-letter list",
        {"200": _json("JobList", "A page of jobs"), **_errors(400, 401, 503)},
        parameters=[_query("status", {"enum": [*LIST_STATUSES, ""]}, "Only jobs that ended this way (empty: all)"),
                    _query("page", {"type": "integer", "minimum": 1, "maximum": 10_000, "default": 1}, "1-based"),
                    _query("per_page", {"type": "integer", "minimum": 1, "maximum": 100, "default": 20},
                           "Jobs per page")])},
    "/jobs/{job_id}": {"delete": _op(
        "Cancel a queued or running job",
        {"200": _json("Cancelled", "Cancelled; its room gets the final event"), **_errors(401, 404, 409, 503)},
        parameters=[_JOB_ID_PARAM])},
    "/jobs/{job_id}/retry": {"post": _op(
        "Run a failed or cancelled job again as a new job that keeps the history",
        {"202": _json("Accepted", "The new job, queued"), "200": _json("Accepted", "An existing identical job"),
         **_errors(400, 401, 404, 409, 413, 415, 429, 503)},
        parameters=[_JOB_ID_PARAM], description=_JSON_BODY,
        requestBody={"required": False, "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/RetryRequest"}}}})},
    "/board": {"get": _op("The live job board (HTML; the page asks for an API key)",
                          {"200": _raw("text/html", "The page")}, secured=False)},
    "/static/{filename}": {"get": _op(
        "The board's static files", {"200": {"description": "The file"}, **_errors(404)}, secured=False,
        parameters=[{"name": "filename", "in": "path", "required": True, "schema": {"type": "string"}}])},
}


def document() -> dict[str, Any]:
    """The whole OpenAPI document (a fresh copy)."""
    return copy.deepcopy({
        "openapi": "3.1.0",
        "info": {"title": SERVICE_NAME, "version": __version__,
                 "description": "Analyse GitHub repositories through Potpie.ai. Live updates over Socket.IO at "
                                "/socket.io/ (auth payload {token}; events joined with join_project)."},
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}, {"apiKey": []}],
        "paths": PATHS,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer <key>"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            },
        },
    })
