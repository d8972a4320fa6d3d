"""The job-creation rate limiter against a real Redis: several limits in one script call, windows opened by a
client's first request, the binding limit reported, per-process counting while Redis is away, and a submit that
counts its request in its own script call. (Over HTTP, across two API processes: tests/test_security.py.)"""

from __future__ import annotations

import logging
import time
import uuid

import pytest
import redis

from potpie_service.core.job import Job
from potpie_service.store.jobs import JobStore
from potpie_service.store.keys import Keys
from potpie_service.store.ratelimit import RateLimiter
from potpie_service.config import Settings, parse_rate_limits
from potpie_service.connections import make_redis
from potpie_service.store.client import StoreRedis
from tests.stack import RedisServer, free_port


@pytest.mark.parametrize("raw, expected", [
    ("60/minute", [(60, 60, "60 per 1 minute")]),
    ("10 per second", [(10, 1, "10 per 1 second")]),
    ("100/2 hours", [(100, 7200, "100 per 2 hour")]),
    ("10/second; 500/HOUR", [(10, 1, "10 per 1 second"), (500, 3600, "500 per 1 hour")]),
    ("3/day,", [(3, 86400, "3 per 1 day")]),
])
def test_limits_parse(raw: str, expected: list[tuple[int, int, str]]) -> None:
    assert [(limit.amount, limit.seconds, limit.text) for limit in parse_rate_limits(raw)] == expected


@pytest.mark.parametrize("raw", ["0/minute", "5/0 minutes", "abc", "5/fortnight", "5/minute;x", "５/minute",
                                 "-1/second", "5/minute/hour"])
def test_bad_limits_are_refused(raw: str) -> None:
    with pytest.raises(ValueError, match="60/minute"):
        parse_rate_limits(raw)


@pytest.mark.parametrize("raw, amounts", [("10/second;100/hour", [10, 100]), ("off", []), ("", []), (" None ", [])])
def test_settings_parse_rate_limit_once(raw: str, amounts: list[int]) -> None:
    assert [limit.amount for limit in Settings.from_env({"RATE_LIMIT": raw}).rate_limit] == amounts


def limiter(client: redis.Redis, raw: str) -> RateLimiter:
    return RateLimiter(client, Keys(f"q-rl-{uuid.uuid4().hex[:8]}"), parse_rate_limits(raw))


def test_every_limit_counts_and_the_binding_one_is_reported(redis_server) -> None:
    client = redis_server.client()
    limits = limiter(client, "3/second;5/minute")
    first = [limits.hit("key:alice") for _ in range(3)]
    assert [v.allowed for v in first] == [True] * 3
    assert [v.remaining for v in first] == [2, 1, 0] and first[-1].limit.text == "3 per 1 second"
    refused = limits.hit("key:alice")
    assert not refused.allowed and refused.limit.text == "3 per 1 second"
    assert 0 < refused.reset_at - time.time() <= 1.0
    assert limits.hit("key:bob").allowed, "another identity has its own budget"
    time.sleep(max(0.0, refused.reset_at - time.time()) + 0.05)  # the second's window ends; the minute's goes on
    assert limits.hit("key:alice").allowed  # fifth request of the minute (the refused one counted too)
    over = limits.hit("key:alice")
    assert not over.allowed and over.limit.text == "5 per 1 minute" and 55 < over.reset_at - time.time() <= 60


def test_a_window_opens_with_the_first_request(redis_server) -> None:
    """Not aligned to the clock: a burst is never split by a minute boundary into two budgets."""
    client = redis_server.client()
    limits = limiter(client, "2/minute")
    before = time.time()
    verdicts = [limits.hit("ip:203.0.113.9") for _ in range(3)]
    assert [v.allowed for v in verdicts] == [True, True, False]
    assert all(abs(v.reset_at - (before + 60)) < 1.0 for v in verdicts)
    keys = client.keys(limits.keys.prefix + "ratelimit:*")
    assert len(keys) == 1 and 59_000 < client.pttl(keys[0]) <= 60_000


def test_redis_away_counts_per_process_and_says_so_once(caplog: pytest.LogCaptureFixture) -> None:
    # the client the API builds (the service's timeouts and retries), pointed at a port where nothing listens
    dead = make_redis(Settings.from_env({"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}), redis_class=StoreRedis)
    limits = limiter(dead, "2/minute")
    with caplog.at_level(logging.WARNING, logger="potpie_service.api.ratelimit"):
        started = time.monotonic()
        verdicts = [limits.hit("key:alice") for _ in range(3)]
        took = time.monotonic() - started
    assert [v.allowed for v in verdicts] == [True, True, False]
    assert limits.hit("key:bob").allowed
    assert took < 3, "a Redis outage never makes a request wait long"
    warnings = [r for r in caplog.records if "rate limit storage unreachable" in r.getMessage()]
    assert len(warnings) == 1


def _script_calls(client: redis.Redis) -> int:
    return int(client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))


def test_a_submit_counts_its_charge_in_its_own_script_call_and_stores_nothing_over_the_limit(
        redis_server: RedisServer) -> None:
    client = redis_server.client()
    queue = f"q-rl-{uuid.uuid4().hex[:8]}"
    store = JobStore(client, queue, 100, 60, 60)
    limits = store.rate_limiter(parse_rate_limits("2/minute"))
    jobs = [Job(uuid.uuid4().hex, owner="alice", repo="octocat/hello") for _ in range(3)]
    charges = [limits.charge("key:alice") for _ in jobs]
    store.submit(Job(uuid.uuid4().hex, owner="bob", repo="octocat/hello"))  # Redis learns the script (NOSCRIPT)
    client.config_resetstat()
    submitted = [store.submit(job, charge=charge) for job, charge in zip(jobs, charges)]
    outcomes = [each.outcome for each in submitted]
    assert _script_calls(client) == 3, "one Redis call a submit, its rate-limit count included"
    assert outcomes == ["created", "created", "limited"]
    assert [job.id for job in jobs if store.get(job.id)] == [jobs[0].id, jobs[1].id], "the refused one was not kept"
    assert client.zcard(store.keys.owner("alice")) == 2
    verdicts = [limits.verdict(each.rate_counts or []) for each in submitted]  # the submits' own counts
    assert [(v.allowed, v.remaining) for v in verdicts] == [(True, 1), (True, 0), (False, 0)]
    assert verdicts[2].limit.text == "2 per 1 minute" and 55 < verdicts[2].reset_at - time.time() <= 60
    assert limits.hit("key:alice").remaining == 0 and limits.hit("key:bob").remaining == 1
    assert int(client.get(charges[0].keys[0])) == 4, "three submits and one hit: each counted once"


def test_a_submit_sent_again_finds_its_job_counted_once_even_past_its_deadline(redis_server: RedisServer) -> None:
    """What redis-py's retry of a pipeline whose connection broke after Redis ran it does: the same script call,
    the same job id. It is the job created, with the counts of the one time it was counted (a 429 decision and the
    X-RateLimit headers need them), and never 'late': the job exists and its first step was pushed."""
    client = redis_server.client()
    store = JobStore(client, f"q-rl-{uuid.uuid4().hex[:8]}", 100, 60, 60)
    limits = store.rate_limiter(parse_rate_limits("5/minute"))
    job, charge = Job(uuid.uuid4().hex, owner="alice", repo="octocat/hello"), limits.charge("key:alice")
    first = store.submit(job, charge=charge)
    again = store.submit(job, charge=charge)
    assert (first.outcome, again.outcome) == ("created", "created") and again.job_id == job.id
    assert again.rate_counts is not None and again.rate_counts[0] == first.rate_counts[0] == 1
    assert limits.verdict(again.rate_counts).remaining == 4 and int(client.get(charge.keys[0])) == 1
    store.submit_budget_s, store._redis_minus_local_ms = 0.001, -60_000.0  # its deadline long gone on Redis' clock
    late = store.submit(job, charge=charge)
    assert late.outcome == "created" and int(client.get(charge.keys[0])) == 1
    store._redis_minus_local_ms = -60_000.0  # (each reply resets it to the true offset)
    assert store.submit(Job(uuid.uuid4().hex, owner="alice", repo="octocat/x"), charge=charge).outcome == "late", \
        "a new submit past its deadline is still refused"
