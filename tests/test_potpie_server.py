"""Right answers from a Potpie that behaves as its server code does (shared/potpie/API-FACTS.md §8): replies that
count only when complete, only the agent's words, one parse per repository in flight, polls that never make
Potpie parse again, pinned commits, estimated progress, stopped runs, errors that name Potpie's request.

Each test runs real API and worker processes against this module's own simulator (its settings change per test)."""

from __future__ import annotations

import hashlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import pytest
import requests

from potpie_service.potpie.simulator import Simulator, SimulatorConfig
from potpie_service.tokens import new_key
from tests.conftest import SIM_KEY, Stack, make_stack, simulator_stats
from tests.stack import Receiver, wait_for

pytestmark = pytest.mark.e2e  # whole stacks of processes: `make test` runs it, `make test-fast` does not

GITHUB_TOKEN = "ghp_MARKERtokenforthetest0000000000000000"


@pytest.fixture(scope="module")
def sim() -> Iterator[Simulator]:
    simulator = Simulator(SimulatorConfig(api_key=SIM_KEY, parse_seconds=0.6, slow_parse_seconds=3.0,
                                          hang_seconds=4.0))
    simulator.start()
    yield simulator
    simulator.stop()


def configure(sim: Simulator, **values: Any) -> None:
    requests.post(sim.url + "/_sim/config", json=values, timeout=5).raise_for_status()


@pytest.fixture(autouse=True)
def default_timing(sim: Simulator) -> Iterator[None]:
    yield
    configure(sim, parse_seconds=0.6, slow_parse_seconds=3.0, message_seconds=0, stuck_threshold_seconds=600)


@pytest.fixture(scope="module")
def real(redis_server, sim: Simulator) -> Iterator[Stack]:
    """As deployed against Potpie: whole replies, tokens encrypted, the simulator's GitHub for branch heads."""
    running = make_stack(redis_server, sim, "real", TOKEN_ENCRYPTION_KEY=new_key(), GITHUB_API_URL=sim.url + "/github",
                         WEBHOOK_ALLOW_PRIVATE="true", MAX_CONCURRENT_JOBS="20", MAX_RETRIES="2")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def strict(redis_server, sim: Simulator) -> Iterator[Stack]:
    """Short Potpie calls, one retry, an operator's GITHUB_TOKEN, the token forwarded (a self-hosted Potpie)."""
    running = make_stack(redis_server, sim, "strict", REQUEST_TIMEOUT="1500", MAX_RETRIES="1",
                         GITHUB_API_URL=sim.url + "/github", GITHUB_TOKEN=GITHUB_TOKEN,
                         POTPIE_FORWARD_GITHUB_TOKEN="true", POTPIE_STREAM="true")
    yield running
    running.stop()


def stats(sim: Simulator) -> dict[str, Any]:
    return simulator_stats(sim)


def head_of(sim: Simulator, repo: str, branch: str = "main") -> str:
    return requests.get(f"{sim.url}/github/repos/{repo}/commits/{branch}",
                        headers={"Accept": "application/vnd.github.sha"}, timeout=5).text


# ---------- a reply counts only when it completed; only the agent's words ----------

def test_a_failed_agent_run_is_retried_never_finished_empty(real: Stack, sim: Simulator) -> None:
    final = real.wait_final(real.submit("agent-error/retried", question="What does it do?")["job_id"])
    assert final["status"] == "finished" and final["attempts"] == 2, final
    assert final["result"]["answer"].startswith("The repository agent-error/retried")


def test_a_run_failing_on_every_try_fails_the_job_with_what_potpie_sent(real: Stack, emissions) -> None:
    published = emissions(real)
    job_id = real.submit("agent-down/always")["job_id"]
    final = real.wait_final(job_id, timeout=40)
    assert final["status"] == "failed" and final["attempts"] == 3 and "result" not in final
    reason = final["details"]["failed_reason"]
    assert "Potpie's agent run failed (HTTP 500, internal_error, request_id " in reason, reason
    assert f"psvc-{job_id}-ask_question-a3-" in reason and "gave up after 3 attempts" in reason
    wait_for(lambda: published.count("analysis_error", job_id), 5, what="the final event")
    assert published.count("analysis_complete", job_id) == 0


def test_a_stream_that_ends_empty_is_no_answer(strict: Stack) -> None:
    # POTPIE_STREAM=true: the failed run's stream is a clean 200 holding only the banner
    final = strict.wait_final(strict.submit("agent-error/stream")["job_id"], timeout=30)
    assert final["status"] == "finished" and final["attempts"] == 2, final


def test_the_setup_banner_never_reaches_the_answer_events_or_webhook(real: Stack, emissions) -> None:
    published, receiver = emissions(real), Receiver()
    try:
        job_id = real.submit("octocat/banner", question="What does it do?", callback_url=receiver.url)["job_id"]
        final = real.wait_final(job_id)
        assert final["status"] == "finished" and final["attempts"] == 1
        wait_for(lambda: receiver.calls, 10, what="the webhook")
        wait_for(lambda: published.count("analysis_complete", job_id), 5, what="the final event")
        for text in (json.dumps(final), json.dumps(published.of(job_id)), receiver.calls[-1][1].decode()):
            assert "Setting up repository workspace" not in text and "\\u23f3" not in text and "\u23f3" not in text
        result = final["result"]
        assert result["answer"].startswith("The repository octocat/banner")
        assert result["snippets_count"] == 3 and "overview" in result["analysis_response"]
        assert result["citations"] == ["src/app.py", "src/service.py"]  # named in the answer: Potpie cites none
    finally:
        receiver.close()


def test_status_chunks_never_reach_the_answer(real: Stack) -> None:
    final = real.wait_final(real.submit("subagent-error/chunks")["job_id"])
    assert final["status"] == "finished"
    assert "SUBAGENT_ERROR" not in json.dumps(final["result"])


# ---------- one parse per repository in flight; polls that never queue a parse ----------

def test_jobs_on_one_repository_share_one_parse(real: Stack, sim: Simulator) -> None:
    configure(sim, parse_seconds=2.0, register_ms=200)  # a window in which ten first /parse calls would race
    repo = "octocat/shared-parse"
    before = stats(sim)["requests"]["GET /parsing-status"]
    with ThreadPoolExecutor(max_workers=10) as pool:
        jobs = list(pool.map(lambda i: real.submit(repo, question=f"Question {i}?")["job_id"], range(10)))
    finals = [real.wait_final(job_id, timeout=40) for job_id in jobs]
    assert all(final["status"] == "finished" for final in finals)
    counted = stats(sim)
    assert counted["parse_calls"][f"{repo}@main"] == 1 and counted["parses_started"][f"{repo}@main"] == 1
    assert counted["projects_by_repo"][f"{repo}@main"] == 1
    assert len({final["potpie_project_id"] for final in finals}) == 1
    assert counted["requests"]["GET /parsing-status"] == before, "no poll used the route that re-queues"
    polls = sum(final["potpie_calls"].get("parsing_status_by_repo", 0) for final in finals)
    assert polls <= 12, f"one poll serves every job of the flight: {polls} polls for 10 jobs over a 2 s parse"
    assert all(final["potpie_calls"]["message"] == 2 for final in finals)


def test_a_long_parse_is_never_queued_again_by_polling(real: Stack, sim: Simulator) -> None:
    configure(sim, stuck_threshold_seconds=0.5)  # Potpie's PARSING_STUCK_THRESHOLD_MINUTES, shortened
    final = real.wait_final(real.submit("slow-parse/long")["job_id"], timeout=30)
    assert final["status"] == "finished"
    assert stats(sim)["parses_started"]["slow-parse/long@main"] == 1


def test_progress_is_estimated_while_potpie_says_submitted(real: Stack, emissions) -> None:
    published = emissions(real)
    job_id = real.submit("slow-parse/progress")["job_id"]
    seen = []
    while (body := real.status(job_id))["status"] not in ("finished", "failed"):
        if body["status"] == "parsing":
            seen.append((body["progress"], body.get("progress_estimated")))
        time.sleep(0.1)
    progresses = [progress for progress, _ in seen]
    assert progresses == sorted(progresses) and len(set(progresses)) >= 3, seen
    assert all(estimated is True for _, estimated in seen) and 15 <= progresses[0] and progresses[-1] < 65
    parsing = [p for name, p in published.of(job_id) if name == "status_update" and p["status"] == "parsing"]
    assert parsing and all(p["progress_estimated"] is True for p in parsing)
    after = [p for name, p in published.of(job_id) if name == "status_update" and p["status"] != "parsing"]
    assert all("progress_estimated" not in p for p in after)


# ---------- reproducible analyses: the commit ----------

def test_a_requested_commit_is_parsed_and_reported(real: Stack, sim: Simulator, emissions) -> None:
    published = emissions(real)
    commit = "0123abc"
    job_id = real.submit("octocat/pinned", commit_id=commit.upper())["job_id"]
    final = real.wait_final(job_id)
    assert final["status"] == "finished" and final["commit_id"] == commit
    expected = {"id": commit, "pinned": True, "source": "request", "note": None}
    assert final["commit"] == expected and final["result"]["commit"] == expected
    assert final["result"]["commit_id"] == commit
    assert all(p["commit"] == expected for name, p in published.of(job_id) if name == "status_update")
    bad = requests.post(real.url + "/analyze", json={"repo": "octocat/x", "commit_id": "main"}, timeout=5)
    assert bad.status_code == 400 and bad.json()["details"]["field"] == "commit_id"


def test_the_branch_head_is_pinned_with_the_jobs_token_which_potpie_never_sees(real: Stack, sim: Simulator) -> None:
    job_id = real.submit("octocat/token-pin", branch="dev", github_token=GITHUB_TOKEN)["job_id"]
    final = real.wait_final(job_id)
    assert final["status"] == "finished"
    head = head_of(sim, "octocat/token-pin", "dev")
    assert final["commit"] == {"id": head, "pinned": True, "source": "github", "note": None}
    counted = stats(sim)
    assert hashlib.sha256(GITHUB_TOKEN.encode()).hexdigest() in counted["github"]["token_sha256"]
    assert "octocat/token-pin@dev" not in counted["github_token_sha256"], "the token was sent to Potpie's /parse"
    assert GITHUB_TOKEN not in json.dumps(final)


def test_without_a_token_the_commit_is_not_pinned_and_the_job_says_so(real: Stack) -> None:
    final = real.wait_final(real.submit("octocat/unpinned")["job_id"])
    assert final["status"] == "finished" and final["commit_id"] is None
    commit = final["result"]["commit"]
    assert commit["pinned"] is False and commit["id"] is None
    assert "no GitHub token" in commit["note"] and "as it already holds it" in commit["note"]


def test_a_github_failure_never_fails_the_job(real: Stack) -> None:
    final = real.wait_final(real.submit("github-down/x", github_token=GITHUB_TOKEN)["job_id"])
    assert final["status"] == "finished" and final["attempts"] == 1
    assert "GitHub answered 503" in final["commit"]["note"] and final["commit"]["pinned"] is False


def test_an_operators_token_pins_and_is_forwarded_only_when_the_operator_asks(strict: Stack, sim: Simulator) -> None:
    final = strict.wait_final(strict.submit("octocat/operator-token")["job_id"])
    assert final["status"] == "finished"
    assert final["commit"]["source"] == "github" and final["commit"]["id"] == head_of(sim, "octocat/operator-token")
    # POTPIE_FORWARD_GITHUB_TOKEN=true: a self-hosted Potpie that reads the field gets it
    assert stats(sim)["github_token_sha256"]["octocat/operator-token@main"] == \
        hashlib.sha256(GITHUB_TOKEN.encode()).hexdigest()


# ---------- stop what is no longer wanted ----------

def _run_of(sim: Simulator, job_id: str) -> str | None:
    return next((run for run in stats(sim)["runs_in_flight"] if run.startswith(f"psvc-{job_id}-")), None)


def test_cancelling_a_job_during_a_reply_stops_its_run(real: Stack, sim: Simulator) -> None:
    configure(sim, message_seconds=20)
    job_id = real.submit("octocat/cancel-run")["job_id"]
    run = wait_for(lambda: _run_of(sim, job_id), 15, what="the agent run to start")
    assert requests.delete(f"{real.url}/jobs/{job_id}", timeout=5).status_code == 200
    wait_for(lambda: stats(sim)["stops"].get(run) == 1, 10, what="Potpie to be asked to stop the run")
    wait_for(lambda: run not in stats(sim)["runs_in_flight"], 5, what="the run to end")
    assert real.status(job_id)["status"] == "cancelled"


def test_a_reply_that_timed_out_is_stopped_before_it_is_asked_again(strict: Stack, sim: Simulator) -> None:
    configure(sim, message_seconds=4)  # longer than REQUEST_TIMEOUT (1.5 s)
    job_id = strict.submit("octocat/too-slow")["job_id"]
    final = strict.wait_final(job_id, timeout=40)
    assert final["status"] == "failed" and final["attempts"] == 2
    assert "did not answer within 1.5 s" in final["details"]["failed_reason"]
    runs = [run for run in stats(sim)["sessions"] if run.startswith(f"psvc-{job_id}-")]
    assert len(runs) == 2 and all(stats(sim)["stops"].get(run) == 1 for run in runs), (runs, stats(sim)["stops"])
    wait_for(lambda: _run_of(sim, job_id) is None, 5, what="no run of the job left going")


def test_a_reply_cut_off_is_stopped_then_asked_again(real: Stack, sim: Simulator) -> None:
    job_id = real.submit("truncated-stream/cut")["job_id"]
    final = real.wait_final(job_id, timeout=30)
    assert final["status"] == "finished" and final["attempts"] == 2
    runs = [run for run in stats(sim)["sessions"] if run.startswith(f"psvc-{job_id}-")]
    assert stats(sim)["stops"].get(runs[0]) == 1, "the cut run was stopped before the retry"


# ---------- errors you can act on ----------

def test_every_potpie_request_names_its_job_step_and_attempt(real: Stack, sim: Simulator) -> None:
    job_id = real.wait_final(real.submit("octocat/request-ids")["job_id"])["job_id"]
    sent = [(route, rid) for route, rid in stats(sim)["request_ids"] if job_id in rid]
    routes = {route for route, _ in sent}
    assert {"POST /parse", "POST /parsing-status", "POST /conversations", "POST /message"} <= routes, routes
    steps = {rid.split("-")[2] for _, rid in sent}
    assert {"submit_parse", "poll_parse", "create_conversation", "ask_question", "ask_structured"} <= steps
    calls = real.status(job_id)["potpie_calls"]
    assert sum(calls.values()) == len(sent) and calls["message"] == 2


def test_an_unknown_agent_is_reported_at_start_and_fails_jobs_clearly(redis_server, sim: Simulator) -> None:
    stack = make_stack(redis_server, sim, "agent", POTPIE_AGENT_ID="no_such_agent")
    try:
        wait_for(lambda: any("is not an agent Potpie lists" in line["message"] for line in stack.log_lines()), 10,
                 what="the worker's start-up check")
        final = stack.wait_final(stack.submit("octocat/agent")["job_id"])
        assert final["status"] == "failed" and final["attempts"] == 1
        assert "POTPIE_AGENT_ID='no_such_agent' is not an agent Potpie lists" in final["details"]["failed_reason"]
        assert "codebase_qna_agent" in final["details"]["failed_reason"]
    finally:
        stack.stop()
