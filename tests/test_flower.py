"""Flower against the real stack: basic auth from FLOWER_BASIC_AUTH, a finished job's tasks with no secret in sight."""

from __future__ import annotations

import ast
import sys
import uuid
from typing import Iterator

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from potpie_service.tokens import new_key
from tests.conftest import Stack, make_stack
from tests.stack import RedisServer, Service, free_port, wait_for

USER, PASSWORD = "ops", "flower-pw-" + uuid.uuid4().hex[:8]
GITHUB_TOKEN = "ghp_" + uuid.uuid4().hex + "ABCD"
TOKEN_KEY = new_key()


@pytest.fixture(scope="module")
def flower(redis_server: RedisServer, simulator) -> Iterator[tuple[Stack, str]]:
    """A worker and an API that accept GitHub tokens, and Flower (`celery -A workers flower`) watching them."""
    stack = make_stack(redis_server, simulator, "flower", TOKEN_ENCRYPTION_KEY=TOKEN_KEY)
    port = free_port()
    process = Service("flower", [sys.executable, "-m", "celery", "-A", "workers", "flower", f"--port={port}",
                                 "--address=127.0.0.1"], {**stack.env, "FLOWER_BASIC_AUTH": f"{USER}:{PASSWORD}"})
    process.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: requests.get(url + "/healthcheck", timeout=1).ok or not process.alive(), 30, what="flower")
        assert process.alive(), process.log()[-3000:]
        hostname = stack.workers[0].hostname  # type: ignore[attr-defined]
        wait_for(lambda: hostname in requests.get(url + "/api/workers?refresh=1", auth=(USER, PASSWORD),
                                                  timeout=5).json(), 20, what="flower to see the worker")
        yield stack, url
    finally:
        process.stop()
        stack.stop()


def test_flower_refuses_requests_without_the_basic_auth_credentials(flower: tuple[Stack, str]) -> None:
    _, url = flower
    for path in ("/", "/tasks", "/api/tasks", "/api/workers"):
        assert requests.get(url + path, timeout=5).status_code == 401, path
        assert requests.get(url + path, auth=(USER, "wrong"), timeout=5).status_code == 401, path
    assert requests.get(url + "/tasks", auth=(USER, PASSWORD), timeout=5).status_code == 200


def test_flower_shows_the_finished_job_with_its_secrets_masked(flower: tuple[Stack, str]) -> None:
    stack, url = flower
    accepted = stack.submit(f"octocat/flower-{uuid.uuid4().hex[:8]}", github_token=GITHUB_TOKEN)
    job_id = accepted["job_id"]
    assert stack.wait_final(job_id)["status"] == "finished"

    def job_tasks() -> list[dict]:
        tasks = requests.get(url + "/api/tasks", params={"taskname": "potpie.run_step"}, auth=(USER, PASSWORD),
                             timeout=5).json().values()
        mine = [task for task in tasks if job_id in str(task.get("args"))]
        return mine if mine and all(task["state"] == "SUCCESS" for task in mine) else []

    tasks = wait_for(job_tasks, 15, interval=0.2, what="flower to show the job's steps as succeeded")
    seqs = []
    for task in tasks:  # type: ignore[union-attr]
        assert task["name"] == "potpie.run_step" and task["state"] == "SUCCESS"
        args = ast.literal_eval(task["args"])
        assert args[0] == job_id and isinstance(args[1], int) and len(args) == 2, task["args"]
        assert task["kwargs"] in ("{}", {}), task["kwargs"]
        seqs.append(args[1])
    assert 0 in seqs and sorted(seqs) == sorted(set(seqs))
    everything = requests.get(url + "/api/tasks", auth=(USER, PASSWORD), timeout=5).text
    page = requests.get(f"{url}/task/{tasks[0]['uuid']}", auth=(USER, PASSWORD), timeout=5).text  # type: ignore[index]
    for secret in (GITHUB_TOKEN, TOKEN_KEY, stack.env["POTPIE_API_KEY"], PASSWORD):
        assert secret not in everything and secret not in page


def test_flower_serves_its_own_prometheus_metrics(flower: tuple[Stack, str]) -> None:
    stack, url = flower
    job_id = stack.submit(f"octocat/flower-{uuid.uuid4().hex[:8]}")["job_id"]
    assert stack.wait_final(job_id)["status"] == "finished"

    def succeeded() -> float:
        response = requests.get(url + "/metrics", timeout=5)
        assert response.status_code == 200
        return sum(sample.value for family in text_string_to_metric_families(response.text)
                   for sample in family.samples
                   if sample.name == "flower_events_total" and sample.labels.get("task") == "potpie.run_step"
                   and sample.labels.get("type") == "task-succeeded")

    assert wait_for(lambda: succeeded() >= 2, 10, what="flower_events_total for potpie.run_step")


def test_flower_broker_tab_and_queue_lengths_work_with_the_service_transport(flower: tuple[Stack, str]) -> None:
    stack, url = flower
    queues = requests.get(url + "/api/queues/length", auth=(USER, PASSWORD), timeout=10)
    assert queues.status_code == 200, queues.text
    assert stack.env["QUEUE_NAME"] in [queue["name"] for queue in queues.json()["active_queues"]]
    page = requests.get(url + "/broker", auth=(USER, PASSWORD), timeout=10)
    assert page.status_code == 200 and stack.env["QUEUE_NAME"] in page.text
