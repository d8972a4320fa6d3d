"""P2 event latency: a worker's state change to a networked Socket.IO client, against Redis PUBLISH -> SUBSCRIBE.

Latency = the client's receive time minus the payload's `timestamp`, which the worker stamps when it builds the
event just before the commit script that writes the state change and publishes the event (so the commit's round
trip is counted too). `timestamp` has millisecond resolution (truncated), so each sample
reads 0-1 ms high; the baseline is stamped and read the same way, so both carry the same bias.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import uuid
from datetime import datetime

import redis
import requests
import socketio

from potpie_service.core.events import now_iso

from .common import RedisServer, Report, Row, Service, bench_env, cli, pct, start_api, start_celery, start_simulator


def _stamp(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def baseline(redis_url: str, count: int, interval: float) -> list[float]:
    """PUBLISH -> SUBSCRIBE latencies (ms) for `count` event-sized messages, one every `interval` seconds."""
    client = redis.Redis.from_url(redis_url)
    pubsub = redis.Redis.from_url(redis_url).pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe("bench-p2")
    latencies: list[float] = []
    done = threading.Event()

    def listen() -> None:
        for message in pubsub.listen():
            received = time.time()
            payload = json.loads(message["data"])
            latencies.append((received - _stamp(payload["timestamp"])) * 1000)
            if len(latencies) >= count:
                done.set()
                return

    threading.Thread(target=listen, daemon=True).start()
    time.sleep(0.2)
    filler = "x" * 200  # about the size of a status_update payload
    for seq in range(count):
        client.publish("bench-p2", json.dumps({"seq": seq, "timestamp": now_iso(), "message": filler}))
        time.sleep(interval)
    done.wait(10)
    pubsub.close()
    return latencies


class Follower:
    """One Socket.IO client that submits jobs one after another and times every live event of each."""

    def __init__(self, api_url: str) -> None:
        self.url = api_url
        self.latencies: list[float] = []
        self.jobs = 0
        self.ended = threading.Event()
        self.joined_seq = 10 ** 9
        self.sio = socketio.Client(reconnection=False)
        for name in ("status_update", "analysis_complete", "analysis_error"):
            self.sio.on(name, self._handler(name))

    def _handler(self, name: str):
        def handle(payload: dict) -> None:
            received = time.time()
            if payload["seq"] > self.joined_seq:  # live events only, not the replay on join
                self.latencies.append((received - _stamp(payload["timestamp"])) * 1000)
            if name != "status_update":
                self.ended.set()
        return handle

    def follow(self, deadline: float) -> None:
        self.sio.connect(self.url, transports=["websocket"], wait_timeout=10)
        session = requests.Session()
        while time.monotonic() < deadline:
            self.ended.clear()
            self.joined_seq = 10 ** 9
            job_id = session.post(self.url + "/analyze", json={"repo": f"octocat/e{uuid.uuid4().hex[:10]}"},
                                  timeout=10).json()["job_id"]
            ack = self.sio.call("join_project", job_id, timeout=10)
            self.joined_seq = ack["seq"]
            if ack["status"] not in ("finished", "failed"):
                self.ended.wait(15)
            self.sio.emit("leave_project", job_id)
            self.jobs += 1
        self.sio.disconnect()


def run(args: argparse.Namespace) -> Report:
    """The baseline, then `clients` followers for `seconds`; same Redis for both."""
    report = Report("P2 event latency")
    server = RedisServer().start()
    services: list[Service] = []
    try:
        base = baseline(server.url, args.baseline_messages, 0.005)
        sim = start_simulator(parse_seconds=0, latency_ms=args.potpie_ms)
        services.append(sim)
        env = bench_env(server.url, sim.url, f"bench-p2-{uuid.uuid4().hex[:6]}", MAX_CONCURRENT_JOBS="100",
                        POTPIE_POLL_INTERVAL="0.1", RATE_LIMIT="off")
        services.append(start_celery(env, "bench-p2-worker"))
        api = start_api(env, "bench-p2-api")
        services.append(api)
        followers = [Follower(api.url) for _ in range(args.clients)]
        deadline = time.monotonic() + args.seconds
        threads = [threading.Thread(target=f.follow, args=(deadline,)) for f in followers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        for service in services[::-1]:
            service.stop()
        server.cleanup()
    ours = [value for f in followers for value in f.latencies]
    p50, p99 = pct(ours, 50), pct(ours, 99)
    report.rows.append(Row("P2 event latency", "state change -> Socket.IO client p50 ms", round(pct(base, 50), 2),
                           round(p50, 2), "<= 5 ms", p50 <= 5, "baseline: Redis PUBLISH -> SUBSCRIBE"))
    report.rows.append(Row("P2 event latency", "state change -> Socket.IO client p99 ms", round(pct(base, 99), 2),
                           round(p99, 2), "<= 25 ms", p99 <= 25, f"{len(ours)} events"))
    report.facts.update({
        "events / jobs / clients": f"{len(ours)} / {sum(f.jobs for f in followers)} / {args.clients}",
        "ours max ms": f"{max(ours):.1f}" if ours else "-",
        "baseline messages": str(len(base)),
        "timestamp resolution": "1 ms, truncated: samples read 0-1 ms high on both sides",
    })
    return report


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, default=25.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--potpie-ms", type=float, default=5.0, help="simulator latency per call (spaces events)")
    parser.add_argument("--baseline-messages", type=int, default=1000)


if __name__ == "__main__":
    cli("p2_events", run, _configure)
