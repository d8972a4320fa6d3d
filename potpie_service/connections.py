"""Redis connection options, built once from Settings for every client (store, broker, Socket.IO): one Redis at
REDIS_URL, or the master the sentinels of REDIS_SENTINELS name (each client asks them again after a failover)."""

from __future__ import annotations

import functools
import logging
import socket
import ssl
from typing import Any, Callable, TypeVar
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelConnectionPool

from .circuit import Breaker, CircuitOpen
from .config import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

# Short timeouts so a dead Redis turns into an error quickly, never a hang.
CONNECT_TIMEOUT = 0.6
SOCKET_TIMEOUT = 5.0
API_SOCKET_TIMEOUT = 1.5  # an API request answers within ~2 s whatever Redis does (a silent Redis: 503)
HEALTH_CHECK_INTERVAL = 10
# The probe client (/readyz, /health): a silent Redis must cost a probe well under the kubelet's timeout, so every
# wait is short and a timeout is never retried (the shared client's 5 s and one retry made /health take 10 s).
PROBE_TIMEOUT = 0.5
PROBE_CONNECTIONS = 4
PROBE_POOL_WAIT = 0.25


def api_timeout(settings: Settings) -> float:
    """The API's Redis socket timeout: short, but longer than a durable submit's WAIT for its replicas."""
    waits = settings.redis_min_replicas_timeout_ms / 1000 + 0.5 if settings.redis_min_replicas_ack else 0.0
    return max(API_SOCKET_TIMEOUT, waits)


class RedisSilent(redis.exceptions.ConnectionError):
    """Not sent: Redis timed out moments ago (the circuit is open); a connection error to callers."""


class GuardedRetry(Retry):
    """redis-py's retry policy with a circuit breaker: one quick retry on a connection error (a pooled connection
    a Redis restart broke), none on a timeout (a silent Redis would make it wait twice); a timeout opens the
    breaker, any answer closes it. redis-py runs every command, pipeline and connect through `call_with_retry`."""

    def __init__(self, breaker: Breaker) -> None:
        super().__init__(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,))
        self.breaker = breaker

    def __deepcopy__(self, memo: dict[int, Any]) -> "GuardedRetry":
        """redis-py copies the retry policy into each connection: the copies share the one breaker."""
        return GuardedRetry(self.breaker)

    def call_with_retry(self, do: Callable[[], T], fail: Any, is_retryable: Any = None,
                        with_failure_count: bool = False) -> T:
        try:
            result = super().call_with_retry(do, fail, is_retryable, with_failure_count)
        except (redis.exceptions.TimeoutError, socket.timeout):
            self.breaker.timed_out()
            raise
        except redis.exceptions.ConnectionError:
            self.breaker.refused()
            raise
        except redis.exceptions.RedisError:  # an error Redis answered with (NOSCRIPT, WRONGTYPE...): it is there
            self.breaker.answered()
            raise
        self.breaker.answered()
        return result


class GuardedPool:
    """A connection pool that fails a call at once while its GuardedRetry's breaker is open, before the call waits
    for a connection (mixed in before redis-py's pool class)."""

    connection_kwargs: dict[str, Any]

    def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        retry = self.connection_kwargs.get("retry")
        if isinstance(retry, GuardedRetry):
            try:
                retry.breaker.admit()
            except CircuitOpen as exc:
                raise RedisSilent(str(exc)) from None
            try:
                return super().get_connection(*args, **kwargs)  # type: ignore[misc]
            except redis.exceptions.ConnectionError:  # none to be had, or refused while connecting
                retry.breaker.refused()
                raise
        return super().get_connection(*args, **kwargs)  # type: ignore[misc]


class GuardedBlockingPool(GuardedPool, redis.BlockingConnectionPool):
    """redis-py's blocking pool behind the breaker."""


@functools.lru_cache(maxsize=1)
def _warn_unverified() -> None:
    log.warning("REDIS_TLS_REJECT_UNAUTHORIZED=false: the Redis server certificate is NOT verified; anyone on "
                "the network path can impersonate Redis. Use only for local testing.")


def tls_problem(settings: Settings) -> str | None:
    """Why TLS to Redis cannot work with this configuration (bad CA, refused client cert), else None.

    A Redis that is merely down is not a problem here: the API starts and reports itself unhealthy.
    """
    if not settings.redis_tls:
        return None
    client = make_redis(settings)
    try:
        client.ping()
    except redis.RedisError as exc:
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, ssl.SSLError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            return None
        reason = getattr(cause, "reason", None) or type(cause).__name__
        return (f"TLS handshake with Redis at {where(settings)} failed ({reason}: {cause}); check "
                "REDIS_TLS_CA_PATH (the CA that signed the server certificate) and, if Redis requires client "
                "certificates, REDIS_TLS_CERT_PATH and REDIS_TLS_KEY_PATH")
    finally:
        client.close()
    return None


def tls_options(settings: Settings) -> dict[str, Any]:
    """redis-py keyword arguments for TLS (empty when TLS is off)."""
    if not settings.redis_tls:
        return {}
    options: dict[str, Any] = {
        "ssl_cert_reqs": "required" if settings.redis_tls_reject_unauthorized else "none",
    }
    if not settings.redis_tls_reject_unauthorized:
        _warn_unverified()
        options["ssl_check_hostname"] = False
    return {**options, **_tls_files(settings)}


def _tls_files(settings: Settings) -> dict[str, str]:
    """The CA bundle and client certificate/key options that are set (same names for redis-py and kombu)."""
    files = {"ssl_ca_certs": settings.redis_tls_ca_path, "ssl_certfile": settings.redis_tls_cert_path,
             "ssl_keyfile": settings.redis_tls_key_path}
    return {name: path for name, path in files.items() if path}


def redis_options(settings: Settings, socket_timeout: float | None = SOCKET_TIMEOUT,
                  retry: Retry | None = None) -> dict[str, Any]:
    """Keyword arguments for `redis.Redis.from_url` shared by every Redis client of the service. The retry: one
    quick retry on a connection error (it heals a pooled connection after a Redis restart), none on a timeout."""
    return {
        "socket_connect_timeout": CONNECT_TIMEOUT,
        "socket_timeout": socket_timeout,
        "socket_keepalive": True,
        "health_check_interval": HEALTH_CHECK_INTERVAL,
        "retry": retry or Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,)),
        **tls_options(settings),
    }


class SentinelBlockingPool(GuardedPool, SentinelConnectionPool, redis.BlockingConnectionPool):
    """The master's address from the sentinels (asked again when a connection breaks), with the blocking pool's
    bound (callers past `max_connections` wait their turn instead of failing) and the breaker."""


def where(settings: Settings) -> str:
    """Which Redis the service uses, for start-up lines and errors (no credentials)."""
    if settings.redis_sentinels:
        return f"the master {settings.redis_sentinel_master!r} of the sentinels {sentinel_list(settings)}"
    url = urlsplit(settings.redis_url)
    return f"{url.hostname}:{url.port or 6379}"


def sentinel_list(settings: Settings) -> str:
    """REDIS_SENTINELS as host:port,host:port."""
    return ",".join(f"{host}:{port}" for host, port in settings.redis_sentinels)


def node_options(settings: Settings) -> dict[str, Any]:
    """Credentials and database of the data nodes behind the sentinels."""
    options: dict[str, Any] = {"db": settings.redis_db}
    if settings.redis_username:
        options["username"] = settings.redis_username
    if settings.redis_password:
        options["password"] = settings.redis_password
    return options


def sentinel_options(settings: Settings) -> dict[str, Any]:
    """How to talk to the sentinels themselves: their password, short timeouts, TLS when the data nodes use it."""
    options: dict[str, Any] = {"socket_connect_timeout": CONNECT_TIMEOUT, "socket_timeout": CONNECT_TIMEOUT,
                               **({"ssl": True, **tls_options(settings)} if settings.redis_tls else {})}
    if settings.redis_sentinel_password:
        options["password"] = settings.redis_sentinel_password
    return options


def make_redis(settings: Settings, socket_timeout: float = SOCKET_TIMEOUT,
               redis_class: type[redis.Redis] = redis.Redis) -> redis.Redis:
    """A Redis client for the job store: a blocking pool of REDIS_MAX_CONNECTIONS, so a thousand greenlets (or API
    threads) share a bounded set of connections, waiting their turn at most `socket_timeout` (redis-py's own pool
    stops at 100 and raises instead), behind a circuit breaker: after a call timed out, calls fail at once for a
    second, then one probes (circuit.py). With sentinels, on the master they name."""
    bound = {"max_connections": settings.redis_max_connections, "timeout": socket_timeout}
    options = redis_options(settings, socket_timeout, GuardedRetry(Breaker()))
    if settings.redis_sentinels:
        sentinel = Sentinel(list(settings.redis_sentinels), sentinel_kwargs=sentinel_options(settings))
        return sentinel.master_for(settings.redis_sentinel_master, redis_class=redis_class,
                                   connection_pool_class=SentinelBlockingPool, decode_responses=True, **bound,
                                   **node_options(settings), **({"ssl": True} if settings.redis_tls else {}),
                                   **options)
    pool = GuardedBlockingPool.from_url(settings.redis_url, decode_responses=True, **bound, **options)
    return redis_class(connection_pool=pool)


def make_probe_redis(settings: Settings, redis_class: type[redis.Redis] = redis.Redis) -> redis.Redis:
    """A Redis client of its own for the API's probes: PROBE_TIMEOUT to connect and to answer, a pool of
    PROBE_CONNECTIONS waited for at most PROBE_POOL_WAIT (so a probe never queues behind the shared pool), no
    health-check PING before a command. A refused or reset connection fails at once and is tried once more (a
    pooled connection Redis dropped must not fail a probe); a timeout is never retried. With sentinels, on the
    master they name, the sentinels asked with the same short timeouts."""
    options = {**redis_options(settings, PROBE_TIMEOUT), "socket_connect_timeout": PROBE_TIMEOUT,
               "health_check_interval": 0, "retry": Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,))}
    bound = {"max_connections": PROBE_CONNECTIONS, "timeout": PROBE_POOL_WAIT}
    if settings.redis_sentinels:
        quick = {**sentinel_options(settings), "socket_connect_timeout": PROBE_TIMEOUT, "socket_timeout": PROBE_TIMEOUT}
        sentinel = Sentinel(list(settings.redis_sentinels), sentinel_kwargs=quick)
        return sentinel.master_for(settings.redis_sentinel_master, redis_class=redis_class,
                                   connection_pool_class=SentinelBlockingPool, decode_responses=True, **bound,
                                   **node_options(settings), **({"ssl": True} if settings.redis_tls else {}),
                                   **options)
    pool = redis.BlockingConnectionPool.from_url(settings.redis_url, decode_responses=True, **bound, **options)
    return redis_class(connection_pool=pool)


def broker_url(settings: Settings) -> str:
    """Celery's broker URL: REDIS_URL, or kombu's `sentinel://` list (the master's name is a transport option)."""
    if not settings.redis_sentinels:
        return settings.redis_url
    return ";".join(f"sentinel://{settings.redis_auth}{host}:{port}/{settings.redis_db}"
                    for host, port in settings.redis_sentinels)


def broker_sentinel_options(settings: Settings) -> dict[str, Any]:
    """kombu transport options for the sentinel transport (empty without sentinels)."""
    if not settings.redis_sentinels:
        return {}
    return {"master_name": settings.redis_sentinel_master, "sentinel_kwargs": sentinel_options(settings)}


def socketio_manager_args(settings: Settings) -> tuple[str, dict[str, Any]]:
    """python-socketio RedisManager's URL and `redis_options`: `redis+sentinel://` with sentinels (credentials
    in the options, not the URL, which python-socketio does not unquote)."""
    options = redis_options(settings, socket_timeout=None)
    if not settings.redis_sentinels:
        return settings.redis_url, options
    url = f"redis+sentinel://{sentinel_list(settings)}/{settings.redis_db}/{settings.redis_sentinel_master}"
    return url, {**options, **node_options(settings), **({"ssl": True} if settings.redis_tls else {}),
                 "sentinel_kwargs": sentinel_options(settings)}


def celery_ssl_options(settings: Settings) -> dict[str, Any] | None:
    """Celery's `broker_use_ssl` / `redis_backend_use_ssl` value (None when TLS is off)."""
    if not settings.redis_tls:
        return None
    reqs = ssl.CERT_REQUIRED if settings.redis_tls_reject_unauthorized else ssl.CERT_NONE
    return {"ssl_cert_reqs": reqs, **_tls_files(settings)}
