"""Job management routes: list (the dead-letter list with ?status=failed), cancel, retry, and the live board."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flask import Blueprint, jsonify, request, send_from_directory

from ..core import submission
from ..core.errors import ValidationError
from .answers import accepted, cancelled
from .context import context, json_body, require_owner
from .ratelimit import charge, paid, rate_limited

STATIC = str(Path(__file__).resolve().parent.parent / "static")
bp = Blueprint("jobs", __name__, static_folder=STATIC, static_url_path="/static")


@bp.get("/jobs")
def list_jobs() -> Any:
    owner = require_owner()
    status, page, per_page = submission.page_query(request.args)
    return jsonify(context().service.list_jobs(owner, status, page, per_page))


@bp.delete("/jobs/<job_id>")
def cancel(job_id: str) -> Any:
    owner = require_owner()
    return jsonify(cancelled(context().service.cancel(owner, submission.check_job_id(job_id))))


@bp.post("/jobs/<job_id>/retry")
@rate_limited
def retry(job_id: str) -> Any:
    owner = require_owner()
    token = None
    if request.get_data(cache=True):
        body = json_body()
        if not isinstance(body, dict) or set(body) - {"github_token"}:
            raise ValidationError("the body may only hold github_token", field="body")
        token = submission.analyze_request({"repo": "a/b", "github_token": body.get("github_token")}).github_token
    done = context().service.retry(owner, submission.check_job_id(job_id), token, charge=charge())
    paid(done.rate_counts)
    reply, status = accepted(done)
    return jsonify(reply), status


@bp.get("/board")
def board() -> Any:
    response = send_from_directory(STATIC, "board.html")
    response.headers["Content-Security-Policy"] = (
        "default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; "
        "frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
    return response
