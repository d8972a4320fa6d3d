"""Rate limits on job creation, counted in Redis so they hold across every API process: one script call per
request counts every limit and reads when each window ends (the submit script itself, when the request gets that
far: see `Charge`); a Redis outage falls back to per-process counting instead of failing requests."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import redis

from ..config import RateLimit
from .keys import Keys
from .errors import StoreUnavailable
from .scripts import Lua

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Verdict:
    """The outcome for one request, against the limit that binds it most."""

    allowed: bool
    limit: RateLimit
    remaining: int
    reset_at: float  # epoch seconds when that limit's window ends


@dataclass(frozen=True)
class Charge:
    """One request's hit on each of its identity's counters, paid once: by the submit script when the request
    reaches it (no round trip of its own), else by `RateLimiter.pay`. Paying it gives its counts: per limit, the
    count and the ms left in its window."""

    keys: list[str]
    windows_ms: list[int]
    amounts: list[int]


class RateLimiter:
    """Counts requests per identity against every configured limit."""

    def __init__(self, client: redis.Redis, keys: Keys, limits: tuple[RateLimit, ...]) -> None:
        self.keys = keys
        self.limits = limits
        self._hit = Lua(client, "rate_hit")
        self._local: dict[str, tuple[int, float]] = {}  # Redis away: per-process (count, window end) by key
        self._lock = threading.Lock()
        self._warned_at = 0.0

    def hit(self, identity: str) -> Verdict:
        """Count one request of `identity`; whether it is allowed, and by which limit it is measured."""
        charge = self.charge(identity)
        return self.verdict(self.pay(charge))

    def charge(self, identity: str) -> Charge:
        """What one request of `identity` will count (nothing is counted yet)."""
        return Charge([self.keys.rate(identity, limit.amount, limit.seconds) for limit in self.limits],
                      [limit.seconds * 1000 for limit in self.limits], [limit.amount for limit in self.limits])

    def pay(self, charge: Charge) -> list[int]:
        """Count a charge now, in Redis (per process while Redis is away); its counts."""
        try:
            return [int(value) for value in self._hit(charge.keys, windows_ms=charge.windows_ms)]
        except StoreUnavailable:
            return self._hit_locally(charge.keys, charge.windows_ms, time.time())

    def verdict(self, counts: list[int]) -> Verdict:
        """Whether a paid charge's `counts` are within every limit, and by which limit it is measured."""
        now, reply = time.time(), counts
        verdicts = []
        for limit, count, left_ms in zip(self.limits, reply[::2], reply[1::2]):
            verdicts.append(Verdict(count <= limit.amount, limit, max(0, limit.amount - count), now + left_ms / 1000))
        refused = [v for v in verdicts if not v.allowed]
        if refused:
            return max(refused, key=lambda v: v.reset_at)  # the wait that actually frees the client
        return min(verdicts, key=lambda v: (v.remaining, v.reset_at))

    def _hit_locally(self, keys: list[str], windows: list[int], now: float) -> list[int]:
        reply: list[int] = []
        with self._lock:
            if time.monotonic() - self._warned_at > 30:
                self._warned_at = time.monotonic()
                log.warning("rate limit storage unreachable; counting per process until Redis is back")
            if len(self._local) > 10_000:  # drop ended windows
                self._local = {key: entry for key, entry in self._local.items() if entry[1] > now}
            for key, window_ms in zip(keys, windows):
                count, ends = self._local.get(key, (0, 0.0))
                if ends <= now:
                    count, ends = 0, now + window_ms / 1000
                self._local[key] = (count + 1, ends)
                reply += [count + 1, int((ends - now) * 1000)]
        return reply
