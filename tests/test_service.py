"""JobService alone, against a real throwaway Redis: no HTTP, no worker. What a submit, a cancel and a retry come to
as domain results and domain errors (the API's statuses and bodies are tests/test_request_path.py's and the e2e
tests')."""

from __future__ import annotations

import os
import signal
import uuid
from typing import Iterator

import pytest

from potpie_service.config import Settings, parse_rate_limits
from potpie_service.core.errors import Conflict, NotFound, RateLimited, Unavailable, ValidationError
from potpie_service.core.model import JobStatus
from potpie_service.core.submission import AnalyzeRequest
from potpie_service.connections import api_timeout
from potpie_service.service import JobService
from potpie_service.store import StoreUnavailable, make_store
from potpie_service.tokens import TokenCipher, new_key
from tests.stack import RedisServer


def request(repo: str = "octocat/service", question: str = "What?", **extra: object) -> AnalyzeRequest:
    return AnalyzeRequest(repo, "main", question, extra.get("github_token"), None,  # type: ignore[arg-type]
                          extra.get("commit_id"))  # type: ignore[arg-type]


@pytest.fixture
def settings(redis_server) -> Settings:
    return Settings(redis_url_raw=redis_server.url, queue_name=f"svc-{uuid.uuid4().hex[:6]}", dedup_enabled=True,
                    max_concurrent_jobs=1, token_encryption_key=new_key())


@pytest.fixture
def service(settings: Settings) -> JobService:
    dispatched: list[str] = []
    made = JobService(settings, make_store(settings), lambda job_id, seq, wait: dispatched.append(job_id),
                      TokenCipher(settings.token_encryption_key))
    made.dispatched = dispatched  # type: ignore[attr-defined]
    return made


def test_a_submit_creates_a_job_or_finds_the_one_it_repeats(service: JobService) -> None:
    first = service.submit("alice", request(), idempotency_key="k-1")
    assert first.outcome == "created" and first.job.status is JobStatus.QUEUED and first.queue_position == 0
    assert service.submit("alice", request(), idempotency_key="k-1").outcome == "replayed"
    duplicate = service.submit("alice", request())  # identical while the first is queued or running
    assert duplicate.outcome == "duplicate" and duplicate.job.id == first.job.id
    second = service.submit("alice", request(question="Another?"))
    assert second.outcome == "created" and second.queue_position == 1, "behind the first (MAX_CONCURRENT_JOBS=1)"
    with pytest.raises(Conflict) as conflict:
        service.submit("alice", request(question="Other"), idempotency_key="k-1")
    assert conflict.value.details["field"] == "Idempotency-Key"
    assert service.submit("bob", request(), idempotency_key="k-1").outcome == "created", "keys are per owner"


def test_a_submit_refuses_what_it_cannot_keep(service: JobService, settings: Settings) -> None:
    with pytest.raises(ValidationError) as loopback:
        service.submit("alice", AnalyzeRequest("octocat/x", "main", "", None, "http://127.0.0.1/hook"))
    assert loopback.value.details["field"] == "callback_url"
    plain = JobService(settings, make_store(settings), lambda *_: None, TokenCipher(""))
    with pytest.raises(ValidationError) as token:
        plain.submit("alice", request(github_token="ghp_x"))
    assert token.value.details["field"] == "github_token"


def test_the_rate_limit_is_counted_by_the_submit_and_its_counts_come_back(service: JobService,
                                                                           settings: Settings) -> None:
    limiter = make_store(settings).rate_limiter(parse_rate_limits("2/minute"))
    counts = [service.submit("carol", request(question=f"Q{i}?"), charge=limiter.charge("key:carol")).rate_counts
              for i in range(2)]
    assert [limiter.verdict(c or []).remaining for c in counts] == [1, 0]
    with pytest.raises(RateLimited) as over:
        service.submit("carol", request(question="Q3?"), charge=limiter.charge("key:carol"))
    assert over.value.rate_counts and not limiter.verdict(over.value.rate_counts).allowed


def test_cancel_and_retry_are_domain_results(service: JobService) -> None:
    job = service.submit("dave", request(question="Cancel me")).job
    cancelled = service.cancel("dave", job.id)
    assert cancelled.status is JobStatus.CANCELLED and cancelled.cancelled_by == "dave"
    with pytest.raises(Conflict):
        service.cancel("dave", job.id)
    with pytest.raises(NotFound):
        service.cancel("eve", job.id)  # another owner's job looks missing
    retried = service.retry("dave", job.id, None)
    assert retried.outcome == "created" and retried.job.retry_of == job.id and retried.job.history == [job.id]
    with pytest.raises(Conflict):
        service.retry("dave", retried.job.id, None)  # still queued: nothing to retry


@pytest.fixture
def stoppable() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    if server.proc is not None:
        os.kill(server.proc.pid, signal.SIGCONT)
    server.cleanup()


def test_redis_away_is_a_domain_error_that_says_whether_the_job_may_exist(stoppable: RedisServer) -> None:
    settings = Settings(redis_url_raw=stoppable.url, queue_name="svc-away")
    service = JobService(settings, make_store(settings, api_timeout(settings)), lambda *_: None, TokenCipher(""))
    assert service.submit("frank", request()).outcome == "created"
    os.kill(stoppable.proc.pid, signal.SIGSTOP)  # silent: the submit is sent, and no answer comes
    with pytest.raises(Unavailable) as silent:
        service.submit("frank", request(question="silent"))
    assert "may have been queued" in silent.value.error and silent.value.details["retry_with"] == "Idempotency-Key"
    with pytest.raises(Unavailable) as open_circuit:  # right after a timeout: not even sent
        service.submit("frank", request(question="circuit"))
    assert "was not queued" in open_circuit.value.error
    os.kill(stoppable.proc.pid, signal.SIGCONT)
    stoppable.stop()  # gone: the connection is refused, nothing was sent
    with pytest.raises(Unavailable) as refused:
        service.submit("frank", request(question="refused"))
    assert "was not queued" in refused.value.error
    with pytest.raises(Unavailable):
        service.status("frank", "0" * 32)
    with pytest.raises(StoreUnavailable):  # the workers' cancellation listener subscribes again through this
        service.store.cancellations()
