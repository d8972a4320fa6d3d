"""The first step the submit script enqueues (celery_message.FirstSteps) is the message `send_task` would have
written, and its task-sent event the one Celery would have published: compared field by field on a real Redis. A
submit that must WAIT for replicas (REDIS_MIN_REPLICAS_ACK) puts nothing on the queue before they hold the job."""

from __future__ import annotations

import base64
import json
import threading
import uuid

import pytest
import redis

from potpie_service.config import Settings, parse_rate_limits
from potpie_service.core.job import Job
from potpie_service.celery_message import FirstSteps
from potpie_service.queue import dispatcher, make_celery
from potpie_service.store import NotReplicated
from potpie_service.store.jobs import Durability, JobStore

# what differs between any two messages: fresh ids, the sender's name and clocks
PER_MESSAGE = {"id", "root_id", "correlation_id", "delivery_tag", "origin", "hostname", "pid", "clock", "timestamp",
               "uuid", "reply_to"}


def _strip(value: object) -> object:
    if isinstance(value, dict):
        return {key: _strip(item) for key, item in value.items() if key not in PER_MESSAGE}
    return value


def _decoded(raw: str) -> dict:
    message = json.loads(raw)
    message["body"] = json.loads(base64.b64decode(message["body"]))
    return message


def test_first_step_message_and_event_match_what_send_task_writes(redis_server) -> None:
    queue = f"test-queue-{uuid.uuid4().hex[:6]}"
    settings = Settings(redis_url_raw=redis_server.url, queue_name=queue)
    app = make_celery(settings)
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    events = client.pubsub()
    steps = FirstSteps(app, settings.queue_name)
    events.subscribe(steps.event_channel)
    events.get_message(timeout=1)  # the subscription's confirmation

    dispatcher(app, settings)("a" * 32, 0, 0)
    theirs = _decoded(client.rpop(queue))
    their_event = _decoded(events.get_message(timeout=2)["data"])
    ours = steps("a" * 32)
    mine, my_event = _decoded(ours.body), _decoded(ours.event)

    assert mine["body"] == theirs["body"] == [["a" * 32, 0], {}, {"callbacks": None, "errbacks": None,
                                                                    "chain": None, "chord": None}]
    assert list(mine) == list(theirs)
    assert _strip(mine) == _strip(theirs)
    assert mine["headers"]["id"] == mine["headers"]["root_id"] == mine["properties"]["correlation_id"]
    assert mine["headers"]["argsrepr"] == "['aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa', 0]"
    assert _strip(my_event) == _strip(their_event)
    assert my_event["body"]["uuid"] == mine["headers"]["id"] and my_event["body"]["type"] == "task-sent"
    assert my_event["body"]["clock"] > their_event["body"]["clock"]  # the app's Lamport clock moved forward
    assert steps("b" * 32).body != steps("b" * 32).body  # a fresh task id and delivery tag each time
    events.close()


def test_a_submit_that_waits_for_replicas_enqueues_nothing_before_they_hold_the_job(redis_server) -> None:
    queue = f"test-queue-{uuid.uuid4().hex[:6]}"
    settings = Settings(redis_url_raw=redis_server.url, queue_name=queue)
    steps = FirstSteps(make_celery(settings), settings.queue_name)
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    durable = JobStore(client, queue, 3, 60, 60, Durability(replicas=1, timeout_ms=300))  # this Redis has none
    seen: list[object] = []
    worker = threading.Thread(target=lambda: seen.append(  # a worker waiting on the queue all through the WAIT
        redis.Redis.from_url(redis_server.url, decode_responses=True).brpop([queue], timeout=2)))
    worker.start()
    refused = Job(uuid.uuid4().hex, owner="o", repo="octocat/hello")
    charge = durable.rate_limiter(parse_rate_limits("5/minute")).charge("key:o")
    with pytest.raises(NotReplicated) as taken_back:
        durable.submit(refused, first_step=steps(refused.id), charge=charge)
    worker.join()
    assert seen == [None], "a worker could have started a job the API then refused"
    assert durable.get(refused.id) is None and client.llen(queue) == 0
    assert taken_back.value.rate_counts is not None and client.get(charge.keys[0]) == "1", \
        "counted once, and the counts handed back so that nothing counts it again"

    plain = JobStore(client, queue, 3, 60, 60)  # no replicas asked for: the script enqueues the first step itself
    job = Job(uuid.uuid4().hex, owner="o", repo="octocat/hello")
    submitted = plain.submit(job, first_step=steps(job.id))
    assert submitted.outcome == "created" and submitted.admitted == ()
    assert _decoded(client.rpop(queue))["body"][0] == [job.id, 0]
