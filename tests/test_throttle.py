"""The global Potpie rate limit: one Redis token bucket shared by every worker process."""

from __future__ import annotations

import multiprocessing
import time
from typing import Iterator

import pytest
import redis

from potpie_service.store.throttle import RateLimitTimeout, TokenBucket
from tests.conftest import Stack, make_stack


def _take(url: str, key: str, count: int, out: "multiprocessing.Queue[list[float]]") -> None:
    bucket = TokenBucket(redis.Redis.from_url(url), key, rate=20, burst=5)
    stamps = []
    for _ in range(count):
        bucket.acquire(max_wait=10)
        stamps.append(time.time())
    out.put(stamps)


def test_bucket_holds_across_processes(redis_server) -> None:
    out: multiprocessing.Queue = multiprocessing.Queue()
    workers = [multiprocessing.Process(target=_take, args=(redis_server.url, "bucket:procs", 15, out))
               for _ in range(3)]
    for worker in workers:
        worker.start()
    stamps = sorted(s for _ in workers for s in out.get(timeout=20))
    for worker in workers:
        worker.join(5)
    # 45 tokens at 20/s with a burst of 5: at least (45 - 5) / 20 = 2 s, whatever the number of processes
    assert stamps[-1] - stamps[0] >= 1.9
    for i, start in enumerate(stamps):  # no one-second window holds more than rate + burst grants
        assert sum(1 for s in stamps[i:] if s - start < 1.0) <= 25


def test_pause_stops_everyone_and_wait_is_bounded(redis_server) -> None:
    client = redis_server.client()
    first, second = (TokenBucket(client, "bucket:pause", rate=100) for _ in range(2))
    first.pause(1.0)  # as after a 429 with Retry-After: 1
    started = time.monotonic()
    second.acquire(max_wait=5)
    assert time.monotonic() - started >= 0.9
    first.pause(30)
    with pytest.raises(RateLimitTimeout):
        second.acquire(max_wait=0.5)


@pytest.fixture(scope="module")
def limited_stack(redis_server, simulator) -> Iterator[Stack]:
    running = make_stack(redis_server, simulator, "limited", POTPIE_RATE_LIMIT="8", POTPIE_POLL_INTERVAL="0.05")
    yield running
    running.stop()


def test_workers_respect_the_global_limit_and_429_pauses_the_bucket(limited_stack: Stack, sim_stats) -> None:
    before = sum(sim_stats()["requests"].values())
    started = time.monotonic()
    jobs = [limited_stack.submit(f"octocat/limited{i}") for i in range(4)] + [limited_stack.submit("rate-limited/x")]
    finals = [limited_stack.wait_final(job["job_id"], timeout=60) for job in jobs]
    elapsed = time.monotonic() - started
    assert all(final["status"] == "finished" for final in finals), finals
    calls = sum(sim_stats()["requests"].values()) - before
    assert calls >= 25
    assert calls / elapsed <= 8 * 1.25 + 8 / elapsed, f"{calls} Potpie calls in {elapsed:.1f} s"
    bucket = limited_stack.redis.client().hgetall(limited_stack.key("potpie-bucket"))
    assert float(bucket["paused_until"]) > 0, "the 429 paused the shared bucket"
