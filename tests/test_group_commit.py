"""Group commit (store.batch): concurrent submits share one pipeline while another batch is on the wire, each caller
still gets its own reply or its own error, and the store's submits stay exact under concurrency. Real Redis."""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis

from potpie_service.core.job import Job
from potpie_service.celery_message import StepMessage
from potpie_service.store.batch import GroupCommit
from potpie_service.store.client import StoreRedis
from potpie_service.store.errors import StoreUnavailable
from potpie_service.store.jobs import JobStore
from tests.stack import RedisServer, wait_for


def _store_client(server: RedisServer) -> StoreRedis:
    """The kind of client the store gives GroupCommit: Redis being away is its StoreUnavailable."""
    return StoreRedis.from_url(server.url, decode_responses=True, socket_timeout=5)


def _in_flight(group: GroupCommit, client: redis.Redis, seconds: float) -> tuple[threading.Thread, list[Any]]:
    """A batch that holds the wire for `seconds` (a BLPOP on an empty list): calls made meanwhile must gather."""
    replies: list[Any] = []
    key = f"empty-{uuid.uuid4().hex}"
    thread = threading.Thread(target=lambda: replies.append(
        group.run(lambda pipe: pipe.execute_command("BLPOP", key, seconds))))
    thread.start()
    wait_for(lambda: any(c.get("cmd") == "blpop" for c in client.client_list()), 5, what="the BLPOP on the wire")
    return thread, replies


def test_calls_made_while_a_batch_is_on_the_wire_go_together_in_the_next_one(redis_server: RedisServer) -> None:
    client = redis_server.client()
    group, counter = GroupCommit(client), f"count-{uuid.uuid4().hex}"
    pipes: dict[int, list[int]] = {}  # which pipeline each call went on
    lock = threading.Lock()

    def incr(caller: int) -> Any:
        def queue(pipe: Any) -> None:
            with lock:
                pipes.setdefault(id(pipe), []).append(caller)
            pipe.execute_command("INCR", counter)
        return group.run(queue)

    first, blocked = _in_flight(group, client, 0.5)
    with ThreadPoolExecutor(10) as pool:
        replies = list(pool.map(incr, range(10)))
    first.join()
    assert blocked == [None], "the first batch's own reply (BLPOP timed out)"
    assert sorted(replies) == list(range(1, 11)), "each caller got its own reply"
    assert [sorted(callers) for callers in pipes.values()] == [list(range(10))], "one pipeline for the ten"
    pipes.clear()
    assert incr(99) == 11 and list(pipes.values()) == [[99]], "nothing on the wire: a call goes at once, alone"


def test_a_command_redis_refuses_fails_alone_and_a_lost_connection_fails_the_batch() -> None:
    server = RedisServer().start()
    try:
        client = _store_client(server)
        client.set("text", "not a hash")
        group = GroupCommit(client)
        first, _ = _in_flight(group, client, 0.3)
        with ThreadPoolExecutor(3) as pool:
            wrong = pool.submit(group.run, lambda pipe: pipe.execute_command("HSET", "text", "f", "v"))
            right = [pool.submit(group.run, lambda pipe: pipe.execute_command("INCR", "n")) for _ in range(2)]
            with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
                wrong.result(5)
            assert sorted(f.result(5) for f in right) == [1, 2]
        first.join()

        server.stop()
        started = time.monotonic()
        with ThreadPoolExecutor(4) as pool:
            calls = [pool.submit(group.run, lambda pipe: pipe.execute_command("INCR", "n")) for _ in range(4)]
            for call in calls:
                with pytest.raises(StoreUnavailable):
                    call.result(10)
        assert time.monotonic() - started < 5, "Redis away: every caller fails fast, none hangs"
    finally:
        server.cleanup()


def test_a_sender_that_dies_mid_batch_leaves_no_follower_without_an_answer(redis_server: RedisServer) -> None:
    client = _store_client(redis_server)
    group = GroupCommit(client)

    class Killed(BaseException):
        """What a killed greenlet or a deadline raises through the sender."""

    original = group._send
    entered = threading.Event()

    def dying(batch: list[Any]) -> None:
        if len(batch) > 1:  # the gathered batch: its sender dies before anything is sent
            raise Killed()
        entered.set()
        original(batch)

    group._send = dying  # type: ignore[method-assign]
    first, _ = _in_flight(group, client, 0.3)
    with ThreadPoolExecutor(3) as pool:
        calls = [pool.submit(group.run, lambda pipe: pipe.execute_command("INCR", "m")) for _ in range(3)]
        outcomes = []
        for call in calls:
            try:
                outcomes.append(call.result(5))
            except Killed:
                outcomes.append("killed")
            except StoreUnavailable as exc:
                outcomes.append(str(exc))
    first.join()
    assert sorted(map(str, outcomes)) == sorted(["killed"] + ["the batch it was in did not complete"] * 2)
    assert group.run(lambda pipe: pipe.execute_command("INCR", "m")) == 1, "the next call goes through"


def test_concurrent_submits_each_store_their_job_and_enqueue_its_first_step_once(redis_server: RedisServer) -> None:
    client = redis_server.client()
    store = JobStore(client, f"q-gc-{uuid.uuid4().hex[:8]}", 1000, 60, 60)
    jobs = [Job(uuid.uuid4().hex, owner="alice", repo=f"octocat/r{i}") for i in range(40)]

    def submit(job: Job) -> Any:
        return store.submit(job, first_step=StepMessage(f"message-{job.id}", "events", "{}"))

    with ThreadPoolExecutor(20) as pool:
        submitted = list(pool.map(submit, jobs))
    assert [s.outcome for s in submitted] == ["created"] * 40 and [s.job_id for s in submitted] == [j.id for j in jobs]
    assert all(store.get(job.id).repo == job.repo for job in jobs)
    assert sorted(client.lrange(store.keys.broker_queue, 0, -1)) == sorted(f"message-{j.id}" for j in jobs)
    tickets = sorted(int(client.hget(store.keys.job(j.id), "ticket")) for j in jobs)
    assert tickets == list(range(tickets[0], tickets[0] + 40)), "one ticket each"


def test_a_submit_after_redis_forgot_its_scripts_still_stores_the_job(redis_server: RedisServer) -> None:
    client = redis_server.client()
    store = JobStore(client, f"q-gc-{uuid.uuid4().hex[:8]}", 10, 60, 60)
    before = Job(uuid.uuid4().hex, owner="bob", repo="octocat/one")
    assert store.submit(before).outcome == "created"
    client.script_flush()
    after = Job(uuid.uuid4().hex, owner="bob", repo="octocat/two")
    assert store.submit(after).outcome == "created"
    assert store.get(after.id).repo == "octocat/two"
