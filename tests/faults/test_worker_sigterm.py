"""Scenario 2: SIGTERM a worker during work: it stops taking steps, hands back what it holds, exits in bounded time."""

from __future__ import annotations

import signal
import time

import pytest

from tests.faults.conftest import sim_config, states, submit_many, wait_all_final
from tests.conftest import simulator_stats
from tests.stack import start_worker, wait_for

pytestmark = pytest.mark.slow


def _queued(stack) -> int:
    return stack.redis.client().llen(stack.env["QUEUE_NAME"])


def _leases(stack, ids: list[str]) -> int:
    """How many of the jobs' step leases are held (a green worker's run waiting for the next poll holds one)."""
    return stack.redis.client().exists(*[stack.key(f"job:{job_id}:lock") for job_id in ids])


def test_sigterm_between_steps_exits_at_once_and_hands_back_scheduled_steps(redis_server, simulators, stacks,
                                                                           emissions) -> None:
    sim = simulators(parse_seconds=0.5, slow_parse_seconds=4)
    stack = stacks(redis_server, sim, "term")
    published = emissions(stack)
    ids = submit_many(stack, [f"slow-parse/term-{i}" for i in range(10)])
    wait_for(lambda: all(state == "parsing" for state in states(stack, ids)), 10, what="every job to be parsing")
    # under gevent each job's run waits for its next poll itself, holding the job's lease
    wait_for(lambda: _queued(stack) == 0 and _leases(stack, ids) == len(ids), 5,
             what="the worker's runs to wait for every job's next poll")

    worker = stack.workers[0]
    started = time.monotonic()
    worker.signal(signal.SIGTERM)
    assert worker.proc.wait(15) == 0  # type: ignore[union-attr]
    took = time.monotonic() - started
    assert took < 5, f"a worker with no long step running took {took:.1f} s to stop"
    assert _queued(stack) >= len(ids) - 2, "the waiting steps went back to the queue for other workers"
    assert _leases(stack, ids) == 0, "their leases were freed, so another worker takes them at once"
    print(f"\nSIGTERM between steps: the worker exited after {took:.2f} s")

    stack.workers.append(start_worker(stack.env, "term-worker1"))
    bodies = wait_all_final(stack, ids, timeout=30)
    assert [body["status"] for body in bodies] == ["finished"] * len(ids)
    published.expect_once("analysis_complete", ids)
    assert simulator_stats(sim)["parse_calls"] == {f"slow-parse/term-{i}@main": 1 for i in range(10)}


def test_sigterm_during_a_long_step_cancels_it_after_the_grace_and_another_worker_finishes(
        redis_server, simulators, stacks, emissions) -> None:
    # Once the parses are submitted, every Potpie call hangs past REQUEST_TIMEOUT (2 s) and is tried 5 times
    # in-step (status polls are safe to repeat): one step would run for ~18 s.
    sim = simulators(parse_seconds=30)
    stack = stacks(redis_server, sim, "term-long", REQUEST_TIMEOUT="2000", POTPIE_CALL_ATTEMPTS="5")
    grace = min(30.0, 2 + 5)  # workers/supervisor.py: shutdown_grace()
    published = emissions(stack)
    ids = submit_many(stack, ["octocat/term-long-0", "octocat/term-long-1"])
    wait_for(lambda: states(stack, ids) == ["parsing", "parsing"], 10, what="both parses submitted")
    sim_config(sim, latency_ms=3000, parse_seconds=0.5)
    client = stack.redis.client()
    locks = [stack.key(f"job:{job_id}:lock") for job_id in ids]
    wait_for(lambda: client.exists(*locks) == 2, 10, what="both steps to be running")

    worker = stack.workers[0]
    started = time.monotonic()
    worker.signal(signal.SIGTERM)
    late = stack.submit("octocat/term-long-late")["job_id"]  # submitted after the signal: not taken
    worker.proc.wait(grace + 10)  # type: ignore[union-attr]
    took = time.monotonic() - started
    assert grace - 1 < took < grace + 6, f"stopped after {took:.1f} s; the bound is the grace ({grace} s) + 6 s"
    assert states(stack, [late]) == ["queued"] and _queued(stack) >= 1, "the stopping worker took a new job"
    cancelled = [line for line in worker.log().splitlines() if "cancelling them" in line]
    assert cancelled, "the long steps were cancelled, not waited for"
    print(f"\nSIGTERM during ~18 s steps: cancelled after the {grace:.0f} s grace, exited after {took:.2f} s")

    sim_config(sim, latency_ms=0)
    stack.workers.append(start_worker(stack.env, "term-long-worker1"))
    bodies = wait_all_final(stack, [*ids, late], timeout=40)
    assert [body["status"] for body in bodies] == ["finished"] * 3
    published.expect_once("analysis_complete", [*ids, late])
