"""Celery configured in one place, and the one way to schedule a job's step by task name.

Every setting here is deliberate; docs/reliability.md explains each (and the README's "Reliability" section).
"""

from __future__ import annotations

import base64
import json
import os
import time
from contextlib import contextmanager
from typing import Any, Iterator

import redis
from celery import Celery
from celery.events.event import Event
from celery.utils.nodenames import anon_nodename
from celery.utils.saferepr import saferepr
from celery.utils.time import utcoffset
from kombu.utils.uuid import uuid
from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import redis as kombu_redis
from redis.sentinel import Sentinel

from .config import Settings
from .core.submission import StepMessage
from .connections import SentinelBlockingPool, broker_sentinel_options, broker_url, celery_ssl_options
from .logs import mask

POOL_WAIT_S = 10.0  # how long a publish or ack waits for a free broker connection
RUN_STEP = "potpie.run_step"
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


class _Channel(kombu_redis.Channel):
    """kombu's Redis channel, reusing one client per connection pool for publishes and acks.

    kombu builds a new `redis.Redis` for every LPUSH, PUBLISH and ack; with redis-py 8 each costs ~140 us of
    Python (it copies ~170 response callbacks), 2-3 per `send_task`. The client is rebuilt when the pool is
    (after a fork or a reconnect), so nothing outlives the connections it uses.
    """

    _shared: tuple[Any, Any] | None = None

    def _get_pool(self, asynchronous: bool = False) -> Any:
        """A blocking pool for the synchronous side: under gevent hundreds of greenlets publish and ack at once,
        and kombu's own pool raises MaxConnectionsError past `max_connections` (which lost the consumer's
        connection); with this one they wait their turn. The event loop's (prefork) pool stays kombu's."""
        if asynchronous:
            return super()._get_pool(asynchronous)
        params = self._connparams(asynchronous=False)
        self.keyprefix_fanout = self.keyprefix_fanout.format(db=params["db"])
        return redis.BlockingConnectionPool(timeout=POOL_WAIT_S, **params)

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        if self._pool is None and self.connection.client is None:
            # After a broker loss Celery collects the connection, then closes this channel, which tries to put its
            # unacked messages back; building a pool now would crash the worker (AttributeError in kombu 5.7).
            # A connection error is ignored by that close; the messages stay in Redis' unacked hash until restored.
            raise redis.exceptions.ConnectionError("the broker connection is closed")
        pool, shared = self.pool, self._shared
        if shared is None or shared[0] is not pool:
            shared = self._shared = (pool, self._create_client())
        yield shared[1]


class _SentinelChannel(_Channel, kombu_redis.SentinelChannel):
    """kombu's Sentinel channel with `_Channel`'s shared client and a blocking pool on the master the sentinels
    name (kombu's pool would raise past `max_connections`, as the plain one did)."""

    def _get_pool(self, asynchronous: bool = False) -> Any:
        return kombu_redis.SentinelChannel._get_pool(self, asynchronous)

    def _sentinel_managed_pool(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._sentinel_managed_pool(asynchronous)
        params = self._connparams(asynchronous=False)
        params.pop("host", None)
        params.pop("port", None)
        sentinels = [(url.hostname, url.port or 26379) for url in map(kombu_redis._parse_url,
                                                                          self.connection.client.alt)]
        manager = Sentinel(sentinels, sentinel_kwargs=getattr(self, "sentinel_kwargs", None), **params)
        self._sentinel_manager = manager  # kombu closes its sentinel connections through this
        master = getattr(self, "master_name", "mymaster")  # a transport option (REDIS_SENTINEL_MASTER)
        return manager.master_for(master, connection_pool_class=SentinelBlockingPool,
                                  timeout=POOL_WAIT_S).connection_pool


class Transport(kombu_redis.Transport):
    """The Redis transport with `_Channel`, for redis:// and rediss:// alike."""

    Channel = _Channel


class SentinelTransport(kombu_redis.SentinelTransport):
    """The Sentinel transport with `_SentinelChannel`; selected when REDIS_SENTINELS is set."""

    Channel = _SentinelChannel


# kombu finds a broker URL's transport by its scheme in this table: ours for redis://, rediss:// and sentinel://
# (rather than Celery's `broker_transport`, which would make the URL Flower rebuilds unrecognisable to it).
TRANSPORT_ALIASES.update(redis=f"{__name__}:Transport", rediss=f"{__name__}:Transport",
                         sentinel=f"{__name__}:SentinelTransport")


def make_celery(settings: Settings) -> Celery:
    """The Celery app for the API (producer only) and the workers."""
    return configure(MaskedCelery("potpie_service"), settings)


def configure(app: Celery, settings: Settings) -> Celery:
    """Every Celery setting of the service (the workers' app is configured when Celery first reads its conf)."""
    app.conf.broker_url = broker_url(settings)  # its scheme selects Transport or SentinelTransport (above)
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


class FirstSteps:
    """`run_step(job_id, 0)` as `send_task` would put it on the broker (kombu's Redis envelope around Celery's
    protocol-2 message) and its task-sent event, for the submit script to push with the job: the API's submit is
    one Redis round trip instead of a script, an LPUSH and a PUBLISH through a kombu producer (about half of its
    CPU). Both are built once per process by Celery's own `as_task_v2` and event constructor, with placeholders
    where a message differs from the next (job and task ids, delivery tag, clock, time); a call fills them in.
    tests/test_queue.py holds the result to what `send_task` writes."""

    def __init__(self, app: Celery, settings: Settings) -> None:
        self.app, self.queue = app, settings.queue_name
        db = str(app.connection_for_write().virtual_host or "0").strip("/") or "0"  # kombu's fanout prefix
        self.event_channel = f"/{db}.{app.conf.event_exchange}/task.sent"
        self._built: tuple[int, str, str, str, str, str] | None = None  # for this pid (the name carries it)

    def __call__(self, job_id: str) -> StepMessage:
        pid, body_head, body_tail, message, event_body, event = self._templates()
        task_id = uuid()
        body = base64.b64encode(f"{body_head}{job_id}{body_tail}".encode()).decode()
        sent = (event_body.replace(_TASK, task_id).replace(_JOB, job_id)
                .replace(f'"{_CLOCK}"', str(self.app.clock.forward())).replace(f'"{_TIME}"', repr(time.time())))
        return StepMessage(
            message.replace(_TASK, task_id).replace(_JOB, job_id).replace(_BODY, body).replace(_TAG, uuid()),
            self.event_channel,
            event.replace(_BODY, base64.b64encode(sent.encode()).decode()).replace(_TAG, uuid()))

    def _templates(self) -> tuple[int, str, str, str, str, str]:
        if self._built is None or self._built[0] != os.getpid():
            args, origin = [_JOB, 0], anon_nodename()
            argsrepr = mask(saferepr(args))
            headers, properties, body, sent = self.app.amqp.as_task_v2(
                _TASK, RUN_STEP, args, argsrepr=argsrepr, kwargsrepr="{}", origin=origin, ignore_result=None,
                create_sent_event=True)
            head, _, tail = json.dumps(body).partition(_JOB)
            message = _envelope(headers, {**properties, "argsrepr": argsrepr, "kwargsrepr": "{}", "delivery_mode": 2,
                                          "delivery_info": {"exchange": "", "routing_key": self.queue}})
            event = Event("task-sent", hostname=origin, utcoffset=utcoffset(), pid=os.getpid(), clock=_CLOCK, **sent,
                          queue=self.queue, exchange="", routing_key=self.queue, timestamp=_TIME)
            exchange = self.app.conf.event_exchange
            self._built = (os.getpid(), head, tail, message, json.dumps(event), _envelope({"hostname": origin}, {
                "delivery_mode": 1, "delivery_info": {"exchange": exchange, "routing_key": "task.sent"}}))
        return self._built


# FirstSteps' placeholders: none can occur in a job id (hex), a task id (uuid) or anything else the message holds
_JOB, _TASK, _BODY, _TAG, _CLOCK, _TIME = "@job@", "@task@", "@body@", "@tag@", "@clock@", "@time@"


def _envelope(headers: dict[str, Any], properties: dict[str, Any]) -> str:
    """kombu's Redis message around a base64-encoded JSON body (`_BODY`, filled in later)."""
    return json.dumps({
        "body": _BODY, "content-encoding": "utf-8", "content-type": "application/json", "headers": headers,
        "properties": {**properties, "priority": 0, "body_encoding": "base64", "delivery_tag": _TAG},
    })


def run_stopper(app: Celery, settings: Settings):
    """A function that queues the stop of the agent run a job leaves in flight (a cancelled job's)."""

    def stop(job_id: str) -> None:
        app.send_task(STOP_AGENT_RUN, args=[job_id], queue=settings.queue_name, countdown=STOP_DELAY_S)

    return stop


def webhook_scheduler(app: Celery, settings: Settings):
    """A function that schedules webhook delivery attempt `attempt` of a job after `countdown` seconds."""

    def schedule(job_id: str, attempt: int, countdown: float = 0.0) -> None:
        app.send_task(DELIVER_WEBHOOK, args=[job_id, attempt], queue=settings.queue_name,
                      countdown=countdown if countdown > 0 else None)

    return schedule
