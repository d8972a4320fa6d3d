"""A thread in each worker's main process: liveness heartbeats through the broker, the sweeper, bounded shutdown.

Liveness: the worker sends a heartbeat task to its own queue and counts as alive while it consumes it. While
every pool process runs a step, the heartbeat cannot be consumed (prefetch is 1 per process); a busy worker is not
a wedged one, since each step is bounded by the task time limit, so the supervisor vouches for it meanwhile.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import threading
import time
from typing import Any

from celery.signals import worker_ready, worker_shutting_down
from celery.utils import worker_direct

from potpie_service import green
from potpie_service.pipeline.positions import announce
from potpie_service.queue import HEARTBEAT, dispatcher
from potpie_service.pipeline.sweeper import sweep
from potpie_service.config import Settings
from potpie_service.store import make_store

from .app import app, current_settings
from .celery_worker import acknowledge_current, running_count, running_requests, stop_consuming

log = logging.getLogger(__name__)
_stop = threading.Event()
_shutdown_started = threading.Event()
# After a broker outage Celery's consumer retries with growing pauses of up to 30 s (kombu's interval_max), so
# it may consume again only that long after Redis is back; the stall clock allows for it.
RECONNECT_WINDOW = 30.0


def stall_limit(settings: Settings) -> float:
    """How long without consuming its own heartbeat (while not busy) before a worker calls itself wedged."""
    return max(10.0, 6 * settings.worker_heartbeat_interval)


def shutdown_grace(settings: Settings) -> float:
    """How long a warm shutdown lets running steps finish before it cancels them and hands them back."""
    return min(30.0, settings.request_timeout + 5)


class Supervisor:
    """Heartbeats, sweeps and watches the worker's own consumption, once per WORKER_HEARTBEAT_INTERVAL."""

    def __init__(self, consumer: Any, settings: Settings) -> None:
        self.consumer = consumer
        self.settings = settings
        self.hostname: str = consumer.hostname
        self.queue = worker_direct(self.hostname).name
        self.store = make_store(settings)
        self.dispatch = dispatcher(app, settings)
        self.proof = time.time()  # the stall clock: last heartbeat consumed, busy spell, or broker outage

    def busy(self) -> bool:
        """Whether every pool process runs a task still within its time limit (so the heartbeat must wait)."""
        processes = getattr(self.consumer.pool, "num_processes", 0) or 1
        horizon = time.time() - self.settings.task_time_limit - 30  # older than this, a "running" task is a wedge
        try:
            running = [r for r in running_requests() if (r.time_start or time.time()) > horizon]
        except RuntimeError:  # the main thread changed the set meanwhile; judge again next tick
            return False
        return len(running) >= processes

    def tick(self) -> bool:
        """One round; True when the worker is wedged and must exit."""
        now = time.time()
        try:
            if self.busy():
                self.store.worker_seen(self.hostname, now)
            elif not self.store.queue_length(self.queue):  # at most one heartbeat waits in the queue
                app.send_task(HEARTBEAT, args=[self.hostname], queue=self.queue)
            if self.store.try_lock("sweeper", self.settings.worker_heartbeat_interval * 0.9):
                sweep(self.store, self.dispatch, self.settings.step_grace)
                announce(self.store, self.settings)
            seen = self.store.worker_last_seen(self.hostname) or 0.0
        except Exception as exc:  # the broker is away: the stall clock restarts once it is back
            log.warning("supervisor tick failed (%s: %s); retrying", type(exc).__name__, exc)
            self.proof = now + RECONNECT_WINDOW
            return False
        self.proof = max(self.proof, seen)
        return now - self.proof > stall_limit(self.settings)

    def run(self) -> None:
        """Tick until the worker shuts down; ask it to exit if it stops consuming."""
        while not _stop.wait(self.settings.worker_heartbeat_interval):
            if self.tick():
                log.critical("worker stopped consuming its heartbeat for %.0f s while idle; exiting so it is "
                             "restarted", time.time() - self.proof)
                os.kill(os.getpid(), signal.SIGTERM)
                return


def stopping() -> bool:
    """Whether this worker process is shutting down (a step delivered now is handed back, not run)."""
    return _shutdown_started.is_set()


class GreenWaits:
    """A green worker's runs wait for their job's next step themselves (a waiting greenlet costs ~50 KB; a
    re-scheduled task costs broker round trips, four task events and a claim) while the pool keeps a reserve (5%,
    at most 50 slots) free for new jobs, webhooks and the heartbeat. A shutdown wakes them to hand back."""

    def __init__(self) -> None:
        self.stop_callbacks: list[Any] = []

    @functools.cached_property
    def limit(self) -> int:
        """Runs that may wait at once: the pool less its reserve."""
        slots = current_settings().worker_concurrency
        return slots - max(1, min(50, slots // 20))

    def allowed(self) -> bool:
        return green.active() and not stopping() and running_count() < self.limit

    def sleep(self, seconds: float) -> bool:
        # A waiting run must not hold the worker's prefetch budget (kombu stops fetching at WORKER_CONCURRENCY
        # unacked messages): its message is acked before its first wait. Its job stays safe: the run holds the step
        # lease while it waits, and if the worker dies the lease lapses and the sweeper dispatches the step again.
        acknowledge_current()
        return not _shutdown_started.wait(seconds)

    def on_stop(self, callback: Any) -> None:
        self.stop_callbacks.append(callback)

    def stop(self) -> None:
        """Give up on running steps: each run hands its step back."""
        for callback in self.stop_callbacks:
            callback()


WAITS = GreenWaits()  # the worker process's one: the pipeline and the shutdown share it


def _stop_consuming(consumer: Any) -> None:
    """Stop taking steps at once. Celery's own green consumer loop notices the shutdown only after its current
    2 s wait for messages, and would start what arrives meanwhile."""
    try:
        stop_consuming(consumer, current_settings().queue_name)
    except Exception as exc:  # the broker may be away; the task's own check still hands a late step back
        log.warning("could not stop consuming at once (%s)", type(exc).__name__)


def _in_background(target: Any, *args: Any) -> None:
    """Run `target` apart from the caller: a greenlet under gevent (its signal handlers run in the event loop,
    where starting a thread would block), else a daemon thread."""
    if green.active():
        import gevent

        gevent.spawn(target, *args)
    else:
        threading.Thread(target=target, args=args, daemon=True).start()


def _escalate(grace: float) -> None:
    """After the grace period, stop waiting for running steps: a green worker's runs hand theirs back at once;
    anything still running (or any other pool) gets a cold shutdown, which cancels and requeues it."""
    time.sleep(grace)
    if not running_count():
        return
    log.warning("steps still running %.0f s after the shutdown signal: cancelling them; they are handed "
                "back to the queue and resumed by another worker", grace)
    if green.active():
        WAITS.stop()
        time.sleep(3.0)  # their runs free the leases and dispatch the steps again, then Celery exits
        if not running_count():
            return
    os.kill(os.getpid(), signal.SIGQUIT)


_consumer: list[Any] = []  # the worker's consumer, once ready


@worker_ready.connect
def _start(sender: Any, **_: object) -> None:
    _consumer.append(sender)
    threading.Thread(target=Supervisor(sender, current_settings()).run, name="psvc-supervisor", daemon=True).start()


@worker_shutting_down.connect
def _shutdown(how: str = "Warm", **_: object) -> None:
    _stop.set()
    if how == "Warm" and not _shutdown_started.is_set():
        _shutdown_started.set()
        grace = shutdown_grace(current_settings())
        log.info("warm shutdown: no new steps; running ones get %.0f s to finish", grace)
        if green.active() and _consumer:
            _in_background(_stop_consuming, _consumer[0])
        _in_background(_escalate, grace)
