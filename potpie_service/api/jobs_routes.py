"""Job management routes: list (the dead-letter list with ?status=failed), cancel, retry, and the live board."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify, request, send_from_directory

from . import validation
from .errors import ValidationError
from .routes import _ctx, _json_body, _owner

bp = Blueprint("jobs", __name__, static_folder="../static", static_url_path="/static")


@bp.get("/jobs")
def list_jobs() -> Any:
    owner = _owner()
    status, page, per_page = validation.page_query(request.args)
    return jsonify(_ctx().service.list_jobs(owner, status, page, per_page))


@bp.delete("/jobs/<job_id>")
def cancel(job_id: str) -> Any:
    owner = _owner()
    return jsonify(_ctx().service.cancel(owner, validation.check_job_id(job_id)))


@bp.post("/jobs/<job_id>/retry")
def retry(job_id: str) -> Any:
    owner = _owner()
    token = None
    if request.get_data(cache=True):
        body = _json_body()
        if not isinstance(body, dict) or set(body) - {"github_token"}:
            raise ValidationError("the body may only hold github_token", field="body")
        token = validation.analyze_request({"repo": "a/b", "github_token": body.get("github_token")}).github_token
    status, reply = _ctx().service.retry(owner, validation.check_job_id(job_id), token)
    return jsonify(reply), status


@bp.get("/board")
def board() -> Any:
    response = send_from_directory(bp.static_folder, "board.html")
    response.headers["Content-Security-Policy"] = (
        "default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; "
        "frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
    return response
