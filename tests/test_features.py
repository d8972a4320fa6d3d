"""What no job queue offers: queue position + ETA, dedup, cancellation, dead-letter replay, webhooks."""

from __future__ import annotations

import json
import time
from typing import Iterator

import pytest
import requests

from potpie_service import webhooks
from potpie_service.service import DURATIONS_MAX_AGE
from tests.conftest import Stack, make_stack
from tests.stack import Receiver, wait_for

pytestmark = pytest.mark.e2e  # whole stacks of processes: `make test` runs it, `make test-fast` does not

SECRET = "whsec-test"


@pytest.fixture(scope="module")
def fifo_stack(redis_server, simulator) -> Iterator[Stack]:
    """One job at a time, so queue positions, ETAs and cancellation are easy to see."""
    running = make_stack(redis_server, simulator, "fifo", MAX_CONCURRENT_JOBS="1", POTPIE_POLL_INTERVAL="0.1")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def feat_stack(redis_server, simulator) -> Iterator[Stack]:
    running = make_stack(redis_server, simulator, "feat", DEDUP_ENABLED="true", WEBHOOK_SECRET=SECRET,
                         WEBHOOK_ALLOW_PRIVATE="true", POTPIE_POLL_INTERVAL="0.1")
    yield running
    running.stop()


def post(stack: Stack, body: dict, **headers: str) -> requests.Response:
    return requests.post(stack.url + "/analyze", json=body, headers=headers, timeout=5)


def test_queue_position_and_eta_in_answer_status_and_events(fifo_stack: Stack, followers) -> None:
    fifo_stack.wait_final(fifo_stack.submit("octocat/warmup")["job_id"])  # a finished job gives the ETA a basis
    time.sleep(DURATIONS_MAX_AGE)  # an API process reads the recent durations again at most this often
    running = fifo_stack.submit("slow-parse/eta-a")
    second = fifo_stack.submit("slow-parse/eta-b")
    third = fifo_stack.submit("slow-parse/eta-c")
    assert (second["queue_position"], third["queue_position"]) == (1, 2)
    assert second["eta_seconds"] > 0 and third["eta_seconds"] > second["eta_seconds"]
    status = fifo_stack.status(third["job_id"])
    assert status["queue_position"] == 2 and status["eta_seconds"] == pytest.approx(third["eta_seconds"], rel=0.5)
    follower = followers(fifo_stack.url)
    assert follower.join(third["job_id"])["ok"] is True
    first = follower.of(third["job_id"])[0][1]
    assert first["status"] == "queued" and first["queue_position"] == 2 and first["eta_seconds"] > 0
    wait_for(lambda: any(p.get("queue_position") == 1 for _, p in follower.of(third["job_id"])), 15,
             what="position 1 pushed")
    final = fifo_stack.wait_final(third["job_id"], timeout=40)
    assert final["status"] == "finished" and final["eta_seconds"] is None and final["queue_position"] is None
    assert fifo_stack.wait_final(running["job_id"])["status"] == "finished"


def test_cancel_running_job_stops_it_frees_the_slot_and_never_completes(fifo_stack: Stack, followers) -> None:
    victim = fifo_stack.submit("slow-parse/cancel-me")
    waiting = fifo_stack.submit("octocat/after-cancel")
    wait_for(lambda: fifo_stack.status(victim["job_id"])["status"] == "parsing", 15, what="the job to run")
    follower = followers(fifo_stack.url)
    assert follower.join(victim["job_id"])["ok"] is True
    answer = requests.delete(f"{fifo_stack.url}/jobs/{victim['job_id']}", timeout=5)
    assert answer.status_code == 200 and answer.json()["status"] == "cancelled"
    wait_for(lambda: any(p["status"] == "cancelled" for _, p in follower.of(victim["job_id"])), 5,
             what="the cancelled event")
    # the slot is free at once: the next job runs and finishes while the victim's parse would still run
    assert fifo_stack.wait_final(waiting["job_id"], timeout=15)["status"] == "finished"
    time.sleep(3.5)  # past the slow parse: a surviving step would have finished the victim by now
    assert follower.finals(victim["job_id"]) == []
    final = fifo_stack.status(victim["job_id"])
    assert final["status"] == "cancelled" and "result" not in final
    again = requests.delete(f"{fifo_stack.url}/jobs/{victim['job_id']}", timeout=5)
    assert again.status_code == 409 and again.json()["details"]["status"] == "cancelled"
    assert requests.delete(f"{fifo_stack.url}/jobs/{'0' * 32}", timeout=5).status_code == 404


def test_cancel_queued_job_keeps_fifo_for_the_rest(fifo_stack: Stack) -> None:
    blocker = fifo_stack.submit("slow-parse/blocker")
    a, b, c = (fifo_stack.submit(f"octocat/q{i}") for i in range(3))
    assert requests.delete(f"{fifo_stack.url}/jobs/{b['job_id']}", timeout=5).status_code == 200
    assert fifo_stack.status(c["job_id"])["queue_position"] == 2
    assert [fifo_stack.wait_final(j["job_id"])["status"] for j in (blocker, a, c)] == ["finished"] * 3
    assert fifo_stack.status(b["job_id"])["status"] == "cancelled"


def test_identical_request_while_running_returns_the_running_job(feat_stack: Stack) -> None:
    body = {"repo": "slow-parse/dedup", "question": "same question"}
    first = post(feat_stack, body)
    second = post(feat_stack, body)
    assert first.status_code == 202 and second.status_code == 200
    assert second.json()["job_id"] == first.json()["job_id"] and second.json()["deduplicated"] is True
    other = post(feat_stack, {**body, "question": "another question"})
    assert other.status_code == 202 and other.json()["job_id"] != first.json()["job_id"]
    feat_stack.wait_final(first.json()["job_id"])
    after = post(feat_stack, body)
    assert after.status_code == 202 and after.json()["job_id"] != first.json()["job_id"], "ended jobs do not dedup"
    for job in (other, after):
        feat_stack.wait_final(job.json()["job_id"])


def test_idempotency_key_replays_the_original_and_conflicts_on_a_different_body(feat_stack: Stack) -> None:
    body = {"repo": "octocat/idem", "question": "q1"}
    first = post(feat_stack, body, **{"Idempotency-Key": "order-42"})
    feat_stack.wait_final(first.json()["job_id"])
    again = post(feat_stack, body, **{"Idempotency-Key": "order-42"})
    assert again.status_code == 200 and again.json()["job_id"] == first.json()["job_id"]
    assert again.json()["idempotent_replay"] is True and again.json()["status"] == "finished"
    clash = post(feat_stack, {**body, "question": "q2"}, **{"Idempotency-Key": "order-42"})
    assert clash.status_code == 409 and clash.json()["details"]["field"] == "Idempotency-Key"
    bad = post(feat_stack, body, **{"Idempotency-Key": "x" * 201})
    assert bad.status_code == 400 and bad.json()["details"]["field"] == "Idempotency-Key"


def test_dead_letter_list_is_paginated_and_retry_keeps_the_history(feat_stack: Stack) -> None:
    failed = [feat_stack.submit(f"parse-error/dlq{i}") for i in range(3)]
    for job in failed:
        assert feat_stack.wait_final(job["job_id"])["status"] == "failed"
    page1 = requests.get(feat_stack.url + "/jobs", params={"status": "failed", "per_page": 2}, timeout=5).json()
    page2 = requests.get(feat_stack.url + "/jobs", params={"status": "failed", "per_page": 2, "page": 2},
                         timeout=5).json()
    ids = [j["job_id"] for j in page1["jobs"] + page2["jobs"]]
    assert page1["total"] >= 3 and len(page1["jobs"]) == 2
    assert set(ids[:3]) == {j["job_id"] for j in failed} and len(set(ids)) == len(ids), "no job twice"
    listed = page1["jobs"] + page2["jobs"]
    assert [j["finished_at"] for j in listed] == sorted((j["finished_at"] for j in listed), reverse=True)
    assert all(j["status"] == "failed" and j["failed_reason"] for j in page1["jobs"])
    assert requests.get(feat_stack.url + "/jobs", params={"status": "nope"}, timeout=5).status_code == 400
    retried = requests.post(f"{feat_stack.url}/jobs/{failed[0]['job_id']}/retry", timeout=5)
    assert retried.status_code == 202, retried.text
    new = retried.json()
    assert new["job_id"] != failed[0]["job_id"] and new["retry_of"] == failed[0]["job_id"]
    assert new["history"] == [failed[0]["job_id"]]
    assert feat_stack.wait_final(new["job_id"])["status"] == "failed"
    again = requests.post(f"{feat_stack.url}/jobs/{new['job_id']}/retry", timeout=5).json()
    assert again["history"] == [failed[0]["job_id"], new["job_id"]]
    done = feat_stack.submit("octocat/not-failed")
    feat_stack.wait_final(done["job_id"])
    assert requests.post(f"{feat_stack.url}/jobs/{done['job_id']}/retry", timeout=5).status_code == 409


def test_webhook_is_signed_retried_and_carries_the_final_event(feat_stack: Stack) -> None:
    receiver = Receiver(fail_first=2)
    try:
        job = feat_stack.submit("octocat/webhook", callback_url=receiver.url)
        final = feat_stack.wait_final(job["job_id"])
        wait_for(lambda: receiver.calls and receiver.calls[-1][2] == 204, 20, what="a successful delivery")
        assert [status for *_, status in receiver.calls] == [500, 500, 204], "retried with backoff"
        first_gap, second_gap = (b - a for a, b in zip(receiver.arrived, receiver.arrived[1:]))
        assert 0.9 <= first_gap < 1.8 and 1.9 <= second_gap < 3.5, ("backoff 1 s, then 2 s", first_gap, second_gap)
        headers, body, _ = receiver.calls[-1]
        assert webhooks.verify(SECRET, headers["X-Potpie-Timestamp"], body, headers["X-Potpie-Signature"])
        assert not webhooks.verify("wrong", headers["X-Potpie-Timestamp"], body, headers["X-Potpie-Signature"])
        assert not webhooks.verify(SECRET, str(int(time.time()) - 3600), body, headers["X-Potpie-Signature"])
        event = json.loads(body)
        assert event["event"] == "analysis_complete" and event["data"] == final["result"]
        # One event id on every attempt (job_id:seq): a receiver drops a repeat, after a failover too.
        assert {call[0]["X-Potpie-Event-Id"] for call in receiver.calls} == {f"{job['job_id']}:{event['seq']}"}
        assert event["event_id"] == f"{job['job_id']}:{event['seq']}"
        assert len({call[0]["X-Potpie-Delivery"] for call in receiver.calls}) == 3, "each attempt its own"
        failed = feat_stack.submit("parse-error/webhook", callback_url=receiver.url)
        feat_stack.wait_final(failed["job_id"])
        wait_for(lambda: json.loads(receiver.calls[-1][1])["job_id"] == failed["job_id"], 10,
                 what="the failure webhook")
        assert json.loads(receiver.calls[-1][1])["event"] == "analysis_error"
    finally:
        receiver.close()


def test_webhook_to_loopback_is_refused_unless_allowed(stack: Stack) -> None:
    for url in ("http://127.0.0.1:9/hook", "http://localhost/hook", "http://10.0.0.1/x", "ftp://example.com/x"):
        answer = requests.post(stack.url + "/analyze", json={"repo": "octocat/x", "callback_url": url}, timeout=5)
        assert answer.status_code == 400, url
        assert answer.json()["details"]["field"] == "callback_url"
