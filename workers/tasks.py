"""Thin Celery tasks over the pipeline: they take a job id and a step number, nothing secret."""

from __future__ import annotations

import os
import time

from celery.exceptions import Reject

from potpie_service.queue import DELIVER_WEBHOOK, HEARTBEAT, RUN_STEP, STOP_AGENT_RUN
from .runtime import WorkerRuntime, make_worker_runtime

from .app import app, current_settings
from .supervisor import WAITS, stopping

_runtime: tuple[int, WorkerRuntime] | None = None


def runtime() -> WorkerRuntime:
    """This process's runtime, built after the pool forked (connections are not shared across fork)."""
    global _runtime
    if _runtime is None or _runtime[0] != os.getpid():
        _runtime = (os.getpid(), make_worker_runtime(current_settings(), app, waits=WAITS))
    return _runtime[1]


@app.task(name=RUN_STEP, acks_late=True, ignore_result=True)
def run_step(job_id: str, seq: int) -> str:
    """Run a job from step `seq` until it waits or ends (a step delivered to a stopping worker goes back)."""
    if stopping():
        raise Reject("the worker is shutting down", requeue=True)
    return runtime().pipeline.run(job_id, int(seq))


@app.task(name=DELIVER_WEBHOOK, ignore_result=True)
def deliver_webhook(job_id: str, attempt: int) -> str:
    """One attempt to POST a job's final event to its callback_url."""
    return runtime().webhooks.deliver(job_id, int(attempt))


@app.task(name=STOP_AGENT_RUN, ignore_result=True)
def stop_agent_run(job_id: str) -> str:
    """Stop the agent run a cancelled job left going on Potpie (it would go on spending the account's credits)."""
    return runtime().pipeline.agents.stop_left(job_id)


@app.task(name=HEARTBEAT, ignore_result=True, acks_late=False)
def heartbeat(hostname: str) -> None:
    """Proof that this worker consumes: record when it ran (sent to the worker's own queue)."""
    runtime().store.worker_seen(hostname, time.time())
