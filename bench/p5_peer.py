"""P5 peer: the same Socket.IO clients against a bare Node socket.io 4 server and against the API, in one run.

The issue's yardstick is the Node/Express/socket.io original this service rebuilds. bench/node/server.js stands in
for it: socket.io 4 with the official Redis adapter, the same `auth: {token}`, `join_project` ack and rooms. Each
server in turn (Node first, then the API as deployed: gevent, API keys on) gets the same clients from
bench/node/p5_clients.js: N connected, the first F each following a job. Then the same publisher process
(bench/node/publisher.js) publishes the same events to both, paced, in each server's own wire format: through
@socket.io/redis-emitter for Node (as the original's workers did), and for the API the python-socketio message the
store's scripts publish (built by store/broadcast.py). Each event is stamped as it is handed to Redis; the client
reads the same clock on receipt.

Per server: RSS per connected socket (the process tree's RSS with every client connected, after a settle, minus its
RSS before the clients, over N), publish -> follower latency, whether every follower got every event exactly once,
and the CPU of the server, the clients and the publisher. The API's jobs are real (submitted, not run: no worker),
so its joins find them; the events are the publisher's, seqs above any the jobs took.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from potpie_service.auth import hash_key
from potpie_service.core.analysis import build_result
from potpie_service.core.events import Event, analysis_complete, room, status_update
from potpie_service.core.job import Job
from potpie_service.core.model import JobStatus
from potpie_service.potpie.simulator import Project, compose_reply
from potpie_service.store.broadcast import broadcast

from .common import (PeakRss, RedisServer, Report, Row, Service, bench_env, cli, free_port, pct, start_api,
                     tree_cpu_s, tree_rss_mb, wait_for)
from .p5_fanout import FINAL, NODE, Clients, NodeLines

TOKEN = "psk_bench-peer-token"  # the API key every client presents, to both servers
SEQ0 = 100  # the publisher's first seq: above any seq a submitted job has taken
BYTES_TARGET = 1.5  # the target: API bytes per socket <= 1.5x Node's


def job_events(job_id: str, index: int) -> list[Event]:
    """A job's life after its join, as the worker publishes it (payloads built by the service's own functions):
    parsing, ready, two conversation updates, finished, then `analysis_complete` with the simulator's result."""
    job = Job(id=job_id, owner="bench", repo=f"octocat/peer{index}", attempts=1, potpie_project_id=f"p-{job_id[:8]}",
              parse_status="ready")
    steps = [(JobStatus.PARSING, 10), (JobStatus.READY, 65), (JobStatus.PROCESSING_CONVERSATIONS, 70),
             (JobStatus.PROCESSING_CONVERSATIONS, 85), (JobStatus.FINISHED, 100)]
    events: list[Event] = []
    for offset, (status, progress) in enumerate(steps):
        job.status, job.progress = status, progress
        events.append(("status_update", status_update(job, SEQ0 + offset)))
    project = Project(job.potpie_project_id, job.repo, job.branch, None, "octocat")
    job.answer, job.citations = compose_reply(project, "What does it do?")
    job.analysis_text = compose_reply(project, "Answer in JSON")[0]
    job.result = build_result(job, "2026-01-01T00:00:00.000Z", 1234)
    events.append(("analysis_complete", analysis_complete(job, SEQ0 + len(steps))))
    return events


def publications(jobs: list[str], channel: str) -> tuple[list[Any], list[Any]]:
    """The same events for both servers, round by round (every job's first event, then every job's second ...):
    Node's as [room, event, payload] for the emitter, the API's as [channel, python-socketio message]."""
    lives = [job_events(job_id, index) for index, job_id in enumerate(jobs)]
    node: list[Any] = []
    api: list[Any] = []
    for step in range(len(lives[0])):
        for job_id, life in zip(jobs, lives):
            name, payload = life[step]
            node.append([room(job_id), name, payload])
            message = broadcast(channel, job_id, [(name, {**payload, "sent_ms": "@sent"})])
            api.append([channel, message.messages[0].replace(f'"@seq:{message.nonce}"', str(payload["seq"]))])
    return node, api


@dataclass
class Side:
    """One server's figures."""

    name: str
    idle_mb: float = 0.0
    connected_mb: float = 0.0
    peak_mb: float = 0.0
    connect_s: float = 0.0
    connect_cpu_s: float = 0.0
    events_cpu_s: float = 0.0
    events_s: float = 0.0
    idle_cores: float = 0.0
    clients_connect_cpu_s: float = 0.0
    clients_events_cpu_s: float = 0.0
    clients_mb: float = 0.0
    publisher_cpu_s: float = 0.0
    publish_s: float = 0.0
    connected: int = 0
    failed: int = 0
    complete: int = 0
    events: int = 0
    latencies: list[float] = field(default_factory=list)

    def kib_per_socket(self, clients: int) -> float:
        return (self.connected_mb - self.idle_mb) * 1024 / clients

    def cpu_ms_per_event(self) -> float:
        """Server CPU per delivered event, less what the idle clients cost meanwhile (their pings)."""
        return max(self.events_cpu_s - self.idle_cores * self.events_s, 0.0) * 1000 / max(self.events, 1)


def followed_all(follower: dict[str, Any], expected: list[int]) -> bool:
    """Every published seq arrived exactly once (the replay on join and anything below SEQ0 aside), the final
    event among them."""
    live = [event for event in follower["events"] if event[0] >= SEQ0]
    return sorted(event[0] for event in live) == expected and any(event[1] in FINAL for event in live)


def measure(side: Side, url: str, pid: int, jobs: list[str], items: list[Any], mode: str, publisher: NodeLines,
            args: argparse.Namespace) -> Side:
    """Connect the clients to the server at `url` (process tree `pid`), publish `items`, collect the figures."""
    side.idle_mb = tree_rss_mb(pid)
    cpu = tree_cpu_s(pid)
    clients = Clients(url, args.clients, jobs, args.in_flight, token=TOKEN)
    try:
        ready = clients.until("ready", args.connect_timeout)
        side.connect_cpu_s, side.connect_s = tree_cpu_s(pid) - cpu, ready["connect_s"]
        side.failed, side.clients_connect_cpu_s = ready["failed"], ready["client_cpu_s"]
        time.sleep(args.settle)
        side.connected_mb = tree_rss_mb(pid)
        cpu = tree_cpu_s(pid)
        time.sleep(args.idle)  # one ping interval: from here on each client pings at its own steady pace
        side.idle_cores = (tree_cpu_s(pid) - cpu) / args.idle
        items_file = Path(tempfile.mkdtemp(prefix="psvc-peer-")) / f"{side.name}.json"
        items_file.write_text(json.dumps(items))
        with PeakRss(pid) as peak:
            cpu, started = tree_cpu_s(pid), time.monotonic()
            publisher.send(json.dumps({"mode": mode, "file": str(items_file), "rate": args.rate}))
            published = publisher.until("published", args.timeout)
            clients.until("done", args.timeout)
            side.events_s = time.monotonic() - started
            time.sleep(0.5)  # a duplicate after the final event would show up in the seqs
            side.events_cpu_s = tree_cpu_s(pid) - cpu
            result = clients.report()
        clients.proc.wait(60)
    finally:
        clients.stop()
    side.peak_mb, side.publisher_cpu_s, side.publish_s = peak.peak, published["cpu_s"], published["seconds"]
    side.clients_events_cpu_s = result["client_cpu_s"] - side.clients_connect_cpu_s
    side.clients_mb, side.connected = result["client_rss_mb"], result["still_connected"]
    expected = list(range(SEQ0, SEQ0 + len(items) // len(jobs)))
    side.complete = sum(1 for follower in result["followers"] if followed_all(follower, expected))
    live = [event for follower in result["followers"] for event in follower["events"] if event[4] is not None]
    side.events, side.latencies = len(live), [received - sent for _, _, _, received, sent in live]
    return side


def node_side(redis_url: str, jobs: list[str], items: list[Any], publisher: NodeLines,
              args: argparse.Namespace) -> Side:
    """The bare Node socket.io 4 server, measured."""
    port = free_port()
    server = Service("bench-peer-node", ["node", str(NODE / "server.js"), str(port), redis_url, TOKEN],
                     dict(os.environ)).start()
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: requests.get(url + "/livez", timeout=1).ok or not server.alive(), 20, what="node server")
        assert server.alive(), server.log()[-3000:]
        return measure(Side("node"), url, server.proc.pid, jobs, items, "emitter", publisher, args)  # type: ignore[union-attr]
    finally:
        server.stop()


def run(args: argparse.Namespace) -> Report:
    """Both servers in turn, the same clients and publisher, one Redis."""
    if not (NODE / "node_modules" / "socket.io").exists():
        raise SystemExit("bench/node has no socket.io: `make bench` installs it (npm ci in bench/node)")
    report = Report("P5 peer")
    server = RedisServer().start()
    api: Service | None = None
    publisher = NodeLines([str(NODE / "publisher.js"), server.url])
    try:
        publisher.until("ready", 20)
        env = bench_env(server.url, "http://127.0.0.1:9", f"bench-peer-{uuid.uuid4().hex[:6]}", RATE_LIMIT="off",
                        AUTH_DISABLED="false", API_KEYS=f"bench:{hash_key(TOKEN)}",
                        MAX_CONCURRENT_JOBS=str(args.followers))
        api = start_api(env, "bench-peer-api")
        url = api.url  # type: ignore[attr-defined]
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {TOKEN}"
        jobs = [session.post(url + "/analyze", json={"repo": f"octocat/peer{i}-{uuid.uuid4().hex[:6]}"},
                             timeout=30).json()["job_id"] for i in range(args.followers)]
        node_items, api_items = publications(jobs, f"psvc-{env['QUEUE_NAME']}")
        node = node_side(server.url, jobs, node_items, publisher, args)
        ours = measure(Side("api"), url, api.proc.pid, jobs, api_items, "raw", publisher, args)  # type: ignore[union-attr]
    finally:
        publisher.stop()
        if api:
            api.stop()
        server.cleanup()
    rows(report, node, ours, args)
    return report


def rows(report: Report, node: Side, ours: Side, args: argparse.Namespace) -> None:
    """The peer rows (baseline: Node; ours: the API) and the facts behind them."""
    name, n, f = "P5 peer (Node socket.io 4)", args.clients, args.followers
    node_kib, api_kib = node.kib_per_socket(n), ours.kib_per_socket(n)
    report.rows += [
        Row(name, f"server RSS KiB per connected socket, {n} clients", round(node_kib, 1), round(api_kib, 1),
            f"<= {BYTES_TARGET}x", api_kib <= BYTES_TARGET * node_kib,
            f"RSS with every client connected ({args.settle:g} s after the last) minus before, over {n}; "
            f"MB idle / connected / peak: Node {node.idle_mb:.0f} / {node.connected_mb:.0f} / {node.peak_mb:.0f}, "
            f"API {ours.idle_mb:.0f} / {ours.connected_mb:.0f} / {ours.peak_mb:.0f}"),
        Row(name, "publish -> follower p50 ms", round(pct(node.latencies, 50), 2), round(pct(ours.latencies, 50), 2),
            "report", None, f"{f} followers, {len(node.latencies)} / {len(ours.latencies)} events (Node / API), "
            f"{args.rate:g} events/s"),
        Row(name, "publish -> follower p99 ms", round(pct(node.latencies, 99), 2), round(pct(ours.latencies, 99), 2),
            "report", None, f"max Node {max(node.latencies, default=0):.1f} / API {max(ours.latencies, default=0):.1f}"
            " ms"),
        Row(name, f"followers with every event exactly once, of {f}", node.complete, ours.complete, "all",
            node.complete == f and ours.complete == f,
            f"clients connected at the end, of {n}: Node {node.connected}, API {ours.connected}; failed to connect: "
            f"Node {node.failed}, API {ours.failed}"),
        Row(name, "server CPU ms per delivered event", round(node.cpu_ms_per_event(), 3),
            round(ours.cpu_ms_per_event(), 3), "report", None,
            f"CPU s over the events: Node {node.events_cpu_s:.2f} in {node.events_s:.1f} s, API "
            f"{ours.events_cpu_s:.2f} in {ours.events_s:.1f} s, less the idle rate over as long"),
        Row(name, f"server CPU cores with {n} idle clients (pings)", round(node.idle_cores, 3),
            round(ours.idle_cores, 3), "report", None,
            f"over {args.idle:g} s after the settle (pings every 20 s on both)"),
        Row(name, f"server CPU s to connect {n} clients", round(node.connect_cpu_s, 2), round(ours.connect_cpu_s, 2),
            "report", None, f"connect + join of all clients, s: Node {node.connect_s:.1f}, API {ours.connect_s:.1f}"),
    ]
    versions = {package: json.loads((NODE / "node_modules" / package / "package.json").read_text())["version"]
                for package in ("socket.io", "@socket.io/redis-adapter", "@socket.io/redis-emitter", "redis")}
    report.facts.update({
        "Node server": "bench/node/server.js: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        "API": "python -m potpie_service api (gevent), API_KEYS on, RATE_LIMIT=off",
        "clients": f"{n} (bench/node/p5_clients.js, WebSocket transport, {args.in_flight} connecting at a time), "
                   f"{f} following a job each, auth: {{token}}",
        "events": f"{len(node.latencies) // max(f, 1)} per follower (5 status_update + analysis_complete), "
                  f"published at {args.rate:g}/s by one process (bench/node/publisher.js)",
        "client generator CPU s, connect / the rest: idle and events (Node / API)":
            f"{node.clients_connect_cpu_s:.1f} / {node.clients_events_cpu_s:.1f}, "
            f"{ours.clients_connect_cpu_s:.1f} / {ours.clients_events_cpu_s:.1f}",
        "client generator RSS MB (Node / API)": f"{node.clients_mb:.0f} / {ours.clients_mb:.0f}",
        "publisher CPU s / publish took s (Node / API)":
            f"{node.publisher_cpu_s:.2f} / {node.publish_s:.1f}, {ours.publisher_cpu_s:.2f} / {ours.publish_s:.1f}",
        "latency clock": "performance.timeOrigin + performance.now() in the publisher and the clients (sub-ms)",
    })


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clients", type=int, default=10000)
    parser.add_argument("--followers", type=int, default=1000)
    parser.add_argument("--in-flight", type=int, default=200, help="clients connecting at once")
    parser.add_argument("--rate", type=float, default=500.0, help="events published per second")
    parser.add_argument("--settle", type=float, default=2.0, help="s after the last connect before RSS is read")
    parser.add_argument("--idle", type=float, default=20.0,
                        help="s of idle clients measured after that (one ping interval), before the events")
    parser.add_argument("--connect-timeout", type=float, default=150.0)
    parser.add_argument("--timeout", type=float, default=120.0)


if __name__ == "__main__":
    cli("p5_peer", run, _configure)
