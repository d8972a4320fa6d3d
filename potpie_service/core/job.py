"""The job record: one typed value for a job's Redis hash, converted to and from the hash in one place.

The field names are the hash's field names. A change to a job is a `JobUpdate`: a TypedDict of the same fields,
so mypy refuses a misspelt or mistyped one where the code is written; `to_hash` turns either into the strings
Redis stores and checks every name again at run time.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any, Mapping, TypedDict

from .model import JobStatus


@dataclass
class Job:
    """A job as the store holds it."""

    id: str
    owner: str = ""
    repo: str = ""
    branch: str = "main"
    question: str = ""
    status: JobStatus = JobStatus.QUEUED
    progress: int = 0
    message: str = ""
    attempts: int = 0
    max_attempts: int = 0
    created_at: str = ""
    created_ts: float = 0.0
    seq: int = 0  # the step a delivery must carry to run (bumped by every committed step)
    event_seq: int = 0  # the last event's seq (the store takes it when it publishes)
    has_github_token: bool = False
    callback_url: str = ""
    retry_of: str = ""
    history: list[str] = field(default_factory=list)
    # what Potpie holds for it
    potpie_project_id: str = ""
    parse_status: str = ""
    parse_started_at: float = 0.0
    parse_requested: bool = False  # a parse request was sent: a resumed job looks the project up first
    parsed_at: str = ""
    commit_id: str = ""  # the commit analysed: the request's, or the branch head read from GitHub
    commit_source: str = ""  # request | github | none (could not pin; commit_note says why); "": not decided yet
    commit_note: str = ""
    progress_estimated: bool = False  # progress comes from the time spent against recent parses, not from Potpie
    conversation_id: str = ""
    agent_session: str = ""  # the agent run (session_id) in flight, to stop; "" when none
    answer: str | None = None  # None: not asked yet ("" is an answer)
    citations: list[str] = field(default_factory=list)
    analysis_text: str | None = None  # None: not asked yet
    result: dict[str, Any] | None = None
    potpie_calls: dict[str, int] = field(default_factory=dict)  # Potpie requests made for it, by endpoint
    # its life
    processed_at: str = ""
    finished_at: str = ""
    failed_reason: str = ""
    last_error: str = ""
    cancelled_by: str = ""
    next_due: float = 0.0  # when its next step is due (the sweeper revives it when it is long overdue)
    status_since: float = 0.0
    admitted_at: float = 0.0
    # its webhook
    webhook_status: str = ""
    webhook_attempts: int = 0
    webhook_error: str = ""

    @classmethod
    def from_hash(cls, raw: Mapping[str, str]) -> "Job":
        """The job a Redis hash holds (fields the store keeps for itself, like `ticket`, are left out)."""
        values: dict[str, Any] = {}
        for name, kind in _KINDS.items():
            if name in raw:
                values[name] = _parse(kind, raw[name])
        return cls(**values)

    def to_hash(self) -> dict[str, str]:
        """Every field that has a value, as the store writes it (None: not written, so it stays None)."""
        return to_hash({name: value for name in _KINDS if (value := getattr(self, name)) is not None})

    def apply(self, update: JobUpdate) -> "Job":
        """Take the update's values (the job as it is once the update is committed); returns the job."""
        for name, value in update.items():
            _kind(name)
            setattr(self, name, value)
        return self

    @property
    def terminal(self) -> bool:
        """Whether the job has ended for good."""
        return self.status.terminal


class JobUpdate(TypedDict, total=False):
    """A change to a job: any of Job's fields but its id, each with its type (tests/test_core.py keeps the two in
    step)."""

    owner: str
    repo: str
    branch: str
    question: str
    status: JobStatus
    progress: int
    message: str
    attempts: int
    max_attempts: int
    created_at: str
    created_ts: float
    seq: int
    event_seq: int
    has_github_token: bool
    callback_url: str
    retry_of: str
    history: list[str]
    potpie_project_id: str
    parse_status: str
    parse_started_at: float
    parse_requested: bool
    parsed_at: str
    commit_id: str
    commit_source: str
    commit_note: str
    progress_estimated: bool
    conversation_id: str
    agent_session: str
    answer: str
    citations: list[str]
    analysis_text: str
    result: dict[str, Any]
    potpie_calls: dict[str, int]
    processed_at: str
    finished_at: str
    failed_reason: str
    last_error: str
    cancelled_by: str
    next_due: float
    status_since: float
    admitted_at: float
    webhook_status: str
    webhook_attempts: int
    webhook_error: str


@dataclass(frozen=True)
class Change:
    """What a job just went through, for observers (metrics, webhooks): a move into a new state, or its end."""

    ended: bool
    job: Job  # as it is now
    previous: JobStatus  # the state it left
    previous_since: float  # when it entered that state (0: not recorded; its submission, then)

    @property
    def time_in_previous(self) -> float:
        """Seconds the job spent in the state it left."""
        return max(0.0, time.time() - (self.previous_since or self.job.created_ts))


def to_hash(update: Mapping[str, Any]) -> dict[str, str]:
    """An update as the strings Redis stores; a name that is no field of Job is an error (KeyError), and None
    cannot be written (a field once set is never unset)."""
    if any(value is None for value in update.values()):
        raise ValueError("a job update cannot write None")
    return {name: _text(_kind(name), value) for name, value in update.items()}


def _kind(name: str) -> str:
    try:
        return _KINDS[name]
    except KeyError:
        raise KeyError(f"Job has no field {name!r}") from None


def _text(kind: str, value: Any) -> str:
    if kind == "bool":
        return "1" if value else "0"
    if kind in ("list", "dict"):
        return json.dumps(value)
    if isinstance(value, Enum):
        return str(value.value)
    return str(value)


def _parse(kind: str, raw: str) -> Any:
    if kind == "int":
        return int(float(raw)) if raw else 0
    if kind == "float":
        return float(raw) if raw else 0.0
    if kind == "bool":
        return raw == "1"
    if kind == "status":
        return JobStatus(raw)
    if kind in ("list", "dict"):
        return json.loads(raw) if raw else ([] if kind == "list" else None)  # a dict field once written holds {}
    return raw


def _kind_of(annotation: str) -> str:
    for kind in ("JobStatus", "bool", "int", "float", "list", "dict"):
        if annotation.startswith(kind):
            return "status" if kind == "JobStatus" else kind
    return "str"


_KINDS = {f.name: _kind_of(str(f.type)) for f in fields(Job)}
