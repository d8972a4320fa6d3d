"""Cancellation reaching a running step: the store publishes a cancelled job's id (`JobStore.finish`), and each
green worker process listens and aborts that job's Potpie call in flight, instead of letting it run until
REQUEST_TIMEOUT only to have its commit refused."""

from __future__ import annotations

import logging
import threading
import time


from ..green import Abortable
from ..store.jobs import JobStore
from ..store import StoreUnavailable

log = logging.getLogger(__name__)


def listen(store: JobStore, calls: Abortable) -> None:
    """Abort the watched call of every job cancelled from now on (runs for the life of the process)."""
    while True:
        try:
            subscription = store.cancellations()
            try:
                while True:
                    message = subscription.get_message(timeout=1.0)
                    if message and calls.abort(str(message["data"])):
                        log.info("job cancelled: aborting its Potpie call in flight", extra={"job_id": message["data"]})
            finally:
                subscription.close()
        except StoreUnavailable as exc:  # Redis is away: listen again once it is back
            log.warning("cancellation listener lost Redis (%s); subscribing again", type(exc).__name__)
            time.sleep(1.0)


def start_listener(store: JobStore, calls: Abortable) -> None:
    """Run `listen` in a daemon thread (a greenlet under gevent)."""
    threading.Thread(target=listen, args=(store, calls), name="psvc-cancels", daemon=True).start()
