"""Builds the long-lived objects of a process (store, Potpie client, emitter, pipeline) from Settings, once."""

from __future__ import annotations

from dataclasses import dataclass

from celery import Celery

from .config import Settings
from .connections import make_redis
from .events import Emitter
from .jobs import JobStore
from .pipeline import Pipeline
from .potpie import PotpieClient
from .queue import dispatcher
from .tokens import TokenCipher


def make_store(settings: Settings) -> JobStore:
    """The job store on the service's Redis."""
    return JobStore(make_redis(settings), settings.queue_name, settings.max_concurrent_jobs,
                    settings.job_ttl_completed, settings.job_ttl_failed)


@dataclass
class WorkerRuntime:
    """What a worker process needs to run steps."""

    store: JobStore
    pipeline: Pipeline


def make_worker_runtime(settings: Settings, app: Celery, observer=None) -> WorkerRuntime:
    """Wire the pipeline for one worker process (call after the pool forks)."""
    store = make_store(settings)
    cipher = TokenCipher(settings.token_encryption_key)
    potpie = PotpieClient(settings.potpie_base_url, settings.potpie_api_key, settings.request_timeout,
                          attempts=settings.potpie_call_attempts, observer=observer, stream=settings.potpie_stream)
    emitter = Emitter(settings)
    pipeline = Pipeline(settings, store, potpie, emitter.emit, dispatcher(app, settings),
                        lambda job_id: cipher.decrypt(store.secret(job_id)))
    return WorkerRuntime(store, pipeline)
