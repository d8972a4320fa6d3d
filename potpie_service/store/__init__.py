"""Redis: the job store and everything else the service keeps there (leases, metrics, rate limits, the Potpie
token bucket), each change an atomic Lua script (store/lua/). The only package that touches Redis keys."""

from __future__ import annotations

from ..config import Settings
from ..connections import SOCKET_TIMEOUT, make_probe_redis, make_redis
from ..core.model import JobStatus
from .client import StoreRedis
from .errors import NotReplicated, StoreUnavailable
from .jobs import Durability, JobStore
from .keys import Keys
from .probe import StoreProbe

__all__ = ["JobStore", "NotReplicated", "StoreProbe", "StoreUnavailable", "make_probe", "make_store"]


def make_store(settings: Settings, timeout: float = SOCKET_TIMEOUT) -> JobStore:
    """The job store on the service's Redis (`timeout`: its socket timeout; the API's is shorter)."""
    return JobStore(make_redis(settings, timeout, StoreRedis), settings.queue_name, settings.max_concurrent_jobs,
                    settings.job_ttl_completed, settings.job_ttl_failed,
                    Durability(settings.redis_min_replicas_ack, settings.redis_min_replicas_timeout_ms),
                    submit_budget_s=timeout)


def make_probe(settings: Settings) -> StoreProbe:
    """The API's probe reads (/readyz, /health) on a short-timeout client of their own."""
    retention = {JobStatus.FINISHED: settings.job_ttl_completed, JobStatus.FAILED: settings.job_ttl_failed,
                 JobStatus.CANCELLED: settings.job_ttl_failed}
    return StoreProbe(make_probe_redis(settings, StoreRedis), Keys(settings.queue_name), retention)
