"""The circuit breaker (circuit.py) alone, and at its seam in redis-py (connections.py) against a real Redis that
goes silent (SIGSTOP): a guard that fails clearly if an upgrade of redis-py stops routing every command, pipeline
and connect through the retry policy it copies into each connection."""

from __future__ import annotations

import os
import signal
import time
from typing import Iterator

import pytest
import redis

from potpie_service.circuit import PROBE_LIMIT_S, Breaker, CircuitOpen
from potpie_service.config import Settings
from potpie_service.connections import GuardedRetry, RedisSilent, make_redis
from tests.stack import RedisServer


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_timeout_opens_the_circuit_then_one_probe_closes_or_reopens_it() -> None:
    clock = Clock()
    breaker = Breaker(cooldown=1.0, clock=clock)
    breaker.admit()  # closed: everything goes through
    breaker.timed_out()
    assert breaker.open
    with pytest.raises(CircuitOpen):
        breaker.admit()
    clock.now += 1.0
    breaker.admit()  # half-open: this one probes ...
    with pytest.raises(CircuitOpen):
        breaker.admit()  # ... and the others still fail at once
    breaker.timed_out()  # the probe timed out too: open again, for a full cooldown
    clock.now += 0.5
    with pytest.raises(CircuitOpen):
        breaker.admit()
    clock.now += 0.5
    breaker.admit()
    breaker.answered()
    assert not breaker.open
    breaker.admit()
    breaker.admit()


def test_a_probe_that_never_reports_stops_blocking_after_a_while() -> None:
    clock = Clock()
    breaker = Breaker(cooldown=1.0, clock=clock)
    breaker.timed_out()
    clock.now += 1.0
    breaker.admit()  # a probe whose call ended before it reached Redis: it never reports
    with pytest.raises(CircuitOpen):
        breaker.admit()
    clock.now += PROBE_LIMIT_S
    breaker.admit()  # another may probe


def test_a_probe_refused_at_once_lets_the_next_call_probe() -> None:
    """Redis came back refusing (restarting): the probe's connection is refused at once, which says nothing of a
    silence; the next call probes instead of every call failing until the probe limit."""
    clock = Clock()
    breaker = Breaker(cooldown=1.0, clock=clock)
    breaker.timed_out()
    clock.now += 1.0
    breaker.admit()
    breaker.refused()
    assert breaker.open
    breaker.admit()  # the next call probes at once
    breaker.answered()
    assert not breaker.open


@pytest.fixture
def silent_redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    os.kill(server.proc.pid, signal.SIGCONT)  # type: ignore[union-attr]
    server.cleanup()


def test_redis_py_routes_commands_pipelines_and_connects_through_the_guarded_retry(silent_redis) -> None:
    client = make_redis(Settings(redis_url_raw=silent_redis.url), socket_timeout=0.5)
    retry = client.connection_pool.connection_kwargs["retry"]
    assert isinstance(retry, GuardedRetry), "the pool no longer carries our retry policy"
    client.set("k", "v")
    connection = client.connection_pool.get_connection()
    try:
        assert isinstance(connection.retry, GuardedRetry) and connection.retry.breaker is retry.breaker, \
            "redis-py no longer copies the retry policy into connections as GuardedRetry.__deepcopy__ expects"
    finally:
        client.connection_pool.release(connection)

    os.kill(silent_redis.proc.pid, signal.SIGSTOP)
    started = time.monotonic()
    with pytest.raises(redis.exceptions.TimeoutError):
        client.get("k")
    assert time.monotonic() - started < 0.9, "a timeout was retried (it must not be)"
    assert retry.breaker.open, "a command's timeout did not reach the breaker"
    started = time.monotonic()
    with pytest.raises(RedisSilent):
        client.pipeline().get("k").execute()
    assert time.monotonic() - started < 0.05, "an open circuit still waited on Redis"

    os.kill(silent_redis.proc.pid, signal.SIGCONT)
    time.sleep(retry.breaker.cooldown)
    assert client.pipeline().get("k").execute() == ["v"]  # the probe: a pipeline's answer closes the circuit
    assert not retry.breaker.open
    assert client.get("k") == "v"
