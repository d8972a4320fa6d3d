"""Settings: every environment variable parsed once, in one place."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping
from urllib.parse import quote, urlsplit

from .auth import bad_entries
from .tokens import valid_key


class ConfigError(Exception):
    """One or more environment variables hold a bad value."""


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError("expected true or false")


def _int(low: int | None = None, high: int | None = None) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise ValueError("expected a whole number") from None
        if low is not None and value < low:
            raise ValueError(f"must be at least {low}")
        if high is not None and value > high:
            raise ValueError(f"must be at most {high}")
        return value

    return parse


def _float(low: float = 0.0) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            raise ValueError("expected a number") from None
        if value < low:
            raise ValueError(f"must be at least {low}")
        return value

    return parse


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}")
        return value

    return parse


def _str(raw: str) -> str:
    return raw.strip()


def _csv(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def _redis_url(raw: str) -> str:
    value = raw.strip()
    if value and urlsplit(value).scheme not in ("redis", "rediss"):
        raise ValueError("must start with redis:// or rediss://")
    return value


def _sentinels(raw: str) -> tuple[tuple[str, int], ...]:
    """`host:port,host:port` (port 26379 when left out)."""
    found = []
    for part in _csv(raw):
        host, _, port = part.partition(":") if ":" in part else (part, ":", "26379")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:  # an IPv6 literal: use a name for it
            raise ValueError(f"expected host:port[,host:port...], got {part!r}")
        found.append((host, int(port)))
    return tuple(found)


def _existing_file(raw: str) -> str:
    value = raw.strip()
    if value and not os.path.isfile(value):
        raise ValueError(f"file not found: {value}")
    return value


@dataclass(frozen=True, repr=False)
class RateLimit:
    """One limit of RATE_LIMIT: `amount` requests per `seconds`."""

    amount: int
    seconds: int
    text: str  # as the 429 body shows it: "5 per 1 minute"

    def __repr__(self) -> str:  # the start-up log shows the settings
        return self.text


_UNIT_SECONDS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
_ONE_LIMIT = re.compile(r"(\d+)\s*(?:/|per)\s*(\d+)?\s*(second|minute|hour|day)s?", re.IGNORECASE | re.ASCII)


def parse_rate_limits(raw: str) -> tuple[RateLimit, ...]:
    """`60/minute`, `10 per second`, `100/2 hours`; several separated by `;` or `,` (empty: no limit)."""
    limits = []
    for part in filter(None, (part.strip() for part in re.split(r"[;,]", raw))):
        match = _ONE_LIMIT.fullmatch(part)
        if not match or int(match[1]) < 1 or int(match[2] or 1) < 1:
            raise ValueError("expected a limit like 60/minute (several: 10/second;100/hour), or off")
        multiples, unit = int(match[2] or 1), match[3].lower()
        limits.append(RateLimit(int(match[1]), multiples * _UNIT_SECONDS[unit], f"{match[1]} per {multiples} {unit}"))
    return tuple(limits)


def _rate_limit(raw: str) -> tuple[RateLimit, ...]:
    value = raw.strip()
    if value.lower() in ("off", "none", ""):
        return ()
    limits = parse_rate_limits(value)
    if not limits:
        raise ValueError("expected a limit like 60/minute (several: 10/second;100/hour), or off")
    return limits


def _env(name: str, default: str, parse: Callable[[str], Any] = _str, secret: bool = False) -> Any:
    return field(default=parse(default), metadata={"env": name, "parse": parse, "secret": secret})


@dataclass(frozen=True)
class Settings:
    """The service's configuration; build with `Settings.from_env()` or directly in tests."""

    port: int = _env("PORT", "8080", _int(1, 65535))
    host: str = _env("HOST", "0.0.0.0")
    api_threads: int = _env("API_THREADS", "1000", _int(10, 20000))  # SOCKETIO_ASYNC_MODE=threading only
    api_connections: int = _env("API_CONNECTIONS", "15000", _int(10, 100000))  # gevent: open connections at most
    potpie_api_key: str = _env("POTPIE_API_KEY", "", secret=True)
    potpie_base_url: str = _env("POTPIE_BASE_URL", "https://production-api.potpie.ai")
    potpie_poll_interval: float = _env("POTPIE_POLL_INTERVAL", "5", _float(0.05))
    parse_timeout: float = _env("PARSE_TIMEOUT", "3600", _float(1))
    request_timeout_ms: int = _env("REQUEST_TIMEOUT", "120000", _int(100))
    potpie_call_attempts: int = _env("POTPIE_CALL_ATTEMPTS", "3", _int(1, 10))
    potpie_stream: bool = _env("POTPIE_STREAM", "false", _bool)  # a stream cannot tell a failed run from a done one
    potpie_agent_id: str = _env("POTPIE_AGENT_ID", "codebase_qna_agent")
    potpie_forward_github_token: bool = _env("POTPIE_FORWARD_GITHUB_TOKEN", "false", _bool)  # self-hosted forks only
    github_token: str = _env("GITHUB_TOKEN", "", secret=True)  # pins branch heads for jobs that bring no token
    github_api_url: str = _env("GITHUB_API_URL", "https://api.github.com")
    redis_url_raw: str = _env("REDIS_URL", "", _redis_url, secret=True)
    redis_host: str = _env("REDIS_HOST", "localhost")
    redis_port: int = _env("REDIS_PORT", "6379", _int(1, 65535))
    redis_password: str = _env("REDIS_PASSWORD", "", secret=True)
    redis_db: int = _env("REDIS_DB", "0", _int(0, 15))
    redis_username: str = _env("REDIS_USERNAME", "")
    redis_tls_enabled: bool = _env("REDIS_TLS_ENABLED", "false", _bool)
    redis_tls_ca_path: str = _env("REDIS_TLS_CA_PATH", "", _existing_file)
    redis_tls_cert_path: str = _env("REDIS_TLS_CERT_PATH", "", _existing_file)
    redis_tls_key_path: str = _env("REDIS_TLS_KEY_PATH", "", _existing_file)
    redis_tls_reject_unauthorized: bool = _env("REDIS_TLS_REJECT_UNAUTHORIZED", "true", _bool)
    redis_max_connections: int = _env("REDIS_MAX_CONNECTIONS", "200", _int(4, 10000))
    redis_sentinels: tuple[tuple[str, int], ...] = _env("REDIS_SENTINELS", "", _sentinels)
    redis_sentinel_master: str = _env("REDIS_SENTINEL_MASTER", "mymaster")
    redis_sentinel_password: str = _env("REDIS_SENTINEL_PASSWORD", "", secret=True)
    redis_min_replicas_ack: int = _env("REDIS_MIN_REPLICAS_ACK", "0", _int(0, 10))
    redis_min_replicas_timeout_ms: int = _env("REDIS_MIN_REPLICAS_TIMEOUT_MS", "1000", _int(1, 60000))
    max_concurrent_jobs: int = _env("MAX_CONCURRENT_JOBS", "5", _int(1, 100000))
    max_retries: int = _env("MAX_RETRIES", "3", _int(0, 20))
    retry_base_delay: float = _env("RETRY_BASE_DELAY", "5", _float(0))
    queue_name: str = _env("QUEUE_NAME", "potpie-analysis")
    log_level: str = _env("LOG_LEVEL", "info", _choice("debug", "info", "warning", "error", "critical"))
    log_format: str = _env("LOG_FORMAT", "json", _choice("json", "text"))
    access_log: str = _env("ACCESS_LOG", "all", _choice("all", "errors", "off"))
    job_ttl_completed: int = _env("JOB_TTL_COMPLETED", "86400", _int(1))
    job_ttl_failed: int = _env("JOB_TTL_FAILED", "604800", _int(1))
    socketio_async_mode: str = _env("SOCKETIO_ASYNC_MODE", "gevent", _choice("gevent", "threading"))
    request_headers_max_bytes: int = _env("REQUEST_HEADERS_MAX_BYTES", "16384", _int(4096, 1048576))
    request_header_fields_max: int = _env("REQUEST_HEADER_FIELDS_MAX", "50", _int(10, 1000))  # gunicorn's
    request_body_timeout: float = _env("REQUEST_BODY_TIMEOUT", "10", _float(0.5))  # a whole body, else 408
    socketio_max_message_bytes: int = _env("SOCKETIO_MAX_MESSAGE_BYTES", "65536", _int(1024, 10485760))
    socketio_connect_timeout: float = _env("SOCKETIO_CONNECT_TIMEOUT", "5", _float(0.5))  # to authenticate
    socketio_event_rate: float = _env("SOCKETIO_EVENT_RATE", "20", _float(0.1))  # per socket and second
    socketio_event_burst: int = _env("SOCKETIO_EVENT_BURST", "200", _int(1, 100000))
    cors_origins: tuple[str, ...] = _env("CORS_ORIGINS", "", _csv)
    broker_visibility_timeout: int = _env("BROKER_VISIBILITY_TIMEOUT", "3600", _int(30))
    worker_pool: str = _env("WORKER_POOL", "gevent", _choice("gevent", "prefork", "threads", "solo"))
    worker_concurrency: int = _env("WORKER_CONCURRENCY", "1000", _int(1, 10000))
    worker_heartbeat_interval: float = _env("WORKER_HEARTBEAT_INTERVAL", "10", _float(0.1))
    step_grace: float = _env("STEP_GRACE", "60", _float(1))
    api_keys: tuple[str, ...] = _env("API_KEYS", "", _csv, secret=True)
    ops_api_keys: tuple[str, ...] = _env("OPS_API_KEYS", "", _csv, secret=True)
    auth_disabled: bool = _env("AUTH_DISABLED", "false", _bool)
    token_encryption_key: str = _env("TOKEN_ENCRYPTION_KEY", "", secret=True)
    metrics_token: str = _env("METRICS_TOKEN", "", secret=True)
    rate_limit: tuple[RateLimit, ...] = _env("RATE_LIMIT", "60/minute", _rate_limit)  # () when off
    trusted_proxies: int = _env("TRUSTED_PROXIES", "0", _int(0, 5))
    dedup_enabled: bool = _env("DEDUP_ENABLED", "true", _bool)
    potpie_rate_limit: float = _env("POTPIE_RATE_LIMIT", "0", _float(0))
    webhook_secret: str = _env("WEBHOOK_SECRET", "", secret=True)
    webhook_allow_private: bool = _env("WEBHOOK_ALLOW_PRIVATE", "false", _bool)
    webhook_max_attempts: int = _env("WEBHOOK_MAX_ATTEMPTS", "5", _int(1, 20))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> "Settings":
        """Parse every variable; raise ConfigError naming each bad one."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        problems: list[str] = []
        for f in fields(cls):
            name = f.metadata["env"]
            if name not in environ:
                continue
            try:
                values[f.name] = f.metadata["parse"](environ[name])
            except ValueError as exc:
                shown = "(hidden)" if f.metadata["secret"] else repr(environ[name])
                problems.append(f"{name}={shown}: {exc}")
        values.update(overrides)
        settings = cls(**values)
        problems.extend(settings._cross_checks())
        if problems:
            raise ConfigError("invalid configuration: " + "; ".join(problems))
        return settings

    def _cross_checks(self) -> list[str]:
        problems = []
        if self.redis_tls_key_path and not self.redis_tls_cert_path:
            problems.append("REDIS_TLS_KEY_PATH is set but REDIS_TLS_CERT_PATH is not")
        problems.extend(self._sentinel_checks())
        if self.broker_visibility_timeout <= self.task_time_limit:
            problems.append(f"BROKER_VISIBILITY_TIMEOUT={self.broker_visibility_timeout}: must exceed the task time "
                            f"limit ({self.task_time_limit:.0f} s, from REQUEST_TIMEOUT and POTPIE_CALL_ATTEMPTS), "
                            "or running steps would be delivered twice")
        if self.token_encryption_key and not valid_key(self.token_encryption_key):
            problems.append("TOKEN_ENCRYPTION_KEY=(hidden): not a Fernet key (make one with "
                            "`python -m potpie_service keygen --token-key`)")
        for name, entries in (("API_KEYS", self.api_keys), ("OPS_API_KEYS", self.ops_api_keys)):
            if bad_entries(entries):
                problems.append(f"{name}=(hidden): entries for {', '.join(bad_entries(entries))} are not "
                                "'name:sha256hex' (the hash from `python -m potpie_service keygen`, not the key)")
        for name, url in (("POTPIE_BASE_URL", self.potpie_base_url), ("GITHUB_API_URL", self.github_api_url)):
            if not url.startswith(("http://", "https://")):
                problems.append(f"{name}: must start with http:// or https://")
        return problems

    def _sentinel_checks(self) -> list[str]:
        if not self.redis_sentinels:
            named = [("REDIS_SENTINEL_PASSWORD", bool(self.redis_sentinel_password)),
                     ("REDIS_SENTINEL_MASTER", self.redis_sentinel_master != "mymaster")]
            return [f"{name} is set but REDIS_SENTINELS is not (the sentinels to ask, host:port,host:port)"
                    for name, set_ in named if set_]
        if not self.redis_sentinel_master:
            return ["REDIS_SENTINEL_MASTER: must name the master the sentinels watch (default mymaster)"]
        if self.redis_url_raw.startswith("rediss://") and not self.redis_tls_enabled:
            return ["REDIS_URL asks for TLS (rediss://) but REDIS_SENTINELS replaces it: set REDIS_TLS_ENABLED=true "
                    "(with REDIS_SENTINELS the data nodes use REDIS_PASSWORD, REDIS_USERNAME, REDIS_DB, REDIS_TLS_*)"]
        return []

    @property
    def redis_tls(self) -> bool:
        """Whether Redis connections use TLS (rediss:// or REDIS_TLS_ENABLED; with sentinels, the latter)."""
        if self.redis_url_raw and not self.redis_sentinels:
            return self.redis_url_raw.startswith("rediss://")
        return self.redis_tls_enabled

    @property
    def redis_url(self) -> str:
        """The Redis URL: REDIS_URL when set, else built from the REDIS_* parts (with REDIS_SENTINELS: the
        credentials and database of the data nodes; connections.py asks the sentinels for the host)."""
        if self.redis_url_raw and not self.redis_sentinels:
            return self.redis_url_raw
        scheme = "rediss" if self.redis_tls_enabled else "redis"
        return f"{scheme}://{self.redis_auth}{self.redis_host}:{self.redis_port}/{self.redis_db}"

    @property
    def redis_auth(self) -> str:
        """REDIS_USERNAME / REDIS_PASSWORD as the `user:password@` part of a URL (quoted; '' for none)."""
        user, password = quote(self.redis_username, safe=""), quote(self.redis_password, safe="")
        return f"{user}:{password}@" if password else (f"{user}@" if user else "")

    @property
    def step_lease(self) -> float:
        """Seconds a step may hold its job: every timed-out try of one Potpie call, plus backoff."""
        return self.potpie_call_attempts * (self.request_timeout + 10) + 10

    @property
    def task_time_limit(self) -> float:
        """Hard limit of one task run; a run chains steps for at most one lease, then re-dispatches."""
        return 2 * self.step_lease + 30

    @property
    def request_timeout(self) -> float:
        """REQUEST_TIMEOUT in seconds: the most one Potpie HTTP call may take, reply included."""
        return self.request_timeout_ms / 1000.0

    @property
    def worker_max_age(self) -> float:
        """A worker counts as alive (/health, potpie_workers_alive) if it consumed a heartbeat this recently."""
        return max(30.0, 3 * self.worker_heartbeat_interval)

    def redacted(self) -> dict[str, Any]:
        """The settings as a dict with every secret replaced, for logs."""
        shown: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            shown[f.metadata["env"]] = "***" if f.metadata["secret"] and value else value
        return shown
