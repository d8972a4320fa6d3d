"""The analysis core: which step comes next, what Potpie's answers mean, and the result built from them."""

from __future__ import annotations

import json
import math
import re
from enum import Enum
from typing import Any

from .job import Job
from .model import (DEFAULT_PARSE_SECONDS, FIRST_POLL_S, MIN_POLL_GAP_S, PARSE_ERROR, PARSE_PROGRESS, PARSE_READY,
                    POLL_SHARE, JobStatus, Stage)

DEFAULT_QUESTION = "Explain the repository architecture."

STRUCTURED_PROMPT = (
    "Now answer with a structured analysis of this repository as JSON only, in one ```json fenced block, "
    'with this shape: {"overview": string, "architecture": string, "snippets": [{"node_id": '
    '"<file_path>:<line_start>-<line_end>", "file_path": string, "line_start": int, "line_end": int, '
    '"tags": [string], "description": string}], "risks_and_gaps": [string]}. Pick the snippets that '
    "matter most for the question: "
)


class Step(str, Enum):
    """The next piece of work for a job, derived from what it already holds."""

    SUBMIT_PARSE = "submit_parse"
    POLL_PARSE = "poll_parse"
    CREATE_CONVERSATION = "create_conversation"
    ASK_QUESTION = "ask_question"
    ASK_STRUCTURED = "ask_structured"
    FINISH = "finish"


def next_step(job: Job) -> Step:
    """The step to run next: a resumed job continues after its last finished step."""
    if not job.potpie_project_id:
        return Step.SUBMIT_PARSE
    if job.parse_status != PARSE_READY:
        return Step.POLL_PARSE
    if not job.conversation_id:
        return Step.CREATE_CONVERSATION
    if job.answer is None:
        return Step.ASK_QUESTION
    if job.analysis_text is None:
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


def parse_identity(job: Job) -> str:
    """The Potpie project a job needs, as Potpie finds one: the exact repository name, then the commit when one is
    sent, else the branch (jobs with the same identity share one parse: store/flights.py)."""
    return f"{job.repo}@{job.commit_id}" if job.commit_id else f"{job.repo}@branch:{job.branch}"


def poll_delay(elapsed: float, interval: float, spacing: float = 0.0) -> float:
    """Seconds until the next poll of a parse `elapsed` seconds old. The first comes at FIRST_POLL_S; the next ones
    are MIN_POLL_GAP_S apart, then POLL_SHARE of the parse's age apart, so a job waits for its next poll at most 7%
    of the time Potpie took (plus a fixed half second); once that gap reaches POTPIE_POLL_INTERVAL (at 71 s for 5 s)
    they keep to the interval's grid from the parse's start, as a fixed interval would: a long parse costs Potpie
    the same polls a minute as before, and its first minute ~46 instead of 12.
    `spacing`: the least gap the poller's load allows (parses it polls / MAX_POLLS_PER_SECOND); when it is wider
    than the gap above, the polls keep to its grid instead, never wider than the interval's: a worker polling a
    thousand parses polls each as a fixed interval would, rather than spend its CPU on polls."""
    if elapsed < FIRST_POLL_S:
        return min(FIRST_POLL_S - elapsed, interval) or FIRST_POLL_S
    gap = max(MIN_POLL_GAP_S, POLL_SHARE * elapsed)
    step = min(spacing, interval)
    if gap < interval and gap >= step:
        return gap
    step = interval if gap >= interval else step
    grid = (math.floor(elapsed / step + 1e-9) + 1) * step - elapsed  # to the next multiple of step
    return grid if grid >= min(MIN_POLL_GAP_S, step) else grid + step


ESTIMATE_STEP = 4  # an estimate moves in steps: no news (a commit, an event) for every poll's fraction of a point


def parse_progress(status: str, current: int, elapsed: float, expected: float | None) -> tuple[int, bool]:
    """(progress, whether it is an estimate) for a parse still running. A status that says how far it is (an older
    server's cloned/parsed/inferring) gives its stage; Potpie's `submitted`, or any status it may add, says
    nothing, so the time spent against the mean of recent parses (`expected`, s) moves it along a curve that
    slows as it nears PARSE_DONE and never reaches it. Never moves backwards."""
    known = PARSE_PROGRESS.get(status, 0)
    told = status not in ("submitted", "created") and status in PARSE_PROGRESS
    span = Stage.PARSE_DONE - 1 - PARSE_PROGRESS["submitted"]
    fraction = 1 - math.exp(-max(0.0, elapsed) / (expected or DEFAULT_PARSE_SECONDS))
    estimate = PARSE_PROGRESS["submitted"] + int(span * fraction) // ESTIMATE_STEP * ESTIMATE_STEP
    progress = max(current, known if told else max(known, estimate))
    return progress, not told


def question_of(job: Job) -> str:
    """The user's question, or the default one."""
    return job.question or DEFAULT_QUESTION


def structured_prompt(job: Job) -> str:
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
    given = raw.get("tags")
    tags = given if isinstance(given, list) else []
    return {
        "node_id": str(raw.get("node_id") or f"{file_path}:{start}-{end}"),
        "file_path": file_path,
        "line_start": start,
        "line_end": max(start, end),
        "tags": [str(t) for t in tags],
        "description": str(raw.get("description") or ""),
    }


_CITED = re.compile(r"(?<![\w/.-])((?:[\w.-]+/)+[\w.-]+\.[A-Za-z0-9]{1,10})(?![\w/])")


def cited_files(text: str) -> list[str]:
    """File paths an answer names (`src/app.py`), in order: Potpie's server fills no citations (§8.4), so the files
    an answer rests on appear only in its text."""
    return list(dict.fromkeys(match.rstrip(".") for match in _CITED.findall(text)))


def commit_info(job: Job) -> dict[str, Any]:
    """The commit the analysis is about: pinned by the request or read from GitHub, or why none could be."""
    pinned = job.commit_source in ("request", "github")
    return {"id": job.commit_id or None, "pinned": pinned, "source": job.commit_source if pinned else None,
            "note": job.commit_note or None}


def build_result(job: Job, finished_at: str, processing_time_ms: int) -> dict[str, Any]:
    """The finished analysis, as sent in `analysis_complete.data` and `/status` `result`."""
    analysis_text = job.analysis_text or ""
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
        "project_id": job.id,
        "potpie_project_id": job.potpie_project_id or None,
        "repo": job.repo,
        "branch": job.branch,
        "commit_id": job.commit_id or None,
        "commit": commit_info(job),
        "question": question_of(job),
        "parsing_status": job.parse_status or None,
        "answer": job.answer or "",
        "citations": job.citations,
        "snippets": snippets,
        "snippets_count": len(snippets),
        "analysis_response": analysis,
        "metadata": {
            "parsed_at": job.parsed_at or None,
            "finished_at": finished_at,
            "processing_time_ms": processing_time_ms,
            "attempts": job.attempts or 1,
            "has_github_token": job.has_github_token,
            "potpie_calls": dict(job.potpie_calls),
            "job_id": job.id,
        },
    }


def eta_seconds(status: JobStatus, position: int | None, admitted_at: float | None, durations: list[float],
                slots: int, now: float) -> float | None:
    """Seconds until a job should finish, from recent run times; None when unknown or ended."""
    if not durations or status.terminal:
        return None
    mean = sum(durations) / len(durations)
    if status is JobStatus.QUEUED and position:
        return round(-(-position // slots) * mean + mean, 1)
    return round(max(1.0, mean - (now - (admitted_at or now))), 1)
