"""The store's Redis client: redis-py's, with its failures to reach Redis (a refused or broken connection, a
timeout, the circuit open) raised as the store's one StoreUnavailable, for every command, script, pipeline and
subscription read. An error Redis answered with (a script's bug, WRONGTYPE, NOSCRIPT, which redis-py handles itself)
stays redis-py's: that is a bug to see, not an outage."""

from __future__ import annotations

from typing import Any

import redis
from redis.client import PubSub, Pipeline

from .errors import StoreUnavailable


def unavailable(exc: redis.RedisError) -> StoreUnavailable:
    """The StoreUnavailable a redis-py connection error or timeout stands for."""
    # a refused or broken connection did nothing, nor did a connect that timed out; a command may have
    sent = isinstance(exc, redis.exceptions.TimeoutError) and "connecting" not in str(exc)
    return StoreUnavailable(f"Redis unavailable ({type(exc).__name__}: {exc})", sent=sent, cause=type(exc).__name__)


_FAILURES = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


class StorePipeline(Pipeline):
    """A pipeline whose execution fails with StoreUnavailable when Redis cannot be had."""

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        try:
            return super().execute(raise_on_error)
        except _FAILURES as exc:
            raise unavailable(exc) from exc


class StorePubSub(PubSub):
    """A subscription whose (re)subscribing and reads fail with StoreUnavailable when Redis cannot be had."""

    def execute_command(self, *args: Any) -> Any:  # SUBSCRIBE and the like, which connect first
        try:
            return super().execute_command(*args)
        except _FAILURES as exc:
            raise unavailable(exc) from exc

    def get_message(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().get_message(*args, **kwargs)
        except _FAILURES as exc:
            raise unavailable(exc) from exc


class StoreRedis(redis.Redis):
    """redis-py's client, failing with StoreUnavailable (see the module)."""

    def execute_command(self, *args: Any, **options: Any) -> Any:
        try:
            return super().execute_command(*args, **options)
        except _FAILURES as exc:
            raise unavailable(exc) from exc

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> StorePipeline:
        return StorePipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)

    def pubsub(self, **kwargs: Any) -> StorePubSub:
        return StorePubSub(self.connection_pool, event_dispatcher=self._event_dispatcher, **kwargs)
