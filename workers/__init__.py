"""The Celery app: `celery -A workers worker` and `celery -A workers flower`."""

from .boot import ensure_pool

ensure_pool()  # first: a plain `celery -A workers worker` becomes the gevent command before anything else loads

import sys  # noqa: E402

from celery.signals import celeryd_init, setup_logging, task_postrun, task_prerun  # noqa: E402

from potpie_service import logs  # noqa: E402
from potpie_service.bootstrap import load_settings  # noqa: E402
from potpie_service.connections import tls_problem  # noqa: E402
from potpie_service.queue import DELIVER_WEBHOOK, RUN_STEP, make_celery  # noqa: E402

settings = load_settings("worker")
if problem := tls_problem(settings):  # an untrusted Redis is a configuration error, not an outage to wait out
    print(f"potpie-service worker: {problem}", file=sys.stderr)
    raise SystemExit(2)
app = make_celery(settings)


@setup_logging.connect
def _keep_our_logging(**_: object) -> None:
    """Celery leaves logging as load_settings set it: LOG_LEVEL and LOG_FORMAT win over `--loglevel`."""


@celeryd_init.connect
def _no_banner(instance, **_: object) -> None:  # noqa: ANN001
    """In JSON log mode, skip Celery's ASCII-art start banner (its facts are in the "starting with" line)."""
    if settings.log_format == "json":
        instance.quiet = True


@task_prerun.connect
def _bind_job(task, args=None, **_: object) -> None:  # noqa: ANN001
    """Stamp the job id on every line logged while a job's task runs."""
    logs.job_id.set(str(args[0]) if task.name in (RUN_STEP, DELIVER_WEBHOOK) and args else None)


@task_postrun.connect
def _unbind_job(**_: object) -> None:
    logs.job_id.set(None)


from . import tasks  # noqa: E402,F401  (registers the tasks on `app`)
from . import supervisor  # noqa: E402,F401  (heartbeat and sweeper thread)
