"""One Potpie parse in flight per repository, shared by every job and worker.

Potpie parses a repository again when `/parse` names a project that is still `submitted` (a second task under the
same id; the first goes on), two first `/parse` calls at once make two projects, and `GET /parsing-status/{id}`
queues a long parse again (shared/potpie/API-FACTS.md §8.1). So the jobs that need the same project share one
flight in Redis: the first job to join sends `/parse` (the leader, while its claim lasts), the others follow the
project it gets, and one poll of Potpie per interval serves them all; each job keeps its own progress, retries and
cancellation. A flight lives while its parse runs; once `ready` it stays a few minutes (later jobs skip `/parse`),
an `error` ends it (the next job asks for a new parse).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from .keys import Keys
from .scripts import Lua

READY_KEPT_S = 300.0  # at most; no longer than finished jobs are kept (JOB_TTL_COMPLETED)


@dataclass(frozen=True)
class Joined:
    """A job's place in a flight: `lead` (send /parse; `requested`: one may have reached Potpie already), `follow`
    (the project, its last status, when its parse started) or `wait` (another job's /parse is on its way)."""

    role: str
    project_id: str = ""
    status: str = ""
    started_at: float = 0.0
    requested: bool = False
    expected_s: float | None = None


@dataclass(frozen=True)
class PollTurn:
    """Whether this job polls Potpie for the flight now (`poll`), reads the status another job polled (`cached`),
    or polls alone because the flight is gone (`gone`); with the mean duration of recent parses (None: none yet)
    and how many jobs joined the flight."""

    action: str
    status: str
    started_at: float
    expected_s: float | None
    members: int = 1

    def worth_recording(self, status: str) -> bool:
        """Whether what this poll read must go to the flight: another job reads it, or the parse ended (its
        duration is recorded, the flight ends). A job alone in its flight spares Redis the write (and claimed no
        turn that the write would release)."""
        return self.action == "poll" and (self.members > 1 or status != self.status)


def _seconds(raw: str) -> float | None:
    return float(raw) if raw else None


class Flights:
    """The parse flights of one queue's store."""

    def __init__(self, script: Lua, keys: Keys, kept_s: float = READY_KEPT_S) -> None:
        self._script = script
        self._keys = keys
        self._kept_s = min(kept_s, READY_KEPT_S)

    def key(self, identity: str) -> str:
        """The flight's Redis key for a project identity (core.analysis.parse_identity)."""
        return self._keys.flight(hashlib.sha256(identity.encode()).hexdigest()[:32])

    def _call(self, key: str, op: str, now: float, **args: Any) -> list[str] | int:
        result: list[str] | int = self._script([key, self._keys.index("parse-durations")], op=op, now=now, **args)
        return result

    def join(self, key: str, job_id: str, now: float, claim_s: float, ttl_s: float) -> Joined:
        """Lead, follow or wait (see Joined). A leader is noted as one that may send /parse: a later leader looks
        the project up before it asks again."""
        reply = self._call(key, "join", now, job=job_id, claim_s=claim_s, ttl_s=ttl_s)
        assert isinstance(reply, list)
        if reply[0] == "follow":
            return Joined("follow", reply[1], reply[2], float(reply[3]), expected_s=_seconds(reply[4]))
        if reply[0] == "lead":
            return Joined("lead", requested=reply[1] == "1", expected_s=_seconds(reply[2]))
        return Joined("wait")

    def release(self, key: str, job_id: str, now: float) -> None:
        """Give up the lead (the leader's /parse failed): another job may take it at once."""
        self._call(key, "release", now, job=job_id)

    def publish(self, key: str, project_id: str, status: str, now: float, ttl_s: float) -> None:
        """The leader's /parse answered: every follower takes the project from here."""
        self._call(key, "publish", now, project_id=project_id, status=status, ttl_s=ttl_s, done_ttl_s=self._kept_s)

    def poll_turn(self, key: str, now: float, max_age: float, claim_s: float) -> PollTurn:
        """This job's turn to poll Potpie, or the status another job read less than `max_age` seconds ago."""
        reply = self._call(key, "poll", now, max_age=max_age, claim_s=claim_s)
        assert isinstance(reply, list)
        return PollTurn(reply[0], reply[1], float(reply[2]), _seconds(reply[3]), int(reply[4]))

    def drop(self, key: str, now: float) -> None:
        """End a flight whose parse outlived PARSE_TIMEOUT: a job that needs the project later asks again."""
        self._call(key, "drop", now)

    def record(self, key: str, status: str, now: float) -> None:
        """The status a poll read, for the flight's other jobs (and the parse's duration, when it is ready)."""
        self._call(key, "record", now, status=status, done_ttl_s=self._kept_s)
