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
from potpie_service.events import STORE_HOST_ID, broadcast, channel, final_events, room, status_update
from potpie_service.jobs import JobStore
from potpie_service.model import JobStatus
from potpie_service.runtime import make_store


@pytest.fixture
def setup(redis_server) -> Iterator[tuple[Settings, JobStore, Any]]:
    settings = Settings.from_env({"REDIS_URL": redis_server.url, "QUEUE_NAME": f"q-ev-{uuid.uuid4().hex[:8]}"})
    store = make_store(settings)
    subscriber = redis.Redis.from_url(redis_server.url).pubsub()
    subscriber.subscribe(channel(settings))
    assert subscriber.get_message(timeout=5)["type"] == "subscribe"  # listening before anything is published
    yield settings, store, subscriber
    subscriber.close()


def published(subscriber: Any, quiet: float = 0.3) -> list[dict[str, Any]]:
    """Every message until the channel has been quiet for `quiet` seconds."""
    found = []
    while (message := subscriber.get_message(timeout=quiet)) is not None:
        found.append(json.loads(message["data"]))
    return found


def running_job(store: JobStore) -> tuple[str, str, dict[str, str]]:
    job_id = uuid.uuid4().hex
    store.submit(job_id, "alice", {"id": job_id, "status": "queued", "seq": 0, "repo": "octocat/x"})
    token = uuid.uuid4().hex
    outcome, record = store.claim(job_id, 0, token, 10)
    assert outcome == "ok"
    return job_id, token, record


def update(settings: Settings, record: dict[str, str], fields: dict[str, Any]) -> Any:
    after = {**record, **{k: str(v) for k, v in fields.items()}}
    return broadcast(settings, record["id"], [("status_update", status_update(after, 0))])


def test_a_commit_publishes_its_event_with_the_seq_it_takes(setup) -> None:
    settings, store, subscriber = setup
    job_id, token, record = running_job(store)
    fields = {"status": "parsing", "seq": 1, "progress": 5}
    seq = store.commit(job_id, token, fields, "state", keep_lease=True, lease_s=10,
                       broadcast=update(settings, record, fields))
    assert seq >= 1
    [message] = published(subscriber)
    assert message["event"] == "status_update" and message["room"] == room(job_id)
    assert message["host_id"] == STORE_HOST_ID and message["namespace"] == "/"
    assert message["data"][0]["seq"] == seq and message["data"][0]["status"] == "parsing"
    assert store.get(job_id)["event_seq"] == str(seq)


def test_a_commit_refused_for_a_lost_lease_publishes_nothing(setup) -> None:
    settings, store, subscriber = setup
    job_id, _, record = running_job(store)
    fields = {"status": "parsing", "seq": 1}
    assert store.commit(job_id, "not-the-lease", fields, broadcast=update(settings, record, fields)) == -1
    assert published(subscriber) == []
    assert store.get(job_id)["status"] == "queued"


def test_a_throttled_progress_commit_publishes_nothing(setup) -> None:
    settings, store, subscriber = setup
    job_id, token, record = running_job(store)
    seqs = []
    for progress, pause in ((10, 0.0), (11, 0.0), (12, 0.3)):  # the default throttle: at most one per 0.25 s
        time.sleep(pause)
        fields = {"status": "queued", "seq": 0, "progress": progress}
        seqs.append(store.commit(job_id, token, fields, "progress", keep_lease=True, lease_s=10,
                                 broadcast=update(settings, record, fields)))
    assert seqs[0] >= 1 and seqs[1] == 0 and seqs[2] == seqs[0] + 1
    assert [m["data"][0]["progress"] for m in published(subscriber)] == [10, 12]
    assert store.get(job_id)["progress"] == "12"  # a throttled commit still writes the state


def test_the_end_publishes_both_final_events_once(setup) -> None:
    settings, store, subscriber = setup
    job_id, token, record = running_job(store)
    fields = {"result": json.dumps({"summary": "ok"}), "progress": 100}
    after = {**record, **{k: str(v) for k, v in fields.items()}, "status": "finished"}
    seq, _ = store.finish(job_id, token, JobStatus.FINISHED, fields,
                          broadcast=broadcast(settings, job_id, final_events(after, 0)))
    messages = published(subscriber)
    assert [(m["event"], m["data"][0]["seq"]) for m in messages] == [("status_update", seq),
                                                                     ("analysis_complete", seq + 1)]
    assert messages[1]["data"][0]["data"] == {"summary": "ok"}
    again, _ = store.finish(job_id, "", JobStatus.CANCELLED, {}, broadcast=broadcast(settings, job_id,
                                                                                     final_events(after, 0)))
    assert again < 0 and published(subscriber) == []


def test_a_marker_inside_the_payload_data_is_left_alone(setup, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the payload's own seq is filled in: the marker's exact text inside a string is data (JSON escapes
    its quotes, so it cannot match)."""
    settings, store, subscriber = setup
    job_id, token, record = running_job(store)
    fixed = uuid.uuid4()
    monkeypatch.setattr("potpie_service.events.uuid.uuid4", lambda: fixed)  # the nonce is known in advance
    tricky = f'"@seq:{fixed.hex}"'
    fields = {"status": "parsing", "seq": 1, "message": tricky}
    news = update(settings, record, fields)
    assert news.nonce == fixed.hex
    seq = store.commit(job_id, token, fields, "state", keep_lease=True, lease_s=10, broadcast=news)
    [message] = published(subscriber)
    assert message["data"][0]["seq"] == seq and message["data"][0]["message"] == tricky


def test_the_message_is_the_one_python_socketio_publishes(setup) -> None:
    """The API's RedisManager relays what the store publishes: same format as python-socketio's own."""
    settings, store, subscriber = setup
    job_id, _, record = running_job(store)
    payload = status_update({**record, "progress": "42"}, 7, queue_position=None)
    manager = socketio.RedisManager(settings.redis_url, channel=channel(settings), write_only=True)
    manager.emit("status_update", payload, namespace="/", room=room(job_id))
    [theirs] = published(subscriber)
    ours = json.loads(broadcast(settings, job_id, [("status_update", payload)]).messages[0])
    ours["data"][0]["seq"] = 7  # what the script writes in place of the marker
    assert {**ours, "host_id": None} == {**theirs, "host_id": None}
    assert theirs["host_id"] != STORE_HOST_ID


def test_a_position_update_is_published_only_while_the_job_is_queued(setup) -> None:
    settings, store, subscriber = setup
    job_id = uuid.uuid4().hex
    store.submit(job_id, "alice", {"id": job_id, "status": "queued", "seq": 0, "repo": "octocat/x"})
    record = store.get(job_id)
    news = broadcast(settings, job_id, [("status_update", status_update(record, 0, queue_position=3))])
    [seq] = store.announce_positions([(job_id, 3, news)])
    [message] = published(subscriber)
    assert seq >= 1 and message["data"][0]["seq"] == seq and message["data"][0]["queue_position"] == 3
    assert store.get(job_id)["announced_position"] == "3"

    started_id, _, started = running_job(store)
    store.redis.hset(store.key(started_id), "status", "parsing")  # it started between the read and the push
    stale = broadcast(settings, started_id, [("status_update", status_update(started, 0, queue_position=1))])
    assert store.announce_positions([(started_id, 1, stale)]) == [0]
    assert published(subscriber) == [] and "announced_position" not in store.get(started_id)
