"""kombu's Redis transport, adapted: the one place this service relies on kombu's internals.

kombu's Redis channel builds a new `redis.Redis` for every LPUSH, PUBLISH and ack, and its connection pool raises
past `max_connections` (which under gevent lost the consumer's connection). `Transport` and `SentinelTransport`
reuse one client per pool and wait for a free connection instead. They override kombu's private channel methods
(`_get_pool`, `conn_or_acquire`, `_sentinel_managed_pool`) and read its `_connparams`, `_create_client`,
`_parse_url` and `keyprefix_fanout`: tests/test_celery_seams.py fails, naming what changed, when an upgrade of kombu
moves any of them.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import redis
from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import redis as kombu_redis
from redis.sentinel import Sentinel

from .connections import SentinelBlockingPool

POOL_WAIT_S = 10.0  # how long a publish or ack waits for a free broker connection


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


def register_transports() -> None:
    """Make kombu use these transports for redis://, rediss:// and sentinel:// URLs in this process (called when
    Celery is configured: the API, the workers and Flower). kombu finds a broker URL's transport by its scheme in
    this table; Celery's `broker_transport` would instead make the URL Flower rebuilds unrecognisable to it."""
    TRANSPORT_ALIASES.update(redis=f"{__name__}:Transport", rediss=f"{__name__}:Transport",
                             sentinel=f"{__name__}:SentinelTransport")


