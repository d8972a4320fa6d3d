"""Builds the long-lived objects of a worker process (store, Potpie client, pipeline) from Settings, once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from celery import Celery

import logging
import threading

from potpie_service import green
from potpie_service.config import Settings
from potpie_service.core.job import Change
from potpie_service.github import GitHubClient
from potpie_service.pipeline.callbacks import WebhookNotifier
from potpie_service.pipeline.cancels import start_listener
from potpie_service.pipeline.steps import Pipeline, Waits
from potpie_service.potpie.client import Observer, PotpieClient, PotpieError
from potpie_service.queue import dispatcher, webhook_scheduler
from potpie_service.store import make_store
from potpie_service.store.jobs import JobStore
from potpie_service.tokens import TokenCipher


log = logging.getLogger(__name__)


def check_agent(potpie: PotpieClient, agent_id: str) -> str | None:
    """Why POTPIE_AGENT_ID cannot work (Potpie does not list it for this key), or None when it is listed or the
    list could not be read (then it is used unchecked: Potpie answers an unknown agent with a bare 500)."""
    try:
        agents = potpie.agents()
    except PotpieError as exc:
        log.warning("could not list Potpie's agents (%s); POTPIE_AGENT_ID=%s is used unchecked", exc.reason, agent_id)
        return None
    if agent_id in agents:
        log.info("Potpie lists the agent POTPIE_AGENT_ID=%s", agent_id)
        return None
    problem = (f"POTPIE_AGENT_ID={agent_id!r} is not an agent Potpie lists for this key (available: "
               f"{', '.join(agents) or 'none'}): set POTPIE_AGENT_ID to one of them")
    log.error(problem)
    return problem


@dataclass
class WorkerRuntime:
    """What a worker process needs to run steps and deliver webhooks."""

    store: JobStore
    pipeline: Pipeline
    webhooks: WebhookNotifier


def _both(first: Callable[[Change], None], second: Callable[[Change], None]) -> Callable[[Change], None]:
    def observe(change: Change) -> None:
        first(change)
        second(change)

    return observe


def _calls(first: Observer, extra: Observer | None) -> Observer:
    """The Potpie-call observer: the metrics recorder's, and an extra one (bench/probe_worker.py) if given."""
    if extra is None:
        return first

    def observe(endpoint: str, outcome: str, seconds: float) -> None:
        first(endpoint, outcome, seconds)
        extra(endpoint, outcome, seconds)

    return observe


def make_worker_runtime(settings: Settings, app: Celery, observer: Observer | None = None,
                        waits: Waits | None = None) -> WorkerRuntime:
    """Wire the pipeline for one worker process (call after the pool forks)."""
    store = make_store(settings)
    recorder = store.recorder()  # cluster-wide metrics, read by the API's /metrics
    cipher = TokenCipher(settings.token_encryption_key)
    limiter = store.potpie_bucket(settings.potpie_rate_limit) if settings.potpie_rate_limit > 0 else None
    potpie = PotpieClient(settings.potpie_base_url, settings.potpie_api_key, settings.request_timeout,
                          attempts=settings.potpie_call_attempts, observer=_calls(recorder.upstream, observer),
                          stream=settings.potpie_stream, limiter=limiter, connections=settings.worker_concurrency)
    webhooks = WebhookNotifier(store, settings.webhook_secret, settings.webhook_allow_private,
                               settings.webhook_max_attempts, webhook_scheduler(app, settings))
    pipeline = Pipeline(settings, store, potpie, dispatcher(app, settings),
                        lambda job_id: cipher.decrypt(store.secret(job_id)),
                        observe=_both(recorder.observe, webhooks.on_event), waits=waits,
                        github=GitHubClient(settings.github_api_url))

    def check() -> None:  # apart from start-up: Potpie may be slow or away
        pipeline.agent_problem = check_agent(potpie, settings.potpie_agent_id)

    threading.Thread(target=check, name="psvc-agent-check", daemon=True).start()
    if green.active():  # only a green process can abort a call another greenlet is blocked in
        start_listener(store, pipeline.calls)
    return WorkerRuntime(store, pipeline, webhooks)
