"""Hostile clients against one API process (auth on, default limits but REQUEST_BODY_TIMEOUT=2 and
SOCKETIO_CONNECT_TIMEOUT=2 to keep the run short): under each abuse three other clients ask /livez every 50 ms and
are answered within 1 s; once the attackers leave, the API's RSS and descriptors are back near where they were; no
5xx and no traceback in its log. Each test prints its figures (`pytest -s`)."""

from __future__ import annotations

import json
import os
import random
import socket
import string
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator

import pytest
import requests

from tests.hostile import (ALICE, Process, RawWebSocket, Victims, connect, metric, polling_sid, read_until_closed,
                           refusals, start_guarded_api, status_of)
from tests.stack import RedisServer, Service, wait_for

pytestmark = pytest.mark.slow
BODY_TIMEOUT = 2.0
CONNECT_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def api(own_redis: RedisServer) -> Iterator[Service]:
    """The API under attack, warmed up first (200 connections at once, 200 sockets), so that what its first
    crowd makes it allocate for good (greenlet stacks, the allocator's arenas) is in every test's baseline."""
    service = start_guarded_api(own_redis.url, "hostile-api", REQUEST_BODY_TIMEOUT=str(BODY_TIMEOUT),
                                SOCKETIO_CONNECT_TIMEOUT=str(CONNECT_TIMEOUT))

    def visit(_: int) -> None:
        with connect(service) as sock:
            sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
            sock.recv(65536)
            time.sleep(0.5)  # all 200 open at once
        with RawWebSocket(service) as ws:
            ws.connect_namespace(ALICE if _ % 2 else None)

    _together(200, visit, workers=200)
    yield service
    service.stop()


@pytest.fixture
def watched(api: Service) -> Iterator[Callable[..., tuple[float, int]]]:
    """The API's worker watched through one test: `settled(rss_slack_mb)` waits for RSS and fds to come back to
    what they were before and returns them; afterwards its log must hold no traceback and no 5xx."""
    process = Process(api)
    requests.get(api.url + "/livez", timeout=5)  # type: ignore[attr-defined]
    baseline = process.usage()
    print(f"\nbefore: RSS {baseline[0]:.1f} MB, {baseline[1]} fds")

    def settled(rss_slack_mb: float = 5.0, timeout: float = 15) -> tuple[float, int]:
        after = process.settles(baseline, rss_slack_mb, timeout=timeout)
        print(f"after: RSS {after[0]:.1f} MB, {after[1]} fds")
        return after

    yield settled
    process.check_log()


def _together(count: int, task: Callable[[int], Any], workers: int = 50) -> list[Any]:
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(task, range(count)))


def test_bodies_that_stop_arriving_get_408_and_their_connections_close(api: Service, watched: Any) -> None:
    """100 authenticated POST /analyze and 100 keyless Socket.IO polling POSTs announce 100 bytes, send a few,
    then nothing."""
    sids = [polling_sid(api) for _ in range(100)]

    def stall(i: int) -> tuple[int, float, bool]:
        if i < 100:
            head = f"POST /analyze HTTP/1.1\r\nAuthorization: Bearer {ALICE}\r\nContent-Type: application/json"
        else:
            head = f"POST /socket.io/?EIO=4&transport=polling&sid={sids[i - 100]} HTTP/1.1\r\nContent-Type: text/plain"
        with connect(api) as sock:
            started = time.monotonic()
            sock.sendall(f"{head}\r\nHost: x\r\nContent-Length: 100\r\n\r\n{{\"re".encode())
            answer, closed = read_until_closed(sock, limit=15)
            return status_of(answer), time.monotonic() - started, closed

    with Victims(api) as victims:
        results = _together(200, stall, workers=200)
    victims.check()
    assert [status for status, _, _ in results] == [408] * 200
    assert all(closed for _, _, closed in results)
    took = sorted(seconds for _, seconds, _ in results)
    assert BODY_TIMEOUT - 0.1 <= took[0] and took[-1] <= BODY_TIMEOUT + 2, took
    print(f"200 stalled bodies: 408 after {took[0]:.2f}-{took[-1]:.2f} s")
    watched()


def test_sockets_that_never_authenticate_are_closed(api: Service, watched: Any) -> None:
    """100 WebSockets whose connect carries no key, 100 that never send anything."""
    def refused(_: int) -> bool:
        ws = RawWebSocket(api)
        answer = ws.connect_namespace(None)
        try:
            return answer.startswith(b"44") and ws.closed_within(3)
        finally:
            ws.close()

    def silent(_: int) -> tuple[bool, float]:
        ws = RawWebSocket(api)
        started = time.monotonic()
        try:
            return ws.closed_within(CONNECT_TIMEOUT + 4), time.monotonic() - started
        finally:
            ws.close()

    with Victims(api) as victims:
        closed_at_once = _together(100, refused)
        closed_later = _together(100, silent, workers=100)
    victims.check()
    assert all(closed_at_once)
    assert all(closed for closed, _ in closed_later)
    took = sorted(seconds for _, seconds in closed_later)
    assert took[-1] <= CONNECT_TIMEOUT + 2.5, took
    assert metric(api, "potpie_socketio_sessions") == 0
    print(f"100 refused: closed at once; 100 silent: closed after {took[0]:.2f}-{took[-1]:.2f} s")
    watched()


def test_oversized_polling_posts_are_413_and_leak_no_descriptor(api: Service, watched: Any) -> None:
    """30 polling POSTs announcing 50 MB (each sends 1 MB before it reads the answer)."""
    before = refusals(api, "body_too_large")

    def oversized(_: int) -> int:
        with connect(api) as sock:
            sock.sendall(f"POST /socket.io/?EIO=4&transport=polling&sid={polling_sid(api)} HTTP/1.1\r\nHost: x\r\n"
                         "Content-Type: text/plain\r\nContent-Length: 50000000\r\n\r\n".encode())
            try:
                sock.sendall(b"4" * 1_000_000)
            except (BrokenPipeError, ConnectionResetError):
                pass
            answer, _ = read_until_closed(sock, limit=5)
            return status_of(answer)

    with Victims(api) as victims:
        statuses = _together(30, oversized, workers=10)
    victims.check()
    assert statuses.count(413) >= 25, statuses  # a reset may beat the answer to a client still writing
    assert set(statuses) <= {413, 0}
    assert refusals(api, "body_too_large") == before + 30
    watched()


def test_oversized_websocket_frames_are_refused_as_they_arrive(api: Service, watched: Any) -> None:
    """10 keyless sockets each send 8 MB of a 10 MB frame."""
    process = Process(api)
    peak = [process.rss_mb()]

    def big_frame(_: int) -> int:
        ws = RawWebSocket(api)
        ws.receive()  # the open packet
        ws.sock.sendall(ws.frame_header(10_000_000))
        sent = 0
        try:
            while sent < 8_000_000:
                ws.sock.sendall(b"4" * 65536)
                sent += 65536
                peak.append(process.rss_mb())
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            ws.close()
        return sent

    with Victims(api) as victims:
        sent = _together(10, big_frame, workers=10)
    victims.check()
    assert max(sent) < 8_000_000, f"the API read {max(sent)} bytes of a frame over its limit"
    growth = max(peak) - peak[0]
    assert growth < 20, f"RSS grew {growth:.1f} MB while the frames arrived"
    wait_for(lambda: metric(api, "potpie_socketio_sessions") == 0, 5, what="the sockets' sessions gone")
    print(f"10 oversized frames: cut after at most {max(sent) / 1e6:.1f} MB sent; RSS peak +{growth:.1f} MB")
    watched()


def test_header_heavy_handshakes_are_431_and_refused_sessions_keep_nothing(api: Service, watched: Any) -> None:
    """100 keyless Socket.IO handshakes with ~720 KB of headers (90 of 8 KB: gunicorn's 431, past
    REQUEST_HEADER_FIELDS_MAX) or ~360 KB (45: the edge's 431), then 100 keyless sessions with 15 KB each, refused
    at connect."""
    heavy = [("GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\nHost: x\r\n"
              + "".join(f"X-Pad-{i}: {'h' * 8000}\r\n" for i in range(count)) + "\r\n").encode() for count in (90, 45)]
    light = {f"X-Pad-{i}": "l" * 5000 for i in range(3)}

    def handshake(i: int) -> int:
        with connect(api) as sock:
            sock.sendall(heavy[i % 2])
            answer, _closed = read_until_closed(sock, limit=10)
            return status_of(answer)

    def refused_session(_: int) -> bool:
        """As a polling client does it: a poll waits while the connect is posted."""
        sid = polling_sid(api, headers=light)
        url = f"{api.url}/socket.io/?EIO=4&transport=polling&sid={sid}"  # type: ignore[attr-defined]
        with ThreadPoolExecutor(1) as pool:
            polling = pool.submit(requests.get, url, headers=light, timeout=10)
            time.sleep(0.2)
            posted = requests.post(url, data="40", headers={**light, "Content-Type": "text/plain"}, timeout=10)
            polled = polling.result()
        return posted.status_code == 200 and polled.text.startswith("44") and polled.text.endswith("\x1e1")

    with Victims(api) as victims:
        statuses = _together(100, handshake, workers=10)
        refused = _together(100, refused_session, workers=10)
    victims.check()
    assert statuses == [431] * 100
    assert all(refused), "each got its CONNECT_ERROR and Engine.IO's close in the same poll"
    wait_for(lambda: metric(api, "potpie_socketio_sessions") == 0, 5, what="the refused sessions gone")
    print("100 handshakes with 720 or 360 KB of headers: 431")
    watched()


def test_made_up_methods_add_no_metric_series(api: Service, watched: Any) -> None:
    """20,000 keyless requests, each with a method of its own."""
    def scrape() -> str:
        return requests.get(api.url + "/metrics", headers={"Authorization": f"Bearer {ALICE}"}, timeout=10).text  # type: ignore[attr-defined]

    series_before, size_before = len(scrape().splitlines()), len(scrape())

    def requests_of(worker: int) -> None:
        with requests.Session() as session:
            for _ in range(2500):
                method = "".join(random.choices(string.ascii_uppercase, k=12))
                session.request(method, api.url + "/livez", timeout=10)  # type: ignore[attr-defined]

    with Victims(api) as victims:
        _together(8, requests_of, workers=8)
    victims.check()
    text = scrape()
    assert len(text.splitlines()) <= series_before + 30, "only the 405/other series (and buckets) are new"
    assert metric(api, 'potpie_http_request_duration_seconds_count{method="other",route="unmatched",status="405"}') \
        >= 20_000
    print(f"/metrics: {size_before} -> {len(text)} bytes after 20,000 made-up methods")
    watched(rss_slack_mb=10)


def test_one_sockets_join_flood_slows_no_one_and_closes_it(api: Service, watched: Any) -> None:
    """One authenticated socket sends join_project as fast as it can; another follows its job meanwhile."""
    job = requests.post(api.url + "/analyze", json={"repo": f"octocat/flood-{os.getpid()}"},  # type: ignore[attr-defined]
                        headers={"Authorization": f"Bearer {ALICE}"}, timeout=5).json()["job_id"]
    before = refusals(api, "event_budget")
    frame = "42" + json.dumps(["join_project", job])
    sent, cut_after = [0], [0.0]
    follower_acks: list[float] = []

    def flood() -> None:
        ws = RawWebSocket(api)
        assert ws.connect_namespace(ALICE).startswith(b"40{")
        started = time.monotonic()
        try:
            while time.monotonic() - started < 5:
                ws.send_text(frame)
                sent[0] += 1
        except (BrokenPipeError, ConnectionResetError, TimeoutError):  # cut off
            cut_after[0] = time.monotonic() - started
        ws.close()

    def follow() -> None:
        ws = RawWebSocket(api)
        assert ws.connect_namespace(ALICE).startswith(b"40{")
        for i in range(20):
            started = time.monotonic()
            ws.send_text(f"42{i}" + json.dumps(["join_project", job]))
            while not (answer := ws.receive()[1]).startswith(b"43"):
                assert answer, "the follower was disconnected"
            assert b'"ok":true' in answer
            follower_acks.append(time.monotonic() - started)
            time.sleep(0.2)
        ws.close()

    with Victims(api) as victims:
        flooder, follower = threading.Thread(target=flood), threading.Thread(target=follow)
        flooder.start()
        follower.start()
        flooder.join(30)
        follower.join(30)
    victims.check()
    assert len(follower_acks) == 20 and max(follower_acks) <= 1, follower_acks
    assert refusals(api, "event_budget") == before + 1
    assert 0 < cut_after[0] < 5, "the flooder was cut off"
    print(f"join flood: cut off after {cut_after[0]:.2f} s ({sent[0]} frames had left the client); the "
          f"follower's join acks at most {max(follower_acks) * 1000:.0f} ms")
    watched()


def test_connect_disconnect_churn_releases_every_session_at_once(api: Service, watched: Any) -> None:
    """5,000 authenticated connect/disconnect cycles over WebSocket."""
    def cycles(worker: int) -> None:
        for _ in range(500):
            ws = RawWebSocket(api)
            assert ws.connect_namespace(ALICE).startswith(b"40{")
            ws.send_text("41")  # leave the namespace, as a client's disconnect() does
            ws.sock.shutdown(socket.SHUT_WR)
            ws.closed_within(5)
            ws.close()

    with Victims(api) as victims:
        started = time.monotonic()
        _together(10, cycles, workers=10)
        took = time.monotonic() - started
    victims.check()
    left = metric(api, "potpie_socketio_sessions")
    assert left == 0, f"{left} sessions held right after the last disconnect"
    print(f"5,000 cycles in {took:.1f} s; 0 sessions held right after")
    watched(rss_slack_mb=10)
