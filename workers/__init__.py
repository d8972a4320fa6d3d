"""The Celery app: `celery -A workers worker` and `celery -A workers flower`."""

from .boot import ensure_pool

ensure_pool()  # first: a plain `celery -A workers worker` becomes the gevent command before anything else loads

from .app import app, current_settings  # noqa: E402
from . import tasks  # noqa: E402,F401  (registers the tasks on `app`)
from . import supervisor  # noqa: E402,F401  (heartbeat and sweeper thread)

__all__ = ["app", "current_settings"]
