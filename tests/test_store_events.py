"""The store publishes a job's events in the Lua script that commits the state they describe (real Redis):
a commit that takes an event seq publishes it, a refused or throttled one publishes nothing."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Iterator

import pytest
import redis
import socketio

from potpie_service.config import Settings
from potpie_service.core.events import final_events, room, status_update
from potpie_service.core.job import Job, JobUpdate
from potpie_service.core.model import JobStatus
from potpie_service.store import make_store
from potpie_service.store.broadcast import STORE_HOST_ID
from potpie_service.store.jobs import JobStore


@pytest.fixture
def setup(redis_server) -> Iterator[tuple[Settings, JobStore, Any]]:
    settings = Settings.from_env({"REDIS_URL": redis_server.url, "QUEUE_NAME": f"q-ev-{uuid.uuid4().hex[:8]}"})
    store = make_store(settings)
    subscriber = redis.Redis.from_url(redis_server.url).pubsub()
    subscriber.subscribe(store.channel)
    assert subscriber.get_message(timeout=5)["type"] == "subscribe"  # listening before anything is published
    yield settings, store, subscriber
    subscriber.close()


def published(subscriber: Any, quiet: float = 0.3) -> list[dict[str, Any]]:
    """Every message until the channel has been quiet for `quiet` seconds."""
    found = []
    while (message := subscriber.get_message(timeout=quiet)) is not None:
        found.append(json.loads(message["data"]))
    return found


def running_job(store: JobStore) -> tuple[str, str, Job]:
    job_id = uuid.uuid4().hex
    store.submit(Job(job_id, owner="alice", repo="octocat/x"))
    token = uuid.uuid4().hex
    outcome, job = store.claim(job_id, 0, token, 10)
    assert outcome == "ok" and job is not None
    return job_id, token, job


def update(store: JobStore, job: Job, fields: JobUpdate) -> Any:
    return store.broadcast(job.id, [("status_update", status_update(Job(**vars(job)).apply(fields), 0))])


def test_a_commit_publishes_its_event_with_the_seq_it_takes(setup) -> None:
    settings, store, subscriber = setup
    job_id, token, record = running_job(store)
    fields: JobUpdate = {"status": JobStatus.PARSING, "seq": 1, "progress": 5}
    seq = store.commit(job_id, token, fields, keep_lease=True, lease_s=10, news=update(store, record, fields))
    assert seq >= 1
    [message] = published(subscriber)
    assert message["event"] == "status_update" and message["room"] == room(job_id)
    assert message["host_id"] == STORE_HOST_ID and message["namespace"] == "/"
    assert message["data"][0]["seq"] == seq and message["data"][0]["status"] == "parsing"
    assert store.get(job_id).event_seq == seq  # type: ignore[union-attr]


def test_a_commit_refused_for_a_lost_lease_publishes_nothing(setup) -> None:
    settings, store, subscriber = setup
    job_id, _, record = running_job(store)
    fields: JobUpdate = {"status": JobStatus.PARSING, "seq": 1}
    assert store.commit(job_id, "not-the-lease", fields, news=update(store, record, fields)) == -1
    assert published(subscriber) == []
    assert store.get(job_id).status is JobStatus.QUEUED  # type: ignore[union-attr]


def test_a_throttled_progress_commit_publishes_nothing(setup) -> None:
    settings, store, subscriber = setup
    job_id, token, record = running_job(store)
    seqs = []
    for progress, pause in ((10, 0.0), (11, 0.0), (12, 0.3)):  # the default throttle: at most one per 0.25 s
        time.sleep(pause)
        fields: JobUpdate = {"status": JobStatus.QUEUED, "seq": 0, "progress": progress}
        seqs.append(store.commit(job_id, token, fields, progress_only=True, keep_lease=True, lease_s=10,
                                 news=update(store, record, fields)))
    assert seqs[0] >= 1 and seqs[1] == 0 and seqs[2] == seqs[0] + 1
    assert [m["data"][0]["progress"] for m in published(subscriber)] == [10, 12]
    assert store.get(job_id).progress == 12  # type: ignore[union-attr]  # a throttled commit still writes


def test_the_end_publishes_both_final_events_once(setup) -> None:
    settings, store, subscriber = setup
    job_id, token, record = running_job(store)
    fields: JobUpdate = {"result": {"summary": "ok"}, "progress": 100}
    after = Job(**vars(record)).apply({**fields, "status": JobStatus.FINISHED})
    news = store.broadcast(job_id, final_events(after, 0))
    seq, _ = store.finish(record, token, JobStatus.FINISHED, fields, news=news)
    messages = published(subscriber)
    assert [(m["event"], m["data"][0]["seq"]) for m in messages] == [("status_update", seq),
                                                                     ("analysis_complete", seq + 1)]
    assert messages[1]["data"][0]["data"] == {"summary": "ok"}
    again, _ = store.finish(record, "", JobStatus.CANCELLED, {}, news=news)
    assert again < 0 and published(subscriber) == []


def test_a_marker_inside_the_payload_data_is_left_alone(setup, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the payload's own seq is filled in: the marker's exact text inside a string is data (JSON escapes
    its quotes, so it cannot match)."""
    settings, store, subscriber = setup
    job_id, token, record = running_job(store)
    fixed = uuid.uuid4()
    monkeypatch.setattr("potpie_service.store.broadcast.uuid.uuid4", lambda: fixed)  # the nonce known in advance
    tricky = f'"@seq:{fixed.hex}"'
    fields: JobUpdate = {"status": JobStatus.PARSING, "seq": 1, "message": tricky}
    news = update(store, record, fields)
    assert news.nonce == fixed.hex
    seq = store.commit(job_id, token, fields, keep_lease=True, lease_s=10, news=news)
    [message] = published(subscriber)
    assert message["data"][0]["seq"] == seq and message["data"][0]["message"] == tricky


def test_the_message_is_the_one_python_socketio_publishes(setup) -> None:
    """The API's RedisManager relays what the store publishes: same format as python-socketio's own."""
    settings, store, subscriber = setup
    job_id, _, record = running_job(store)
    payload = status_update(record.apply({"progress": 42}), 7, queue_position=None)
    manager = socketio.RedisManager(settings.redis_url, channel=store.channel, write_only=True)
    manager.emit("status_update", payload, namespace="/", room=room(job_id))
    [theirs] = published(subscriber)
    ours = json.loads(store.broadcast(job_id, [("status_update", payload)]).messages[0])
    ours["data"][0]["seq"] = 7  # what the script writes in place of the marker
    assert {**ours, "host_id": None} == {**theirs, "host_id": None}
    assert theirs["host_id"] != STORE_HOST_ID


def test_a_position_update_is_published_only_while_the_job_is_queued(setup) -> None:
    settings, store, subscriber = setup
    store.max_concurrent = 0  # nobody is admitted: the job waits in line
    job_id = uuid.uuid4().hex
    store.submit(Job(job_id, owner="alice", repo="octocat/x"))
    news = store.broadcast(job_id, [("status_update", status_update(store.get(job_id), 0, queue_position=3))])
    [seq] = store.announce_positions([(job_id, 3, news)])
    [message] = published(subscriber)
    assert seq >= 1 and message["data"][0]["seq"] == seq and message["data"][0]["queue_position"] == 3
    assert [(w.job_id, w.announced) for w in store.front_of_line(5)] == [(job_id, 3)]

    store.max_concurrent = 5
    started_id, _, started = running_job(store)
    raw = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    raw.hset(store.keys.job(started_id), "status", "parsing")  # it started between the read and the push
    stale = store.broadcast(started_id, [("status_update", status_update(started, 0, queue_position=1))])
    assert store.announce_positions([(started_id, 1, stale)]) == [0]
    assert published(subscriber) == [] and raw.hget(store.keys.job(started_id), "announced_position") is None
