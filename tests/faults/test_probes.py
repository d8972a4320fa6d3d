"""Issue 29: the API's probes when Redis stops answering without closing its connections (SIGSTOP: what a network
partition or a stuck primary looks like), and when every worker is away for longer than a heartbeat counts."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections import defaultdict
from typing import Iterator

import pytest
import requests

from tests.conftest import Stack
from tests.faults.conftest import states, wait_all_final
from tests.stack import RedisServer, service_env, start_api, start_worker, wait_for

pytestmark = pytest.mark.slow

PROBE_BOUND = 1.5  # seconds: the figure for every probe and /health answer while Redis is silent
SILENCE = 12.0  # longer than the shared client's 5 s timeout and its retry, so a scrape shows what it does then
OUTAGE = 40.0  # longer than the 30 s a worker's last heartbeat counts, so /health must report it absent


@pytest.fixture
def silent_redis() -> Iterator[RedisServer]:
    """A Redis of the test's own: stopping it must not stall anything else."""
    server = RedisServer().start()
    yield server
    if server.proc is not None:
        os.kill(server.proc.pid, signal.SIGCONT)  # a failed test must not leave a stopped process behind
    server.cleanup()


def _get(url: str, slowest: dict[str, float], codes: dict[str, set[int]], path: str) -> requests.Response:
    started = time.monotonic()
    response = requests.get(url + path, timeout=10)
    slowest[path] = max(slowest[path], time.monotonic() - started)
    codes[path].add(response.status_code)
    return response


def test_probes_answer_within_1_5_s_while_redis_is_silent(silent_redis: RedisServer, simulator) -> None:
    api = start_api(service_env(silent_redis.url, simulator.url, QUEUE_NAME=f"q-silent-{uuid.uuid4().hex[:6]}"),
                    "silent-redis-api")
    url = api.url  # type: ignore[attr-defined]
    slowest: dict[str, float] = defaultdict(float)
    codes: dict[str, set[int]] = defaultdict(set)
    scrape: dict[str, object] = {}
    try:
        assert requests.get(url + "/readyz", timeout=5).status_code == 200
        assert requests.get(url + "/health", timeout=5).json()["status"] == "degraded"  # no worker here

        def scrape_once() -> None:  # what Prometheus sees meanwhile (the metrics read uses the shared client)
            started = time.monotonic()
            body = requests.get(url + "/metrics", timeout=30).text
            scrape.update(seconds=time.monotonic() - started, redis_up="potpie_metrics_redis_up 0.0" not in body)

        os.kill(silent_redis.proc.pid, signal.SIGSTOP)  # type: ignore[union-attr]
        stopped_at = time.monotonic()
        scraper = threading.Thread(target=scrape_once, daemon=True)
        scraper.start()

        def hammer() -> None:  # probes of several kubelets and dashboards at once: more than the probe pool holds
            while time.monotonic() - stopped_at < SILENCE - 1:
                for path in ("/readyz", "/health"):
                    _get(url, slowest, codes, path)

        crowd = [threading.Thread(target=hammer, daemon=True) for _ in range(6)]
        for thread in crowd:
            thread.start()
        while time.monotonic() - stopped_at < SILENCE:
            for path in ("/livez", "/readyz", "/health"):
                response = _get(url, slowest, codes, path)
                if path == "/readyz":
                    assert response.json()["status"] == "unready" and "Redis" in response.json()["reason"]
                if path == "/health":
                    body = response.json()
                    assert body["status"] == "unhealthy" and body["checks"]["redis"]["status"] == "down", body
            time.sleep(0.2)
        for thread in crowd:
            thread.join(5)
    finally:
        os.kill(silent_redis.proc.pid, signal.SIGCONT)  # type: ignore[union-attr]
    try:
        back = time.monotonic()
        wait_for(lambda: requests.get(url + "/readyz", timeout=5).status_code == 200, 5, what="/readyz 200 again")
        ready_after = time.monotonic() - back
        wait_for(lambda: requests.get(url + "/health", timeout=5).json()["status"] == "degraded", 5,
                 what="/health back to degraded (no worker)")
        scraper.join(30)
        print(f"\nslowest answers while Redis was silent {SILENCE:.0f} s: "
              + ", ".join(f"{path} {seconds:.3f} s" for path, seconds in sorted(slowest.items()))
              + f"; ready again {ready_after:.2f} s after SIGCONT; a /metrics scrape started at the stop took "
              f"{scrape.get('seconds', float('nan')):.1f} s (Redis read: {scrape.get('redis_up')})")
        assert codes == {"/livez": {200}, "/readyz": {503}, "/health": {503}}, codes
        assert max(slowest.values()) <= PROBE_BOUND, dict(slowest)
    finally:
        api.stop()


def test_every_worker_away_keeps_the_api_ready_and_jobs_finish_when_they_return(own_redis: RedisServer, stacks,
                                                                              simulators) -> None:
    stack: Stack = stacks(own_redis, simulators(parse_seconds=0.5), "away")
    assert stack.wait_final(stack.submit("octocat/before")["job_id"])["status"] == "finished"
    stack.workers[0].stop()
    gone, ids, health_seen = time.monotonic(), [], set()
    absent_after = None
    while time.monotonic() - gone < OUTAGE:
        ready = requests.get(stack.url + "/readyz", timeout=5)
        assert ready.status_code == 200, f"unready {time.monotonic() - gone:.1f} s into the outage: {ready.text}"
        health = requests.get(stack.url + "/health", timeout=5)
        assert health.status_code == 200, health.text
        health_seen.add(health.json()["status"])
        if absent_after is None and health.json()["checks"]["workers"]["status"] == "down":
            absent_after = time.monotonic() - gone
            assert health.json()["status"] == "degraded" and health.json()["degraded"] == ["workers"]
        if len(ids) < (time.monotonic() - gone) / 2:  # a submit every 2 s
            accepted = requests.post(stack.url + "/analyze", json={"repo": f"octocat/away-{len(ids)}"}, timeout=5)
            assert accepted.status_code == 202 and accepted.json()["status"] == "queued", accepted.text
            ids.append(accepted.json()["job_id"])
        time.sleep(0.5)
    assert absent_after is not None, "/health never said the workers were away"
    metrics = requests.get(stack.url + "/metrics", timeout=5).text
    assert "potpie_workers_alive 0.0" in metrics
    assert set(states(stack, ids)) <= {"queued"}, "nothing ran while no worker was there"

    back = time.monotonic()
    stack.workers.append(start_worker(stack.env, "away-worker-back"))
    bodies = wait_all_final(stack, ids, timeout=60)
    finished_after = time.monotonic() - back
    assert [body["status"] for body in bodies] == ["finished"] * len(ids)
    wait_for(lambda: requests.get(stack.url + "/health", timeout=5).json()["status"] == "ok", 10, what="ok again")
    print(f"\nevery worker away {OUTAGE:.0f} s: /readyz 200 throughout, {len(ids)} submits answered 202, /health "
          f"{sorted(health_seen)} (workers reported absent after {absent_after:.1f} s); all {len(ids)} jobs finished "
          f"{finished_after:.1f} s after a worker came back")

