"""Guards on what the service relies on inside Celery and kombu beyond their public API (workers/celery_worker.py,
potpie_service/kombu_redis.py; the forged first-step message has its own comparison in tests/test_queue.py). Each
fails with a message naming what an upgrade moved, before a deployment finds out."""

from __future__ import annotations

import inspect

import kombu
import kombu.transport.virtual
from celery.worker import request as celery_request
from celery.worker import state as worker_state
from celery.worker.consumer import Consumer
from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import redis as kombu_redis

from potpie_service import kombu_redis as ours
from workers import celery_worker


def test_the_worker_internals_the_supervisor_reads_are_where_it_reads_them() -> None:
    active = worker_state.active_requests
    assert hasattr(active, "__iter__") and hasattr(active, "__len__"), "celery.worker.state.active_requests changed"
    for name in ("id", "time_start", "acknowledge"):
        assert hasattr(celery_request.Request, name), f"celery's Request has no {name!r} any more"
    assert not inspect.signature(celery_request.Request.acknowledge).parameters.keys() - {"self"}, \
        "Request.acknowledge() takes arguments now"
    assert "queue" in inspect.signature(Consumer.cancel_task_queue).parameters, \
        "Consumer.cancel_task_queue(queue) changed"
    assert celery_worker.running_count() == len(celery_worker.running_requests()) == 0


def test_kombus_redis_channel_still_has_what_our_transport_overrides_and_reads() -> None:
    for name in ("_get_pool", "conn_or_acquire", "_create_client", "_connparams", "keyprefix_fanout", "pool", "client"):
        assert hasattr(kombu_redis.Channel, name), f"kombu's Redis Channel has no {name!r} any more"
    assert "asynchronous" in inspect.signature(kombu_redis.Channel._get_pool).parameters
    assert "client" in inspect.signature(kombu_redis.Channel.conn_or_acquire).parameters
    assert "self.connection = connection" in inspect.getsource(kombu.transport.virtual.Channel.__init__), \
        "kombu's virtual Channel no longer keeps its connection as .connection (conn_or_acquire reads it)"
    assert hasattr(kombu_redis.SentinelChannel, "_sentinel_managed_pool"), "SentinelChannel changed"
    assert callable(kombu_redis._parse_url), "kombu.transport.redis._parse_url is gone"
    assert isinstance(TRANSPORT_ALIASES, dict) and "redis" in TRANSPORT_ALIASES


def test_our_transports_are_chosen_by_scheme_once_registered() -> None:
    ours.register_transports()
    for url, transport in (("redis://127.0.0.1:1/0", ours.Transport), ("rediss://127.0.0.1:1/0", ours.Transport),
                           ("sentinel://127.0.0.1:1", ours.SentinelTransport)):
        assert kombu.Connection(url).get_transport_cls() is transport, url
