"""What a step comes to: the job goes on (`Advance`) or ends (`End`); `JobFailed` when it cannot succeed."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..core.job import JobUpdate
from ..core.model import JobStatus


@dataclass
class Advance:
    """The job goes on: its new state and fields, and how long until its next step (0: at once)."""

    status: JobStatus
    update: JobUpdate = field(default_factory=lambda: JobUpdate())
    wait: float = 0.0
    retry_in: float | None = None  # a retry: its delay, told in the event


@dataclass
class End:
    """The job ends (finished or failed)."""

    status: JobStatus
    update: JobUpdate = field(default_factory=lambda: JobUpdate())


class JobFailed(Exception):
    """A step found that the job cannot succeed; the message is the failed_reason."""
