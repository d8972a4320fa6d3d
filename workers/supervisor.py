"""A thread in each worker's main process: liveness heartbeats through the broker, and the sweeper."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

from celery.signals import worker_ready, worker_shutting_down
from celery.utils import worker_direct

from potpie_service.events import Emitter
from potpie_service.positions import announce
from potpie_service.queue import HEARTBEAT, dispatcher
from potpie_service.recovery import sweep
from potpie_service.runtime import make_store

from . import app, settings

log = logging.getLogger(__name__)
_stop = threading.Event()


def stall_limit() -> float:
    """How long without consuming its own heartbeat before a worker calls itself wedged."""
    return max(30.0, 6 * settings.worker_heartbeat_interval)


def _loop(hostname: str) -> None:
    store = make_store(settings)
    dispatch = dispatcher(app, settings)
    emitter = Emitter(settings)
    interval = settings.worker_heartbeat_interval
    started = time.time()
    while not _stop.wait(interval):
        try:
            app.send_task(HEARTBEAT, args=[hostname], queue=worker_direct(hostname).name)
            if store.try_lock("sweeper", interval * 0.9):
                sweep(store, dispatch, settings.step_grace)
                announce(store, emitter.emit, settings.max_concurrent_jobs)
            seen = store.worker_last_seen(hostname) or started
        except Exception:  # the broker may be down for a while; keep trying, the check below decides
            log.exception("supervisor tick failed")
            seen = None
        if seen is not None and time.time() - max(seen, started) > stall_limit():
            log.critical("worker stopped consuming (no heartbeat for %.0f s); exiting so it is restarted",
                         time.time() - seen)
            os.kill(os.getpid(), signal.SIGTERM)
            return


@worker_ready.connect
def _start(sender, **_: object) -> None:
    threading.Thread(target=_loop, args=(sender.hostname,), name="psvc-supervisor", daemon=True).start()


@worker_shutting_down.connect
def _shutdown(**_: object) -> None:
    _stop.set()
