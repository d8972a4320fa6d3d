"""HTTP routes: validate, call one service function, return JSON."""

from __future__ import annotations

import time
from typing import Any

from flask import Blueprint, current_app, jsonify, request

from .. import SERVICE_NAME, __version__
from ..core import submission
from ..core.events import now_iso
from ..health import UNHEALTHY
from . import openapi
from .answers import accepted
from .context import context, json_body, presented_key, require_owner
from .errors import Unauthorized
from .ratelimit import charge, paid, rate_limited

bp = Blueprint("api", __name__)


@bp.get("/")
def index() -> Any:
    return jsonify({"status": "ok", "service": SERVICE_NAME, "version": __version__, "timestamp": now_iso(),
                    "uptime": round(time.time() - context().service.started, 1)})


@bp.get("/livez")
def livez() -> Any:
    return jsonify({"status": "ok"})


@bp.get("/openapi.json")
def openapi_document() -> Any:
    return jsonify(openapi.document())


@bp.get("/metrics")
def metrics() -> Any:
    exporter, key = current_app.extensions["metrics"], presented_key()  # api/metrics.py ApiMetrics
    if not exporter.accepts(key, context().auth.operator(key)):
        raise Unauthorized("Send Authorization: Bearer <METRICS_TOKEN> to read metrics")
    body, content_type = exporter.render()
    return current_app.response_class(body, content_type=content_type)


@bp.get("/readyz")
def readyz() -> Any:
    readiness = context().health.ready()
    body = {"status": "ready" if readiness.ready else "unready", "redis_latency_ms": readiness.latency_ms}
    if not readiness.ready:
        body["reason"] = readiness.reason
    return jsonify(body), 200 if readiness.ready else 503


@bp.get("/health")
def health() -> Any:
    ctx = context()
    operator = ctx.auth.operator(presented_key())
    report = ctx.health.report(ctx.sockets.value, details=operator)
    body = report.body
    if not operator:
        body = {"status": body["status"], "timestamp": body["timestamp"],
                "details": "send an API key for the dependency details"}
    return jsonify(body), 503 if report.status == UNHEALTHY else 200


@bp.post("/analyze")
@rate_limited
def analyze() -> Any:
    owner = require_owner()
    body = submission.analyze_request(json_body())
    key = submission.idempotency_key(request.headers.get("Idempotency-Key"))
    done = context().service.submit(owner, body, key, charge=charge())
    paid(done.rate_counts)
    reply, status = accepted(done)
    return jsonify(reply), status


@bp.get("/status/<job_id>")
def status(job_id: str) -> Any:
    owner = require_owner()
    return jsonify(context().service.status(owner, submission.check_job_id(job_id)))


@bp.get("/queue/stats")
def queue_stats() -> Any:
    if not context().auth.operator(presented_key()):
        raise Unauthorized("A valid API key is required")
    return jsonify(context().service.queue_stats())
