"""Real-time updates: real python-socketio clients over the network, real API and worker processes, real Redis."""

from __future__ import annotations

import base64
import os
import socket
import time
import uuid
from typing import Any, Callable, Iterator

import pytest
import requests
import socketio

from potpie_service.auth import hash_key
from potpie_service.core.events import replay
from potpie_service.core.job import Job
from potpie_service.core.model import JobStatus
from tests.conftest import Stack, make_stack
from tests.stack import Follower, RedisServer, Service, start_api, wait_for

pytestmark = pytest.mark.e2e  # whole stacks of processes: `make test` runs it, `make test-fast` does not

Followers = Callable[..., Follower]  # the followers fixture: followers(url, token=..., origin=...)
ORDER = ["queued", "parsing", "ready", "processing_conversations", "finished"]


def unique(owner: str) -> str:
    """A repo name no other test uses (the simulator remembers repos for the whole session)."""
    return f"{owner}/rt-{uuid.uuid4().hex[:8]}"


def assert_contiguous(events: list[tuple[str, dict[str, Any]]]) -> None:
    seqs = [payload["seq"] for _, payload in events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), f"a seq is missing or repeated: {seqs}"


def test_full_sequence_in_order_with_seq_and_progress(stack: Stack, followers: Followers) -> None:
    watcher = followers(stack.url)
    job_id = stack.submit(unique("octocat"), question="How is it built?")["job_id"]
    ack = watcher.join(job_id)
    assert ack["ok"] is True and ack["project_id"] == job_id and isinstance(ack["seq"], int)
    watcher.wait_final(job_id)
    time.sleep(0.3)  # anything after the final event would be a duplicate
    events = watcher.deduped(job_id)
    assert_contiguous(events)
    progress = [payload["progress"] for name, payload in events if name == "status_update"]
    assert progress == sorted(progress) and progress[-1] == 100
    statuses = [payload["status"] for name, payload in events if name == "status_update"]
    assert [ORDER.index(s) for s in statuses] == sorted(ORDER.index(s) for s in statuses), statuses
    assert {"parsing", "ready", "processing_conversations", "finished"} <= set(statuses)
    (last_update, update), (last_name, complete) = events[-2:]
    assert (last_update, update["status"], last_name) == ("status_update", "finished", "analysis_complete")
    assert complete["seq"] == update["seq"] + 1
    assert [name for name, _ in watcher.of(job_id)].count("analysis_complete") == 1, "no duplicate final event"
    for _, payload in events:
        assert payload["job_id"] == job_id and payload["timestamp"].endswith("Z") and payload["message"]
    assert complete["data"] == stack.status(job_id)["result"]
    assert complete["data"]["question"] == "How is it built?"


@pytest.mark.parametrize("owner, final_name", [("octocat", "analysis_complete"), ("parse-error", "analysis_error")])
def test_late_join_gets_the_final_state_once(stack: Stack, followers: Followers, owner: str,
                                             final_name: str) -> None:
    job_id = stack.submit(unique(owner))["job_id"]
    body = stack.wait_final(job_id)
    watcher = followers(stack.url)
    ack = watcher.join(job_id)
    assert ack["ok"] is True and ack["status"] == body["status"]
    time.sleep(0.3)
    events = watcher.of(job_id)
    assert [name for name, _ in events] == ["status_update", final_name]
    assert events[0][1]["status"] == body["status"] and events[0][1]["progress"] == body["progress"]
    assert events[1][1]["seq"] == events[0][1]["seq"] + 1 == ack["seq"]
    if final_name == "analysis_complete":
        assert events[1][1]["data"] == body["result"]
    else:
        assert events[1][1]["message"] == body["details"]["failed_reason"] and events[1][1]["attempts"] == 1


@pytest.fixture(scope="module")
def narrow_stack(redis_server, simulator) -> Iterator[Stack]:
    """Two jobs at a time, one Potpie try per call (every transient failure is a job-level retry)."""
    running = make_stack(redis_server, simulator, "rt-narrow", MAX_CONCURRENT_JOBS="2", POTPIE_CALL_ATTEMPTS="1",
                         MAX_RETRIES="5", RETRY_BASE_DELAY="0.1")
    yield running
    running.stop()


def test_join_before_the_job_starts_gets_queued_then_everything(narrow_stack: Stack,
                                                                followers: Followers) -> None:
    blockers = [narrow_stack.submit(unique("octocat"))["job_id"] for _ in range(2)]
    accepted = narrow_stack.submit(unique("octocat"))
    job_id = accepted["job_id"]
    assert accepted["queue_position"] == 1
    watcher = followers(narrow_stack.url)
    ack = watcher.join(job_id)
    assert (ack["ok"], ack["status"]) == (True, "queued")
    watcher.wait_final(job_id, timeout=40)
    time.sleep(0.3)  # anything after the final event would be a duplicate
    received = [p["seq"] for _, p in watcher.of(job_id)]
    assert set(range(ack["seq"], max(received) + 1)) <= set(received), \
        f"joined early: nothing missed {received} (connected {watcher.connects} times)"
    # A live event may overtake the join's replay, or arrive again in it; the documented seq rule drops those.
    assert all(received.count(seq) <= 2 for seq in received), received
    events = watcher.deduped(job_id)
    assert_contiguous(events)
    first = events[0][1]
    assert (events[0][0], first["status"], first["queue_position"]) == ("status_update", "queued", 1)
    statuses = [p["status"] for _, p in events]
    started = statuses.index("parsing")
    assert set(statuses[:started]) == {"queued"} and all(p["queue_position"] == 1 for _, p in events[:started])
    assert "queued" not in statuses[started:] and events[-1][0] == "analysis_complete"
    assert [name for name, _ in watcher.of(job_id)].count("analysis_complete") == 1
    assert all(narrow_stack.wait_final(b)["status"] == "finished" for b in blockers)  # one may still run


def test_retries_emit_retrying_and_one_final_event(narrow_stack: Stack, followers: Followers) -> None:
    watcher = followers(narrow_stack.url)
    flaky = narrow_stack.submit(unique("flaky"))["job_id"]
    broken = narrow_stack.submit(unique("server-error"))["job_id"]
    assert watcher.join(flaky)["ok"] and watcher.join(broken)["ok"]
    for job_id in (flaky, broken):
        watcher.wait_final(job_id, timeout=40)
    time.sleep(0.3)
    for job_id, final_name, attempts in ((flaky, "analysis_complete", 5), (broken, "analysis_error", 6)):
        names = [name for name, _ in watcher.of(job_id)]
        assert names.count("analysis_complete") + names.count("analysis_error") == 1, names
        assert names[-1] == final_name
        events = watcher.deduped(job_id)  # the join may replay the retrying state the client just got live
        retrying = [p for name, p in events if name == "status_update" and p["status"] == "retrying"]
        assert [p["attempt"] for p in retrying] == list(range(1, attempts)), retrying
        for payload in retrying:
            assert payload["max_attempts"] == 6 and payload["retry_in"] > 0 and payload["error"]
            assert f"Attempt {payload['attempt']} of 6 failed" in payload["message"]
        assert_contiguous(events)
    error = watcher.of(broken)[-1][1]
    assert error["attempts"] == 6 and "gave up after 6 attempts" in error["message"]


def test_parse_error_gives_one_analysis_error(stack: Stack, followers: Followers) -> None:
    watcher = followers(stack.url)
    job_id = stack.submit(unique("parse-error"))["job_id"]
    watcher.join(job_id)
    name, payload = watcher.wait_final(job_id)
    time.sleep(0.3)
    names = [n for n, _ in watcher.of(job_id)]
    assert name == "analysis_error" and names.count("analysis_error") == 1 and "analysis_complete" not in names
    assert payload["status"] == "failed" and payload["error"] and payload["attempts"] == 1
    assert "could not parse the repository" in payload["message"]
    closing = watcher.deduped(job_id)[-2][1]
    assert closing["status"] == "failed" and closing["seq"] == payload["seq"] - 1


@pytest.fixture
def extra_apis() -> Iterator[list[Service]]:
    started: list[Service] = []
    yield started
    for api in started:
        api.stop()


def test_client_on_another_api_process_receives_every_event(stack: Stack, extra_apis: list[Service],
                                                            followers: Followers) -> None:
    api_b = start_api(stack.env, "rt-api-b")
    extra_apis.append(api_b)
    on_b, on_a = followers(api_b.url), followers(stack.url)  # type: ignore[attr-defined]
    job_id = stack.submit(unique("slow-parse"))["job_id"]  # submitted through API A; its parse takes 3 s
    joined_b = on_b.join(job_id)
    assert joined_b["ok"] and on_a.join(job_id)["ok"]
    assert joined_b["status"] in ("queued", "parsing"), "joined while the job runs, so what follows is live"
    for watcher in (on_b, on_a):
        watcher.wait_final(job_id)
    time.sleep(0.3)
    events_b = on_b.deduped(job_id)
    assert_contiguous(events_b)
    assert [name for name, _ in events_b][-2:] == ["status_update", "analysis_complete"]
    live = [(name, payload["status"]) for name, payload in events_b if payload["seq"] > joined_b["seq"]]
    assert {("status_update", "ready"), ("status_update", "finished"), ("analysis_complete", "finished")} \
        <= set(live), f"the events after B's join crossed processes: {live}"
    seen_a = [(n, p["seq"], p["status"]) for n, p in on_a.deduped(job_id)]
    seen_b = [(n, p["seq"], p["status"]) for n, p in events_b]
    start = max(seen_a[0][1], seen_b[0][1])
    assert [e for e in seen_b if e[1] >= start] == [e for e in seen_a if e[1] >= start], "both APIs saw the same"
    assert events_b[-1][1]["data"] == stack.status(job_id)["result"]


def test_reconnect_after_the_api_is_killed_and_restarted(stack: Stack, extra_apis: list[Service],
                                                         followers: Followers) -> None:
    api = start_api(stack.env, "rt-api-restart")
    extra_apis.append(api)
    port = int(api.url.rsplit(":", 1)[1])  # type: ignore[attr-defined]
    watcher = followers(api.url)  # type: ignore[attr-defined]
    job_id = stack.submit(unique("slow-parse"))["job_id"]
    assert watcher.join(job_id)["ok"]
    wait_for(lambda: any(p["status"] == "parsing" for _, p in watcher.of(job_id)), 10, what="parsing")
    api.kill()  # SIGKILL: no goodbye to the client
    wait_for(lambda: not watcher.client.connected, 5, what="the client to notice the drop")
    assert stack.wait_final(job_id)["status"] == "finished"  # the job ends while the API is down
    assert not any(name == "analysis_complete" for name, _ in watcher.of(job_id))
    extra_apis.append(start_api(stack.env, "rt-api-restarted", port=port))
    name, payload = watcher.wait_final(job_id, timeout=20)
    # the server replays the job's events before it answers the join, so the ack may come just after them
    wait_for(lambda: watcher.acks, 5, what="the re-join's ack")
    assert watcher.connects == 2 and watcher.acks[-1]["ok"] is True
    assert name == "analysis_complete" and payload["data"] == stack.status(job_id)["result"]
    time.sleep(0.3)
    events = watcher.deduped(job_id)
    assert [n for n, _ in events].count("analysis_complete") == 1
    assert events[-1][1]["seq"] == events[-2][1]["seq"] + 1


def test_bad_join_payloads_get_an_error_ack_and_leave_stops_events(stack: Stack, followers: Followers) -> None:
    watcher = followers(stack.url)
    for payload in (None, 123, {}, "x" * 5000, ["a"], {"project_id": 7}, "0" * 32):
        ack = watcher.join(payload)
        assert ack["ok"] is False and ack["error"], (payload, ack)
    assert watcher.join("0" * 32)["error"] == "Job not found"
    assert watcher.client.connected
    stays = followers(stack.url)
    job_id = stack.submit(unique("octocat"))["job_id"]
    assert watcher.join({"project_id": job_id})["ok"] and stays.join(job_id)["ok"]
    wait_for(lambda: any(p["status"] == "parsing" for _, p in watcher.of(job_id)), 10, what="parsing")
    assert watcher.client.call("leave_project", job_id, timeout=5) == {"ok": True, "project_id": job_id}
    time.sleep(0.2)  # an event already on its way when we left may still land
    left_at = len(watcher.of(job_id))
    stays.wait_final(job_id)
    time.sleep(0.3)
    assert len(watcher.of(job_id)) == left_at, "events arrived after leave_project"
    assert len(stays.of(job_id)) > left_at
    assert watcher.client.call("leave_project", "nope", timeout=5)["ok"] is False


def _sockets(url: str) -> int:
    return requests.get(url + "/health", timeout=5).json()["websocket_connections"]


def test_health_counts_websocket_connections(stack: Stack, followers: Followers) -> None:
    # earlier tests closed their sockets, but the server may not have counted the last closes yet
    wait_for(lambda: _sockets(stack.url) == 0, 10, what="the sockets of earlier tests to be closed")
    opened = [followers(stack.url) for _ in range(3)]
    wait_for(lambda: _sockets(stack.url) == 3, 5, what="3 connections")
    opened[0].close()
    opened[1].close()
    wait_for(lambda: _sockets(stack.url) == 1, 5, what="2 fewer connections")
    opened[2].close()
    wait_for(lambda: _sockets(stack.url) == 0, 5, what="back to none")


ALICE, BOB = "psk_alice_" + "a" * 20, "psk_bob_" + "b" * 20


@pytest.fixture(scope="module")
def auth_api(stack: Stack) -> Iterator[Service]:
    """An API with two client keys and one allowed cross origin, on the default stack's queue and worker."""
    api = start_api({**stack.env, "AUTH_DISABLED": "false", "CORS_ORIGINS": "https://app.example",
                     "API_KEYS": f"alice:{hash_key(ALICE)},bob:{hash_key(BOB)}"}, "rt-api-auth")
    yield api
    api.stop()


def test_sockets_need_a_key_and_see_only_their_owners_jobs(auth_api: Service, followers: Followers) -> None:
    url = auth_api.url  # type: ignore[attr-defined]
    app = "https://app.example"
    with pytest.raises(socketio.exceptions.ConnectionError):
        followers(url, origin=app)
    with pytest.raises(socketio.exceptions.ConnectionError):
        followers(url, token="psk_wrong", origin=app)
    response = requests.post(url + "/analyze", json={"repo": unique("octocat")}, timeout=5,
                             headers={"Authorization": f"Bearer {ALICE}"})
    job_id = response.json()["job_id"]
    assert followers(url, token=BOB, origin=app).join(job_id) == {"ok": False, "error": "Job not found",
                                                                        "project_id": job_id}
    alice = followers(url, token=ALICE, origin=app)
    assert alice.join(job_id)["ok"] is True
    assert alice.wait_final(job_id)[0] == "analysis_complete"


def test_cors_same_origin_only_by_default(stack: Stack, followers: Followers) -> None:
    with pytest.raises(socketio.exceptions.ConnectionError):
        followers(stack.url, origin="https://evil.example")
    assert followers(stack.url, origin=stack.url).client.connected
    response = requests.get(stack.url + "/livez", headers={"Origin": "https://evil.example"}, timeout=5)
    assert "Access-Control-Allow-Origin" not in response.headers


def test_cors_origins_allows_the_listed_origin(auth_api: Service, followers: Followers) -> None:
    url = auth_api.url  # type: ignore[attr-defined]
    assert followers(url, token=ALICE, origin="https://app.example").client.connected
    with pytest.raises(socketio.exceptions.ConnectionError):
        followers(url, token=ALICE, origin="https://evil.example")
    assert followers(url, token=ALICE, origin=url).client.connected, "the same origin stays allowed"
    preflight = requests.options(url + "/analyze", timeout=5, headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert preflight.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "Authorization" in preflight.headers["Access-Control-Allow-Headers"]
    answer = requests.get(url + "/livez", headers={"Origin": "https://app.example"}, timeout=5)
    assert answer.headers["Access-Control-Allow-Origin"] == "https://app.example"
    other = requests.get(url + "/livez", headers={"Origin": "https://evil.example"}, timeout=5)
    assert "Access-Control-Allow-Origin" not in other.headers


def test_replay_of_a_retrying_job_carries_the_retry_details() -> None:
    job = Job("a" * 32, status=JobStatus.RETRYING, progress=30, event_seq=7, attempts=3, max_attempts=6,
              last_error="Potpie server error (500)", next_due=time.time() + 2)
    [(name, payload)] = replay(job, None)
    assert (name, payload["seq"], payload["attempt"], payload["max_attempts"]) == ("status_update", 7, 2, 6)
    assert payload["error"] == "Potpie server error (500)" and 1.5 < payload["retry_in"] <= 2


def test_websocket_declines_per_message_compression(stack: Stack) -> None:
    """A browser offers permessage-deflate; the API holds ~140 KB less per socket by declining it (api/websocket.py),
    and the socket still opens: engine.io's open packet comes as a plain text frame."""
    host, port = stack.url.rsplit("/", 1)[1].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as conn:
        conn.sendall((f"GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: {host}:{port}\r\n"
                      "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                      f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n"
                      "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n").encode())
        reply = b""
        while b"\r\n\r\n" not in reply:
            reply += conn.recv(4096)
        head, frame = reply.split(b"\r\n\r\n", 1)
        while len(frame) < 3:
            frame += conn.recv(4096)
    assert head.startswith(b"HTTP/1.1 101"), head
    assert b"sec-websocket-extensions" not in head.lower(), head
    assert frame[0] == 0x81, "a final text frame without the RSV1 (compressed) bit"
    assert frame[2:3] == b"0", "engine.io's open packet"


def test_room_index_agrees_with_the_room_table_through_joins_leaves_and_disconnects(
        redis_server: RedisServer) -> None:
    """The API's room registry answers a socket's rooms from its own index (a disconnect no longer scans every
    room): after every step the index says what a scan of python-socketio's room table says, and a disconnect
    takes the socket out of every room while its neighbours stay where they were."""
    from socketio.base_manager import BaseManager

    from potpie_service.api.rooms import IndexedRedisManager

    manager = IndexedRedisManager(redis_server.url, write_only=True)
    socketio.Server(client_manager=manager)
    sids = [manager.connect(f"eio-{index}", "/") for index in range(40)]

    def agree() -> None:
        for sid in sids:
            assert sorted(manager.get_rooms(sid, "/"), key=str) == sorted(BaseManager.get_rooms(manager, sid, "/"),
                                                                          key=str)

    for index, sid in enumerate(sids):
        manager.enter_room(sid, "/", f"job-{index % 4}")
        if index % 3 == 0:
            manager.enter_room(sid, "/", "job-extra")
    agree()
    for sid in sids[::5]:
        manager.leave_room(sid, "/", "job-extra")
    agree()
    gone, stay = sids[:20], sids[20:]
    for sid in gone:
        manager.pre_disconnect(sid, "/")
        manager.disconnect(sid, "/", ignore_queue=True)
    agree()
    for sid in gone:
        assert not manager.get_rooms(sid, "/") and not manager.is_connected(sid, "/")
        assert all(sid not in room for room in manager.rooms["/"].values())
    assert not manager.pending_disconnect, "a disconnect leaves no pending mark behind"
    for index, sid in enumerate(stay, start=20):
        assert f"job-{index % 4}" in manager.get_rooms(sid, "/") and manager.is_connected(sid, "/")
    for sid in stay:
        manager.disconnect(sid, "/", ignore_queue=True)
    assert manager.rooms == {} and manager.member_of == {}


def test_a_follower_hears_what_was_published_while_the_relay_was_subscribing_again(
        stack: Stack, redis_server: RedisServer, followers: Followers) -> None:
    """Pub/sub keeps nothing for a subscriber that is away: the API's relay loses its subscription (Redis drops
    every pub/sub connection) and the job is cancelled before the relay has subscribed again (it waits 1 s). The
    follower, connected all along, still gets the cancelled state: the relay replays its rooms once it is back."""
    job_id = stack.submit(unique("slow-parse"))["job_id"]
    wait_for(lambda: stack.status(job_id)["status"] == "parsing", 15, what="the job to run")
    watcher = followers(stack.url)
    assert watcher.join(job_id)["ok"] is True
    assert redis_server.client().client_kill_filter(_type="pubsub") >= 1
    answer = requests.delete(f"{stack.url}/jobs/{job_id}", timeout=5)
    assert answer.status_code == 200 and answer.json()["status"] == "cancelled"
    wait_for(lambda: [p for _, p in watcher.of(job_id) if p.get("status") == "cancelled"], 10,
             what="the cancelled state after the relay subscribed again")
    assert "relay subscribed again" in stack.api.log()  # type: ignore[union-attr]
    cancelled = {p["seq"] for _, p in watcher.of(job_id) if p.get("status") == "cancelled"}
    assert len(cancelled) == 1, "the replay carries the seq the store gave the state"
