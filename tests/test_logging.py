"""Log format of real API and worker processes: JSON lines with job and request ids, text mode, LOG_LEVEL."""

from __future__ import annotations

import ast
import json
import re
import signal
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Iterator

import celery.worker.consumer.consumer
import pytest
import requests

from tests.stack import ARTIFACTS, ROOT, RedisServer, Service, free_port, service_env, start_api, start_worker, wait_for

# Lines not written through logging: `python -m potpie_service api` prints where it listens, and gunicorn's master
# logs in its own text format unless its logger class is potpie_service.api.server.GunicornLogger (see the last test).
SIM_KEY = "sk-simulator"


@dataclass
class Deployment:
    """An API (and maybe a worker) with fresh log files."""

    api: Service
    workers: list[Service]

    @property
    def url(self) -> str:
        return self.api.url  # type: ignore[attr-defined]

    def lines(self, service: Service) -> list[str]:
        return [line for line in service.log().splitlines() if line.strip()]

    def run(self, repo: str, **headers: str) -> tuple[str, str]:
        """Submit a job and wait for its end; return (job id, the submit's request id)."""
        response = requests.post(self.url + "/analyze", json={"repo": repo}, headers=headers, timeout=5)
        assert response.status_code == 202, response.text
        job_id = response.json()["job_id"]
        wait_for(lambda: requests.get(f"{self.url}/status/{job_id}", timeout=5).json()["status"] in
                 ("finished", "failed"), 20, interval=0.1, what=f"job {job_id}")
        return job_id, response.headers["X-Request-ID"]

    def stop(self) -> None:
        for service in (self.api, *self.workers):
            service.terminate()
        for service in (self.api, *self.workers):
            service.stopped()


def _deploy(redis_server: RedisServer, simulator, name: str, worker: bool, **overrides: str) -> Deployment:
    for old in ARTIFACTS.glob(f"{name}-*.log"):
        old.unlink()
    env = service_env(redis_server.url, simulator.url, QUEUE_NAME=f"q-{name}-{uuid.uuid4().hex[:6]}", **overrides)
    workers = [start_worker(env, f"{name}-worker0")] if worker else []
    return Deployment(start_api(env, f"{name}-api"), workers)


@pytest.fixture(scope="module")
def deployments(redis_server: RedisServer, simulator) -> Iterator[dict[str, Deployment]]:
    """JSON at info (worker + API), text at info (API), JSON at warning (worker + API), access lines for errors
    only (API); started side by side."""
    specs = {"json": ("logjson", True, {}), "text": ("logtext", False, {"LOG_FORMAT": "text"}),
             "warning": ("logwarn", True, {"LOG_LEVEL": "warning"}),
             "errors": ("logerrors", False, {"ACCESS_LOG": "errors"})}
    with ThreadPoolExecutor(4) as pool:
        futures = {key: pool.submit(_deploy, redis_server, simulator, name, worker, **overrides)
                   for key, (name, worker, overrides) in specs.items()}
        running = {key: future.result() for key, future in futures.items()}
    yield running
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(Deployment.stop, running.values()))


def _records(lines: list[str]) -> list[dict]:
    records = []
    for line in lines:
        record = json.loads(line)  # every other line is one JSON object
        assert {"timestamp", "level", "logger", "message"} <= set(record), line
        datetime.fromisoformat(record["timestamp"])
        records.append(record)
    return records


def test_json_lines_with_job_ids_on_worker_lines(deployments: dict[str, Deployment]) -> None:
    deployment = deployments["json"]
    finished, _ = deployment.run(f"octocat/log-{uuid.uuid4().hex[:6]}")
    failed, _ = deployment.run(f"parse-error/log-{uuid.uuid4().hex[:6]}")
    worker = deployment.lines(deployment.workers[0])
    records = [json.loads(line) for line in worker]  # the worker writes nothing but JSON lines
    assert all({"timestamp", "level", "logger", "message"} <= set(record) for record in records)
    pipeline = [r for r in records if r["logger"].startswith("potpie_service.pipeline")]
    assert pipeline and all(r.get("job_id") for r in pipeline), pipeline
    assert any(r["level"] == "error" and r["message"].startswith("job failed: Potpie could not parse")
               and r["job_id"] == failed for r in pipeline)
    steps = [r for r in records if r["logger"] == "celery.app.trace" and "potpie.run_step" in r["message"]]
    assert {r.get("job_id") for r in steps} == {finished, failed}  # Celery's own lines about a step, too
    assert not any(SIM_KEY in line for line in worker)


def test_api_access_lines_carry_the_request_id(deployments: dict[str, Deployment]) -> None:
    deployment = deployments["json"]
    job_id, submitted = deployment.run(f"octocat/log-{uuid.uuid4().hex[:6]}", **{"X-Request-ID": "req-abc-123"})
    assert submitted == "req-abc-123"
    missing = requests.get(f"{deployment.url}/status/{uuid.uuid4().hex}", timeout=5)
    assert missing.status_code == 404 and len(missing.headers["X-Request-ID"]) == 32
    records = _records(deployment.lines(deployment.api))
    access = {r["request_id"]: r for r in records if r["logger"] == "potpie_service.access"}
    post = access["req-abc-123"]
    assert (post["method"], post["route"], post["path"], post["status"]) == ("POST", "/analyze", "/analyze", 202)
    assert post["duration_ms"] > 0 and post["message"].startswith("POST /analyze 202 ")
    lost = access[missing.headers["X-Request-ID"]]
    assert (lost["route"], lost["status"]) == ("/status/<job_id>", 404)
    queued = [r for r in records if r.get("job_id") == job_id and r["logger"] == "potpie_service.service"]
    assert queued and all(r["request_id"] == "req-abc-123" for r in queued)  # lines logged while serving it
    assert not any(SIM_KEY in line for line in deployment.lines(deployment.api))


def test_a_token_in_the_path_or_the_request_id_is_masked_in_the_access_line(deployments: dict[str, Deployment]) -> None:
    deployment = deployments["json"]
    token = "ghp_" + uuid.uuid4().hex
    response = requests.get(f"{deployment.url}/status/{token}", headers={"X-Request-ID": token}, timeout=5)
    assert response.status_code == 404
    records = _records(deployment.lines(deployment.api))
    assert not any(token in line for line in deployment.lines(deployment.api))
    assert any(r["logger"] == "potpie_service.access" and (r["path"], r["request_id"]) == ("/status/***", "***")
               for r in records), records[-3:]


def test_access_log_errors_keeps_only_the_failed_requests(deployments: dict[str, Deployment]) -> None:
    deployment = deployments["errors"]
    submitted = requests.post(deployment.url + "/analyze", json={"repo": f"octocat/log-{uuid.uuid4().hex[:6]}"},
                              headers={"X-Request-ID": "errors-ok-1"}, timeout=5)
    assert submitted.status_code == 202, submitted.text
    assert requests.get(deployment.url + "/", headers={"X-Request-ID": "errors-ok-2"}, timeout=5).status_code == 200
    missing = requests.get(f"{deployment.url}/status/{uuid.uuid4().hex}", headers={"X-Request-ID": "errors-404"},
                           timeout=5)
    bad = requests.post(deployment.url + "/analyze", json={"repo": "no slash"}, headers={"X-Request-ID": "errors-400"},
                        timeout=5)
    assert (missing.status_code, bad.status_code) == (404, 400)
    wait_for(lambda: any(r.get("request_id") == "errors-400" for r in _records(deployment.lines(deployment.api))), 5,
             what="the 400's access line")
    records = _records(deployment.lines(deployment.api))
    access = {r["request_id"]: r["status"] for r in records if r["logger"] == "potpie_service.access"}
    assert access == {"errors-404": 404, "errors-400": 400}
    job_id = submitted.json()["job_id"]
    assert any(r.get("job_id") == job_id and r["request_id"] == "errors-ok-1" and r["message"].startswith("job queued")
               for r in records)  # the service's own lines stay: ACCESS_LOG is about the access lines only
    metrics = requests.get(deployment.url + "/metrics", timeout=5).text
    assert 'potpie_http_request_duration_seconds_count{method="POST",route="/analyze",status="202"} 1.0' in metrics


def test_text_format_is_plain_text_with_the_request_id(deployments: dict[str, Deployment]) -> None:
    deployment = deployments["text"]
    response = requests.get(deployment.url + "/", headers={"X-Request-ID": "text-req-1"}, timeout=5)
    assert response.status_code == 200
    lines = deployment.lines(deployment.api)
    for line in lines:
        with pytest.raises(json.JSONDecodeError):
            json.loads(line)
    assert any(" INFO potpie_service.access: GET / 200 " in line and line.endswith("[request text-req-1]")
               for line in lines), lines


def test_log_level_warning_drops_info_lines(deployments: dict[str, Deployment]) -> None:
    deployment = deployments["warning"]
    job_id, _ = deployment.run(f"parse-error/log-{uuid.uuid4().hex[:6]}")
    assert requests.get(deployment.url + "/livez", timeout=5).status_code == 200
    worker = [json.loads(line) for line in deployment.lines(deployment.workers[0])]
    api = _records(deployment.lines(deployment.api))
    assert {r["level"] for r in worker + api} <= {"warning", "error", "critical"}, [r["message"] for r in api]
    assert any(r["level"] == "error" and r.get("job_id") == job_id for r in worker)  # the failure still shows
    assert any(r["level"] == "warning" and "AUTH IS DISABLED" in r["message"] for r in api)


def test_gunicorn_own_lines_are_json_with_the_gunicorn_logger_class(redis_server: RedisServer, simulator) -> None:
    env = service_env(redis_server.url, simulator.url)
    port = free_port()
    log_path = ARTIFACTS / "gunicorn-cli.log"
    with open(log_path, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-w", "1", "--threads", "4", "-b", f"127.0.0.1:{port}",
             "-k", "potpie_service.api.server.JsonErrorWorker",
             "--logger-class", "potpie_service.api.server.GunicornLogger",
             "potpie_service.wsgi:app"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: requests.get(f"http://127.0.0.1:{port}/livez", timeout=1).ok, 20, what="gunicorn")
            assert requests.get(f"http://127.0.0.1:{port}/", timeout=5).ok
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(15)
    time.sleep(0.1)
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    gunicorn = [r["message"] for r in records if r["logger"] == "gunicorn.error"]
    assert any(m.startswith("Starting gunicorn") for m in gunicorn) and "Shutting down: Master" in gunicorn
    assert any(r["logger"] == "potpie_service.access" and r["route"] == "/" for r in records)
    probes = [r for r in records if r["logger"] == "potpie_service.access" and r["route"] == "/livez"]
    assert not probes, "probes are quiet"


def _string_constants(path: Path) -> list[str]:
    """Every string literal of a module, adjacent literals joined and f-strings reduced to their fixed parts."""
    return [node.value for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)]


def test_troubleshooting_messages_exist_in_the_code() -> None:
    sources = [*ROOT.glob("potpie_service/**/*.py"), *ROOT.glob("workers/*.py")]
    sources.append(Path(celery.worker.consumer.consumer.__file__))  # messages Celery prints for us
    corpus = [text for path in sources for text in _string_constants(path)]
    messages = []
    for page, least in (("docs/operations.md", 20), ("README.md", 10)):  # both troubleshooting tables
        doc = (ROOT / page).read_text().split("## Troubleshooting", 1)[1].split("\n## ", 1)[0]
        rows = [line.split(" | ")[0] for line in doc.splitlines() if line.startswith("| ") and "---" not in line]
        found = [m for row in rows[1:] for m in re.findall(r"`([^`]+)`", row) if '"' not in m]
        assert len(found) >= least, (page, found)
        messages += found
    for message in messages:
        for fragment in (part.strip() for part in message.split("…")):
            if len(fragment) >= 3:
                assert any(fragment in text for text in corpus), f"not in the code: {fragment!r} ({message!r})"
