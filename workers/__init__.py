"""The Celery app: `celery -A workers worker` and `celery -A workers flower`."""

from potpie_service.bootstrap import load_settings
from potpie_service.queue import make_celery

settings = load_settings("worker")
app = make_celery(settings)

from . import tasks  # noqa: E402,F401  (registers the tasks on `app`)
from . import supervisor  # noqa: E402,F401  (heartbeat and sweeper thread)
