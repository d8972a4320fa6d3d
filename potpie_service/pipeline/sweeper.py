"""The sweeper: re-dispatches jobs whose next step was lost (a crash between commit and enqueue, a dead worker).

Duplicates it may create are harmless: a step only runs for the job's current seq, under a lease.
"""

from __future__ import annotations

import logging
import time

from ..store.jobs import JobStore
from .steps import Dispatch

log = logging.getLogger(__name__)
# An admitted job whose first step has not started this long after its admission, while the broker's queue is
# empty (so its message is not waiting behind others), lost that message: a worker took it on a connection that
# died under it. Dispatched again then, not after STEP_GRACE.
FIRST_STEP_GRACE = 5.0


def sweep(store: JobStore, dispatch: Dispatch, grace: float) -> list[str]:
    """Admit waiting jobs into free slots and revive overdue active ones; return the ids dispatched."""
    dispatched = store.admit()
    for job_id in dispatched:
        dispatch(job_id, 0, 0)
    first_grace = min(grace, FIRST_STEP_GRACE) if not store.queue_length(store.keys.broker_queue) else grace
    for late in store.overdue(grace, first_grace):
        log.warning("step overdue by %.0f s; dispatching it again", late.late_s,
                    extra={"job_id": late.job_id, "seq": late.seq})
        store.mark(late.job_id, next_due=time.time())
        dispatch(late.job_id, late.seq, 0)
        dispatched.append(late.job_id)
    return dispatched
