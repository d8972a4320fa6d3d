"""P5 fan-out: 10,000 Socket.IO clients on one API process (the deployed default: gevent), 1,000 of them following
their own job; every follower must get every state change (contiguous `seq` from its join to the final event, and
the final event itself), and a submit at 8 clients must stay fast while they are all connected.

The clients are the official JavaScript socket.io-client in one Node process (bench/node/p5_clients.js, WebSocket
transport), so the load generator costs little CPU beside the server; its CPU and memory are reported. The jobs are
submitted and joined before the worker starts, so no state change can happen before its client listens. API RSS
and CPU are measured over its process tree.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import requests

from .common import (ROOT, PeakRss, RedisServer, Report, Row, Service, bench_env, cli, start_api, start_celery,
                     start_simulator, tree_cpu_s, tree_rss_mb)
from .p1_submit import _wrk_script

FINAL = ("analysis_complete", "analysis_error")
NODE = ROOT / "bench" / "node"
RSS_LIMIT_MB = 1536


class NodeLines:
    """A Node process of bench/node that talks in JSON lines: commands on its stdin, messages on its stdout."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(["node", *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})})
        self.last: dict[str, Any] = {}

    def until(self, kind: str, timeout: float) -> dict[str, Any]:
        """Read lines until one of type `kind` (its message), or raise after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"node {self.proc.args[1]} exited (code {self.proc.poll()}) before '{kind}'")
            message = json.loads(line)
            self.last = message
            if message["type"] == kind:
                return message
        raise TimeoutError(f"no '{kind}' from node {self.proc.args[1]} within {timeout:.0f} s (last: {self.last})")

    def send(self, line: str) -> None:
        """Write one command line to the process."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


class Clients(NodeLines):
    """The Node process holding the clients (bench/node/p5_clients.js); with `token`, each presents it as
    `auth: {token}`."""

    def __init__(self, url: str, total: int, jobs: list[str], in_flight: int, token: str | None = None) -> None:
        jobs_file = Path(tempfile.mkdtemp(prefix="psvc-p5-")) / "jobs.json"
        jobs_file.write_text(json.dumps(jobs))
        super().__init__([str(NODE / "p5_clients.js"), url, str(total), str(jobs_file), str(in_flight)],
                         {"P5_TOKEN": token} if token else None)

    def report(self) -> dict[str, Any]:
        self.send("report")
        return self.until("report", 60)


def complete(follower: dict[str, Any]) -> bool:
    """Final event received and no seq missing (or repeated) between the join and it."""
    live = [event for event in follower["events"] if event[0] > follower["joined"]]
    seqs = sorted(event[0] for event in live)
    finals = [event[0] for event in live if event[1] in FINAL]
    return follower["joined"] >= 0 and len(finals) == 1 and seqs == list(range(follower["joined"] + 1, finals[0] + 1))


def submit_latency(url: str, seconds: float) -> dict[str, float]:
    """wrk at 8 keep-alive clients posting new jobs: rate and latency percentiles (ms)."""
    out = subprocess.run(["wrk", "-t2", "-c8", f"-d{seconds:g}s", "--latency", "-s", _wrk_script(), url + "/analyze"],
                         capture_output=True, text=True, check=True).stdout

    def ms(label: str) -> float:
        value, unit = re.search(rf"{label}\s+([\d.]+)(us|ms|s)\b", out).groups()  # type: ignore[union-attr]
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    refused = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rate": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
            "p50": ms("50%"), "p99": ms("99%"), "non2xx": int(refused.group(1)) if refused else 0}


def run(args: argparse.Namespace) -> Report:
    """Submit the followers' jobs; connect every client and join the followers; measure submits; run the jobs."""
    for tool, hint in (("node", "Node.js"), ("wrk", "wrk (make bench installs it)")):
        if not shutil.which(tool):
            raise SystemExit(f"{hint} is needed for P5")
    if not (NODE / "node_modules" / "socket.io-client").exists():
        raise SystemExit("bench/node has no socket.io-client: `make bench` installs it (npm ci in bench/node)")
    report = Report("P5 fan-out")
    server = RedisServer().start()
    services: list[Service] = []
    clients: Clients | None = None
    try:
        sim = start_simulator(parse_seconds=args.parse_seconds)
        services.append(sim)
        env = bench_env(server.url, sim.url, f"bench-p5-{uuid.uuid4().hex[:6]}",
                        MAX_CONCURRENT_JOBS=str(args.followers), POTPIE_POLL_INTERVAL="0.5", RATE_LIMIT="off")
        api = start_api(env, "bench-p5-api")
        services.append(api)
        url = api.url  # type: ignore[attr-defined]
        session = requests.Session()
        ids = [session.post(url + "/analyze", json={"repo": f"octocat/f{i}-{uuid.uuid4().hex[:6]}"},
                            timeout=30).json()["job_id"] for i in range(args.followers)]
        idle_rss = tree_rss_mb(api.proc.pid)
        cpu_before = tree_cpu_s(api.proc.pid)
        clients = Clients(url, args.clients, ids, args.in_flight)
        ready = clients.until("ready", args.connect_timeout)
        connect_cpu = tree_cpu_s(api.proc.pid) - cpu_before
        time.sleep(2)  # let the connection burst settle
        connected_rss = tree_rss_mb(api.proc.pid)
        latency = submit_latency(url, args.seconds)
        with PeakRss(api.proc.pid) as peak:
            cpu_before = tree_cpu_s(api.proc.pid)
            started = time.monotonic()
            services.append(start_celery(env, "bench-p5-worker"))
            clients.until("done", args.timeout)
            fanout_s = time.monotonic() - started
            time.sleep(0.5)  # stragglers after a final event would show up as gaps or extra seqs
            api_cpu = tree_cpu_s(api.proc.pid) - cpu_before
            health = session.get(url + "/health", timeout=30).json()
            result = clients.report()  # the Node process then disconnects every client and exits
        clients.proc.wait(60)
        left = time.monotonic()
        requests.get(url + "/livez", timeout=120)  # a new connection: the idle keep-alive one may be closed
        answered_after_s = time.monotonic() - left
    finally:
        if clients:
            clients.stop()
        for service in services[::-1]:
            service.stop()
        server.cleanup()
    followers = result["followers"]
    done = sum(1 for follower in followers if complete(follower))
    events = sum(len(follower["events"]) for follower in followers)
    per_client_kb = (connected_rss - idle_rss) * 1024 / args.clients
    report.rows.append(Row("P5 fan-out", f"clients connected at the end, of {args.clients}", args.clients,
                           result["still_connected"], "all", result["still_connected"] == args.clients,
                           f"{ready['failed']} failed to connect, {result['disconnects']} disconnected"))
    report.rows.append(Row("P5 fan-out", f"followers with every state change, of {args.followers}", args.followers,
                           done, "all", done == args.followers, f"{events} events received by the followers"))
    report.rows.append(Row("P5 fan-out", f"API RSS MB with {args.clients} clients (peak)", round(idle_rss, 1),
                           round(peak.peak, 1), f"<= {RSS_LIMIT_MB}", peak.peak <= RSS_LIMIT_MB,
                           f"baseline: the API before the clients connected; {per_client_kb:.1f} KB per client"))
    report.rows.append(Row("P5 fan-out", f"submit p99 ms at 8 clients, {args.clients} connected", None,
                           round(latency["p99"], 2), "< 50 ms", latency["p99"] < 50 and latency["non2xx"] == 0,
                           f"p50 {latency['p50']:.2f} ms, {latency['rate']:.0f} req/s"))
    report.rows.append(Row("P5 fan-out", "API CPU ms per delivered event", None,
                           round(api_cpu * 1000 / max(events, 1), 3), "report", None,
                           f"{api_cpu:.1f} CPU s over {fanout_s:.1f} s, idle clients' pings included"))
    report.facts.update({
        "clients": f"{args.clients} (Node {_node_version()}, socket.io-client "
                   f"{json.loads((NODE / 'node_modules/socket.io-client/package.json').read_text())['version']}, "
                   f"WebSocket transport, {args.in_flight} connecting at a time), {args.followers} following a job",
        "connect + join of all clients, s / API CPU s": f"{ready['connect_s']:.1f} / {connect_cpu:.1f}",
        "API RSS idle / connected, MB": f"{idle_rss:.1f} / {connected_rss:.1f}",
        "jobs run in s (worker start to last final event)": f"{fanout_s:.1f}",
        "Node clients: CPU s over the whole run / RSS MB": f"{result['client_cpu_s']:.1f} / "
                                                          f"{result['client_rss_mb']:.0f}",
        "API": "python -m potpie_service api (SOCKETIO_ASYNC_MODE=gevent, API_CONNECTIONS 15000)",
        "health status with every client connected": str(health.get("status")),
        "GET /livez answered s after all clients disconnected at once": f"{answered_after_s:.1f}",
    })
    return report


def _node_version() -> str:
    return subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clients", type=int, default=10000)
    parser.add_argument("--followers", type=int, default=1000)
    parser.add_argument("--in-flight", type=int, default=200, help="clients connecting at once")
    parser.add_argument("--parse-seconds", type=float, default=1.0)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of the submit-latency round")
    parser.add_argument("--connect-timeout", type=float, default=150.0)
    parser.add_argument("--timeout", type=float, default=120.0)


if __name__ == "__main__":
    cli("p5_fanout", run, _configure)
