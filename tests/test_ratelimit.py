"""The job-creation rate limiter against a real Redis: several limits in one script call, windows opened by a
client's first request, the binding limit reported, and per-process counting while Redis is away.
(Over HTTP, across two API processes: tests/test_security.py.)"""

from __future__ import annotations

import logging
import time
import uuid

import pytest
import redis

from potpie_service.store.keys import Keys
from potpie_service.store.ratelimit import RateLimiter
from potpie_service.config import Settings, parse_rate_limits
from potpie_service.connections import make_redis
from tests.stack import free_port


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
    dead = make_redis(Settings.from_env({"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}))
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
