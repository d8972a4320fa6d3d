"""Redis: the job store and everything else the service keeps there (leases, metrics, rate limits, the Potpie
token bucket), each change an atomic Lua script (store/lua/). The only package that touches Redis keys."""

from __future__ import annotations

from ..config import Settings
from ..connections import make_redis
from .jobs import Durability, JobStore


def make_store(settings: Settings) -> JobStore:
    """The job store on the service's Redis."""
    return JobStore(make_redis(settings), settings.queue_name, settings.max_concurrent_jobs,
                    settings.job_ttl_completed, settings.job_ttl_failed,
                    Durability(settings.redis_min_replicas_ack, settings.redis_min_replicas_timeout_ms))
