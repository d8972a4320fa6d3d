"""P5 fan-out: 1,000 Socket.IO clients on one API process, each following its own job; every client must get
every state change (contiguous `seq` from its join to the final event, and the final event itself).

The jobs are submitted and joined before the worker starts, so no state change can happen before its client
listens. The API is `python -m potpie_service api` with API_THREADS above the client count (threading mode: a
thread per WebSocket); API RSS and CPU are measured over its process tree.
"""

from __future__ import annotations

import argparse
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import requests
import socketio

from .common import (PeakRss, RedisServer, Report, Row, Service, bench_env, cli, start_api, start_celery,
                     start_simulator, tree_cpu_s, tree_rss_mb, wait_for)

FINAL = ("analysis_complete", "analysis_error")


class Follower:
    """One client following one job: the seqs and statuses it received live."""

    def __init__(self, url: str, job_id: str) -> None:
        self.url, self.job_id = url, job_id
        self.received: list[tuple[int, str, str]] = []  # (seq, event, status); handlers run in threads
        self.joined_seq = -1
        self.ended = threading.Event()
        self.sio = socketio.Client(reconnection=False)
        for name in ("status_update", *FINAL):
            self.sio.on(name, self._handler(name))

    def _handler(self, name: str):
        def handle(payload: dict) -> None:
            self.received.append((payload["seq"], name, payload["status"]))
            if name in FINAL:
                self.ended.set()
        return handle

    @property
    def live(self) -> list[tuple[int, str, str]]:
        """What arrived after the join (the replay of the state at join time left out)."""
        return [item for item in self.received if item[0] > self.joined_seq]

    @property
    def statuses(self) -> set[str]:
        return {status for _, name, status in self.live if name == "status_update"}

    def start(self) -> None:
        self.sio.connect(self.url, transports=["websocket"], wait_timeout=30)
        ack = self.sio.call("join_project", self.job_id, timeout=30)
        assert ack["ok"], ack
        self.joined_seq = ack["seq"]

    def complete(self) -> bool:
        """Final event received and no seq missing (or repeated) between the join and it."""
        seqs = sorted(seq for seq, _, _ in self.live)
        finals = [seq for seq, name, _ in self.live if name in FINAL]
        return len(finals) == 1 and seqs == list(range(self.joined_seq + 1, finals[0] + 1))


def run(args: argparse.Namespace) -> Report:
    """Submit, connect and join `clients` jobs; start the worker; wait for every final event."""
    report = Report("P5 fan-out")
    server = RedisServer().start()
    services: list[Service] = []
    followers: list[Follower] = []
    try:
        sim = start_simulator(parse_seconds=args.parse_seconds)
        services.append(sim)
        env = bench_env(server.url, sim.url, f"bench-p5-{uuid.uuid4().hex[:6]}", MAX_CONCURRENT_JOBS=str(args.clients),
                        POTPIE_POLL_INTERVAL="0.5", RATE_LIMIT="off", API_THREADS=str(args.clients + 100))
        api = start_api(env, "bench-p5-api")
        services.append(api)
        session = requests.Session()
        ids = [session.post(api.url + "/analyze", json={"repo": f"octocat/f{i}-{uuid.uuid4().hex[:6]}"},
                            timeout=30).json()["job_id"] for i in range(args.clients)]
        idle_rss = tree_rss_mb(api.proc.pid)
        followers = [Follower(api.url, job_id) for job_id in ids]
        connect_started = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda f: f.start(), followers))
        connect_s = time.monotonic() - connect_started
        connected_rss = tree_rss_mb(api.proc.pid)
        cpu_before = tree_cpu_s(api.proc.pid)
        with PeakRss(api.proc.pid) as peak:
            started = time.monotonic()
            services.append(start_celery(env, "bench-p5-worker", pool="prefork", concurrency=args.concurrency))
            wait_for(lambda: all(f.ended.is_set() for f in followers), args.timeout, interval=0.2,
                     what="every client's final event")
            fanout_s = time.monotonic() - started
            time.sleep(0.5)  # stragglers after a final event would show up as gaps or extra seqs
        api_cpu = tree_cpu_s(api.proc.pid) - cpu_before
        health = session.get(api.url + "/health", timeout=10).json()
    finally:
        for follower in followers:
            follower.sio.disconnect()
        for service in services[::-1]:
            service.stop()
        server.cleanup()
    complete = sum(1 for f in followers if f.complete())
    events = sum(len(f.live) for f in followers)
    report.rows.append(Row("P5 fan-out", f"clients with every state change, of {args.clients}", args.clients,
                           complete, "all", complete == args.clients,
                           f"{events} live events; all {complete == args.clients and 'complete' or 'NOT complete'}"))
    report.rows.append(Row("P5 fan-out", f"API RSS MB with {args.clients} clients (peak)", round(idle_rss, 1),
                           round(peak.peak, 1), "report", None, "baseline: the API before the clients connected"))
    report.rows.append(Row("P5 fan-out", "API CPU ms per delivered event", None,
                           round(api_cpu * 1000 / max(events, 1), 3), "report", None,
                           f"{api_cpu:.1f} CPU s over {fanout_s:.1f} s"))
    report.facts.update({
        "connect + join of all clients, s": f"{connect_s:.1f}",
        "API RSS after connecting, MB / per client KB": f"{connected_rss:.1f} / "
                                                        f"{(connected_rss - idle_rss) * 1024 / args.clients:.0f}",
        "jobs run in s (worker start to last final event)": f"{fanout_s:.1f}",
        "statuses seen by each client": "parsing, ready, processing_conversations, finished"
        if all({"parsing", "ready", "finished"} <= f.statuses for f in followers) else "some missing",
        "API": f"python -m potpie_service api, API_THREADS={args.clients + 100}",
        "health status at the end": str(health.get("status")),
    })
    return report


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--parse-seconds", type=float, default=1.0)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=90.0)


if __name__ == "__main__":
    cli("p5_fanout", run, _configure)
