"""/livez, /readyz and /health as an orchestrator and an operator meet them: real API processes over HTTP on a
real Redis; no worker unless the test says so. (Redis that stops answering, and every worker away for longer than
a heartbeat's age: tests/faults/test_probes.py.)"""

from __future__ import annotations

import socket
import time
import uuid
from typing import Iterator

import pytest
import requests

from potpie_service.auth import new_key
from tests.conftest import Stack
from tests.stack import RedisServer, Service, service_env, start_api, wait_for

ALICE, ALICE_ENTRY = new_key("alice")
CHECKS = {"redis", "queue", "workers", "redis_replicas", "potpie_api"}


def timed_get(url: str, **kwargs: object) -> tuple[requests.Response, float]:
    started = time.monotonic()
    response = requests.get(url, timeout=10, **kwargs)  # type: ignore[arg-type]
    return response, time.monotonic() - started


@pytest.fixture(scope="module")
def lone_api(redis_server: RedisServer, simulator) -> Iterator[Service]:
    """An API with auth on and no worker at all (a rollout of every worker looks like this to the API)."""
    env = service_env(redis_server.url, simulator.url, QUEUE_NAME=f"q-lone-{uuid.uuid4().hex[:6]}",
                      AUTH_DISABLED="false", API_KEYS=ALICE_ENTRY)
    api = start_api(env, "lone-api")
    yield api
    api.stop()


def test_readyz_is_public_ready_without_any_worker_and_writes_no_access_line(lone_api: Service) -> None:
    url = lone_api.url  # type: ignore[attr-defined]
    ready = requests.get(url + "/readyz", timeout=5)
    assert ready.status_code == 200 and ready.headers["Content-Type"] == "application/json"
    assert ready.json()["status"] == "ready" and 0 <= ready.json()["redis_latency_ms"] < 500
    assert requests.get(url + "/health", timeout=5).status_code == 200  # an access line to wait for
    wait_for(lambda: [line for line in lone_api.log_lines() if line.get("route") == "/health"], 5,
             what="the /health access line")
    assert not [line for line in lone_api.log_lines() if line.get("route") == "/readyz"], "probes are not logged"


def test_health_without_workers_is_degraded_not_unhealthy_and_submits_queue(lone_api: Service) -> None:
    url, key = lone_api.url, {"Authorization": f"Bearer {ALICE}"}  # type: ignore[attr-defined]
    health = requests.get(url + "/health", headers=key, timeout=5)
    assert health.status_code == 200, health.text
    body = health.json()
    assert body["status"] == "degraded" and body["degraded"] == ["workers"], body
    assert set(body["checks"]) == CHECKS
    assert body["checks"]["workers"] == {"status": "down", "alive": 0, "seen_within_s": 30.0}
    assert body["checks"]["redis"]["status"] == "up" and body["checks"]["redis"]["role"] == "master"
    assert body["checks"]["queue"]["status"] == "up"
    assert body["checks"]["redis_replicas"] == {"status": "up", "connected": 0, "required": 0}
    assert body["checks"]["potpie_api"]["status"] == "up", "the simulator answers within the first wait"
    anonymous = requests.get(url + "/health", timeout=5)
    assert anonymous.status_code == 200 and set(anonymous.json()) == {"status", "timestamp", "details"}
    assert anonymous.json()["status"] == "degraded"
    accepted = requests.post(url + "/analyze", json={"repo": "octocat/no-worker"}, headers=key, timeout=5)
    assert accepted.status_code == 202 and accepted.json()["status"] == "queued", accepted.text
    counts = requests.get(url + "/health", headers=key, timeout=5).json()["checks"]["queue"]["stats"]
    assert counts["waiting"] + counts["active"] >= 1 and counts["total"] >= 1


def test_health_is_ok_when_a_worker_consumes(stack: Stack) -> None:
    wait_for(lambda: requests.get(stack.url + "/health", timeout=5).json()["checks"]["potpie_api"]["status"] == "up",
             5, what="the first Potpie check")
    body = requests.get(stack.url + "/health", timeout=5).json()
    assert body["status"] == "ok" and body["degraded"] == [], body
    assert {name: check["status"] for name, check in body["checks"].items()} == dict.fromkeys(CHECKS, "up")
    assert body["checks"]["workers"]["alive"] >= 1


@pytest.fixture
def silent_potpie() -> Iterator[str]:
    """A Potpie address that accepts connections (the kernel's backlog) and never answers a byte."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    listener.close()


def test_a_silent_potpie_never_holds_health_up(redis_server: RedisServer, silent_potpie: str) -> None:
    env = service_env(redis_server.url, silent_potpie, QUEUE_NAME=f"q-sp-{uuid.uuid4().hex[:6]}")
    api = start_api(env, "silent-potpie-api")
    try:
        url = api.url  # type: ignore[attr-defined]
        first, took = timed_get(url + "/health")
        assert took < 1.5 and first.status_code == 200, (took, first.text)
        assert first.json()["checks"]["potpie_api"]["status"] == "pending", "its check waits in the background"
        assert "potpie_api" not in first.json()["degraded"]
        slowest = took
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            health, took = timed_get(url + "/health")
            slowest = max(slowest, took)
            if health.json()["checks"]["potpie_api"]["status"] == "down":
                break
            time.sleep(0.2)
        assert health.json()["checks"]["potpie_api"]["status"] == "down", health.text
        assert health.json()["degraded"] == ["workers", "potpie_api"] and health.status_code == 200
        assert slowest < 1.5, slowest
    finally:
        api.stop()


def test_readyz_and_health_answer_503_at_once_when_redis_refuses(simulator) -> None:
    server = RedisServer().start()
    api = start_api(service_env(server.url, simulator.url, QUEUE_NAME=f"q-ref-{uuid.uuid4().hex[:6]}"),
                    "refused-redis-api")
    try:
        url = api.url  # type: ignore[attr-defined]
        assert requests.get(url + "/readyz", timeout=5).status_code == 200
        server.stop()
        ready, took = timed_get(url + "/readyz")
        assert ready.status_code == 503 and took < 1.0, (took, ready.text)
        assert ready.json() == {"status": "unready", "redis_latency_ms": ready.json()["redis_latency_ms"],
                                "reason": "Redis unreachable (ConnectionError)"}
        health, took = timed_get(url + "/health")
        assert health.status_code == 503 and took < 1.5, (took, health.text)
        assert health.json()["status"] == "unhealthy" and health.json()["checks"]["redis"]["status"] == "down"
        assert requests.get(url + "/livez", timeout=5).status_code == 200, "liveness never asks Redis"
        server.start()
        wait_for(lambda: requests.get(url + "/readyz", timeout=5).status_code == 200, 5, what="ready again")
    finally:
        api.stop()
        server.cleanup()
