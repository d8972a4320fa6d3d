"""Scenarios 4 and 5: Redis (with AOF, as deployed) restarted, then down for 30 s, under a running stack."""

from __future__ import annotations

import time
from typing import Iterator

import pytest
import requests

from tests.conftest import Stack, make_stack
from tests.faults.conftest import FAULT_ENV, fast_simulator, states, submit_many, wait_all_final, \
    worker_health
from tests.stack import RedisServer, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def aof_stack() -> Iterator[Stack]:
    """A stack on its own Redis with appendonly=yes (appendfsync always), on a port that survives restarts."""
    server = RedisServer(appendonly=True).start()
    sim = fast_simulator(parse_seconds=0.5, slow_parse_seconds=4)
    stack = make_stack(server, sim, "aof", **{**FAULT_ENV, "MAX_CONCURRENT_JOBS": "3"})
    yield stack
    stack.stop()
    sim.stop()
    server.cleanup()


def _pids(stack: Stack) -> list[int]:
    return [service.proc.pid for service in [stack.api, *stack.workers]]  # type: ignore[union-attr]


def _nobody_restarted(stack: Stack, pids: list[int]) -> None:
    assert all(service.alive() for service in [stack.api, *stack.workers]), "a process exited"
    assert _pids(stack) == pids


def test_redis_restart_keeps_queued_and_running_jobs_and_nothing_needs_a_restart(aof_stack: Stack,
                                                                                   followers) -> None:
    stack, pids = aof_stack, _pids(aof_stack)
    follower = followers(stack.url, reconnection_delay_max=1.0)
    ids = submit_many(stack, [f"slow-parse/aof-{i}" for i in range(8)])
    follower.follow(ids)
    wait_for(lambda: states(stack, ids).count("parsing") == 3, 10, what="three jobs running")
    assert states(stack, ids).count("queued") == 5, "five wait for a slot (MAX_CONCURRENT_JOBS=3)"

    stack.redis.restart(down_for=1.0)
    assert states(stack, ids).count("queued") == 5 and states(stack, ids).count("parsing") == 3, \
        "the AOF brought every job back as it was"

    bodies = wait_all_final(stack, ids, timeout=60)
    assert [body["status"] for body in bodies] == ["finished"] * 8
    late = stack.submit("octocat/aof-after")["job_id"]
    assert stack.wait_final(late, timeout=20)["status"] == "finished"
    _nobody_restarted(stack, pids)
    # The worker consumes again by itself (kombu reconnects); its liveness probe says so.
    probe = worker_health(stack.env, stack.workers[0].hostname, max_age=3)  # type: ignore[attr-defined]
    assert probe.returncode == 0, probe.stdout
    # A client that followed the jobs through the restart got every final event.
    for job_id, body in zip(ids, bodies):
        name, payload = follower.wait_final(job_id, timeout=10)
        assert name == "analysis_complete" and payload["data"] == body["result"]
        assert len(follower.finals(job_id)) == 1


def test_redis_down_30s_answers_503_fast_and_recovers_by_itself(aof_stack: Stack) -> None:
    stack, pids = aof_stack, _pids(aof_stack)
    ids = submit_many(stack, [f"slow-parse/down-{i}" for i in range(3)])
    wait_for(lambda: states(stack, ids) == ["parsing"] * 3, 10, what="the jobs to be running")

    stack.redis.stop()
    down_since, slowest = time.monotonic(), {"health": 0.0, "analyze": 0.0}
    while time.monotonic() - down_since < 30:
        started = time.monotonic()
        health = requests.get(stack.url + "/health", timeout=10)
        slowest["health"] = max(slowest["health"], time.monotonic() - started)
        assert health.status_code == 503 and health.json()["status"] == "unhealthy"
        started = time.monotonic()
        analyze = requests.post(stack.url + "/analyze", json={"repo": "octocat/while-down"}, timeout=10)
        slowest["analyze"] = max(slowest["analyze"], time.monotonic() - started)
        assert analyze.status_code == 503 and analyze.json()["success"] is False, analyze.text
        assert "Redis" in analyze.json()["error"]
        _nobody_restarted(stack, pids)  # no crash, no crash loop
        time.sleep(0.5)
    assert slowest["health"] < 2 and slowest["analyze"] < 2, slowest

    stack.redis.start()
    back = time.monotonic()
    bodies = wait_all_final(stack, ids, timeout=60)
    assert [body["status"] for body in bodies] == ["finished"] * 3
    late = stack.submit("octocat/down-after")["job_id"]
    assert stack.wait_final(late, timeout=30)["status"] == "finished"
    wait_for(lambda: requests.get(stack.url + "/health", timeout=5).status_code == 200, 10, what="/health 200")
    _nobody_restarted(stack, pids)
    print(f"\nslowest answers while Redis was down: {slowest}; recovered {time.monotonic() - back:.1f} s after")
