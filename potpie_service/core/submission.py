"""What a submission is, and the rules it must meet: type, length and charset of every field, unknown fields
refused (the API checks bodies with these; the OpenAPI document publishes the same patterns)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .errors import ValidationError
from .model import JobStatus

MAX_BODY_BYTES = 16 * 1024
MAX_QUESTION = 4000
# The patterns the OpenAPI document publishes; the server matches them with fullmatch (no trailing-newline gap).
REPO_PATTERN = r"[A-Za-z0-9](?:[A-Za-z0-9]|-(?=[A-Za-z0-9])){0,38}/(?!\.\.?$)(?!.*\.git$)[A-Za-z0-9._-]{1,100}"
# git check-ref-format rules over a conservative charset: no "..", "//", leading "-" or "/", component starting
# with "." or ending with ".lock", trailing "/" or ".", nor the name "@".
BRANCH_PATTERN = (r"(?![-/])(?!@$)(?!.*\.\.)(?!.*//)(?!.*\.lock(?:/|$))(?!(?:.*/)?\.)"
                  r"[A-Za-z0-9._+@/-]{0,254}[A-Za-z0-9_+@-]")
TOKEN_PATTERN = r"[A-Za-z0-9_]{1,255}"
COMMIT_PATTERN = r"[0-9a-fA-F]{7,40}"  # a full or abbreviated commit sha
# any text but control characters (tab, newline, carriage return allowed) and lone surrogates (not UTF-8)
QUESTION_PATTERN = r"[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]*"
_REPO = re.compile(REPO_PATTERN)
_BRANCH = re.compile(BRANCH_PATTERN)
_TOKEN = re.compile(TOKEN_PATTERN)
_COMMIT = re.compile(COMMIT_PATTERN)
_QUESTION = re.compile(QUESTION_PATTERN)
_JOB_ID = re.compile(r"[a-f0-9]{32}")
_FIELD_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# http(s)://host[:port][/path]: an ASCII host name or IPv4 (no credentials), a valid port, printable ASCII after
CALLBACK_URL_PATTERN = (r"https?://[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?"
                        r"(?::(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}"
                        r"|[1-9][0-9]{0,3}))?(?:[/?#][\x21-\x7e]{0,1700})?")
_CALLBACK_URL = re.compile(CALLBACK_URL_PATTERN)
FIELDS = ("repo", "branch", "commit_id", "question", "github_token", "callback_url")
_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,200}$")
LIST_STATUSES = tuple(status.value for status in (JobStatus.FINISHED, JobStatus.FAILED, JobStatus.CANCELLED))


@dataclass(frozen=True)
class AnalyzeRequest:
    """A validated `POST /analyze` body."""

    repo: str
    branch: str
    question: str
    github_token: str | None
    callback_url: str | None = None
    commit_id: str | None = None  # lower-case hex; None: the branch head, pinned by the worker when it can be


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
    if not _REPO.fullmatch(repo):
        raise ValidationError("repo must be 'owner/name' (GitHub user or organisation, then repository name)",
                              field="repo", example="octocat/Hello-World")
    return repo


def check_branch(branch: str) -> str:
    """A valid git branch name (git check-ref-format rules; letters, digits and . _ - / + @)."""
    if not _BRANCH.fullmatch(branch):
        raise ValidationError("branch must be a git branch name of at most 255 characters (letters, digits, "
                              "and . _ - / + @)", field="branch")
    return branch


def check_job_id(job_id: Any) -> str | None:
    """The job id when well-formed, else None."""
    return job_id if isinstance(job_id, str) and _JOB_ID.fullmatch(job_id) else None


def analyze_request(body: Any) -> AnalyzeRequest:
    """Validate a `POST /analyze` body."""
    if not isinstance(body, dict):
        raise ValidationError("the body must be a JSON object", field="body")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        shown = unknown[0] if _FIELD_NAME.fullmatch(unknown[0]) else "(a name that is not shown)"  # no echo
        raise ValidationError(f"unknown field: {shown}", field=shown, allowed=list(FIELDS))
    repo = check_repo(_string(body, "repo"))
    branch = check_branch(_string(body, "branch", "main") or "main")
    question = _string(body, "question", "") or ""
    if len(question) > MAX_QUESTION:
        raise ValidationError(f"question must be at most {MAX_QUESTION} characters", field="question")
    if not _QUESTION.fullmatch(question):
        raise ValidationError("question must not contain control characters (newline and tab are fine)",
                              field="question")
    question = question.strip()
    token = _string(body, "github_token")
    if token is not None and not _TOKEN.fullmatch(token):
        raise ValidationError("github_token must be a GitHub token (letters, digits and _ only)",
                              field="github_token")
    callback_url = _string(body, "callback_url")
    if callback_url is not None and not _CALLBACK_URL.fullmatch(callback_url):
        raise ValidationError("callback_url must be an http(s) URL of at most 2048 characters", field="callback_url")
    commit_id = _string(body, "commit_id")
    if commit_id is not None and not _COMMIT.fullmatch(commit_id):
        raise ValidationError("commit_id must be a commit sha: 7 to 40 hexadecimal characters", field="commit_id")
    return AnalyzeRequest(repo, branch, question, token or None, callback_url or None,
                          commit_id.lower() if commit_id else None)


def idempotency_key(value: str | None) -> str | None:
    """The Idempotency-Key header when present and well-formed (printable ASCII, at most 200 characters)."""
    if value is None:
        return None
    if not _IDEMPOTENCY_KEY.match(value):
        raise ValidationError("Idempotency-Key must be 1-200 printable ASCII characters", field="Idempotency-Key")
    return value


def page_query(args: Any) -> tuple[JobStatus | None, int, int]:
    """(status, page, per_page) from `GET /jobs` query arguments."""
    raw_status = args.get("status") or None
    if raw_status is not None and raw_status not in LIST_STATUSES:
        raise ValidationError(f"status must be one of {', '.join(LIST_STATUSES)}", field="status")
    status = JobStatus(raw_status) if raw_status else None
    numbers = {}
    for name, default, high in (("page", 1, 10_000), ("per_page", 20, 100)):
        raw = args.get(name, str(default))
        if not (raw.isascii() and raw.isdigit() and len(raw) <= 6) or not 1 <= int(raw) <= high:  # "²", 10**5000
            raise ValidationError(f"{name} must be a whole number from 1 to {high}", field=name)
        numbers[name] = int(raw)
    return status, numbers["page"], numbers["per_page"]
