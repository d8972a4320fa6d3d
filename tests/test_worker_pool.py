"""The green worker: a plain `celery -A workers worker` runs gevent with WORKER_CONCURRENCY greenlets, keeps many
Potpie calls in flight at once, bounds a whole call by REQUEST_TIMEOUT, and aborts a cancelled job's call."""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime
from typing import Iterator

import pytest
import requests

from potpie_service.config import Settings
from potpie_service.queue import make_celery
from potpie_service.potpie.simulator import Simulator, SimulatorConfig
from tests.conftest import SIM_KEY, Stack, make_stack, simulator_stats
from tests.stack import start_worker, wait_for
from workers.boot import green_command

pytestmark = pytest.mark.e2e  # whole stacks of processes: `make test` runs it, `make test-fast` does not

FINAL = ("finished", "failed", "cancelled")


def _pool(stack: Stack, hostname: str) -> dict:
    """The worker's own account of its pool (`celery inspect stats`)."""
    control = make_celery(Settings.from_env(stack.env)).control
    replies = control.inspect(destination=[hostname], timeout=5).stats()
    return replies[hostname]["pool"]


@pytest.fixture(scope="module")
def slow_agent() -> Iterator[Simulator]:
    """A Potpie whose agent replies stream for 3 s and whose every answer takes 50 ms more."""
    sim = Simulator(SimulatorConfig(api_key=SIM_KEY, parse_seconds=0.3, message_seconds=3.0, latency_ms=50))
    sim.start()
    yield sim
    sim.stop()


@pytest.fixture(scope="module")
def green_stack(redis_server, slow_agent) -> Iterator[Stack]:
    running = make_stack(redis_server, slow_agent, "green", MAX_CONCURRENT_JOBS="100", RATE_LIMIT="off",
                         WORKER_CONCURRENCY="300", REQUEST_TIMEOUT="10000")
    yield running
    running.stop()


def test_a_plain_worker_command_runs_the_configured_green_pool(green_stack: Stack) -> None:
    worker = green_stack.workers[0]
    assert "--pool" not in " ".join(worker.args) and "--concurrency" not in " ".join(worker.args)
    pool = _pool(green_stack, worker.hostname)  # type: ignore[attr-defined]
    assert pool["implementation"] == "celery.concurrency.gevent:TaskPool" and pool["max-concurrency"] == 300
    assert worker.alive()  # the same process (pid) the test started: it replaced itself, it did not fork
    assert "worker_pool setting shouldn't be used" not in worker.log()


def test_worker_pool_prefork_runs_prefork(green_stack: Stack) -> None:
    worker = start_worker({**green_stack.env, "WORKER_POOL": "prefork", "WORKER_CONCURRENCY": "2"}, "green-prefork")
    try:
        pool = _pool(green_stack, worker.hostname)  # type: ignore[attr-defined]
        assert pool["implementation"] == "celery.concurrency.prefork:TaskPool" and pool["max-concurrency"] == 2
    finally:
        worker.stop()


def test_green_command_keeps_what_the_command_line_says() -> None:
    env = {"WORKER_POOL": "gevent", "WORKER_CONCURRENCY": "700"}
    argv = ["/venv/bin/celery", "-A", "workers", "worker", "-E"]
    assert green_command(argv, env) == [sys.executable, "-m", "celery", "-A", "workers", "worker", "-E",
                                        "--pool=gevent", "--concurrency=700"]
    assert green_command([*argv, "-c", "8"], env)[-1] == "--pool=gevent"  # type: ignore[index]
    for named in (["-P", "prefork"], ["-Pthreads"], ["--pool=solo"], ["--pool", "gevent"]):
        assert green_command([*argv, *named], env) is None, named
    assert green_command(argv, {**env, "WORKER_POOL": "prefork"}) is None
    assert green_command(argv, {**env, "PSVC_WORKER_REEXEC": "1"}) is None  # never twice
    assert green_command(argv, {**env, "WORKER_CONCURRENCY": "many"}) is None  # reported by the worker itself


def test_many_agent_replies_stream_at_once_in_one_worker_process(green_stack: Stack, slow_agent: Simulator) -> None:
    jobs = 60
    requests.post(slow_agent.url + "/_sim/reset", timeout=5)
    ids = [green_stack.submit(f"octocat/green-{i}-{time.monotonic_ns()}")["job_id"] for i in range(jobs)]
    bodies = [green_stack.wait_final(job_id, timeout=60) for job_id in ids]
    assert [body["status"] for body in bodies] == ["finished"] * jobs
    # each job's two replies stream for 3 s: one process holding a reply per pool slot keeps them all open at once
    assert simulator_stats(slow_agent)["messages_in_flight_peak"] >= jobs * 0.9


@pytest.fixture
def endless_agent(redis_server) -> Iterator[tuple[Stack, Simulator]]:
    """Agent replies that keep streaming for 30 s, against REQUEST_TIMEOUT 2 s and one try per call."""
    sim = Simulator(SimulatorConfig(api_key=SIM_KEY, parse_seconds=0.2, message_seconds=30.0))
    sim.start()
    stack = make_stack(redis_server, sim, "endless", REQUEST_TIMEOUT="2000", POTPIE_CALL_ATTEMPTS="1",
                       MAX_RETRIES="1", RETRY_BASE_DELAY="0.2", AUTH_DISABLED="true")
    yield stack, sim
    stack.stop()
    sim.stop()


def test_a_reply_that_never_ends_is_bounded_by_request_timeout(endless_agent) -> None:
    # Deltas arrive every 0.5 s, so no socket read ever waits 2 s: only the whole call's deadline can end it.
    stack, _ = endless_agent
    final = stack.wait_final(stack.submit("octocat/endless")["job_id"], timeout=40)
    assert final["status"] == "failed" and final["attempts"] == 2, final
    reason = final["details"]["failed_reason"]
    assert "Potpie did not answer within 2 s (request_id psvc-" in reason and "(gave up after 2 attempts)" in reason


def _log_time(stack: Stack, job_id: str, message: str) -> float:
    """When the worker logged `message` for the job (waiting up to 2 s for the line to be written)."""
    lines = wait_for(lambda: [line for line in stack.log_lines()
                              if line.get("job_id") == job_id and line["message"] == message], 2,
                     what=f"the worker line {message!r}")
    return datetime.fromisoformat(lines[0]["timestamp"]).timestamp()  # type: ignore[index]


def test_cancelling_a_job_aborts_its_agent_reply_in_flight(endless_agent, emissions) -> None:
    stack, sim = endless_agent
    published = emissions(stack)
    job_id = stack.submit("octocat/cancel-in-flight")["job_id"]
    wait_for(lambda: simulator_stats(sim)["messages_in_flight"] == 1, 15, what="the agent reply to be streaming")
    asked = time.time()
    response = requests.delete(f"{stack.url}/jobs/{job_id}", timeout=5)
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    # the worker heard of it and threw into the call: the HTTP request to Potpie is gone, not left to run
    stopped = _log_time(stack, job_id, "step stopped: the job was cancelled") - asked
    wait_for(lambda: simulator_stats(sim)["messages_in_flight"] == 0, 2, interval=0.02,
             what="Potpie to see the connection closed")
    assert stopped < 1.0, f"the call was aborted {stopped:.2f} s after the DELETE"
    time.sleep(0.5)
    status = stack.status(job_id)
    assert status["status"] == "cancelled" and "result" not in status
    final = [payload for name, payload in published.of(job_id) if name == "status_update"][-1]
    assert final["status"] == "cancelled"
    assert [name for name, _ in published.of(job_id) if name in ("analysis_complete", "analysis_error")] == []
    record = stack.redis.client().hgetall(stack.key(f"job:{job_id}"))
    assert record["status"] == "cancelled" and "answer" not in record
    print(f"\ncancel -> Potpie call aborted in {stopped * 1000:.0f} ms; record {json.dumps(record['status'])}")
