"""A Redis that stops answering without closing its connections (SIGSTOP: a partition, a stuck primary, a full
conntrack table), under a running stack: the API answers every request in time and tells the truth about submits,
and everything resumes by itself once Redis answers again."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import pytest
import requests

from potpie_service.potpie.simulator import Simulator
from tests.conftest import Stack, make_stack
from tests.faults.conftest import FAULT_ENV, fast_simulator, states, wait_all_final
from tests.stack import Emissions, RedisServer, start_worker, wait_for

pytestmark = pytest.mark.slow

SILENT_S = 20.0


@pytest.fixture(scope="module")
def quiet() -> Iterator[tuple[Stack, Simulator]]:
    server = RedisServer().start()
    sim = fast_simulator(parse_seconds=4.0, message_seconds=0.5)
    stack = make_stack(server, sim, "silent", **FAULT_ENV)
    yield stack, sim
    stack.stop()
    sim.stop()
    os.kill(server.proc.pid, signal.SIGCONT)  # type: ignore[union-attr]
    server.cleanup()


def _timed(method: str, url: str, **kwargs: Any) -> tuple[float, requests.Response]:
    started = time.monotonic()
    response = requests.request(method, url, timeout=10, **kwargs)
    return time.monotonic() - started, response


def _jobs_of(stack: Stack) -> dict[str, str]:
    """repo -> job id of every job record in Redis."""
    client = stack.redis.client()
    found = {}
    for key in client.scan_iter(stack.key("job:*"), count=1000):
        if key.count(":") == 3:  # job:<id>, not job:<id>:lock
            repo = client.hget(key, "repo")
            if repo:
                found[repo] = key.rsplit(":", 1)[1]
    return found


def test_a_silent_redis_is_answered_in_time_and_truthfully_and_everything_resumes(quiet, followers) -> None:
    stack, _ = quiet
    pids = [service.proc.pid for service in [stack.api, *stack.workers]]  # type: ignore[union-attr]
    published = Emissions(stack.env["REDIS_URL"], stack.env["QUEUE_NAME"])
    follower = followers(stack.url, reconnection_delay_max=1.0)
    try:
        tag, began = uuid.uuid4().hex[:6], time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
        in_flight = [stack.submit(f"octocat/flight-{tag}-{i}")["job_id"] for i in range(30)]
        follower.follow(in_flight[:5])
        wait_for(lambda: states(stack, in_flight).count("parsing") == 30, 15, what="30 jobs parsing")

        answers: list[tuple[str, float, int, dict[str, Any]]] = []  # (repo, seconds, status, body)
        other: list[tuple[str, float, int]] = []
        stop = threading.Event()

        def submitter(n: int) -> None:
            i = 0
            while not stop.is_set():
                repo = f"octocat/during-{tag}-{n}-{i}"
                seconds, answer = _timed("POST", stack.url + "/analyze", json={"repo": repo},
                                         headers={"Idempotency-Key": repo})
                answers.append((repo, seconds, answer.status_code, answer.json()))
                i += 1
                time.sleep(0.2)

        def reader() -> None:
            while not stop.is_set():
                for path in ("/livez", f"/status/{in_flight[0]}", "/queue/stats"):
                    seconds, answer = _timed("GET", stack.url + path)
                    other.append((path, seconds, answer.status_code))
                time.sleep(0.2)

        os.kill(stack.redis.proc.pid, signal.SIGSTOP)  # type: ignore[union-attr]
        silenced = time.monotonic()
        with ThreadPoolExecutor(max_workers=5) as pool:
            for n in range(4):
                pool.submit(submitter, n)
            pool.submit(reader)
            time.sleep(SILENT_S)
            stop.set()
        os.kill(stack.redis.proc.pid, signal.SIGCONT)  # type: ignore[union-attr]
        healed = time.monotonic()
        slowest = max(seconds for _, seconds, _, _ in answers)
        print(f"\nsilent for {healed - silenced:.1f} s; {len(answers)} submits (slowest {slowest:.2f} s), "
              f"{len(other)} reads (slowest {max(s for _, s, _ in other):.2f} s) during it")
        assert slowest <= 2.0, f"a submit took {slowest:.2f} s"
        assert all(status in (202, 503) for _, _, status, _ in answers), {s for _, _, s, _ in answers}
        assert sum(1 for *_, status, _ in answers if status == 503) >= len(answers) - 4, "Redis was silent"
        slow_reads = [(path, round(s, 2)) for path, s, _ in other if s > 2.0]
        assert slow_reads == [], slow_reads
        assert all(status == 200 for path, _, status in other if path == "/livez")
        assert {status for path, _, status in other if path != "/livez"} <= {200, 503}, "503 JSON, never a 500"

        # After the heal: a 503 that said "not queued" has no job; one that said "may have been" tells the client
        # to retry with its Idempotency-Key, which finds the job or makes it.
        wait_for(lambda: requests.post(stack.url + "/analyze", json={"repo": f"octocat/after-{tag}"},
                                       timeout=5).status_code == 202, 30, interval=0.5, what="submits to succeed")
        jobs = _jobs_of(stack)
        refused = [(repo, body) for repo, _, status, body in answers if status == 503]
        said_not = [repo for repo, body in refused if "was not queued" in body["error"]]
        said_maybe = [repo for repo, body in refused if "may have been queued" in body["error"]]
        assert len(said_not) + len(said_maybe) == len(refused), [body["error"] for _, body in refused]
        assert [repo for repo in said_not if repo in jobs] == [], "a 503 said 'not queued' but the job exists"
        for repo in said_maybe:
            again = requests.post(stack.url + "/analyze", json={"repo": repo}, headers={"Idempotency-Key": repo},
                                  timeout=5)
            assert again.status_code in (200, 202), again.text
            assert (again.status_code == 200) == (repo in jobs)
        print(f"503s: {len(said_not)} 'not queued', {len(said_maybe)} 'may have been queued' "
              f"({sum(1 for repo in said_maybe if repo in jobs)} of those had been)")

        accepted = [jobs[repo] for repo, _, status, _ in answers if status == 202]
        bodies = wait_all_final(stack, in_flight + accepted, timeout=90)
        assert [body["status"] for body in bodies] == ["finished"] * len(bodies), \
            {body["status"] for body in bodies}
        published.expect_once("analysis_complete", in_flight + accepted, timeout=10)
        for job_id in in_flight[:5]:  # a follower connected through the silence got each final event once
            assert follower.wait_final(job_id, timeout=15)[0] == "analysis_complete"
            assert len(follower.finals(job_id)) == 1
        assert [service.proc.pid for service in [stack.api, *stack.workers]] == pids  # type: ignore[union-attr]
        assert all(service.alive() for service in [stack.api, *stack.workers]), "a process exited"
        tracebacks = [line for line in stack.log_lines()  # this test's lines (the logs keep earlier runs')
                      if line["timestamp"] >= began and "Traceback" in json.dumps(line)]
        assert tracebacks == [], tracebacks[:2]
    finally:
        os.kill(stack.redis.proc.pid, signal.SIGCONT)  # type: ignore[union-attr]
        published.close()


def test_a_submit_reaching_redis_after_its_deadline_is_refused(quiet) -> None:
    """The submit script checks its deadline against Redis' clock: a script delayed past the API's answer does
    nothing when it finally runs."""
    stack, _ = quiet
    client = stack.redis.client()
    before = int(client.get(stack.key("tickets")) or 0)
    os.kill(stack.redis.proc.pid, signal.SIGSTOP)  # type: ignore[union-attr]
    try:
        seconds, answer = _timed("POST", stack.url + "/analyze", json={"repo": "octocat/late-one"},
                                 headers={"Idempotency-Key": "late-one"})
        assert answer.status_code == 503 and seconds <= 2.0
        assert "may have been queued" in answer.json()["error"]
        time.sleep(1.0)  # the script waits in Redis' socket buffer past its deadline
    finally:
        os.kill(stack.redis.proc.pid, signal.SIGCONT)  # type: ignore[union-attr]
    time.sleep(1.0)
    assert "octocat/late-one" not in _jobs_of(stack), "the late script ran"
    assert int(client.get(stack.key("tickets")) or 0) == before
    # the key was never used: retried with it, the submit makes the job now
    wait_for(lambda: requests.post(stack.url + "/analyze", json={"repo": "octocat/late-one"},
                                   headers={"Idempotency-Key": "late-one"}, timeout=5).status_code == 202, 5,
             interval=0.5, what="a new job for the key")


def test_an_admitted_job_whose_first_step_was_lost_starts_within_seconds(redis_server) -> None:
    """A worker that took the first step's message on a connection that died under it (a half-open broker
    connection) leaves the job admitted and never started: with the broker's queue empty, the sweeper dispatches
    it again after FIRST_STEP_GRACE (5 s), not STEP_GRACE (60 s here, as deployed)."""
    sim = fast_simulator(parse_seconds=0.2)
    stack = make_stack(redis_server, sim, "lost-first", **{**FAULT_ENV, "STEP_GRACE": "60"})
    try:
        worker = stack.workers[0]
        os.kill(worker.proc.pid, signal.SIGSTOP)  # type: ignore[union-attr]
        job_id = stack.submit("octocat/lost-first")["job_id"]
        time.sleep(0.5)  # Redis hands the message to the stopped worker's waiting BRPOP: off the list, not acked
        worker.kill()  # ... and it dies before kombu records it as unacked: the message is gone
        client = stack.redis.client()
        assert client.llen(stack.env["QUEUE_NAME"]) == 0 and job_id not in json.dumps(client.hgetall("unacked"))
        stack.workers.append(start_worker(stack.env, "lost-first-worker1"))
        lost_at = time.monotonic()
        final = stack.wait_final(job_id, timeout=30)
        took = time.monotonic() - lost_at
        assert final["status"] == "finished" and took < 15, f"started {took:.1f} s after its step was lost"
        print(f"\na lost first step: the job finished {took:.1f} s later")
    finally:
        stack.stop()
        sim.stop()
