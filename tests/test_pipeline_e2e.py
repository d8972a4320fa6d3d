"""The analysis pipeline end to end: real API and worker processes, real Redis, the simulator over HTTP."""

from __future__ import annotations

import re
import time
import uuid
from datetime import datetime
from typing import Iterator

import pytest
import requests

from potpie_service.store.metrics import MetricsRecorder
from tests.conftest import Stack, make_stack
from tests.stack import Emissions, wait_for

pytestmark = pytest.mark.e2e  # whole stacks of processes: `make test` runs it, `make test-fast` does not


def test_happy_path_result_field_by_field(stack: Stack, sim_stats) -> None:
    accepted = stack.submit("octocat/Hello-World", branch="main", question="What does it do?")
    job_id = accepted["job_id"]
    assert accepted["project_id"] == job_id and len(job_id) == 32
    assert accepted["status"] == "queued" and accepted["success"] is True
    assert isinstance(accepted["queue_position"], int)

    final = stack.wait_final(job_id)
    assert final["status"] == "finished", final
    assert final["progress"] == 100
    assert final["attempts"] == 1 and final["max_attempts"] == 4
    assert final["potpie_project_id"]
    assert final["details"]["failed_reason"] is None
    assert final["details"]["processed_at"] and final["details"]["finished_at"]
    result = final["result"]
    assert result["project_id"] == job_id
    assert result["potpie_project_id"] == final["potpie_project_id"]
    assert (result["repo"], result["branch"], result["question"]) == ("octocat/Hello-World", "main",
                                                                       "What does it do?")
    assert result["parsing_status"] == "ready"
    assert "octocat/Hello-World" in result["answer"] and "What does it do?" in result["answer"]
    assert result["citations"] == ["src/app.py", "src/service.py"]
    assert result["snippets_count"] == len(result["snippets"]) == 3
    first = result["snippets"][0]
    assert set(first) == {"node_id", "file_path", "line_start", "line_end", "tags", "description"}
    assert first["file_path"] == "src/app.py" and first["line_start"] == 1 and first["line_end"] == 20
    assert "overview" in result["analysis_response"] and "snippets" not in result["analysis_response"]
    meta = result["metadata"]
    assert meta["job_id"] == job_id and meta["attempts"] == 1 and meta["has_github_token"] is False
    assert meta["processing_time_ms"] > 0 and meta["parsed_at"]


def test_progress_is_monotonic_and_states_follow_the_lifecycle(stack: Stack) -> None:
    job_id = stack.submit("slow-parse/progress")["job_id"]
    seen: list[tuple[str, int]] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        body = stack.status(job_id)
        if not seen or seen[-1] != (body["status"], body["progress"]):
            seen.append((body["status"], body["progress"]))
        if body["status"] in ("finished", "failed"):
            break
        time.sleep(0.05)
    progresses = [p for _, p in seen]
    assert progresses == sorted(progresses), seen
    statuses = [s for s, _ in seen]
    assert statuses[-1] == "finished"
    assert "parsing" in statuses
    # Potpie says only `submitted` until `ready`: the estimate from recent parses moves the progress meanwhile
    assert len({p for s, p in seen if s == "parsing"}) >= 3, seen
    order = ["queued", "parsing", "ready", "processing_conversations", "finished"]
    assert [order.index(s) for s in statuses] == sorted(order.index(s) for s in statuses)


@pytest.mark.parametrize("repo, reason", [
    ("parse-error/demo", "could not parse the repository"),
    ("usage-limit/demo", "usage limit reached (HTTP 402, request_failed, request_id psvc-"),
    ("unauthorized/demo", "rejected the API key: check POTPIE_API_KEY (HTTP 401, authentication_required"),
])
def test_errors_that_cannot_improve_fail_at_once(stack: Stack, repo: str, reason: str) -> None:
    final = stack.wait_final(stack.submit(repo)["job_id"])
    assert final["status"] == "failed"
    assert reason in final["details"]["failed_reason"]
    assert final["attempts"] == 1, "a permanent error must not be retried"
    assert "result" not in final


def test_parse_stuck_past_parse_timeout_fails_with_reason(stack: Stack, sim_stats) -> None:
    repo = f"stuck/demo-{uuid.uuid4().hex[:6]}"
    final = stack.wait_final(stack.submit(repo)["job_id"], timeout=30)
    assert final["status"] == "failed"
    assert "PARSE_TIMEOUT (4 s)" in final["details"]["failed_reason"]
    assert "last status: submitted" in final["details"]["failed_reason"]
    # the next job does not follow the parse that timed out (it would fail at once): it asks Potpie again
    started = time.monotonic()
    again = stack.wait_final(stack.submit(repo)["job_id"], timeout=30)
    assert again["status"] == "failed" and time.monotonic() - started >= 4
    assert sim_stats()["parse_calls"][f"{repo}@main"] == 2


@pytest.mark.parametrize("repo", ["flaky/inline", "rate-limited/inline", "bad-json/inline", "auth-flaky/inline"])
def test_transient_failures_are_retried_inside_the_step(stack: Stack, repo: str) -> None:
    final = stack.wait_final(stack.submit(repo)["job_id"], timeout=40)
    assert final["status"] == "finished", final
    assert final["attempts"] == 1, "tenacity absorbed the failure without a job-level retry"


def test_parse_that_timed_out_is_looked_up_not_requested_again(stack: Stack, sim_stats, emissions) -> None:
    # The first POST /parse hangs past REQUEST_TIMEOUT but Potpie did create the project: the step does not
    # repeat the request; the job-level retry asks Potpie by repo first and finds it, parsed by then (0.6 s).
    published = emissions(stack)
    job_id = stack.submit("timeout/lookup")["job_id"]
    final = stack.wait_final(job_id, timeout=40)
    assert final["status"] == "finished", final
    assert final["attempts"] == 2
    assert sim_stats()["parse_calls"]["timeout/lookup@main"] == 1
    states = _states(published, job_id)
    assert states[states.index("retrying") + 1] == "ready", f"the lookup found the project ready: {states}"


def _states(published: Emissions, job_id: str) -> list[str]:
    """The statuses of the job's published status updates, in order."""
    return [payload["status"] for name, payload in published.of(job_id) if name == "status_update"]


def _retries_counted(stack: Stack) -> float:
    time.sleep(1.5 * MetricsRecorder.FLUSH_S)  # what the worker counted is written once a second
    text = requests.get(stack.url + "/metrics", timeout=5).text
    return float(re.search(r"^potpie_job_retries_total (\S+)$", text, re.MULTILINE).group(1))


def _straight_to_ready(stack: Stack, published: Emissions, job_id: str) -> None:
    """The job finished on its first attempt through queued -> ready (no parsing, no retrying, no ERROR line),
    and ran every step after the parse: the answer and the structured analysis are in the result."""
    final = stack.wait_final(job_id)
    assert final["status"] == "finished" and final["attempts"] == 1, final
    wait_for(lambda: published.count("analysis_complete", job_id), 5, what="the final event")
    time.sleep(0.5)  # time for a duplicate to follow
    assert published.count("analysis_complete", job_id) == 1
    updates = [payload for name, payload in published.of(job_id)
               if name == "status_update" and payload["status"] != "queued"]  # queue-position updates aside
    states = [update["status"] for update in updates]
    assert states[0] == "ready" and "parsing" not in states and "retrying" not in states, states
    assert updates[0]["progress"] == 65 and updates[0]["message"] == "Parsing completed, starting conversations..."
    assert [u["progress"] for u in updates] == sorted(u["progress"] for u in updates)
    assert states[-1] == "finished" and "processing_conversations" in states
    result = final["result"]
    assert result["parsing_status"] == "ready" and result["answer"] and result["snippets_count"] == 3
    errors = [line for line in stack.log_lines() if line["level"] == "error" and line.get("job_id") == job_id]
    assert errors == []


def test_a_parse_that_is_ready_at_once_goes_straight_to_ready(stack: Stack, sim_stats, emissions) -> None:
    published = emissions(stack)
    retries = _retries_counted(stack)
    job_id = stack.submit("already-parsed/demo")["job_id"]
    _straight_to_ready(stack, published, job_id)
    assert _retries_counted(stack) == retries, "no retry is counted"
    assert sim_stats()["parse_calls"]["already-parsed/demo@main"] == 1


def test_a_repeat_analysis_of_the_same_repo_is_ready_at_once(stack: Stack, sim_stats, emissions) -> None:
    published = emissions(stack)
    repo = f"octocat/repeat-{uuid.uuid4().hex[:8]}"
    first = stack.submit(repo, question="What does it do?")["job_id"]
    assert stack.wait_final(first)["status"] == "finished"
    assert "parsing" in _states(published, first)
    retries = _retries_counted(stack)
    second = stack.submit(repo, question="Where is the entry point?")["job_id"]
    _straight_to_ready(stack, published, second)
    assert _retries_counted(stack) == retries, "no retry is counted"
    # the first job's parse is still known ready (store/flights.py): the second asks Potpie for no parse at all
    assert sim_stats()["parse_calls"][f"{repo}@main"] == 1
    assert stack.status(second)["potpie_project_id"] == stack.status(first)["potpie_project_id"]


def test_malformed_agent_json_keeps_the_raw_text(stack: Stack) -> None:
    final = stack.wait_final(stack.submit("malformed-reply/demo")["job_id"])
    assert final["status"] == "finished"
    analysis = final["result"]["analysis_response"]
    assert "no valid JSON" in analysis["parse_error"]
    assert "```json" in analysis["raw_text"]
    assert final["result"]["snippets"] == [] and final["result"]["snippets_count"] == 0


def test_unknown_job_is_404_json(stack: Stack) -> None:
    for job_id in ("0" * 32, "not-an-id"):
        response = requests.get(f"{stack.url}/status/{job_id}", timeout=5)
        assert response.status_code == 404
        assert response.json()["success"] is False


@pytest.fixture(scope="module")
def retry_stack(redis_server, simulator) -> Iterator[Stack]:
    """One Potpie try per call, so every transient failure becomes a job-level retry."""
    running = make_stack(redis_server, simulator, "retry", POTPIE_CALL_ATTEMPTS="1", MAX_RETRIES="5",
                         RETRY_BASE_DELAY="0.2")
    yield running
    running.stop()


def test_job_level_retry_resumes_without_parsing_again(retry_stack: Stack, sim_stats) -> None:
    final = retry_stack.wait_final(retry_stack.submit("flaky/resume")["job_id"], timeout=40)
    assert final["status"] == "finished", final
    # parse 503, status 503, conversation 503, message 503: four failed attempts, the fifth succeeds
    assert final["attempts"] == 5
    assert final["result"]["metadata"]["attempts"] == 5
    # the first parse never created a project; the second did; later retries resumed after it
    assert sim_stats()["parse_calls"]["flaky/resume@main"] == 2


def test_exhausted_retries_fail_with_the_attempt_count(retry_stack: Stack) -> None:
    final = retry_stack.wait_final(retry_stack.submit("server-error/demo")["job_id"], timeout=40)
    assert final["status"] == "failed"
    assert final["attempts"] == 6 and final["max_attempts"] == 6
    assert "gave up after 6 attempts" in final["details"]["failed_reason"]
    assert "server error (HTTP 500, internal_error, request_id psvc-" in final["details"]["failed_reason"]


@pytest.fixture(scope="module")
def narrow_stack(redis_server, simulator) -> Iterator[Stack]:
    """MAX_CONCURRENT_JOBS=2 across two worker processes on separate hosts."""
    running = make_stack(redis_server, simulator, "narrow", workers=2, MAX_CONCURRENT_JOBS="2",
                         POTPIE_POLL_INTERVAL="0.1")
    yield running
    running.stop()


def _ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def test_queue_positions_are_fifo_and_the_cap_holds_across_workers(narrow_stack: Stack) -> None:
    jobs = [narrow_stack.submit(f"slow-parse/cap{i}") for i in range(6)]
    positions = [job["queue_position"] for job in jobs]
    assert positions[:2] == [0, 0], "the first two take the free slots"
    assert positions[2:] == [1, 2, 3, 4]
    assert [narrow_stack.status(job["job_id"])["queue_position"] for job in jobs[2:]] == [1, 2, 3, 4]
    finals = [narrow_stack.wait_final(job["job_id"], timeout=60) for job in jobs]
    assert all(final["status"] == "finished" for final in finals)
    client = narrow_stack.redis.client()
    prefix = narrow_stack.key("job:")
    admitted = [float(client.hget(prefix + job["job_id"], "admitted_at")) for job in jobs]
    # admitted_at is the clock of the worker whose finish freed the slot, read just before its script runs: two
    # slots freed at once by two workers may stamp FIFO admissions a fraction of a millisecond out of order.
    assert all(later > earlier - 0.05 for earlier, later in zip(admitted, admitted[1:])), \
        ("jobs are admitted in submission order", admitted)
    spans = [(_ts(f["details"]["processed_at"]), _ts(f["details"]["finished_at"])) for f in finals]
    for start, _ in spans:
        running = sum(1 for s, e in spans if s <= start < e)
        assert running <= 2, f"{running} jobs ran at once with MAX_CONCURRENT_JOBS=2"


@pytest.fixture(scope="module")
def ttl_stack(redis_server, simulator) -> Iterator[Stack]:
    running = make_stack(redis_server, simulator, "ttl", JOB_TTL_COMPLETED="2", JOB_TTL_FAILED="3")
    yield running
    running.stop()


def test_finished_and_failed_jobs_expire_after_their_ttl(ttl_stack: Stack) -> None:
    done = ttl_stack.wait_final(ttl_stack.submit("octocat/ttl")["job_id"])
    failed = ttl_stack.wait_final(ttl_stack.submit("parse-error/ttl")["job_id"])
    assert (done["status"], failed["status"]) == ("finished", "failed")
    client = ttl_stack.redis.client()
    prefix = ttl_stack.key("")
    assert client.ttl(prefix + "job:" + done["job_id"]) <= 2
    assert 2000 < client.pttl(prefix + "job:" + failed["job_id"]) <= 3000  # TTL rounds: > 2 only within 0.5 s
    wait_for(lambda: requests.get(f"{ttl_stack.url}/status/{done['job_id']}", timeout=5).status_code == 404, 6,
             what="the finished job to expire")
    wait_for(lambda: requests.get(f"{ttl_stack.url}/status/{failed['job_id']}", timeout=5).status_code == 404, 6,
             what="the failed job to expire")
    stats = requests.get(ttl_stack.url + "/queue/stats", timeout=5).json()["stats"]
    assert stats["completed"] == 0 and stats["failed"] == 0
    leftovers = [k for k in client.scan_iter(prefix + "*") if done["job_id"] in k or failed["job_id"] in k]
    assert leftovers == []
