"""The real worker (`workers`) with one probe added: how long each job spent inside Potpie calls.

`celery -A bench.probe_worker worker`. The pipeline, tasks and settings are the deployed ones; the only change is
an extra PotpieClient observer (a hook the runtime already has; the deployed metrics recorder keeps its own)
that sums Potpie time per task run, written to Redis after the task (`bench:potpie:<job_id>`), so P3 can
subtract Potpie's time from each job's total.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import redis
from celery.signals import task_postrun, task_prerun

from workers import runtime as service_runtime
from potpie_service.queue import RUN_STEP
from workers import app, current_settings, tasks

from .common import PROBE

__all__ = ["app"]
_spent = threading.local()  # per task run; the threads pool runs several at once
_client: list[redis.Redis] = []


def _observe(endpoint: str, outcome: str, seconds: float) -> None:
    _spent.seconds = getattr(_spent, "seconds", 0.0) + seconds


def _make_runtime(*args: Any, **kwargs: Any) -> service_runtime.WorkerRuntime:
    return service_runtime.make_worker_runtime(*args, observer=_observe, **kwargs)


tasks.make_worker_runtime = _make_runtime


@task_prerun.connect
def _reset(task=None, **_: object) -> None:
    _spent.seconds = 0.0


@task_postrun.connect
def _record(task=None, args=None, **_: object) -> None:
    if task is None or task.name != RUN_STEP or not args:
        return
    if not _client:
        _client.append(redis.Redis.from_url(current_settings().redis_url))
    pipe = _client[0].pipeline(transaction=False)
    pipe.hincrbyfloat(PROBE + str(args[0]), "potpie", getattr(_spent, "seconds", 0.0))
    pipe.hincrby(PROBE + str(args[0]), "runs", 1)
    pipe.hset(PROBE + str(args[0]), "last_end", time.time())
    pipe.execute()
