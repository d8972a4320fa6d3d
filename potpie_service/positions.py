"""Pushes fresh queue positions and ETAs to the rooms of the jobs waiting at the front of the line.

Called on the workers' supervisor tick, so the cost is bounded (at most `limit` events per tick, and only for
jobs whose position changed) however long the line is.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from . import analysis
from .events import STATUS_UPDATE, status_update
from .jobs import JobStore

EmitFn = Callable[[str, list], None]


def announce(store: JobStore, emit: EmitFn, slots: int, limit: int = 100) -> int:
    """Emit a `status_update` with queue_position and eta_seconds to each front job whose position moved."""
    waiting = store.redis.zrange(f"{store.prefix}waiting", 0, limit - 1)
    if not waiting:
        return 0
    records = store.records(waiting, "announced_position")
    moved = [(job_id, position) for position, (job_id, (announced, _)) in enumerate(zip(waiting, records), 1)
             if announced != str(position)]
    if not moved:
        return 0
    durations = store.recent_durations()
    now = time.time()
    for (job_id, position), record in zip(moved, store.announce_positions(moved)):
        if not record:
            continue  # started, ended or expired since the line was read
        extra: dict[str, Any] = {"queue_position": position,
                                 "eta_seconds": analysis.eta_seconds("queued", position, None, durations, slots, now)}
        emit(job_id, [(STATUS_UPDATE, status_update(record, int(record["event_seq"]), **extra))])
    return len(moved)
