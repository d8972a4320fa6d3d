"""Rate limits on job creation: per API key (per client IP without a valid one), counted in Redis so they hold
across every API process. One script call per request counts every limit and reads when each window ends
(fixed windows opened by a client's first request); a Redis outage falls back to per-process counting instead
of failing requests."""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import redis
from flask import Flask, Response, g, request

from ..auth import Authenticator
from ..config import RateLimit, Settings
from .errors import TooManyRequests, error_response

log = logging.getLogger(__name__)

# Endpoints that create work: new jobs and retries.
LIMITED_ENDPOINTS = frozenset({"api.analyze", "jobs.retry"})

# ARGV: per limit, its key and window (ms). Returns per limit its count and the ms left in its window.
_HIT = """
local out = {}
for i = 1, #ARGV, 2 do
  local count = redis.call('INCR', ARGV[i])
  local left = redis.call('PTTL', ARGV[i])
  if count == 1 or left < 0 then
    redis.call('PEXPIRE', ARGV[i], ARGV[i + 1])
    left = tonumber(ARGV[i + 1])
  end
  out[#out + 1] = count
  out[#out + 1] = left
end
return out
"""


@dataclass(frozen=True)
class Verdict:
    """The outcome for one request, against the limit that binds it most."""

    allowed: bool
    limit: RateLimit
    remaining: int
    reset_at: float  # epoch seconds when that limit's window ends


class RateLimiter:
    """Counts requests per identity against every configured limit."""

    def __init__(self, client: redis.Redis, prefix: str, limits: tuple[RateLimit, ...]) -> None:
        self.prefix = prefix
        self.limits = limits
        self._hit = client.register_script(_HIT)
        self._local: dict[str, tuple[int, float]] = {}  # Redis away: per-process (count, window end) by key
        self._lock = threading.Lock()
        self._warned_at = 0.0

    def hit(self, identity: str) -> Verdict:
        """Count one request of `identity`; whether it is allowed, and by which limit it is measured."""
        now = time.time()
        args: list[Any] = []
        for limit in self.limits:
            args += [f"{self.prefix}:{identity}:{limit.amount}/{limit.seconds}", limit.seconds * 1000]
        try:
            reply = [int(value) for value in self._hit(args=args)]
        except redis.RedisError:
            reply = self._hit_locally(args, now)
        verdicts = []
        for limit, count, left_ms in zip(self.limits, reply[::2], reply[1::2]):
            verdicts.append(Verdict(count <= limit.amount, limit, max(0, limit.amount - count), now + left_ms / 1000))
        refused = [v for v in verdicts if not v.allowed]
        if refused:
            return max(refused, key=lambda v: v.reset_at)  # the wait that actually frees the client
        return min(verdicts, key=lambda v: (v.remaining, v.reset_at))

    def _hit_locally(self, args: list[Any], now: float) -> list[int]:
        reply: list[int] = []
        with self._lock:
            if time.monotonic() - self._warned_at > 30:
                self._warned_at = time.monotonic()
                log.warning("rate limit storage unreachable; counting per process until Redis is back")
            if len(self._local) > 10_000:  # drop ended windows
                self._local = {key: entry for key, entry in self._local.items() if entry[1] > now}
            for key, window_ms in zip(args[::2], args[1::2]):
                count, ends = self._local.get(key, (0, 0.0))
                if ends <= now:
                    count, ends = 0, now + window_ms / 1000
                self._local[key] = (count + 1, ends)
                reply += [count + 1, int((ends - now) * 1000)]
        return reply


def client_identity(auth: Authenticator, presented_key: Callable[[], str | None]) -> str:
    """The bucket a request counts against: its key's owner, else its IP (also when auth is disabled)."""
    owner = None if auth.disabled else auth.owner(presented_key())
    return f"key:{owner}" if owner else f"ip:{request.remote_addr or 'unknown'}"


def init_rate_limits(app: Flask, settings: Settings, auth: Authenticator, presented_key: Callable[[], str | None],
                     client: redis.Redis) -> RateLimiter | None:
    """Apply RATE_LIMIT to the job-creating endpoints (None when RATE_LIMIT=off)."""
    if not settings.rate_limit:
        log.warning("RATE_LIMIT=off: job creation is not rate limited")
        return None
    limiter = RateLimiter(client, f"psvc:{settings.queue_name}:ratelimit", settings.rate_limit)

    @app.before_request
    def count() -> Any:
        if request.endpoint not in LIMITED_ENDPOINTS or request.method == "OPTIONS":
            return None
        g.rate_limit = verdict = limiter.hit(client_identity(auth, presented_key))
        if verdict.allowed:
            return None
        return error_response(TooManyRequests(
            "Too many requests: slow down and retry after the time in the Retry-After header",
            limit=verdict.limit.text))

    @app.after_request
    def headers(response: Response) -> Response:
        verdict: Verdict | None = g.get("rate_limit")
        if verdict is not None:
            response.headers["X-RateLimit-Limit"] = str(verdict.limit.amount)
            response.headers["X-RateLimit-Remaining"] = str(verdict.remaining)
            response.headers["X-RateLimit-Reset"] = str(math.ceil(verdict.reset_at))
            if not verdict.allowed:
                response.headers["Retry-After"] = str(max(1, math.ceil(verdict.reset_at - time.time())))
        return response

    return limiter
