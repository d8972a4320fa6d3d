"""The workers' Celery app. It is configured when Celery first reads its settings (as the worker or Flower
starts), not when this module is imported: a bad environment then stops the command with one line naming the
variable, and importing the package never exits."""

from __future__ import annotations

import functools
import sys
from typing import Any

from celery.signals import celeryd_init, setup_logging, task_postrun, task_prerun

from potpie_service import logs
from potpie_service.bootstrap import load_settings
from potpie_service.config import Settings
from potpie_service.queue import DELIVER_WEBHOOK, RUN_STEP, MaskedCelery, configure
from potpie_service.connections import tls_problem

app = MaskedCelery("potpie_service")


@functools.lru_cache(maxsize=1)
def current_settings() -> Settings:
    """The worker's settings, read once; exit 2 with one line on a bad value or an untrusted Redis."""
    settings = load_settings("worker")
    if problem := tls_problem(settings):  # an untrusted Redis is a configuration error, not an outage to wait out
        print(f"potpie-service worker: {problem}", file=sys.stderr)
        raise SystemExit(2)
    return settings


@app.on_configure.connect
def _configure(sender: Any, **_: object) -> None:
    configure(sender, current_settings())


@setup_logging.connect
def _keep_our_logging(**_: object) -> None:
    """Celery leaves logging as load_settings set it: LOG_LEVEL and LOG_FORMAT win over `--loglevel`."""


@celeryd_init.connect
def _no_banner(instance: Any, **_: object) -> None:
    """In JSON log mode, skip Celery's ASCII-art start banner (its facts are in the "starting with" line)."""
    if current_settings().log_format == "json":
        instance.quiet = True


@task_prerun.connect
def _bind_job(task: Any, args: Any = None, **_: object) -> None:
    """Stamp the job id on every line logged while a job's task runs."""
    logs.job_id.set(str(args[0]) if task.name in (RUN_STEP, DELIVER_WEBHOOK) and args else None)


@task_postrun.connect
def _unbind_job(**_: object) -> None:
    logs.job_id.set(None)
