"""The pipeline alone: `Pipeline.run` driven in this process against a real throwaway Redis and the simulator over
HTTP, with no worker, no Celery and no API. A change to the steps is checked here in seconds; the same behaviour
through real processes is in tests/test_pipeline_e2e.py and tests/test_potpie_server.py."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Iterator

import pytest
import requests

from potpie_service.config import Settings
from potpie_service.core.job import Job
from potpie_service.core.model import JobStatus
from potpie_service.core.replies import SETUP_BANNER
from potpie_service.pipeline.agents import AgentRuns
from potpie_service.pipeline.outcomes import JobFailed
from potpie_service.pipeline.parsing import Parsing, PollLoad
from potpie_service.github import GitHubClient
from potpie_service.pipeline.steps import Pipeline
from potpie_service.potpie.client import PotpieClient, TransientPotpieError, Trace
from potpie_service.potpie.simulator import Simulator, SimulatorConfig
from potpie_service.store import make_store
from potpie_service.store.jobs import JobStore
from tests.conftest import SIM_KEY, simulator_stats


@pytest.fixture(scope="module")
def sim() -> Iterator[Simulator]:
    simulator = Simulator(SimulatorConfig(api_key=SIM_KEY, parse_seconds=0.3))
    simulator.start()
    yield simulator
    simulator.stop()


@dataclass
class Driver:
    """A pipeline and its store; steps the pipeline dispatches are run here, in order, after their countdown."""

    pipeline: Pipeline
    store: JobStore
    queue: list[tuple[str, int, float]] = field(default_factory=list)

    def submit(self, repo: str, question: str = "", **fields: object) -> str:
        job = Job(uuid.uuid4().hex, owner="tester", repo=repo, question=question, max_attempts=3,
                  created_ts=time.time(), **fields)  # type: ignore[arg-type]
        submitted = self.store.submit(job)
        assert submitted.outcome == "created"
        self.queue.append((job.id, 0, 0.0))
        return job.id

    def drain(self, timeout: float = 20.0) -> list[str]:
        """Run every dispatched step until none is left; what each delivery came to."""
        outcomes, deadline = [], time.monotonic() + timeout
        while self.queue:
            assert time.monotonic() < deadline, f"still dispatching: {self.queue}"
            self.queue.sort(key=lambda item: item[2])
            job_id, seq, due = self.queue.pop(0)
            time.sleep(max(0.0, due - time.monotonic()))
            outcomes.append(self.pipeline.run(job_id, seq))
        return outcomes

    def job(self, job_id: str) -> Job:
        found = self.store.get(job_id)
        assert found is not None
        return found


@pytest.fixture
def driver(redis_server, sim: Simulator) -> Driver:
    requests.post(sim.url + "/_sim/reset", timeout=5).raise_for_status()
    settings = Settings(redis_url_raw=redis_server.url, queue_name=f"pipe-{uuid.uuid4().hex[:6]}",
                        potpie_base_url=sim.url, potpie_api_key=SIM_KEY, potpie_poll_interval=0.1,
                        retry_base_delay=0.05, request_timeout_ms=3000, max_retries=2, max_concurrent_jobs=50)
    store = make_store(settings)
    made = Driver(None, store)  # type: ignore[arg-type]
    made.pipeline = Pipeline(settings, store, PotpieClient(sim.url, SIM_KEY, 3.0), dispatch=lambda job_id, seq, wait:
                             made.queue.append((job_id, seq, time.monotonic() + wait)), reveal_token=lambda _: None)
    return made


def test_a_job_runs_every_step_to_a_result_holding_only_the_agents_words(driver: Driver) -> None:
    job_id = driver.submit("octocat/pipe", "What does it do?")
    outcomes = driver.drain()
    job = driver.job(job_id)
    assert job.status is JobStatus.FINISHED and outcomes[-1] == "ended", outcomes
    assert job.result is not None and job.result["answer"].startswith("The repository octocat/pipe")
    assert SETUP_BANNER not in job.result["answer"]
    assert job.result["commit"]["pinned"] is False and "no GitHub token" in job.result["commit"]["note"]
    assert job.potpie_calls["parse"] == 1 and job.potpie_calls["message"] == 2 and job.agent_session == ""
    assert job.progress == 100 and job.attempts == 1


def test_jobs_on_one_repository_share_one_parse(driver: Driver, sim: Simulator) -> None:
    ids = [driver.submit("octocat/shared", f"Question {i}?") for i in range(4)]
    driver.drain()
    assert [driver.job(job_id).status for job_id in ids] == [JobStatus.FINISHED] * 4
    stats = simulator_stats(sim)
    assert stats["parse_calls"]["octocat/shared@main"] == 1 and stats["parses_started"]["octocat/shared@main"] == 1
    assert len({driver.job(job_id).potpie_project_id for job_id in ids}) == 1


def test_a_failed_agent_run_is_an_attempt_and_the_next_one_finishes(driver: Driver) -> None:
    job_id = driver.submit("agent-error/pipe")
    outcomes = driver.drain()
    job = driver.job(job_id)
    assert job.status is JobStatus.FINISHED and job.attempts == 2, (outcomes, job.last_error)
    assert "agent run failed (HTTP 500, internal_error" in job.last_error


def test_a_delivery_for_an_old_step_or_an_ended_job_does_nothing(driver: Driver) -> None:
    job_id = driver.submit("octocat/dupes")
    driver.drain()
    ended = driver.job(job_id)
    assert driver.pipeline.run(job_id, 0) == "done" and driver.pipeline.run(job_id, ended.seq) == "done"
    assert driver.job(job_id).event_seq == ended.event_seq, "nothing published again"
    assert driver.pipeline.run(uuid.uuid4().hex, 0) == "gone"


def test_a_requested_commit_is_parsed_as_is(driver: Driver, sim: Simulator) -> None:
    job_id = driver.submit("octocat/pinned", commit_id="abcdef1", commit_source="request")
    driver.drain()
    job = driver.job(job_id)
    assert job.status is JobStatus.FINISHED
    assert job.result is not None and job.result["commit"] == {"id": "abcdef1", "pinned": True, "source": "request",
                                                              "note": None}
    # what Potpie was asked to parse: that commit (its lookup by commit finds the job's project, a branch one none)
    found = PotpieClient(sim.url, SIM_KEY, 3.0).find_project("octocat/pinned", "main", "abcdef1")
    assert found is not None and found[0] == job.potpie_project_id
    assert simulator_stats(sim)["parse_calls"] == {"octocat/pinned@main": 1}


def test_the_poll_load_counts_the_parses_polled_within_the_interval() -> None:
    load = PollLoad(window=5.0)
    for index in range(250):
        load.note(f"parse-{index}", 100.0 + index * 0.01)
    load.note("parse-0", 103.0)  # polled again: counted once
    assert load.spacing(103.0) == pytest.approx(2.5), "250 parses at 100 polls a second: 2.5 s apart"
    assert load.spacing(106.0) == pytest.approx(1.51), "5 s later: those polled since 101 s"
    assert load.spacing(108.0) == pytest.approx(0.01), "then only the one polled again at 103 s"
    assert load.spacing(109.0) == 0.0


def test_a_run_that_could_not_be_stopped_is_not_forgotten_and_nothing_is_asked_meanwhile(driver: Driver) -> None:
    """Potpie cannot be told to stop the run an earlier try left (here: it cannot be reached at all): asking again
    would start a second billed run and lose the first one's id, so the try fails and the id stays for the next."""
    job_id = driver.submit("octocat/left-running")
    driver.store.mark(job_id, conversation_id="conv-1", agent_session="psvc-earlier-run")
    runs = AgentRuns(driver.store, PotpieClient("http://127.0.0.1:9", SIM_KEY, 1.0))  # nothing listens on port 9
    with pytest.raises(TransientPotpieError, match="could not be stopped"):
        runs.ask(driver.job(job_id), "What?", Trace(job_id, "ask_question", 2))
    assert driver.job(job_id).agent_session == "psvc-earlier-run"


def test_a_forwarded_token_is_the_jobs_own_never_the_operators_in_its_place(driver: Driver, sim: Simulator) -> None:
    """POTPIE_FORWARD_GITHUB_TOKEN on, GITHUB_TOKEN set: a job that came with its own token whose secret can no
    longer be read fails rather than have Potpie parse with the operator's identity; a job without one forwards
    the operator's."""
    settings = Settings(potpie_forward_github_token=True, github_token="ghp_operator")
    parsing = Parsing(settings, driver.store, PotpieClient(sim.url, SIM_KEY, 3.0), GitHubClient(sim.url + "/github"),
                      reveal_token=lambda _: None)
    with pytest.raises(JobFailed, match="could not be read"):
        parsing._forwarded_token(Job("a" * 32, repo="o/r", has_github_token=True))
    assert parsing._forwarded_token(Job("b" * 32, repo="o/r")) == "ghp_operator"
