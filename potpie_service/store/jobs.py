"""The job store: job records, the FIFO admission queue under MAX_CONCURRENT_JOBS, step claims — all in Redis.

Each change that must be atomic is one Lua script (store/lua/), so a crash between two writes cannot leave a job
half-moved. The keys are listed in store/keys.py; no module outside the store touches Redis or a key name.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Unpack, cast

import redis

from ..config import RateLimit
from ..core.events import Event
from ..core.job import Job, JobUpdate, to_hash
from ..core.model import JobStatus
from ..celery_message import StepMessage
from .batch import GroupCommit
from .broadcast import Broadcast, broadcast
from .errors import NotReplicated
from .flights import Flights
from .keys import Keys
from .metrics import MetricsRecorder, MetricsSnapshot, read_snapshot
from .ratelimit import Charge, RateLimiter
from .scripts import Scripts
from .throttle import TokenBucket


SILENT = Broadcast()  # a change that announces nothing


@dataclass(frozen=True)
class Durability:
    """REDIS_MIN_REPLICAS_ACK: how many replicas must confirm a submit (and a parse-request mark) before it
    counts, and for how long Redis WAITs for them."""

    replicas: int = 0
    timeout_ms: int = 1000


@dataclass(frozen=True)
class Submitted:
    """What `JobStore.submit` did: created, or found an existing job (replayed, duplicate, conflict)."""

    outcome: str
    job_id: str
    queue_position: int | None = None
    admitted: tuple[str, ...] = ()
    rate_counts: list[int] | None = None  # the rate-limit counts the script paid (count, ms left, per limit)


@dataclass(frozen=True)
class Dedup:
    """What makes a submission return an existing job instead of a new one (digests; '' for none)."""

    request_key: str = ""      # identical request while the first is queued or running
    idempotency_key: str = ""  # client's Idempotency-Key
    request_hash: str = ""     # what the Idempotency-Key was first used for
    idempotency_ttl: int = 86400


@dataclass(frozen=True)
class Overdue:
    """An active job whose next step is late and held by nobody (the sweeper dispatches it again)."""

    job_id: str
    seq: int
    late_s: float


@dataclass(frozen=True)
class Waiting:
    """A job at the front of the line: its place, the place it was last told, what its room last heard."""

    job_id: str
    position: int
    announced: int | None
    message: str
    progress: int


class JobStore:
    """Job records and the admission queue, shared by the API and every worker."""

    def __init__(self, client: redis.Redis, queue_name: str, max_concurrent: int,
                 ttl_completed: int, ttl_failed: int, durability: Durability = Durability(),
                 submit_budget_s: float = 0.0) -> None:
        self._redis = client
        # A submit the caller gave up on (its answer was a 503) must not run when it reaches Redis late: the script
        # refuses past call time + this budget, on Redis' clock (the offset from ours learnt from its replies).
        self.submit_budget_s = submit_budget_s
        self._redis_minus_local_ms = 0.0
        self.durability = durability
        self.keys = Keys(queue_name)
        self.max_concurrent = max_concurrent
        self.ttl = {JobStatus.FINISHED: ttl_completed, JobStatus.FAILED: ttl_failed,
                    JobStatus.CANCELLED: ttl_failed}
        self._scripts = Scripts(client)
        self._group = GroupCommit(client)
        self.flights = Flights(self._scripts["flight"], self.keys, kept_s=ttl_completed)

    @property
    def channel(self) -> str:
        """The Socket.IO channel the store publishes events on and every API process relays."""
        return self.keys.events_channel

    def broadcast(self, job_id: str, events: list[Event]) -> Broadcast:
        """Events for the job's room, for a commit, finish or announce to publish with the seq it takes."""
        return broadcast(self.channel, job_id, events)

    # --- writes --------------------------------------------------------------------------------------------

    def submit(self, job: Job, secret: str = "", secret_ttl: int = 86400, dedup: Dedup = Dedup(),
               first_step: StepMessage | None = None, charge: Charge | None = None) -> Submitted:
        """Store a new job at the back of the line and admit what fits; one round trip. A rate-limit `charge` is
        paid first in the same script: over a limit nothing is stored (outcome 'limited'). When the job
        itself is admitted, `first_step` goes onto the Celery queue in the same script (and is not among
        `admitted`, which the caller dispatches). With a Durability, Redis WAITs for the replicas in the same
        pipeline (one connection) and `first_step` is not used: a job is only dispatched once the replicas hold
        it, so the caller dispatches it with the others. Short of them the job is taken back and NotReplicated
        raised (the others it admitted stay admitted; the sweeper dispatches them)."""
        keys = self.keys
        job_keys = [keys.job(job.id), keys.index("waiting"), keys.index("active"), keys.index("tickets"),
                    keys.owner(job.owner), keys.secret(job.id), keys.idempotency(job.owner, dedup.idempotency_key),
                    keys.dedup(job.owner, dedup.request_key), keys.broker_queue]
        rate_keys = charge.keys if charge else []
        rate = dict(rate_windows_ms=charge.windows_ms, rate_amounts=charge.amounts) if charge else {}
        step = first_step if first_step and not self.durability.replicas else StepMessage("", "", "")
        called = time.time()
        deadline_ms = int((called + self.submit_budget_s) * 1000 + self._redis_minus_local_ms) \
            if self.submit_budget_s else 0
        args = dict(prefix=keys.prefix, max=self.max_concurrent, now=called, id=job.id, fields=job.to_hash(),
                    secret=secret, secret_ttl=secret_ttl, use_idempotency=bool(dedup.idempotency_key),
                    request_hash=dedup.request_hash, idempotency_ttl=dedup.idempotency_ttl,
                    use_dedup=bool(dedup.request_key), owner_ttl=max(self.ttl.values()),
                    step_event_channel=step.event_channel, deadline_ms=deadline_ms, **rate)
        raw = (step.body, step.event)
        if not self.durability.replicas:
            reply, acked = self._grouped("submit", job_keys + rate_keys, raw, args), 0
        else:
            pipe = self._redis.pipeline(transaction=False)
            self._scripts.call("submit", job_keys + rate_keys, client=pipe, raw=raw, **args)
            reply, acked = self._wait(pipe)
        # Redis' clock against ours, as of this reply (it left Redis before we read it: an underestimate, which
        # only makes the next deadline stricter)
        self._redis_minus_local_ms = float(reply[5]) - time.time() * 1000
        counts = [int(value) for value in reply[4]] if charge and reply[0] != "late" else None
        if self.durability.replicas and reply[0] == "created" and acked < self.durability.replicas:
            self._scripts.call("withdraw", [job_keys[0], *job_keys[1:3], *job_keys[4:]], prefix=keys.prefix,
                               max=self.max_concurrent, now=time.time(), id=job.id)
            raise NotReplicated(acked, self.durability.replicas, self.durability.timeout_ms, counts)
        if reply[0] != "created":
            return Submitted(reply[0], reply[1], rate_counts=counts)
        return Submitted("created", reply[1], int(reply[2]) + 1, tuple(reply[3]), counts)

    def claim(self, job_id: str, seq: int, token: str, ttl_s: float) -> tuple[str, Job | None]:
        """Take the lease on step `seq` of a job: ('ok', job) or (gone|done|stale|busy, None)."""
        reply = self._scripts.call("claim", [self.keys.job(job_id), self.keys.lock(job_id)], seq=seq, token=token,
                                   ttl_ms=int(ttl_s * 1000))
        if reply[0] != "ok":
            return reply[0], None
        flat = reply[1]
        return "ok", Job.from_hash(dict(zip(flat[::2], flat[1::2])))

    def commit(self, job_id: str, token: str, update: JobUpdate, progress_only: bool = False,
               keep_lease: bool = False, lease_s: float = 0, throttle_s: float = 0.25,
               news: Broadcast = SILENT) -> int:
        """Write a step's outcome, keeping or freeing the lease, and publish `news` when it takes an event seq
        (a progress-only change within `throttle_s` of the last event takes none); return that seq (0: none
        taken; -1: the lease was lost, nothing written)."""
        return int(self._scripts.call(
            "commit", [self.keys.job(job_id), self.keys.lock(job_id)], token=token, now=time.time(),
            progress_only=progress_only, throttle_s=throttle_s, keep_ms=int(lease_s * 1000) if keep_lease else 0,
            fields=to_hash(update), news=news.args()))

    def mark(self, job_id: str, durable: bool = False, **update: Unpack[JobUpdate]) -> None:
        """Set fields of a job outside a step commit (a note written before a Potpie call, a webhook's fate);
        `durable`: also WAIT for the Durability's replicas (NotReplicated short of them), so the note survives a
        failover before the call it announces is made."""
        mapping = cast("dict[Any, Any]", to_hash(update))
        if not (durable and self.durability.replicas):
            self._redis.hset(self.keys.job(job_id), mapping=mapping)
            return
        pipe = self._redis.pipeline(transaction=False)
        pipe.hset(self.keys.job(job_id), mapping=mapping)
        _, acked = self._wait(pipe)
        if acked < self.durability.replicas:
            raise NotReplicated(acked, self.durability.replicas, self.durability.timeout_ms)

    def _grouped(self, name: str, keys: list[str], raw: tuple[str, ...], args: dict[str, Any]) -> Any:
        """Run a script in the next group commit; once more, on its own, if Redis had forgotten it."""
        script = self._scripts[name]
        try:
            return self._group.run(lambda pipe: script.queue(pipe, keys, raw, **args))
        except redis.exceptions.NoScriptError:
            return script(keys, raw=raw, **args)

    def _wait(self, pipe: Any) -> tuple[Any, int]:
        """Run a pipeline of one write, then WAIT on its connection; (the write's reply, replicas that have it)."""
        pipe.execute_command("WAIT", self.durability.replicas, self.durability.timeout_ms)
        reply, acked = pipe.execute()
        return reply, int(acked)

    def finish(self, job: Job, token: str, status: JobStatus, update: JobUpdate,
               news: Broadcast = SILENT) -> tuple[int, list[str]]:
        """End a job: write it, free its slot, set its TTL, delete its token, publish `news` (its final events:
        seq and seq + 1); return (first event seq, the jobs admitted into the slot), a negative seq when nothing
        was done (-1 lease lost, -2 gone, -3 already ended). `token` '' ends it without a lease (a cancel)."""
        keys, index = self.keys, status.value
        seq, admitted = self._scripts.call(
            "finish",
            [keys.job(job.id), keys.lock(job.id), keys.secret(job.id), keys.index("active"), keys.index("waiting"),
             keys.index(index), keys.owner(job.owner, index), keys.index("durations")],
            prefix=keys.prefix, id=job.id, token=token, now=time.time(), max=self.max_concurrent,
            ttl=self.ttl[status], status=status.value, fields=to_hash(update), news=news.args(),
            cancelled_channel=keys.cancelled_channel, announce_cancel=status is JobStatus.CANCELLED,
            record_duration=status is JobStatus.FINISHED)
        return int(seq), list(admitted)

    def admit(self) -> list[str]:
        """Admit waiting jobs into free slots; return their ids."""
        return list(self._scripts.call("admit", [self.keys.index("waiting"), self.keys.index("active")],
                                       prefix=self.keys.prefix, max=self.max_concurrent, now=time.time()))

    def renew(self, held: dict[str, str], ttl_s: float) -> list[str]:
        """Extend each step lease (job id -> token) by `ttl_s`, in one round trip; return the jobs whose lease
        was no longer that token's."""
        pipe = self._redis.pipeline(transaction=False)
        for job_id, token in held.items():
            self._scripts.call("renew", [self.keys.lock(job_id)], client=pipe, token=token, ttl_ms=int(ttl_s * 1000))
        return [job_id for job_id, renewed in zip(held, pipe.execute()) if not renewed]

    def release(self, job_id: str, token: str) -> bool:
        """Free the step lease `token` (a run handing its job back); False when it was no longer this token's."""
        return bool(self._scripts.call("release", [self.keys.lock(job_id)], token=token))

    def announce_positions(self, moved: list[tuple[str, int, Broadcast]]) -> list[int]:
        """Record each waiting job's new position, take an event seq for it and publish its update, in one round
        trip; return the seqs (0 for a job no longer queued: nothing written or published)."""
        pipe = self._redis.pipeline(transaction=False)
        for job_id, position, news in moved:
            self._scripts.call("announce", [self.keys.job(job_id)], client=pipe, position=position,
                               news=news.args())
        return [int(seq) for seq in pipe.execute()]

    def try_lock(self, name: str, ttl_s: float) -> bool:
        """A short named lock (e.g. so one worker at a time sweeps)."""
        return bool(self._redis.set(self.keys.named_lock(name), "1", nx=True, px=max(1, int(ttl_s * 1000))))

    def worker_seen(self, hostname: str, when: float) -> None:
        """Record that a worker consumed its heartbeat task at `when`."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.zadd(self.keys.index("workers"), {hostname: when})
        pipe.zremrangebyscore(self.keys.index("workers"), "-inf", when - 86400)
        pipe.execute()

    # --- reads ---------------------------------------------------------------------------------------------

    def get(self, job_id: str) -> Job | None:
        """A job, or None when unknown or expired."""
        raw: dict[str, str] = self._redis.hgetall(self.keys.job(job_id))  # type: ignore[assignment]  # decoded
        return Job.from_hash(raw) if raw else None

    def secret(self, job_id: str) -> str | None:
        """The job's encrypted GitHub token, if it has one."""
        secret: str | None = self._redis.get(self.keys.secret(job_id))  # type: ignore[assignment]  # decoded
        return secret

    def queue_position(self, job_id: str) -> int | None:
        """1-based place in the waiting line, or None when the job is not waiting."""
        rank: int | None = self._redis.zrank(self.keys.index("waiting"), job_id)  # type: ignore[assignment]
        return None if rank is None else rank + 1

    def overdue(self, grace_s: float, first_grace_s: float | None = None) -> list[Overdue]:
        """Active jobs whose next step is overdue by `grace_s` (`first_grace_s` for an admitted job whose first step
        never started) with no lease held; the slots of vanished jobs are freed on the way. Two round trips, no
        scan."""
        ids: list[str] = self._redis.zrange(self.keys.index("active"), 0, -1)  # type: ignore[assignment]
        pipe = self._redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hmget(self.keys.job(job_id), ["status", "seq", "next_due"])
            pipe.exists(self.keys.lock(job_id))
        replies = pipe.execute()
        now, late = time.time(), []
        for job_id, (status, seq, next_due), leased in zip(ids, replies[::2], replies[1::2]):
            if status is None:
                self._redis.zrem(self.keys.index("active"), job_id)
            elif (not JobStatus(status).terminal and not leased
                  and now >= float(next_due or 0) + (first_grace_s if first_grace_s is not None and status ==
                                                     JobStatus.QUEUED.value and int(seq or 0) == 0 else grace_s)):
                late.append(Overdue(job_id, int(seq or 0), now - float(next_due or 0)))
        return late

    def front_of_line(self, limit: int) -> list[Waiting]:
        """The first `limit` waiting jobs, in order."""
        ids: list[str] = self._redis.zrange(self.keys.index("waiting"), 0, limit - 1)  # type: ignore[assignment]
        pipe = self._redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hmget(self.keys.job(job_id), ["announced_position", "message", "progress"])
        return [Waiting(job_id, position, int(announced) if announced else None, message or "", int(progress or 0))
                for position, (job_id, (announced, message, progress)) in enumerate(zip(ids, pipe.execute()), 1)]

    def worker_last_seen(self, hostname: str) -> float | None:
        """When the worker last consumed a heartbeat, or None."""
        score = self._redis.zscore(self.keys.index("workers"), hostname)
        return None if score is None else float(score)

    def workers_alive(self, max_age: float) -> int:
        """How many workers consumed a heartbeat within `max_age` seconds."""
        return int(self._redis.zcount(self.keys.index("workers"), time.time() - max_age, "+inf"))

    def stats(self) -> dict[str, int]:
        """Counts by state, trimming retention indexes first; one round trip, no scans."""
        now = time.time()
        pipe = self._redis.pipeline(transaction=False)
        for status in (JobStatus.FINISHED, JobStatus.FAILED, JobStatus.CANCELLED):
            pipe.zremrangebyscore(self.keys.index(status.value), "-inf", now - self.ttl[status])
        for name in ("waiting", "active", "finished", "failed", "cancelled"):
            pipe.zcard(self.keys.index(name))
        waiting, active, completed, failed, cancelled = pipe.execute()[3:]
        return {"waiting": waiting, "active": active, "completed": completed, "failed": failed,
                "cancelled": cancelled, "total": waiting + active + completed + failed + cancelled}

    def owner_jobs(self, owner: str, status: JobStatus | None, offset: int, limit: int) -> tuple[int, list[Job]]:
        """(total, page) of an owner's jobs, newest first; `status` (an ended one) narrows it."""
        index = self.keys.owner(owner, status.value if status else "")
        ttl = self.ttl[status] if status else max(self.ttl.values())
        pipe = self._redis.pipeline(transaction=False)
        pipe.zremrangebyscore(index, "-inf", time.time() - ttl)
        pipe.zcard(index)
        pipe.zrevrange(index, offset, offset + limit - 1)
        _, total, ids = pipe.execute()
        pipe = self._redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hgetall(self.keys.job(job_id))
        return int(total), [Job.from_hash(raw) for raw in pipe.execute() if raw]

    def recent_durations(self) -> list[float]:
        """Durations (s) of the last finished jobs, newest first (for ETAs)."""
        return [float(d) for d in self._redis.lrange(self.keys.index("durations"), 0, -1)]

    def queue_length(self, queue: str) -> int:
        """Messages waiting in a Celery queue on this Redis (the broker's list of that name)."""
        return int(self._redis.llen(queue))

    def cancellations(self) -> Any:
        """A subscription to the ids of jobs as they are cancelled (published by `finish`); its reads fail with
        StoreUnavailable when Redis cannot be had."""
        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(self.keys.cancelled_channel)
        return pubsub

    # --- the other Redis-backed pieces, on this client and keyspace ----------------------------------------

    def recorder(self) -> MetricsRecorder:
        """The cluster-wide metrics writer (workers; the API for cancellations)."""
        return MetricsRecorder(self._redis, self.keys.index("metrics"))

    def snapshot(self, worker_max_age: float) -> MetricsSnapshot:
        """Everything /metrics shows from Redis, in one round trip."""
        return read_snapshot(self._scripts, self.keys, worker_max_age)

    def potpie_bucket(self, rate: float) -> TokenBucket:
        """The token bucket every worker shares in front of Potpie (POTPIE_RATE_LIMIT)."""
        return TokenBucket(self._redis, self.keys.index("potpie-bucket"), rate)

    def rate_limiter(self, limits: tuple[RateLimit, ...]) -> RateLimiter:
        """The job-creation rate limiter every API process shares (RATE_LIMIT)."""
        return RateLimiter(self._redis, self.keys, limits)

