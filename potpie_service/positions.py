"""Pushes fresh queue positions and ETAs to the rooms of the jobs waiting at the front of the line.

Called on the workers' supervisor tick, so the cost is bounded (at most `limit` events per tick, and only for
jobs whose position changed) however long the line is. Each update is published by the store's script that
records the position, and only while the job is still queued.
"""

from __future__ import annotations

import time
from typing import Any

from . import analysis
from .config import Settings
from .events import STATUS_UPDATE, broadcast, status_update
from .jobs import JobStore


def announce(store: JobStore, settings: Settings, limit: int = 100) -> int:
    """Publish a `status_update` with queue_position and eta_seconds to each front job whose position moved;
    return how many were published."""
    waiting = store.redis.zrange(f"{store.prefix}waiting", 0, limit - 1)
    if not waiting:
        return 0
    records = store.records(waiting, "announced_position", "message", "progress")
    moved = [(job_id, position, record) for position, (job_id, record) in enumerate(zip(waiting, records), 1)
             if record[0] != str(position)]
    if not moved:
        return 0
    durations = store.recent_durations()
    now = time.time()
    batch = []
    for job_id, position, (_, message, progress, _) in moved:
        job = {"id": job_id, "status": "queued", "message": message or "", "progress": progress or "0"}
        extra: dict[str, Any] = {"queue_position": position, "eta_seconds": analysis.eta_seconds(
            "queued", position, None, durations, settings.max_concurrent_jobs, now)}
        batch.append((job_id, position, broadcast(settings, job_id, [(STATUS_UPDATE, status_update(job, 0, **extra))])))
    return sum(1 for seq in store.announce_positions(batch) if seq)
