"""The sweeper: re-dispatches jobs whose next step was lost (a crash between commit and enqueue, a dead worker).

Duplicates it may create are harmless: a step only runs for the job's current seq, under a lease.
"""

from __future__ import annotations

import logging
import time

from .jobs import JobStore
from .model import JobStatus
from .pipeline import Dispatch

log = logging.getLogger(__name__)


def sweep(store: JobStore, dispatch: Dispatch, grace: float) -> list[str]:
    """Admit waiting jobs into free slots and revive overdue active ones; return the ids dispatched."""
    dispatched = store.admit()
    for job_id in dispatched:
        dispatch(job_id, 0, 0)
    now = time.time()
    ids = store.active()
    for job_id, (status, seq, next_due, leased) in zip(ids, store.records(ids, "status", "seq", "next_due")):
        if status is None:
            store.drop_active(job_id)
            continue
        if JobStatus(status).terminal or leased or now < float(next_due or 0) + grace:
            continue
        log.warning("step overdue by %.0f s; dispatching it again", now - float(next_due or 0),
                    extra={"job_id": job_id, "seq": seq})
        store.mark(job_id, next_due=now)
        dispatch(job_id, int(seq or 0), 0)
        dispatched.append(job_id)
    return dispatched
