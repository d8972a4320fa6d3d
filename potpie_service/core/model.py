"""Job statuses, their allowed transitions, the progress each stage stands for and the texts users see."""

from __future__ import annotations

from enum import Enum


class JobStatus(str, Enum):
    """Where a job is in its life."""

    QUEUED = "queued"
    PARSING = "parsing"
    READY = "ready"
    PROCESSING_CONVERSATIONS = "processing_conversations"
    RETRYING = "retrying"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        """Whether the job has ended for good."""
        return self in TERMINAL


TERMINAL = frozenset({JobStatus.FINISHED, JobStatus.FAILED, JobStatus.CANCELLED})

_WORKING = {JobStatus.PARSING, JobStatus.READY, JobStatus.PROCESSING_CONVERSATIONS}
# Potpie answers a parse request with `ready` at once when it already holds the repository at that branch (a
# second question about the same repository), so a queued job may go straight to ready: parsing is Potpie's work,
# and none was needed. Within parsing any Potpie status may follow any other (a re-parse goes back to submitted).
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.PARSING, JobStatus.READY, JobStatus.RETRYING, *TERMINAL}),
    JobStatus.PARSING: frozenset({JobStatus.PARSING, JobStatus.READY, JobStatus.RETRYING, *TERMINAL}),
    JobStatus.READY: frozenset({JobStatus.PROCESSING_CONVERSATIONS, JobStatus.RETRYING, *TERMINAL}),
    JobStatus.PROCESSING_CONVERSATIONS: frozenset({JobStatus.PROCESSING_CONVERSATIONS, JobStatus.RETRYING,
                                                   *TERMINAL}),
    JobStatus.RETRYING: frozenset({JobStatus.RETRYING, *_WORKING, *TERMINAL}),
    JobStatus.FINISHED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
}

MESSAGES = {
    JobStatus.QUEUED: "Repository analysis queued. Connect to Socket.IO and join the project for live updates.",
    JobStatus.PARSING: "Repository parsing in progress...",
    JobStatus.READY: "Parsing completed, starting conversations...",
    JobStatus.PROCESSING_CONVERSATIONS: "Asking Potpie's codebase agent...",
    JobStatus.RETRYING: "Attempt failed, retrying...",
    JobStatus.FINISHED: "Analysis completed successfully.",
    JobStatus.FAILED: "Analysis failed.",
    JobStatus.CANCELLED: "Analysis cancelled.",
}


def can_move(current: JobStatus, new: JobStatus) -> bool:
    """Whether a job in `current` may move to `new`."""
    return new in TRANSITIONS[current]


class Stage(int, Enum):
    """Progress (0-100) at each point of a job's life; it never goes back."""

    QUEUED = 0
    PARSING = 10
    PARSE_DONE = 60  # the most Potpie's parse statuses reach (PARSE_PROGRESS)
    READY = 65
    CONVERSATION = 70
    ANSWERED = 85
    ANALYSED = 95
    FINISHED = 100


# Progress while Potpie parses, by its status (any status not listed creeps up, short of PARSE_DONE).
PARSE_PROGRESS = {"submitted": 15, "created": 15, "cloned": 30, "parsed": 45, "processing": 50,
                  "inferring": 55, "ready": int(Stage.PARSE_DONE)}
PARSE_READY = "ready"
PARSE_ERROR = "error"
# Potpie's server says only `submitted` until `ready`: progress is then estimated from the time spent against the
# mean duration of recent parses, or this many seconds before any parse has finished.
DEFAULT_PARSE_SECONDS = 60.0
FIRST_POLL_S = 0.25  # the first poll after a parse request (a quick parse is seen at once)
MIN_POLL_GAP_S = 0.5  # the polls after it come at least this far apart...
POLL_SHARE = 0.07  # ...and at most this share of the parse's age apart, until that reaches POTPIE_POLL_INTERVAL
MAX_POLLS_PER_SECOND = 100  # a worker process polling more parses than this a second spaces their polls out
