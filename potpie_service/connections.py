"""Redis connection options, built once from Settings for every client (store, broker, Socket.IO)."""

from __future__ import annotations

import functools
import logging
import ssl
from typing import Any
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .config import Settings

log = logging.getLogger(__name__)

# Short timeouts so a dead Redis turns into an error quickly, never a hang.
CONNECT_TIMEOUT = 0.6
SOCKET_TIMEOUT = 5.0
HEALTH_CHECK_INTERVAL = 10


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
        where = urlsplit(settings.redis_url)
        reason = getattr(cause, "reason", None) or type(cause).__name__
        return (f"TLS handshake with Redis at {where.hostname}:{where.port} failed ({reason}: {cause}); check "
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


def redis_options(settings: Settings, socket_timeout: float | None = SOCKET_TIMEOUT) -> dict[str, Any]:
    """Keyword arguments for `redis.Redis.from_url` shared by every Redis client of the service."""
    return {
        "socket_connect_timeout": CONNECT_TIMEOUT,
        "socket_timeout": socket_timeout,
        "socket_keepalive": True,
        "health_check_interval": HEALTH_CHECK_INTERVAL,
        "retry": Retry(NoBackoff(), 1),  # one quick retry heals a pooled connection after a Redis restart
        **tls_options(settings),
    }


def make_redis(settings: Settings, socket_timeout: float | None = SOCKET_TIMEOUT) -> redis.Redis:
    """A Redis client for the job store and health checks: a blocking pool of REDIS_MAX_CONNECTIONS, so a thousand
    greenlets (or API threads) share a bounded set of connections, waiting their turn at most SOCKET_TIMEOUT
    (redis-py's own pool stops at 100 and raises instead)."""
    pool = redis.BlockingConnectionPool.from_url(settings.redis_url, decode_responses=True,
                                                 max_connections=settings.redis_max_connections,
                                                 timeout=SOCKET_TIMEOUT, **redis_options(settings, socket_timeout))
    return redis.Redis(connection_pool=pool)


def celery_ssl_options(settings: Settings) -> dict[str, Any] | None:
    """Celery's `broker_use_ssl` / `redis_backend_use_ssl` value (None when TLS is off)."""
    if not settings.redis_tls:
        return None
    reqs = ssl.CERT_REQUIRED if settings.redis_tls_reject_unauthorized else ssl.CERT_NONE
    return {"ssl_cert_reqs": reqs, **_tls_files(settings)}
