"""Builds the long-lived objects of a process (store, Potpie client, pipeline) from Settings, once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from celery import Celery

from . import green
from .cancels import start_listener
from .config import Settings
from .connections import make_redis
from .jobs import JobStore
from .metrics import MetricsRecorder
from .pipeline import Pipeline, Waits
from .potpie import PotpieClient
from .queue import dispatcher, webhook_scheduler
from .throttle import TokenBucket
from .tokens import TokenCipher
from .webhooks import WebhookNotifier


def make_store(settings: Settings) -> JobStore:
    """The job store on the service's Redis."""
    return JobStore(make_redis(settings), settings.queue_name, settings.max_concurrent_jobs,
                    settings.job_ttl_completed, settings.job_ttl_failed)


@dataclass
class WorkerRuntime:
    """What a worker process needs to run steps and deliver webhooks."""

    store: JobStore
    pipeline: Pipeline
    webhooks: WebhookNotifier


def _fan_out(*observers: Callable[..., None] | None) -> Callable[..., None]:
    """One observer that calls each given one in turn (None entries skipped: an extra never replaces another)."""
    given = [observer for observer in observers if observer is not None]

    def observe(*args: Any) -> None:
        for observer in given:
            observer(*args)

    return observe


def make_worker_runtime(settings: Settings, app: Celery, observer=None, waits: Waits | None = None) -> WorkerRuntime:
    """Wire the pipeline for one worker process (call after the pool forks)."""
    store = make_store(settings)
    recorder = MetricsRecorder(store.redis, store.prefix)  # cluster-wide metrics, read by the API's /metrics
    cipher = TokenCipher(settings.token_encryption_key)
    limiter = None
    if settings.potpie_rate_limit > 0:
        limiter = TokenBucket(store.redis, f"{store.prefix}potpie-bucket", settings.potpie_rate_limit)
    potpie = PotpieClient(settings.potpie_base_url, settings.potpie_api_key, settings.request_timeout,
                          attempts=settings.potpie_call_attempts, observer=_fan_out(recorder.upstream, observer),
                          stream=settings.potpie_stream, limiter=limiter, connections=settings.worker_concurrency)
    webhooks = WebhookNotifier(store, settings.webhook_secret, settings.webhook_allow_private,
                               settings.webhook_max_attempts, webhook_scheduler(app, settings))
    pipeline = Pipeline(settings, store, potpie, dispatcher(app, settings),
                        lambda job_id: cipher.decrypt(store.secret(job_id)),
                        observe=_fan_out(recorder.observe, webhooks.on_event), waits=waits)
    if green.active():  # only a green process can abort a call another greenlet is blocked in
        start_listener(store, pipeline.calls)
    return WorkerRuntime(store, pipeline, webhooks)
