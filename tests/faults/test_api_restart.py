"""Scenario 3: the API process is stopped (SIGTERM) and started again while Socket.IO clients follow jobs."""

from __future__ import annotations

import signal
import time

import pytest

from tests.faults.conftest import submit_many, wait_all_final
from tests.stack import start_api, wait_for

pytestmark = pytest.mark.slow


def test_api_sigterm_closes_sockets_and_clients_come_back_to_the_final_state(redis_server, simulators, stacks,
                                                                             followers) -> None:
    # octocat/ jobs end while the API is down (~9-11 s), slow-parse/ ones after it is back (~14 s).
    sim = simulators(parse_seconds=9.5, slow_parse_seconds=13)
    stack = stacks(redis_server, sim, "apirestart")
    front = start_api(stack.env, "apirestart-front")
    port = int(front.url.rsplit(":", 1)[1])  # type: ignore[attr-defined]
    clients = [followers(front.url) for _ in range(3)]  # type: ignore[attr-defined]
    # Three jobs end while the API is down, three after it is back.
    ids = submit_many(stack, [f"octocat/apirestart-{i}" for i in range(3)] +
                      [f"slow-parse/apirestart-{i}" for i in range(3)])
    for client in clients:
        client.follow(ids)
    wait_for(lambda: all(client.of(job_id) for client in clients for job_id in ids), 10, what="first events")

    started = time.monotonic()
    front.signal(signal.SIGTERM)
    code = front.proc.wait(12)  # type: ignore[union-attr]
    took = time.monotonic() - started
    assert took <= 10, f"the API took {took:.1f} s to stop on SIGTERM"
    assert code == 0, front.log()[-2000:]
    wait_for(lambda: all(not client.client.connected for client in clients), 10, what="clients to see the close")
    assert not any(client.finals(job_id) for client in clients for job_id in ids), "no job ended before the restart"
    wait_all_final(stack, ids[:3], timeout=20)  # these end while no API serves the clients

    restarted = start_api(stack.env, "apirestart-front2", port=port)
    try:
        bodies = wait_all_final(stack, ids, timeout=30)
        for client in clients:
            for job_id in ids:
                client.wait_final(job_id, timeout=10)
        time.sleep(0.3)  # anything late would show up now
        for client in clients:
            assert client.connects == 2, "each client reconnected by itself, once"
            for job_id, body in zip(ids, bodies):
                seqs = {payload["seq"] for _, payload in client.finals(job_id)}
                assert len(seqs) == 1, (job_id, client.finals(job_id))  # duplicates of a replay share their seq
                name, payload = client.finals(job_id)[-1]
                assert name == "analysis_complete" and payload["data"] == body["result"]
    finally:
        restarted.stop()
    print(f"\nAPI stopped {took:.2f} s after SIGTERM")
