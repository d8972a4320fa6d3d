"""HTTP routes: validate, call one service function, return JSON."""

from __future__ import annotations

import time
from typing import Any

from flask import Blueprint, current_app, g, jsonify, request

from .. import SERVICE_NAME, __version__
from ..events import now_iso
from . import openapi, validation
from .errors import PayloadTooLarge, Unauthorized, UnsupportedMediaType, ValidationError

bp = Blueprint("api", __name__)


def _ctx() -> Any:
    return current_app.extensions["potpie"]


def presented_key() -> str | None:
    """The API key from `Authorization: Bearer` or `X-API-Key`."""
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return request.headers.get("X-API-Key")


def _owner() -> str:
    owner = _ctx().auth.owner(presented_key())
    if owner is None:
        raise Unauthorized("A valid API key is required (Authorization: Bearer <key> or X-API-Key)")
    g.owner = owner
    return owner


def _json_body() -> Any:
    if request.content_length is not None and request.content_length > validation.MAX_BODY_BYTES:
        raise PayloadTooLarge(f"the body must be at most {validation.MAX_BODY_BYTES} bytes", field="body")
    if not request.is_json:
        raise UnsupportedMediaType("the body must be JSON (Content-Type: application/json)", field="body")
    raw = request.get_data(cache=True)
    if len(raw) > validation.MAX_BODY_BYTES:
        raise PayloadTooLarge(f"the body must be at most {validation.MAX_BODY_BYTES} bytes", field="body")
    try:
        body = request.get_json(silent=True)
    except RecursionError:  # json's C decoder recurses: thousands of nested brackets fit in 16 KiB
        body = None
    if body is None:
        raise ValidationError("the body is not valid JSON (or nested too deeply)", field="body")
    return body


@bp.get("/")
def index() -> Any:
    return jsonify({"status": "ok", "service": SERVICE_NAME, "version": __version__, "timestamp": now_iso(),
                    "uptime": round(time.time() - _ctx().service.started, 1)})


@bp.get("/livez")
def livez() -> Any:
    return jsonify({"status": "ok"})


@bp.get("/openapi.json")
def openapi_document() -> Any:
    return jsonify(openapi.document())


@bp.get("/metrics")
def metrics() -> Any:
    exporter, key = current_app.extensions["metrics"], presented_key()
    if not exporter.accepts(key, _ctx().auth.operator(key)):
        raise Unauthorized("Send Authorization: Bearer <METRICS_TOKEN> to read metrics")
    body, content_type = exporter.render()
    return current_app.response_class(body, content_type=content_type)


@bp.get("/health")
def health() -> Any:
    ctx = _ctx()
    status, body = ctx.service.health(ctx.sockets.value)
    if not ctx.auth.operator(presented_key()):
        body = {"status": body["status"], "timestamp": body["timestamp"],
                "details": "send an API key for the dependency details"}
    return jsonify(body), status


@bp.post("/analyze")
def analyze() -> Any:
    owner = _owner()
    body = validation.analyze_request(_json_body())
    key = validation.idempotency_key(request.headers.get("Idempotency-Key"))
    status, reply = _ctx().service.submit(owner, body, key)
    return jsonify(reply), status


@bp.get("/status/<job_id>")
def status(job_id: str) -> Any:
    owner = _owner()
    return jsonify(_ctx().service.status(owner, validation.check_job_id(job_id)))


@bp.get("/queue/stats")
def queue_stats() -> Any:
    if not _ctx().auth.operator(presented_key()):
        raise Unauthorized("A valid API key is required")
    return jsonify(_ctx().service.queue_stats())
