"""The real worker (`workers`) with one probe added: how long each job spent inside Potpie calls.

`celery -A bench.probe_worker worker`. The pipeline, tasks and settings are the deployed ones; the only change is
the PotpieClient observer (a hook the runtime already has), which still feeds the deployed metrics recorder and
also sums Potpie time per task run, written to Redis after the task (`bench:potpie:<job_id>`), so P3 can
subtract Potpie's time from each job's total.

BENCH_WHATIF (comma-separated) measures proposed fixes in files this package does not own: `noproxy` (requests
stops re-reading proxy settings from the environment on every call), `nometrics` (no per-call metrics write).
"""

from __future__ import annotations

import functools
import os
import threading
import time
from typing import Any

import redis
from celery.signals import task_postrun, task_prerun

from potpie_service import runtime as service_runtime
from potpie_service.connections import make_redis
from potpie_service.metrics import MetricsRecorder
from potpie_service.queue import RUN_STEP
from workers import app, settings, tasks

from .common import PROBE

__all__ = ["app"]
WHATIF = set(filter(None, os.environ.get("BENCH_WHATIF", "").split(",")))
_spent = threading.local()  # per task run; the threads pool runs several at once
_client: list[redis.Redis] = []
_recorder: list[MetricsRecorder] = []


def _observe(endpoint: str, outcome: str, seconds: float) -> None:
    _spent.seconds = getattr(_spent, "seconds", 0.0) + seconds
    if "nometrics" in WHATIF:
        return
    if not _recorder:
        _recorder.append(MetricsRecorder(make_redis(settings), f"psvc:{settings.queue_name}:"))
    _recorder[0].upstream(endpoint, outcome, seconds)


def _make_runtime(*args: Any, **kwargs: Any) -> service_runtime.WorkerRuntime:
    built = service_runtime.make_worker_runtime(*args, observer=_observe, **kwargs)
    if "noproxy" in WHATIF:
        built.pipeline.potpie.session.trust_env = False
    return built


tasks.make_worker_runtime = functools.partial(_make_runtime)


@task_prerun.connect
def _reset(task=None, **_: object) -> None:
    _spent.seconds = 0.0


@task_postrun.connect
def _record(task=None, args=None, **_: object) -> None:
    if task is None or task.name != RUN_STEP or not args:
        return
    if not _client:
        _client.append(redis.Redis.from_url(settings.redis_url))
    pipe = _client[0].pipeline(transaction=False)
    pipe.hincrbyfloat(PROBE + str(args[0]), "potpie", getattr(_spent, "seconds", 0.0))
    pipe.hincrby(PROBE + str(args[0]), "runs", 1)
    pipe.hset(PROBE + str(args[0]), "last_end", time.time())
    pipe.execute()
