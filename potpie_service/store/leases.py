"""Step leases: how long one lives, and the thread that keeps renewing those a worker process holds.

A delivery runs a job's step only under its lease (`JobStore.claim`), and commits only while it still holds it.
The lease is short and renewed every quarter of its TTL while the step runs, so a killed or frozen holder loses
it within one TTL and the sweeper can hand the step to another worker.
"""

from __future__ import annotations

import logging
import os
import threading
import time


from ..config import Settings
from .jobs import JobStore
from .errors import StoreUnavailable

log = logging.getLogger(__name__)


def lease_ttl(settings: Settings) -> float:
    """Seconds a step lease outlives its last renewal: four heartbeat intervals, at least 5 s."""
    return max(5.0, 4 * settings.worker_heartbeat_interval)


class LeaseKeeper:
    """Renews the step leases this process holds, from a thread, until the step lets go of them."""

    def __init__(self, store: JobStore, ttl: float) -> None:
        self.store = store
        self.ttl = ttl
        self._held: dict[str, str] = {}
        self._lock = threading.Lock()
        self._thread: tuple[int, threading.Thread] | None = None

    def hold(self, job_id: str, token: str) -> None:
        """Keep renewing the lease `token` on the job until `release`."""
        with self._lock:
            self._held[job_id] = token
            if self._thread is None or self._thread[0] != os.getpid() or not self._thread[1].is_alive():
                thread = threading.Thread(target=self._renew, name="psvc-lease", daemon=True)
                self._thread = (os.getpid(), thread)  # a forked child starts its own thread
                thread.start()

    def release(self, job_id: str) -> None:
        """Stop renewing the job's lease (the step committed it, freed it or lost it)."""
        with self._lock:
            self._held.pop(job_id, None)

    def _renew(self) -> None:
        while True:
            time.sleep(self.ttl / 4)
            with self._lock:
                held = dict(self._held)
            if not held:
                continue
            try:  # every lease in one round trip: a green worker holds hundreds
                self.store.renew(held, self.ttl)
            except StoreUnavailable as exc:  # Redis is away; the leases may lapse and the steps be redone
                log.warning("could not renew %d step leases: %s", len(held), type(exc).__name__)
