"""The job store: job records, the FIFO admission queue under MAX_CONCURRENT_JOBS, step claims — all in Redis.

Each change that must be atomic is one Lua script, so a crash between two writes cannot leave a job half-moved.
Keys (prefix `psvc:<queue>:`): `job:<id>` hash, `job:<id>:lock` step lease, `secret:<id>` encrypted token,
`waiting` zset (ticket order), `active` zset (admitted jobs), `finished` / `failed` zsets (retention index),
`owner:<owner>` zset (a caller's jobs), `tickets` counter.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterable

import redis

from .model import JobStatus

_ADMIT = """
-- a retention index keeps entries for `ttl` seconds and vanishes `ttl` after its last entry (no unbounded growth)
local function retain(index, now, ttl)
  redis.call('ZREMRANGEBYSCORE', index, '-inf', now - ttl)
  redis.call('EXPIRE', index, math.ceil(ttl))
end

local function admit(prefix, max, now)
  local admitted = {}
  while redis.call('ZCARD', prefix .. 'active') < max do
    local head = redis.call('ZRANGE', prefix .. 'waiting', 0, 0)
    if #head == 0 then break end
    local id = head[1]
    redis.call('ZREM', prefix .. 'waiting', id)
    if redis.call('EXISTS', prefix .. 'job:' .. id) == 1 then
      redis.call('ZADD', prefix .. 'active', now, id)
      redis.call('HSET', prefix .. 'job:' .. id, 'admitted_at', now, 'next_due', now)
      table.insert(admitted, id)
    end
  end
  return admitted
end
"""

# ARGV: prefix, max, now, id, owner, encrypted token ('' for none), token ttl, dedup key ('' for none),
#       idempotency key ('' for none), request hash, idempotency ttl, owner index ttl, field, value, ...
_SUBMIT = _ADMIT + """
local prefix, max, now, id = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local dedup, idem = ARGV[8], ARGV[9]
if idem ~= '' then
  local seen = redis.call('HMGET', idem, 'job_id', 'hash')
  if seen[1] then
    if seen[2] ~= ARGV[10] then return {'conflict', seen[1]} end
    return {'replayed', seen[1]}
  end
end
if dedup ~= '' then
  local other = redis.call('GET', dedup)
  if other then
    local status = redis.call('HGET', prefix .. 'job:' .. other, 'status')
    if status and status ~= 'finished' and status ~= 'failed' and status ~= 'cancelled' then
      return {'duplicate', other}
    end
  end
end
local key = prefix .. 'job:' .. id
local ticket = redis.call('INCR', prefix .. 'tickets')
redis.call('HSET', key, 'ticket', ticket, unpack(ARGV, 13))
redis.call('ZADD', prefix .. 'waiting', ticket, id)
redis.call('ZADD', prefix .. 'owner:' .. ARGV[5], now, id)
retain(prefix .. 'owner:' .. ARGV[5], now, tonumber(ARGV[12]))
if ARGV[6] ~= '' then redis.call('SET', prefix .. 'secret:' .. id, ARGV[6], 'EX', ARGV[7]) end
if idem ~= '' then
  redis.call('HSET', idem, 'job_id', id, 'hash', ARGV[10])
  redis.call('EXPIRE', idem, ARGV[11])
end
if dedup ~= '' then
  redis.call('SET', dedup, id)
  redis.call('HSET', key, 'dedup_key', dedup)
end
local admitted = admit(prefix, max, now)
local rank = redis.call('ZRANK', prefix .. 'waiting', id)
return {'created', id, rank or -1, admitted}
"""

# ARGV: prefix, id, seq, token, ttl_ms
_CLAIM = """
local key = ARGV[1] .. 'job:' .. ARGV[2]
if redis.call('EXISTS', key) == 0 then return {'gone'} end
local status = redis.call('HGET', key, 'status')
if status == 'finished' or status == 'failed' or status == 'cancelled' then return {'done'} end
if redis.call('HGET', key, 'seq') ~= ARGV[3] then return {'stale'} end
if not redis.call('SET', key .. ':lock', ARGV[4], 'NX', 'PX', ARGV[5]) then return {'busy'} end
return {'ok', redis.call('HGETALL', key)}
"""

# Publishing in the script that takes the seq makes a state change and its announcement one atomic step:
# no crash in between can commit a change without telling the job's room, or tell of one that was refused.
_BROADCAST = """
local function broadcast(channel, nonce, seq, first, count)
  if channel == '' then return end
  local marker = '"@seq:' .. nonce .. '"'
  for i = 0, count - 1 do
    if ARGV[first + i] ~= '' then
      redis.call('PUBLISH', channel, (string.gsub(ARGV[first + i], marker, tostring(seq + i))))
    end
  end
end
"""

# ARGV: prefix, id, token, now, mode (state|progress), throttle s, keep lease ms (0: free it),
#       channel, nonce, message ('' for none), field, value...
_COMMIT = _BROADCAST + """
local key = ARGV[1] .. 'job:' .. ARGV[2]
if redis.call('GET', key .. ':lock') ~= ARGV[3] then return -1 end
redis.call('HSET', key, unpack(ARGV, 11))
if ARGV[7] == '0' then redis.call('DEL', key .. ':lock') else redis.call('PEXPIRE', key .. ':lock', ARGV[7]) end
if ARGV[5] == 'progress' then
  local last = tonumber(redis.call('HGET', key, 'emitted_at') or '0')
  if tonumber(ARGV[4]) - last < tonumber(ARGV[6]) then return 0 end
end
redis.call('HSET', key, 'emitted_at', ARGV[4])
local seq = redis.call('HINCRBY', key, 'event_seq', 1)
broadcast(ARGV[8], ARGV[9], seq, 10, 1)
return seq
"""

# ARGV: prefix, id, token ('' = no lease check), now, max, ttl, final set name,
#       channel, nonce, message, message ('' for none), field, value, ...
_FINISH = _ADMIT + _BROADCAST + """
local prefix, id, now = ARGV[1], ARGV[2], tonumber(ARGV[4])
local key = prefix .. 'job:' .. id
if redis.call('EXISTS', key) == 0 then return {-2, {}} end
if ARGV[3] ~= '' and redis.call('GET', key .. ':lock') ~= ARGV[3] then return {-1, {}} end
local status = redis.call('HGET', key, 'status')
if status == 'finished' or status == 'failed' or status == 'cancelled' then return {-3, {}} end
redis.call('HSET', key, unpack(ARGV, 12))
redis.call('DEL', key .. ':lock', prefix .. 'secret:' .. id)
redis.call('ZREM', prefix .. 'active', id)
redis.call('ZREM', prefix .. 'waiting', id)
redis.call('ZADD', prefix .. ARGV[7], now, id)
retain(prefix .. ARGV[7], now, tonumber(ARGV[6]))
redis.call('EXPIRE', key, ARGV[6])
local owner = redis.call('HGET', key, 'owner')
if owner then
  redis.call('ZADD', prefix .. 'owner:' .. owner .. ':' .. ARGV[7], now, id)
  retain(prefix .. 'owner:' .. owner .. ':' .. ARGV[7], now, tonumber(ARGV[6]))
end
local dedup = redis.call('HGET', key, 'dedup_key')
if dedup and redis.call('GET', dedup) == id then redis.call('DEL', dedup) end
if ARGV[7] == 'cancelled' then redis.call('PUBLISH', prefix .. 'cancelled', id) end  -- workers abort its call
if ARGV[7] == 'finished' then
  redis.call('LPUSH', prefix .. 'durations', now - tonumber(redis.call('HGET', key, 'admitted_at') or now))
  redis.call('LTRIM', prefix .. 'durations', 0, 49)
end
redis.call('HSET', key, 'emitted_at', now)
local seq = redis.call('HINCRBY', key, 'event_seq', 2) - 1
broadcast(ARGV[8], ARGV[9], seq, 10, 2)
return {seq, admit(prefix, tonumber(ARGV[5]), now)}
"""

# ARGV: job key, position, channel, nonce, message. A job still queued records the position it is told, takes
# the next event seq and publishes the message with it; any other (started, ended, expired) is left untouched,
# so no seq is spent, no expired record comes back and nothing is published.
_ANNOUNCE = _BROADCAST + """
if redis.call('HGET', ARGV[1], 'status') ~= 'queued' then return 0 end
redis.call('HSET', ARGV[1], 'announced_position', ARGV[2])
local seq = redis.call('HINCRBY', ARGV[1], 'event_seq', 1)
broadcast(ARGV[3], ARGV[4], seq, 5, 1)
return seq
"""

# ARGV: prefix, max, now
_ADMIT_ONLY = _ADMIT + "return admit(ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]))"

# ARGV: prefix, id, token, ttl_ms — extend a lease only while its holder still owns it
_RENEW = """
local lock = ARGV[1] .. 'job:' .. ARGV[2] .. ':lock'
if redis.call('GET', lock) ~= ARGV[3] then return 0 end
return redis.call('PEXPIRE', lock, ARGV[4])
"""

# ARGV: prefix, id, token — free a lease only if its holder still owns it
_RELEASE = """
local lock = ARGV[1] .. 'job:' .. ARGV[2] .. ':lock'
if redis.call('GET', lock) ~= ARGV[3] then return 0 end
return redis.call('DEL', lock)
"""


class StoreUnavailable(Exception):
    """Redis cannot be reached."""


@dataclass(frozen=True)
class Submitted:
    """What `JobStore.submit` did: created, or found an existing job (replayed, duplicate, conflict)."""

    outcome: str
    job_id: str
    queue_position: int | None = None
    admitted: tuple[str, ...] = ()


@dataclass(frozen=True)
class Dedup:
    """Keys that make a submission return an existing job instead of a new one."""

    request_key: str = ""      # identical request while the first is queued or running
    idempotency_key: str = ""  # client's Idempotency-Key
    request_hash: str = ""     # what the Idempotency-Key was first used for
    idempotency_ttl: int = 86400


@dataclass(frozen=True)
class Broadcast:
    """Messages the store PUBLISHes on `channel` in the script that takes their event seq (commit, finish).
    In message i, the JSON string `"@seq:<nonce>"` becomes the number seq + i."""

    channel: str = ""
    nonce: str = ""
    messages: tuple[str, ...] = ()

    def args(self, slots: int) -> list[str]:
        if len(self.messages) > slots:
            raise ValueError(f"at most {slots} messages")
        return [self.channel, self.nonce, *self.messages, *[""] * (slots - len(self.messages))]


def _flatten(fields: dict[str, Any]) -> list[str]:
    flat: list[str] = []
    for name, value in fields.items():
        flat += [name, "" if value is None else str(value)]
    return flat


class JobStore:
    """Job records and the admission queue, shared by the API and every worker."""

    def __init__(self, client: redis.Redis, queue_name: str, max_concurrent: int,
                 ttl_completed: int, ttl_failed: int) -> None:
        self.redis = client
        self.prefix = f"psvc:{queue_name}:"
        self.max_concurrent = max_concurrent
        self.ttl = {JobStatus.FINISHED: ttl_completed, JobStatus.FAILED: ttl_failed,
                    JobStatus.CANCELLED: ttl_failed}
        self._submit = client.register_script(_SUBMIT)
        self._claim = client.register_script(_CLAIM)
        self._commit = client.register_script(_COMMIT)
        self._finish = client.register_script(_FINISH)
        self._admit = client.register_script(_ADMIT_ONLY)
        self._announce = client.register_script(_ANNOUNCE)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    def key(self, job_id: str) -> str:
        """The Redis key of a job's record."""
        return f"{self.prefix}job:{job_id}"

    def submit(self, job_id: str, owner: str, fields: dict[str, Any], secret: str = "",
               secret_ttl: int = 86400, dedup: Dedup = Dedup()) -> Submitted:
        """Store a new job at the back of the line and admit what fits; one round trip."""
        reply = self._submit(args=[
            self.prefix, self.max_concurrent, time.time(), job_id, owner, secret, secret_ttl,
            f"{self.prefix}dedup:{owner}:{dedup.request_key}" if dedup.request_key else "",
            f"{self.prefix}idem:{owner}:{dedup.idempotency_key}" if dedup.idempotency_key else "",
            dedup.request_hash, dedup.idempotency_ttl, max(self.ttl.values()), *_flatten(fields)])
        if reply[0] != "created":
            return Submitted(reply[0], reply[1])
        return Submitted("created", reply[1], int(reply[2]) + 1, tuple(reply[3]))

    def get(self, job_id: str) -> dict[str, str] | None:
        """A job's record, or None when unknown or expired."""
        record = self.redis.hgetall(self.key(job_id))
        return record or None

    def secret(self, job_id: str) -> str | None:
        """The job's encrypted GitHub token, if it has one."""
        return self.redis.get(f"{self.prefix}secret:{job_id}")

    def queue_position(self, job_id: str) -> int | None:
        """1-based place in the waiting line, or None when the job is not waiting."""
        rank = self.redis.zrank(f"{self.prefix}waiting", job_id)
        return None if rank is None else int(rank) + 1

    def claim(self, job_id: str, seq: int, token: str, ttl_s: float) -> tuple[str, dict[str, str]]:
        """Take the lease on step `seq` of a job: ('ok', record) or (gone|done|stale|busy, {})."""
        reply = self._claim(args=[self.prefix, job_id, seq, token, int(ttl_s * 1000)])
        if reply[0] != "ok":
            return reply[0], {}
        flat = reply[1]
        return "ok", dict(zip(flat[::2], flat[1::2]))

    def commit(self, job_id: str, token: str, fields: dict[str, Any], mode: str = "state",
               keep_lease: bool = False, lease_s: float = 0, throttle_s: float = 0.25,
               broadcast: Broadcast = Broadcast()) -> int:
        """Write a step's outcome, keeping or freeing the lease, and publish `broadcast` when it takes an event
        seq; return that seq (0: none taken, throttled; -1: the lease was lost, nothing written)."""
        keep_ms = int(lease_s * 1000) if keep_lease else 0
        return int(self._commit(args=[self.prefix, job_id, token, time.time(), mode, throttle_s, keep_ms,
                                      *broadcast.args(1), *_flatten(fields)]))

    def mark(self, job_id: str, **fields: Any) -> None:
        """Set fields of a job record outside a step commit (e.g. a note written before a Potpie call)."""
        self.redis.hset(self.key(job_id), mapping={k: str(v) for k, v in fields.items()})

    def finish(self, job_id: str, token: str, status: JobStatus, fields: dict[str, Any],
               broadcast: Broadcast = Broadcast()) -> tuple[int, list[str]]:
        """End a job: write it, free its slot, set its TTL, delete its token, publish `broadcast` (two messages
        at most: seq and seq + 1); return (first event seq, admitted), a negative seq when nothing was done."""
        final_set = "finished" if status is JobStatus.FINISHED else "failed"
        if status is JobStatus.CANCELLED:
            final_set = "cancelled"
        seq, admitted = self._finish(args=[self.prefix, job_id, token, time.time(), self.max_concurrent,
                                           self.ttl[status], final_set, *broadcast.args(2), "status",
                                           status.value, *_flatten(fields)])
        return int(seq), list(admitted)

    def cancellations(self) -> redis.client.PubSub:
        """A subscription to the ids of jobs as they are cancelled (published by `finish`)."""
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(f"{self.prefix}cancelled")
        return pubsub

    def admit(self) -> list[str]:
        """Admit waiting jobs into free slots; return their ids."""
        return list(self._admit(args=[self.prefix, self.max_concurrent, time.time()]))

    def active(self) -> list[str]:
        """Ids of the jobs holding a slot."""
        return list(self.redis.zrange(f"{self.prefix}active", 0, -1))

    def records(self, job_ids: Iterable[str], *names: str) -> list[list[str | None]]:
        """Selected fields of several jobs, plus whether each holds a lease, in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        ids = list(job_ids)
        for job_id in ids:
            pipe.hmget(self.key(job_id), list(names))
            pipe.exists(self.key(job_id) + ":lock")
        replies = pipe.execute()
        return [replies[i] + [replies[i + 1]] for i in range(0, len(replies), 2)]

    def renew(self, held: dict[str, str], ttl_s: float) -> list[str]:
        """Extend each step lease (job id -> token) by `ttl_s`, in one round trip; return the jobs whose lease
        was no longer that token's."""
        pipe = self.redis.pipeline(transaction=False)
        for job_id, token in held.items():
            self._renew(args=[self.prefix, job_id, token, int(ttl_s * 1000)], client=pipe)
        return [job_id for job_id, renewed in zip(held, pipe.execute()) if not renewed]

    def release(self, job_id: str, token: str) -> bool:
        """Free the step lease `token` (a run handing its job back); False when it was no longer this token's."""
        return bool(self._release(args=[self.prefix, job_id, token]))

    def announce_positions(self, moved: list[tuple[str, int, Broadcast]]) -> list[int]:
        """Record each waiting job's new position, take an event seq for it and publish its update, in one round
        trip; return the seqs (0 for a job no longer queued: nothing written or published)."""
        pipe = self.redis.pipeline(transaction=False)
        for job_id, position, news in moved:
            self._announce(args=[self.key(job_id), position, *news.args(1)], client=pipe)
        return [int(seq) for seq in pipe.execute()]

    def drop_active(self, job_id: str) -> None:
        """Free the slot of a job whose record is gone."""
        self.redis.zrem(f"{self.prefix}active", job_id)

    def try_lock(self, name: str, ttl_s: float) -> bool:
        """A short named lock (e.g. so one worker at a time sweeps)."""
        return bool(self.redis.set(f"{self.prefix}lock:{name}", "1", nx=True, px=max(1, int(ttl_s * 1000))))

    def worker_seen(self, hostname: str, when: float) -> None:
        """Record that a worker consumed its heartbeat task at `when`."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.zadd(f"{self.prefix}workers", {hostname: when})
        pipe.zremrangebyscore(f"{self.prefix}workers", "-inf", when - 86400)
        pipe.execute()

    def worker_last_seen(self, hostname: str) -> float | None:
        """When the worker last consumed a heartbeat, or None."""
        score = self.redis.zscore(f"{self.prefix}workers", hostname)
        return None if score is None else float(score)

    def workers_alive(self, max_age: float) -> int:
        """How many workers consumed a heartbeat within `max_age` seconds."""
        return int(self.redis.zcount(f"{self.prefix}workers", time.time() - max_age, "+inf"))

    def stats(self) -> dict[str, int]:
        """Counts by state, trimming retention indexes first; one round trip, no scans."""
        now = time.time()
        pipe = self.redis.pipeline(transaction=False)
        pipe.zremrangebyscore(f"{self.prefix}finished", "-inf", now - self.ttl[JobStatus.FINISHED])
        pipe.zremrangebyscore(f"{self.prefix}failed", "-inf", now - self.ttl[JobStatus.FAILED])
        pipe.zremrangebyscore(f"{self.prefix}cancelled", "-inf", now - self.ttl[JobStatus.CANCELLED])
        for name in ("waiting", "active", "finished", "failed", "cancelled"):
            pipe.zcard(f"{self.prefix}{name}")
        waiting, active, completed, failed, cancelled = pipe.execute()[3:]
        return {"waiting": waiting, "active": active, "completed": completed, "failed": failed,
                "cancelled": cancelled, "total": waiting + active + completed + failed + cancelled}

    def owner_jobs(self, owner: str, status: str | None, offset: int, limit: int) -> tuple[int, list[dict[str, str]]]:
        """(total, page) of an owner's jobs, newest first; `status` finished|failed|cancelled narrows it."""
        index = f"{self.prefix}owner:{owner}" + (f":{status}" if status else "")
        ttl = self.ttl[JobStatus(status)] if status else max(self.ttl.values())
        pipe = self.redis.pipeline(transaction=False)
        pipe.zremrangebyscore(index, "-inf", time.time() - ttl)
        pipe.zcard(index)
        pipe.zrevrange(index, offset, offset + limit - 1)
        _, total, ids = pipe.execute()
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hgetall(self.key(job_id))
        return int(total), [record for record in pipe.execute() if record]

    def recent_durations(self) -> list[float]:
        """Durations (s) of the last finished jobs, newest first (for ETAs)."""
        return [float(d) for d in self.redis.lrange(f"{self.prefix}durations", 0, -1)]

    def ping(self) -> None:
        """Raise StoreUnavailable unless Redis answers."""
        try:
            self.redis.ping()
        except redis.RedisError as exc:
            raise StoreUnavailable(str(exc)) from None
