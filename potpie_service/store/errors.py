"""The one error the store raises when Redis cannot be had, so callers above it know nothing of redis-py."""

from __future__ import annotations


class StoreUnavailable(Exception):
    """Redis could not be reached, or did not answer in time. `sent`: the command went out and no answer came
    back, so it may have taken effect (or may yet, when it reaches Redis late); otherwise nothing was done."""

    def __init__(self, reason: str, sent: bool = False, cause: str = "") -> None:
        super().__init__(reason)
        self.reason, self.sent, self.cause = reason, sent, cause or type(self).__name__


class NotReplicated(StoreUnavailable):
    """Fewer replicas than REDIS_MIN_REPLICAS_ACK confirmed a write within the timeout."""

    def __init__(self, acked: int, wanted: int, timeout_ms: int, rate_counts: list[int] | None = None) -> None:
        super().__init__(f"{acked} of {wanted} Redis replica(s) confirmed the write within {timeout_ms} ms")
        self.acked, self.wanted, self.timeout_ms = acked, wanted, timeout_ms
        self.rate_counts = rate_counts  # a submit's rate-limit counts, paid even though its job was taken back
