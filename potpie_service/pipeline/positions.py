"""Pushes fresh queue positions and ETAs to the rooms of the jobs waiting at the front of the line.

Called on the workers' supervisor tick, so the cost is bounded (at most `limit` events per tick, and only for
jobs whose position changed) however long the line is. Each update is published by the store's script that
records the position, and only while the job is still queued.
"""

from __future__ import annotations

import time
from typing import Any

from ..config import Settings
from ..core import analysis
from ..core.events import STATUS_UPDATE, status_update
from ..core.job import Job
from ..core.model import JobStatus
from ..store.jobs import JobStore


def announce(store: JobStore, settings: Settings, limit: int = 100) -> int:
    """Publish a `status_update` with queue_position and eta_seconds to each front job whose position moved;
    return how many were published."""
    moved = [waiting for waiting in store.front_of_line(limit) if waiting.announced != waiting.position]
    if not moved:
        return 0
    durations = store.recent_durations()
    now = time.time()
    batch = []
    for waiting in moved:
        job = Job(waiting.job_id, status=JobStatus.QUEUED, message=waiting.message, progress=waiting.progress)
        extra: dict[str, Any] = {"queue_position": waiting.position, "eta_seconds": analysis.eta_seconds(
            JobStatus.QUEUED, waiting.position, None, durations, settings.max_concurrent_jobs, now)}
        news = store.broadcast(job.id, [(STATUS_UPDATE, status_update(job, 0, **extra))])
        batch.append((job.id, waiting.position, news))
    return sum(1 for seq in store.announce_positions(batch) if seq)
