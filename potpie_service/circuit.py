"""A circuit breaker for a dependency that can go silent (Redis behind a partition, a stuck primary, a full
conntrack table): its packets are dropped, not refused, so every call waits its whole timeout.

After a call times out, calls fail at once for `cooldown` seconds instead of each waiting the timeout again; then
one call goes through to probe (the others still fail at once) and its outcome closes or re-opens the circuit.
Refusals and errors the dependency answers with are not its business: they are fast already.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

PROBE_LIMIT_S = 10.0


class CircuitOpen(Exception):
    """The dependency timed out moments ago: this call was not sent."""


class Breaker:
    """Closed, open for `cooldown` s after a timeout, then half-open (one probe at a time)."""

    def __init__(self, cooldown: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.cooldown = cooldown
        self._clock = clock
        self._lock = threading.Lock()
        self._open_until = 0.0  # 0: closed
        self._probing = 0.0  # when the probe in flight was let through (0: none)

    @property
    def open(self) -> bool:
        """Whether calls are being failed at once right now (a probe may be on its way)."""
        return self._open_until > 0.0

    def admit(self) -> None:
        """Let a call through, or raise CircuitOpen: while open, and while half-open with a probe in flight."""
        with self._lock:
            if not self._open_until:
                return
            now = self._clock()
            # a probe that never reported (its call ended before it reached Redis) stops counting after a while
            probing = self._probing and now - self._probing < PROBE_LIMIT_S
            if now < self._open_until or probing:
                raise CircuitOpen(f"Redis timed out less than {self.cooldown:g} s ago; not sent")
            self._probing = now  # this call probes

    def timed_out(self) -> None:
        """A call waited its whole timeout: open (again)."""
        with self._lock:
            self._open_until = self._clock() + self.cooldown
            self._probing = 0.0

    def refused(self) -> None:
        """A call failed fast (a refused connection, none to be had): it learnt nothing of a silence, so the
        circuit stays as it is, and a probe that ended so is over (the next call may probe)."""
        if self._probing:
            with self._lock:
                self._probing = 0.0

    def answered(self) -> None:
        """A call got an answer: close."""
        if self._open_until:
            with self._lock:
                self._open_until = 0.0
                self._probing = 0.0
