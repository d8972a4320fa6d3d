"""A token bucket in Redis shared by every worker: the global rate limit in front of Potpie.

Celery's own `rate_limit` is per worker; this one holds across all of them. A 429 from Potpie pauses the
bucket for everyone until its Retry-After has passed.
"""

from __future__ import annotations

import time

import redis

from .scripts import Lua


class RateLimitTimeout(TimeoutError):
    """Waited longer than allowed for a token (the Potpie client catches any TimeoutError)."""


class TokenBucket:
    """`acquire()` blocks until the shared bucket grants a request; `pause(s)` stops everyone for s seconds."""

    def __init__(self, client: redis.Redis, key: str, rate: float, burst: float | None = None) -> None:
        self.key = key
        self.rate = rate
        self.burst = burst or max(1.0, rate)
        self._acquire = Lua(client, "bucket_acquire")
        self._pause = Lua(client, "bucket_pause")

    def acquire(self, max_wait: float) -> float:
        """Take one token, waiting at most `max_wait` seconds; return the time waited."""
        started = time.monotonic()
        while True:
            wait = float(self._acquire([self.key], rate=self.rate, burst=self.burst, now=time.time()))
            if wait <= 0:
                return time.monotonic() - started
            if time.monotonic() - started + wait > max_wait:
                raise RateLimitTimeout(f"no Potpie request slot within {max_wait:g} s (POTPIE_RATE_LIMIT)")
            time.sleep(wait)

    def pause(self, seconds: float) -> None:
        """Hold every worker's requests for `seconds` (Potpie said 429 with Retry-After)."""
        self._pause([self.key], until=time.time() + seconds)
