"""A token bucket in Redis shared by every worker: the global rate limit in front of Potpie.

Celery's own `rate_limit` is per worker; this one holds across all of them. A 429 from Potpie pauses the
bucket for everyone until its Retry-After has passed.
"""

from __future__ import annotations

import time

import redis

# ARGV: key, rate (tokens/s), burst, now. Returns the seconds to wait as a string (0 = go).
_ACQUIRE = """
local bucket = redis.call('HMGET', ARGV[1], 'tokens', 'ts', 'paused_until')
local rate, burst, now = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local paused = tonumber(bucket[3]) or 0
if now < paused then return tostring(paused - now) end
local tokens = tonumber(bucket[1]) or burst
local last = tonumber(bucket[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - last) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', ARGV[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('EXPIRE', ARGV[1], 3600)
return tostring(wait)
"""

# ARGV: key, until (unix time)
_PAUSE = """
local current = tonumber(redis.call('HGET', ARGV[1], 'paused_until')) or 0
if tonumber(ARGV[2]) > current then redis.call('HSET', ARGV[1], 'paused_until', ARGV[2]) end
redis.call('EXPIRE', ARGV[1], 3600)
return 1
"""


class RateLimitTimeout(Exception):
    """Waited longer than allowed for a token."""


class TokenBucket:
    """`acquire()` blocks until the shared bucket grants a request; `pause(s)` stops everyone for s seconds."""

    def __init__(self, client: redis.Redis, key: str, rate: float, burst: float | None = None) -> None:
        self.key = key
        self.rate = rate
        self.burst = burst or max(1.0, rate)
        self._acquire = client.register_script(_ACQUIRE)
        self._pause = client.register_script(_PAUSE)

    def acquire(self, max_wait: float) -> float:
        """Take one token, waiting at most `max_wait` seconds; return the time waited."""
        started = time.monotonic()
        while True:
            wait = float(self._acquire(args=[self.key, self.rate, self.burst, time.time()]))
            if wait <= 0:
                return time.monotonic() - started
            if time.monotonic() - started + wait > max_wait:
                raise RateLimitTimeout(f"no Potpie request slot within {max_wait:g} s (POTPIE_RATE_LIMIT)")
            time.sleep(wait)

    def pause(self, seconds: float) -> None:
        """Hold every worker's requests for `seconds` (Potpie said 429 with Retry-After)."""
        self._pause(args=[self.key, time.time() + seconds])
