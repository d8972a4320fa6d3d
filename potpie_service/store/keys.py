"""Every Redis key of the service, in one place: `psvc:<QUEUE_NAME>:` then the name below.

`job:<id>` hash (core/job.py), `job:<id>:lock` step lease, `secret:<id>` encrypted GitHub token, `waiting` zset
(ticket order), `active` zset (admitted jobs), `finished` / `failed` / `cancelled` zsets (retention indexes),
`owner:<owner>[:<status>]` zsets (a caller's jobs), `tickets` counter, `durations` list (recent run times),
`workers` zset (heartbeats), `flight:<digest>` hash (a Potpie parse in flight, store/flights.py),
`parse-durations` list (recent parse times), `idem:<owner>:<key>` and `dedup:<owner>:<hash>` (repeat submissions),
`metrics` hash, `potpie-bucket` hash (the Potpie token bucket), `ratelimit:<identity>:<amount>/<seconds>` counters,
`lock:<name>` short named locks; the pub/sub channel `cancelled` (ids of jobs as they are cancelled). Socket.IO's
channel is `psvc-<QUEUE_NAME>` (no colon: python-socketio's own naming). One key is kombu's, not ours: the Celery
queue's list `<QUEUE_NAME>`, onto which the submit script pushes a job's first step.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    """The key names of one queue's store."""

    queue_name: str

    @property
    def prefix(self) -> str:
        return f"psvc:{self.queue_name}:"

    def job(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    def lock(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}:lock"

    def secret(self, job_id: str) -> str:
        return f"{self.prefix}secret:{job_id}"

    def index(self, name: str) -> str:
        """waiting, active, finished, failed, cancelled, tickets, durations, workers, metrics, potpie-bucket."""
        return f"{self.prefix}{name}"

    def owner(self, owner: str, status: str = "") -> str:
        return f"{self.prefix}owner:{owner}" + (f":{status}" if status else "")

    def idempotency(self, owner: str, digest: str) -> str:
        return f"{self.prefix}idem:{owner}:{digest}"

    def dedup(self, owner: str, digest: str) -> str:
        return f"{self.prefix}dedup:{owner}:{digest}"

    def rate(self, identity: str, amount: int, seconds: int) -> str:
        return f"{self.prefix}ratelimit:{identity}:{amount}/{seconds}"

    def flight(self, digest: str) -> str:
        """A parse in flight, shared by the jobs that need that Potpie project (store/flights.py)."""
        return f"{self.prefix}flight:{digest}"

    def named_lock(self, name: str) -> str:
        return f"{self.prefix}lock:{name}"

    @property
    def broker_queue(self) -> str:
        """kombu's list holding the Celery queue's messages (priority 0: the queue's own name)."""
        return self.queue_name

    @property
    def cancelled_channel(self) -> str:
        return f"{self.prefix}cancelled"

    @property
    def events_channel(self) -> str:
        """The Socket.IO channel every API process and the store's scripts share."""
        return f"psvc-{self.queue_name}"
