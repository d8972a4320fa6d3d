"""Scenario 7: the same step message delivered more than once, by a second publish or a visibility-timeout restore."""

from __future__ import annotations


import pytest
from kombu import Connection

from potpie_service.config import Settings
from potpie_service.queue import RUN_STEP, make_celery
from tests.faults.conftest import sim_config, states, wait_all_final
from tests.conftest import simulator_stats
from tests.stack import wait_for

pytestmark = pytest.mark.slow


def _skips(stack) -> list[str]:
    return [line for worker in stack.workers for line in worker.log().splitlines() if "step skipped" in line]


def _job(stack, job_id: str) -> dict[str, str]:
    return stack.redis.client().hgetall(stack.key(f"job:{job_id}"))


def test_a_step_published_many_times_runs_once(own_redis, simulators, stacks, emissions) -> None:
    sim = simulators(parse_seconds=0.5, slow_parse_seconds=3, latency_ms=200)
    stack = stacks(own_redis, sim, "dup")
    published = emissions(stack)
    celery = make_celery(Settings.from_env(stack.env))
    job_id = stack.submit("slow-parse/dup")["job_id"]
    wait_for(lambda: _job(stack, job_id).get("status") == "parsing", 10, what="the job to be parsing")

    seq = int(_job(stack, job_id)["seq"])
    for _ in range(5):  # five copies of the current step (its own message waits for its countdown)
        celery.send_task(RUN_STEP, args=[job_id, seq], queue=stack.env["QUEUE_NAME"])
    for old in range(seq):  # and copies of steps already done
        celery.send_task(RUN_STEP, args=[job_id, old], queue=stack.env["QUEUE_NAME"])
    final = stack.wait_final(job_id, timeout=30)
    for _ in range(2):  # and copies after the end
        celery.send_task(RUN_STEP, args=[job_id, seq], queue=stack.env["QUEUE_NAME"])
    wait_for(lambda: len(_skips(stack)) >= 5 + seq + 2, 10, what="every copy to be dropped")

    assert final["status"] == "finished" and final["attempts"] == 1
    published.expect_once("analysis_complete", [job_id])
    requests = simulator_stats(sim)["requests"]
    assert (requests["POST /parse"], requests["POST /conversations"], requests["POST /message"]) == (1, 1, 2), \
        "no step called Potpie twice"
    reasons = {line.split("step skipped: ")[1].split('"')[0] for line in _skips(stack)}
    assert reasons <= {"busy", "stale", "done"} and "done" in reasons and "stale" in reasons


def test_a_visibility_timeout_redelivery_of_running_steps_runs_nothing_twice(own_redis, simulators, stacks,
                                                                             emissions) -> None:
    sim = simulators(parse_seconds=0.5, slow_parse_seconds=3, latency_ms=1500)  # each Potpie call takes 1.5 s
    stack = stacks(own_redis, sim, "redeliver")
    published = emissions(stack)
    ids = [stack.submit(f"slow-parse/redeliver-{i}")["job_id"] for i in range(3)]
    client = stack.redis.client()
    locks = [stack.key(f"job:{job_id}:lock") for job_id in ids]
    wait_for(lambda: client.exists(*locks) == 3, 10, what="three steps to be running")
    in_flight = client.hlen("unacked")
    assert in_flight >= 3

    # What kombu does once a message has been unacked longer than the visibility timeout: put it back in the
    # queue while its first delivery still runs. A timeout of 0 makes every unacked message due now.
    with Connection(stack.env["REDIS_URL"], transport_options={"visibility_timeout": 0}) as connection:
        connection.default_channel.qos.restore_visible(num=1000)

    wait_for(lambda: len(_skips(stack)) >= 3, 15, what="the redelivered copies to be dropped")
    sim_config(sim, latency_ms=0)
    bodies = wait_all_final(stack, ids, timeout=40)
    assert [body["status"] for body in bodies] == ["finished"] * 3
    published.expect_once("analysis_complete", ids)
    requests = simulator_stats(sim)["requests"]
    assert (requests["POST /parse"], requests["POST /conversations"], requests["POST /message"]) == (3, 3, 6), \
        "no step called Potpie twice"
    assert states(stack, ids) == ["finished"] * 3
