"""Celery configured in one place, and the one way to schedule a job's step by task name.

Every setting here is deliberate; docs/reliability.md explains each (and the README's "Reliability" section).
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.utils.saferepr import saferepr

from .celery_message import RUN_STEP, FirstSteps, StepMessage
from .config import Settings
from .connections import broker_sentinel_options, broker_url, celery_ssl_options
from .kombu_redis import register_transports
from .logs import mask

__all__ = ["RUN_STEP", "HEARTBEAT", "DELIVER_WEBHOOK", "STOP_AGENT_RUN", "FirstSteps", "StepMessage", "make_celery",
           "configure", "dispatcher", "first_steps", "run_stopper", "webhook_scheduler"]
HEARTBEAT = "potpie.heartbeat"
DELIVER_WEBHOOK = "potpie.deliver_webhook"
STOP_AGENT_RUN = "potpie.stop_agent_run"
STOP_DELAY_S = 1.0  # a cancel's stop waits this long: a step that was just starting its run has recorded it


class MaskedCelery(Celery):
    """Celery whose task messages carry masked argument reprs: what Flower and worker logs show of a task."""

    def send_task(self, name: str, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        """Send as usual; the reprs pass the secret mask (a second line of defence: task args hold no secrets)."""
        options.setdefault("argsrepr", mask(saferepr(args or ())))
        options.setdefault("kwargsrepr", mask(saferepr(kwargs or {})))
        return super().send_task(name, args, kwargs, **options)


def make_celery(settings: Settings) -> Celery:
    """The Celery app for the API (producer only) and the workers."""
    return configure(MaskedCelery("potpie_service"), settings)


def configure(app: Celery, settings: Settings) -> Celery:
    """Every Celery setting of the service (the workers' app is configured when Celery first reads its conf)."""
    register_transports()  # kombu_redis: the broker URL's scheme selects Transport or SentinelTransport
    app.conf.broker_url = broker_url(settings)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,            # job state lives in our own store, with TTLs
        result_backend=None,
        task_default_queue=settings.queue_name,
        task_acks_late=True,                # ack after the step ran: a crash redelivers it
        task_reject_on_worker_lost=True,    # ... also when the pool child was killed
        # The pool is sized by sockets, not cores: a step mostly waits on Potpie, so the default is gevent with
        # WORKER_CONCURRENCY greenlets. gevent must be named on the command line (`-P`, so Celery patches the
        # standard library first): workers/boot.py turns a plain `celery -A workers worker` into that command.
        worker_pool="prefork" if settings.worker_pool == "gevent" else settings.worker_pool,
        worker_concurrency=settings.worker_concurrency,
        broker_pool_limit=max(10, min(settings.worker_concurrency, 100)),  # producers shared by the greenlets
        worker_prefetch_multiplier=1,       # no hoarding; ETA steps are held apart from prefetch anyway
        task_time_limit=settings.task_time_limit,  # hard cap for one task run; below the visibility timeout
        task_soft_time_limit=settings.task_time_limit - 15,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        # SIGTERM is a warm shutdown (running steps finish); workers/supervisor.py turns it cold after its grace.
        # A cold one (SIGQUIT) gives steps 2 s more, then cancels them: their messages go back to the queue.
        worker_soft_shutdown_timeout=2.0,
        worker_enable_soft_shutdown_on_idle=False,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=20,   # a broker that stays down makes the worker exit for a restart
        broker_heartbeat=0,
        broker_transport_options={
            "visibility_timeout": settings.broker_visibility_timeout,  # > step limit, > every countdown
            "health_check_interval": 10,
            "socket_keepalive": True,
            "socket_timeout": 10,
            "socket_connect_timeout": 5,
            "max_connections": settings.redis_max_connections,
            **broker_sentinel_options(settings),
        },
        broker_use_ssl=celery_ssl_options(settings),
        worker_direct=True,                 # each worker also consumes its own queue (liveness heartbeats)
        worker_send_task_events=True,       # Flower sees every task
        task_send_sent_event=True,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
    )
    return app


def dispatcher(app: Celery, settings: Settings):
    """A function that schedules step `seq` of a job after `countdown` seconds."""

    def dispatch(job_id: str, seq: int, countdown: float = 0.0) -> None:
        app.send_task(RUN_STEP, args=[job_id, seq], queue=settings.queue_name,
                      countdown=countdown if countdown > 0 else None)

    return dispatch


def run_stopper(app: Celery, settings: Settings):
    """A function that queues the stop of the agent run a job leaves in flight (a cancelled job's)."""

    def stop(job_id: str) -> None:
        app.send_task(STOP_AGENT_RUN, args=[job_id], queue=settings.queue_name, countdown=STOP_DELAY_S)

    return stop


def first_steps(app: Celery, settings: Settings) -> FirstSteps:
    """A new job's first step as the submit script pushes it (celery_message.py)."""
    return FirstSteps(app, settings.queue_name)


def webhook_scheduler(app: Celery, settings: Settings):
    """A function that schedules webhook delivery attempt `attempt` of a job after `countdown` seconds."""

    def schedule(job_id: str, attempt: int, countdown: float = 0.0) -> None:
        app.send_task(DELIVER_WEBHOOK, args=[job_id, attempt], queue=settings.queue_name,
                      countdown=countdown if countdown > 0 else None)

    return schedule
