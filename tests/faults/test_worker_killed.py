"""Scenario 1: SIGKILL the worker (under gevent, the deployed pool, its one process runs every step), three
rounds, each while steps hold their leases, with 50 jobs in flight."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.faults.conftest import states, submit_many, wait_all_final
from tests.conftest import simulator_stats
from tests.stack import start_worker, wait_for

pytestmark = pytest.mark.slow

JOBS = 50


def test_kill_9_three_rounds_loses_nothing_and_repeats_nothing(redis_server, simulators, stacks, emissions,
                                                                followers) -> None:
    sim = simulators(parse_seconds=0.5, slow_parse_seconds=10, latency_ms=40)  # each call holds its step 40 ms
    stack = stacks(redis_server, sim, "kill", POTPIE_CALL_ATTEMPTS="1")
    published = emissions(stack)
    ids = submit_many(stack, [f"slow-parse/kill-{i}" for i in range(JOBS)])
    follower = followers(stack.url)
    follower.follow(ids)

    client = stack.redis.client()
    locks = stack.key("job:*:lock")
    held_at_kills, in_flight = [], []
    for round_no in range(3):
        worker = stack.workers[-1]
        time.sleep(1.5)
        in_flight.append(sum(1 for state in states(stack, ids) if state not in ("finished", "failed")))
        held = wait_for(lambda: len(list(client.scan_iter(locks))), 5, interval=0.01, what="a step to be running")
        os.kill(worker.proc.pid, signal.SIGKILL)  # type: ignore[union-attr]  # its steps and prefetched ones die
        held_at_kills.append(held)
        stack.workers.append(start_worker(stack.env, f"kill-worker{round_no + 1}"))
    assert in_flight[0] == JOBS and min(in_flight) > 0, f"jobs in flight at each round: {in_flight}"
    assert any(held_at_kills), f"steps were running when the kills landed: {held_at_kills}"

    last_kill = time.monotonic()
    bodies = wait_all_final(stack, ids, timeout=90)
    print(f"\nafter the last kill every job ended within {time.monotonic() - last_kill:.1f} s; steps running at the "
          f"kills: {held_at_kills}")
    assert [body["status"] for body in bodies] == ["finished"] * JOBS
    assert all(body["attempts"] == 1 for body in bodies), "a crash is not a failed attempt"

    # Exactly one analysis_complete published per job, and none failed.
    published.expect_once("analysis_complete", ids)
    assert not published.jobs_with("analysis_error")
    # A client over the network got each job's final event once, carrying the result /status serves.
    wait_for(lambda: all(follower.finals(job_id) for job_id in ids), 10, what="every final event on the socket")
    time.sleep(0.5)
    for job_id, body in zip(ids, bodies):
        finals = follower.finals(job_id)
        assert [name for name, _ in finals] == ["analysis_complete"], (job_id, finals)
        assert finals[0][1]["data"] == body["result"]
    # Potpie was asked to parse each repository once: a resumed job asks Potpie what it holds before asking again.
    assert simulator_stats(sim)["parse_calls"] == {f"slow-parse/kill-{i}@main": 1 for i in range(JOBS)}
    # The kills were felt: the sweeper re-dispatched the steps the killed main processes held.
    revived = [line for line in stack.log_lines() if "dispatching it again" in line.get("message", "")]
    assert revived, "no step had to be revived: the kills hit nothing"

