"""The analysis core: which step comes next, what Potpie's answers mean, and the result built from them.

Plain code on plain dicts: no Flask, Celery or Redis here.
"""

from __future__ import annotations

import json
import re
from enum import Enum
from typing import Any, Mapping

from .model import JobStatus

DEFAULT_QUESTION = "Explain the repository architecture."

STRUCTURED_PROMPT = (
    "Now answer with a structured analysis of this repository as JSON only, in one ```json fenced block, "
    'with this shape: {"overview": string, "architecture": string, "snippets": [{"node_id": '
    '"<file_path>:<line_start>-<line_end>", "file_path": string, "line_start": int, "line_end": int, '
    '"tags": [string], "description": string}], "risks_and_gaps": [string]}. Pick the snippets that '
    "matter most for the question: "
)

# Progress follows Potpie's parse statuses; any status not listed is "still working".
PARSE_PROGRESS = {"submitted": 15, "created": 15, "cloned": 30, "parsed": 45, "processing": 50,
                  "inferring": 55, "ready": 60}
PROGRESS = {
    JobStatus.QUEUED: 0,
    JobStatus.PARSING: 10,
    JobStatus.READY: 65,
    "conversation": 70,
    "answered": 85,
    JobStatus.FINISHED: 100,
}
PARSE_READY = "ready"
PARSE_ERROR = "error"


class Step(str, Enum):
    """The next piece of work for a job, derived from what it already holds."""

    SUBMIT_PARSE = "submit_parse"
    POLL_PARSE = "poll_parse"
    CREATE_CONVERSATION = "create_conversation"
    ASK_QUESTION = "ask_question"
    ASK_STRUCTURED = "ask_structured"
    FINISH = "finish"


def next_step(job: Mapping[str, str]) -> Step:
    """The step to run next: a resumed job continues after its last finished step."""
    if not job.get("potpie_project_id"):
        return Step.SUBMIT_PARSE
    if job.get("parse_status") != PARSE_READY:
        return Step.POLL_PARSE
    if not job.get("conversation_id"):
        return Step.CREATE_CONVERSATION
    if "answer" not in job:
        return Step.ASK_QUESTION
    if "analysis_text" not in job:
        return Step.ASK_STRUCTURED
    return Step.FINISH


def parse_state(status: str) -> JobStatus:
    """The job status a Potpie parse status means: ready, failed (error), else still parsing (any other value,
    including statuses Potpie may add later)."""
    if status == PARSE_READY:
        return JobStatus.READY
    if status == PARSE_ERROR:
        return JobStatus.FAILED
    return JobStatus.PARSING


def parse_progress(status: str, current: int) -> int:
    """Progress for a Potpie parse status; never moves backwards."""
    return max(current, PARSE_PROGRESS.get(status, current + 1 if current < 58 else current))


def question_of(job: Mapping[str, str]) -> str:
    """The user's question, or the default one."""
    return job.get("question") or DEFAULT_QUESTION


def structured_prompt(job: Mapping[str, str]) -> str:
    """The second message: ask for the structured JSON analysis."""
    return STRUCTURED_PROMPT + question_of(job)


_FENCE = re.compile(r"```(?:json|JSON)?\s*\n?(.*?)```", re.DOTALL)


def extract_json(text: str) -> dict[str, Any] | None:
    """The first JSON object in an agent's reply: a fenced block first, else the first {...} that parses."""
    candidates = [m.group(1) for m in _FENCE.finditer(text)]
    candidates.append(text)
    decoder = json.JSONDecoder()
    for candidate in candidates:
        start = candidate.find("{")
        while start != -1:
            try:
                value, _ = decoder.raw_decode(candidate, start)
            except json.JSONDecodeError:
                start = candidate.find("{", start + 1)
                continue
            if isinstance(value, dict):
                return value
            start = candidate.find("{", start + 1)
    return None


def _snippet(raw: Any) -> dict[str, Any] | None:
    if not isinstance(raw, dict) or not raw.get("file_path"):
        return None

    def as_int(value: Any) -> int:
        try:
            return max(0, int(value))
        except (TypeError, ValueError):
            return 0

    start, end = as_int(raw.get("line_start")), as_int(raw.get("line_end"))
    file_path = str(raw["file_path"])
    tags = raw.get("tags") if isinstance(raw.get("tags"), list) else []
    return {
        "node_id": str(raw.get("node_id") or f"{file_path}:{start}-{end}"),
        "file_path": file_path,
        "line_start": start,
        "line_end": max(start, end),
        "tags": [str(t) for t in tags],
        "description": str(raw.get("description") or ""),
    }


def build_result(job: Mapping[str, str], finished_at: str, processing_time_ms: int) -> dict[str, Any]:
    """The finished analysis, as sent in `analysis_complete.data` and `/status` `result`."""
    analysis_text = job.get("analysis_text", "")
    parsed = extract_json(analysis_text)
    raw_snippets = parsed.get("snippets") if parsed else None
    snippets = [s for s in map(_snippet, raw_snippets if isinstance(raw_snippets, list) else []) if s]
    analysis: dict[str, Any]
    if parsed is None:
        analysis = {"parse_error": "the agent's reply held no valid JSON; the raw text is kept",
                    "raw_text": analysis_text}
    else:
        analysis = {k: v for k, v in parsed.items() if k != "snippets"}
    return {
        "project_id": job["id"],
        "potpie_project_id": job.get("potpie_project_id"),
        "repo": job["repo"],
        "branch": job["branch"],
        "question": question_of(job),
        "parsing_status": job.get("parse_status"),
        "answer": job.get("answer", ""),
        "citations": json.loads(job.get("citations") or "[]"),
        "snippets": snippets,
        "snippets_count": len(snippets),
        "analysis_response": analysis,
        "metadata": {
            "parsed_at": job.get("parsed_at"),
            "finished_at": finished_at,
            "processing_time_ms": processing_time_ms,
            "attempts": int(job.get("attempts") or 1),
            "has_github_token": job.get("has_github_token") == "1",
            "job_id": job["id"],
        },
    }


def eta_seconds(status: str, position: int | None, admitted_at: float | None, durations: list[float],
                slots: int, now: float) -> float | None:
    """Seconds until a job should finish, from recent run times; None when unknown or ended."""
    if not durations or status in ("finished", "failed", "cancelled"):
        return None
    mean = sum(durations) / len(durations)
    if status == "queued" and position:
        return round(-(-position // slots) * mean + mean, 1)
    return round(max(1.0, mean - (now - (admitted_at or now))), 1)
