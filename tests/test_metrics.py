"""Prometheus metrics: exact values after real jobs, scraped from two real API processes over HTTP."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Iterator

import pytest
import redis
import requests
import socketio
from redis.backoff import NoBackoff
from redis.retry import Retry
from prometheus_client.parser import text_string_to_metric_families

from potpie_service.config import Settings
from potpie_service.api.metrics import ClusterCollector
from potpie_service.core.job import Change, Job
from potpie_service.core.metrics import KNOWN_CLASSES, failure_class
from potpie_service.core.model import JobStatus
from potpie_service.store.jobs import JobStore
from potpie_service.store.metrics import MetricsRecorder
from tests.conftest import Stack, make_stack
from tests.stack import RedisServer, Service, free_port, service_env, start_api, wait_for

pytestmark = pytest.mark.e2e  # whole stacks of processes: `make test` runs it, `make test-fast` does not

TOKEN = "metrics-test-token-1234"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
CLUSTER = ("potpie_jobs_", "potpie_job_", "potpie_upstream_", "potpie_queue_", "potpie_workers_", "potpie_metrics_")


def parse(text: str) -> Samples:
    """Every sample of an exposition, keyed by (name, sorted labels)."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape(url: str) -> Samples:
    response = requests.get(url + "/metrics", headers=AUTH, timeout=5)
    assert response.status_code == 200, response.text
    return parse(response.text)


def val(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def delta(after: Samples, before: Samples, name: str, **labels: str) -> float:
    return val(after, name, **labels) - val(before, name, **labels)


def cluster(samples: Samples) -> Samples:
    return {key: value for key, value in samples.items() if key[0].startswith(CLUSTER)}


def unique(owner: str) -> str:
    """A repo name the simulator has not seen (it reuses projects per repo, which would skip the parsing state)."""
    return f"{owner}/m-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def apis(redis_server: RedisServer, simulator) -> Iterator[tuple[Stack, Service]]:
    """One worker and TWO API processes on one queue; MAX_CONCURRENT_JOBS=1 so jobs can be made to wait."""
    stack = make_stack(redis_server, simulator, "metrics", MAX_CONCURRENT_JOBS="1", METRICS_TOKEN=TOKEN)
    second = start_api(stack.env, "metrics-api2")
    yield stack, second
    stopping = threading.Thread(target=second.stop)
    stopping.start()
    stack.stop()
    stopping.join()


def test_metrics_need_the_metrics_token(apis: tuple[Stack, Service]) -> None:
    stack, _ = apis
    for headers in ({}, {"Authorization": "Bearer wrong-token"}, {"X-API-Key": "any-client-key"}):
        response = requests.get(stack.url + "/metrics", headers=headers, timeout=5)
        assert response.status_code == 401, headers
        assert response.json()["success"] is False and "METRICS_TOKEN" in response.json()["error"]
        assert TOKEN not in response.text
    response = requests.get(stack.url + "/metrics", headers=AUTH, timeout=5)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert "# TYPE potpie_queue_depth gauge" in response.text


def test_job_counts_are_exact_and_identical_on_both_api_processes(apis: tuple[Stack, Service]) -> None:
    stack, second = apis
    before = scrape(stack.url)
    jobs = [("octocat", stack.url), ("octocat", second.url), ("parse-error", stack.url),
            ("usage-limit", second.url), ("unauthorized", stack.url)]
    ids = []
    for owner, url in jobs:
        response = requests.post(url + "/analyze", json={"repo": unique(owner)}, timeout=5)
        assert response.status_code == 202, response.text
        ids.append(response.json()["job_id"])
    finals = [stack.wait_final(job_id)["status"] for job_id in ids]
    assert finals == ["finished", "finished", "failed", "failed", "failed"]

    def ends(samples: Samples) -> float:
        name = "potpie_job_duration_seconds_count"
        return sum(delta(samples, before, name, status=status) for status in ("finished", "failed"))

    # the worker records a job's end in the metrics just after it writes the final state wait_final saw
    wait_for(lambda: ends(scrape(stack.url)) >= 5, 10, what="the 5 ends in the metrics")
    first, other = scrape(stack.url), scrape(second.url)

    assert cluster(first) == cluster(other)  # read from Redis: the same on every API process, nothing doubled
    assert delta(first, before, "potpie_jobs_submitted_total") == 5
    assert delta(first, before, "potpie_jobs_finished_total") == 2
    failed = {cls: delta(first, before, "potpie_jobs_failed_total", failure_class=cls) for cls in KNOWN_CLASSES}
    assert failed == {cls: (1 if cls in ("parse_error", "potpie_usage_limit", "potpie_auth") else 0)
                      for cls in KNOWN_CLASSES}
    assert delta(first, before, "potpie_job_duration_seconds_count", status="finished") == 2
    assert delta(first, before, "potpie_job_duration_seconds_count", status="failed") == 3
    assert delta(first, before, "potpie_job_duration_seconds_bucket", status="finished", le="+Inf") == 2
    assert delta(first, before, "potpie_job_duration_seconds_sum", status="finished") > 0
    # Each job observed once per state it left: finished jobs leave 4 states, parse-error 2, usage-limit 3, and the
    # unauthorized key fails the first Potpie call, in queued.
    states = {state: delta(first, before, "potpie_job_state_duration_seconds_count", state=state)
              for state in ("queued", "parsing", "ready", "processing_conversations", "retrying")}
    assert states == {"queued": 5, "parsing": 4, "ready": 3, "processing_conversations": 2, "retrying": 0}
    # Per-process facts: each API counts only the requests it served.
    assert delta(first, before, "potpie_http_request_duration_seconds_count",
                 method="POST", route="/analyze", status="202") == 3
    assert val(other, "potpie_http_request_duration_seconds_count",
               method="POST", route="/analyze", status="202") == 2
    assert val(first, "potpie_queue_depth") == val(first, "potpie_jobs_in_flight") == 0
    assert val(first, "potpie_workers_alive") == 1


def test_potpie_call_metrics_by_endpoint_and_status_after_a_flaky_job(apis: tuple[Stack, Service]) -> None:
    stack, _ = apis
    before = scrape(stack.url)
    final = stack.wait_final(stack.submit(unique("flaky"))["job_id"])
    assert final["status"] == "finished" and final["attempts"] == 1  # every 503 was retried inside its step
    name = "potpie_upstream_request_duration_seconds_count"
    # the worker writes what it added up once a second (MetricsRecorder.FLUSH_S)
    wait_for(lambda: delta(scrape(stack.url), before, name, endpoint="message", status="200") >= 2, 5,
             what="the worker to write the job's Potpie-call metrics")
    after = scrape(stack.url)
    expected = {("parse", "503"): 1, ("parse", "200"): 1, ("parsing_status_by_repo", "503"): 1,
                ("conversations", "503"): 1, ("conversations", "200"): 1, ("message", "503"): 1, ("message", "200"): 2}
    for (endpoint, status), count in expected.items():
        assert delta(after, before, name, endpoint=endpoint, status=status) == count, (endpoint, status)
        errors = delta(after, before, "potpie_upstream_errors_total", endpoint=endpoint, status=status)
        assert errors == (count if status == "503" else 0), (endpoint, status)
    assert delta(after, before, name, endpoint="parsing_status_by_repo", status="200") >= 1
    assert delta(after, before, "potpie_upstream_request_duration_seconds_sum", endpoint="message", status="200") > 0


def test_queue_depth_and_oldest_waiting_age_while_jobs_wait(apis: tuple[Stack, Service]) -> None:
    stack, second = apis
    blocker = stack.submit(unique("stuck"))["job_id"]  # parses forever: holds the only slot until cancelled
    wait_for(lambda: stack.status(blocker)["status"] == "parsing", 10, what="the stuck job to start")
    submitted_at = time.time()
    waiting = [stack.submit(unique("octocat"))["job_id"]]
    time.sleep(0.8)
    waiting.append(stack.submit(unique("octocat"))["job_id"])
    time.sleep(0.4)
    for url in (stack.url, second.url):
        samples = scrape(url)
        assert val(samples, "potpie_queue_depth") == 2
        age = val(samples, "potpie_queue_oldest_age_seconds")
        assert abs(age - (time.time() - submitted_at)) < 0.4, age  # the first one, not the newest
        assert val(samples, "potpie_jobs_in_flight") == 1
        assert val(samples, "potpie_jobs_max_concurrent") == 1
        assert val(samples, "potpie_jobs_utilisation_ratio") == 1.0
    assert requests.delete(f"{stack.url}/jobs/{blocker}", timeout=5).status_code == 200
    for job_id in waiting:
        assert stack.wait_final(job_id)["status"] == "finished"
    samples = scrape(second.url)
    assert val(samples, "potpie_queue_depth") == val(samples, "potpie_queue_oldest_age_seconds") == 0
    assert val(samples, "potpie_jobs_utilisation_ratio") == 0


def test_socketio_connections_and_http_routes_are_per_process(apis: tuple[Stack, Service]) -> None:
    stack, second = apis
    client = socketio.Client(reconnection=False)
    client.connect(stack.url, transports=["websocket"], auth={"token": "any"}, wait_timeout=5)
    try:
        assert val(scrape(stack.url), "potpie_socketio_connections") == 1
        assert val(scrape(second.url), "potpie_socketio_connections") == 0
    finally:
        client.disconnect()
    wait_for(lambda: val(scrape(stack.url), "potpie_socketio_connections") == 0, 5, what="the disconnect")

    before = scrape(second.url)
    missing = uuid.uuid4().hex
    assert requests.get(f"{second.url}/status/{missing}", timeout=5).status_code == 404
    assert requests.get(f"{second.url}/no/such/{missing}", timeout=5).status_code == 404
    after = scrape(second.url)
    name = "potpie_http_request_duration_seconds_count"
    assert delta(after, before, name, method="GET", route="/status/<job_id>", status="404") == 1
    assert delta(after, before, name, method="GET", route="unmatched", status="404") == 1
    assert not any(missing in value for _, labels in after for _, value in labels)  # no raw paths as labels


def test_metrics_answer_without_redis(simulator) -> None:
    env = service_env(f"redis://127.0.0.1:{free_port()}/0", simulator.url, METRICS_TOKEN=TOKEN)
    api = start_api(env, "metrics-noredis-api")
    try:
        samples = scrape(api.url)
    finally:
        api.stop()
    assert val(samples, "potpie_metrics_redis_up") == 0
    assert not any(name.startswith("potpie_jobs_") for name, _ in samples)
    assert ("potpie_http_request_duration_seconds_count",
            (("method", "GET"), ("route", "/livez"), ("status", "200"))) in samples


def test_recorder_adds_up_potpie_calls_and_writes_them_in_one_round_trip(redis_server: RedisServer) -> None:
    client = redis_server.client()
    recorder = MetricsRecorder(client, f"psvc:unit-{uuid.uuid4().hex[:6]}:metrics")
    for _ in range(3):
        recorder.upstream("message", "200", 0.2)
    recorder.upstream("message", "timeout", 1.0)
    assert client.hgetall(recorder.key) == {}, "added up in the process, not one write per call"
    written = wait_for(lambda: client.hgetall(recorder.key), 3 * MetricsRecorder.FLUSH_S,
                       what="the recorder's thread to write them")
    assert written["potpie_upstream_request_duration_seconds|message,200|0.25"] == "3"  # type: ignore[index]
    assert float(written["potpie_upstream_request_duration_seconds|message,200|sum"]) \
        == pytest.approx(0.6)  # type: ignore[index]
    assert written["potpie_upstream_errors_total|message,timeout"] == "1"  # type: ignore[index]


def test_recorder_histograms_are_cumulative_and_exact(redis_server: RedisServer) -> None:
    client = redis_server.client()
    store = JobStore(client, f"unit-{uuid.uuid4().hex[:6]}", 3, 60, 60)
    recorder = store.recorder()
    for seconds in (0.02, 0.05, 0.3, 100.0):  # 0.05 sits on a bound: le means "less than or equal"
        recorder.upstream("parse", "200", seconds)
    recorder.upstream("parse", "timeout", 3.0)
    now = time.time()
    recorder.observe(Change(False, Job("j", status=JobStatus.RETRYING), JobStatus.PARSING, now - 2))
    failed = Job("j", status=JobStatus.FAILED, created_ts=now - 10,
                 failed_reason="Potpie server error (500) (gave up after 4 attempts)")
    recorder.observe(Change(True, failed, JobStatus.RETRYING, now - 1))
    recorder.flush()  # what the recorder's thread does every second
    collector = ClusterCollector(store, Settings(max_concurrent_jobs=3))
    samples = parse(_exposition(collector))
    label = {"endpoint": "parse", "status": "200"}
    buckets = {le: val(samples, "potpie_upstream_request_duration_seconds_bucket", le=le, **label)
               for le in ("0.025", "0.05", "0.1", "0.5", "60", "+Inf")}
    assert buckets == {"0.025": 1, "0.05": 2, "0.1": 2, "0.5": 3, "60": 3, "+Inf": 4}
    assert val(samples, "potpie_upstream_request_duration_seconds_sum", **label) == pytest.approx(100.37)
    assert val(samples, "potpie_upstream_errors_total", endpoint="parse", status="timeout") == 1
    assert val(samples, "potpie_upstream_errors_total", endpoint="parse", status="200") == 0
    assert val(samples, "potpie_job_retries_total") == 1
    assert val(samples, "potpie_jobs_failed_total", failure_class="retries_exhausted") == 1
    assert val(samples, "potpie_job_state_duration_seconds_bucket", state="parsing", le="2.5") == 1
    assert val(samples, "potpie_job_state_duration_seconds_bucket", state="parsing", le="1") == 0
    assert val(samples, "potpie_job_duration_seconds_bucket", status="failed", le="5") == 0
    assert val(samples, "potpie_job_duration_seconds_bucket", status="failed", le="15") == 1
    assert val(samples, "potpie_jobs_max_concurrent") == 3


def test_recorder_never_raises_when_redis_is_down() -> None:
    dead = redis.Redis(port=free_port(), socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))
    recorder = MetricsRecorder(dead, "psvc:dead:metrics")
    recorder.upstream("parse", "200", 0.1)
    recorder.observe(Change(True, Job("j", status=JobStatus.FINISHED, created_ts=time.time()), JobStatus.READY, 0))
    recorder.flush()


@pytest.mark.parametrize("reason, expected", [
    ("Potpie rejected the API key (401): check POTPIE_API_KEY", "potpie_auth"),
    ("Potpie denied access (403): check POTPIE_API_KEY and the repository's permissions", "potpie_auth"),
    ("Potpie usage limit reached (402): Message limit of 50 reached for free plan.", "potpie_usage_limit"),
    ("Potpie could not parse the repository (status: error). Check that ...", "parse_error"),
    ("Potpie did not finish parsing within PARSE_TIMEOUT (4 s); last status: submitted", "parse_timeout"),
    ("Potpie server error (500) Internal server error (gave up after 4 attempts)", "retries_exhausted"),
    ("internal error in poll_parse: KeyError (gave up after 4 attempts)", "internal"),
    ("the GitHub token could not be read: it expired, or TOKEN_ENCRYPTION_KEY differs", "github_token"),
    ("Potpie does not know this project (404)", "potpie_rejected"),
    ("something nobody wrote yet", "other"),
])
def test_failure_classes(reason: str, expected: str) -> None:
    assert failure_class(reason) == expected
    assert expected in KNOWN_CLASSES


def _exposition(collector: ClusterCollector) -> str:
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    registry.register(collector)
    return generate_latest(registry).decode()
