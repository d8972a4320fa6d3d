"""Strict validation of request bodies: type, length and charset of every field; unknown fields refused."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .errors import ValidationError

MAX_BODY_BYTES = 16 * 1024
MAX_QUESTION = 4000
_OWNER = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9]|-(?=[A-Za-z0-9])){0,38}$")
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,100}$")
_TOKEN = re.compile(r"^[A-Za-z0-9_]{1,255}$")
_JOB_ID = re.compile(r"^[a-f0-9]{32}$")
_REF_BAD = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")
FIELDS = ("repo", "branch", "question", "github_token")


@dataclass(frozen=True)
class AnalyzeRequest:
    """A validated `POST /analyze` body."""

    repo: str
    branch: str
    question: str
    github_token: str | None


def _string(body: dict[str, Any], name: str, default: str | None = None) -> str | None:
    value = body.get(name, default)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValidationError(f"{name} must be a string", field=name)
    return value


def check_repo(repo: str | None) -> str:
    """`owner/name` in GitHub's character rules."""
    if not repo:
        raise ValidationError("Missing required parameter: repo", field="repo", example="octocat/Hello-World")
    owner, _, name = repo.strip().partition("/")
    if not _OWNER.match(owner) or not _NAME.match(name) or name in (".", "..") or name.endswith(".git"):
        raise ValidationError("repo must be 'owner/name' (GitHub user or organisation, then repository name)",
                              field="repo", example="octocat/Hello-World")
    return f"{owner}/{name}"


def check_branch(branch: str) -> str:
    """A valid git ref name (git check-ref-format rules)."""
    bad = (not branch or len(branch) > 255 or _REF_BAD.search(branch) or ".." in branch or "@{" in branch
           or "//" in branch or branch == "@" or branch.startswith(("/", ".", "-")) or branch.endswith(("/", ".", ".lock"))
           or any(part.startswith(".") or part.endswith(".lock") for part in branch.split("/")))
    if bad:
        raise ValidationError("branch must be a valid git branch name", field="branch")
    return branch


def check_job_id(job_id: Any) -> str | None:
    """The job id when well-formed, else None."""
    return job_id if isinstance(job_id, str) and _JOB_ID.match(job_id) else None


def analyze_request(body: Any) -> AnalyzeRequest:
    """Validate a `POST /analyze` body."""
    if not isinstance(body, dict):
        raise ValidationError("the body must be a JSON object", field="body")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise ValidationError(f"unknown field: {unknown[0]}", field=unknown[0], allowed=list(FIELDS))
    repo = check_repo(_string(body, "repo"))
    branch = check_branch(_string(body, "branch", "main") or "main")
    question = (_string(body, "question", "") or "").strip()
    if len(question) > MAX_QUESTION:
        raise ValidationError(f"question must be at most {MAX_QUESTION} characters", field="question")
    token = _string(body, "github_token")
    if token is not None and not _TOKEN.match(token):
        raise ValidationError("github_token must be a GitHub token (letters, digits and _ only)",
                              field="github_token")
    return AnalyzeRequest(repo, branch, question, token or None)
