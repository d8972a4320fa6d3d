"""Soak test of the Socket.IO side: ~200 connected clients with churn, jobs submitted and followed for minutes.

Starts its own Redis, simulator (in-process), worker and API, then records errors, events received against
events expected, and the API's RSS and thread count over time (from /proc). Run:
`.venv/bin/python bench/soak_socketio.py --duration 180 --clients 200` (see --help).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import socketio

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from potpie_service.potpie.simulator import Simulator, SimulatorConfig  # noqa: E402
from tests.stack import RedisServer, Service, free_port, service_env, start_worker, wait_for  # noqa: E402

FINALS = ("analysis_complete", "analysis_error")


@dataclass
class Follow:
    """One client's view of one job."""

    seqs: set[int] = field(default_factory=set)
    final: str | None = None
    raw_finals: int = 0
    interrupted: bool = False  # the client was churned while the job ran: gaps are expected, the final is not
    joined_at_seq: int | None = None  # the lowest seq a join's ack gave (no ack: counted from 0, shows as a gap)


class Errors(Counter):
    """Error counts by kind, safe to bump from any thread."""

    lock = threading.Lock()

    def bump(self, kind: str) -> None:
        with self.lock:
            self[kind] += 1


class Follower:
    """A python-socketio client that follows the jobs given to it, re-joining them on every connect."""

    def __init__(self, url: str, errors: Errors) -> None:
        self.url, self.errors = url, errors
        self.sio = socketio.Client(reconnection=True, reconnection_delay=0.2, reconnection_delay_max=1)
        self.follows: dict[str, Follow] = {}
        self.open: set[str] = set()
        self.lock = threading.Lock()
        self.churning = threading.Event()
        self.sio.on("connect", self._rejoin)
        for name in ("status_update", *FINALS):
            self.sio.on(name, lambda payload, name=name: self._record(name, payload))

    def connect(self) -> None:
        try:
            self.sio.connect(self.url, transports=["websocket"], wait_timeout=10)
        except socketio.exceptions.ConnectionError:
            self.errors.bump("socket connect failed")

    def _ack(self, ack: Any) -> None:
        if not (isinstance(ack, dict) and ack.get("ok")):
            self.errors.bump(f"join refused: {ack}")
            return
        with self.lock:  # the earliest join's seq starts what this follow must receive (acks may come swapped)
            follow = self.follows.get(ack["project_id"])
            if follow is not None:
                follow.joined_at_seq = min(ack["seq"], follow.joined_at_seq if follow.joined_at_seq is not None
                                           else ack["seq"])

    def _rejoin(self) -> None:
        with self.lock:
            jobs = list(self.open)
        for job_id in jobs:
            self.sio.emit("join_project", job_id, callback=self._ack)

    def follow(self, job_id: str) -> None:
        with self.lock:
            self.follows[job_id] = Follow()
            self.open.add(job_id)
        if self.sio.connected:
            self.sio.emit("join_project", job_id, callback=self._ack)

    def _record(self, name: str, payload: dict[str, Any]) -> None:
        with self.lock:
            follow = self.follows.get(payload.get("project_id", ""))
            if follow is None:
                return
            follow.seqs.add(payload["seq"])
            if name in FINALS:
                follow.raw_finals += 1
                follow.final = name
                self.open.discard(payload["project_id"])

    def churn(self, away: float) -> None:
        """Drop the connection, stay away a moment, come back (and re-join)."""
        with self.lock:
            for job_id in self.open:
                self.follows[job_id].interrupted = True
        self.sio.disconnect()
        time.sleep(away)
        self.connect()
        self.churning.clear()


def proc_stats(pid: int) -> tuple[float, int]:
    """(RSS in MB, thread count) of one process, from /proc."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["Threads"])


def api_worker_pid(master: int) -> int:
    """The gunicorn worker process under the API's master."""
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return int(children[0])


def start_api(env: dict[str, str], threads: int | None) -> Service:
    port = free_port()
    args = [sys.executable, "-m", "potpie_service", "api", *(["--threads", str(threads)] if threads else [])]
    api = Service("soak-api", args, {**env, "PORT": str(port), "HOST": "127.0.0.1"}).start()
    api.url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
    wait_for(lambda: requests.get(api.url + "/livez", timeout=1).ok, 30, what="the API")  # type: ignore[attr-defined]
    return api


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start the stack, soak it, return the measurements."""
    redis_server = RedisServer().start()
    sim = Simulator(SimulatorConfig(api_key="sk-simulator", parse_seconds=args.parse_seconds))
    sim.start()
    env = service_env(redis_server.url, sim.url, QUEUE_NAME="soak", MAX_CONCURRENT_JOBS="50", LOG_LEVEL="warning",
                      DEDUP_ENABLED="false", RATE_LIMIT="100000/minute", POTPIE_RATE_LIMIT="0")
    worker = start_worker(env, "soak-worker", concurrency=args.worker_concurrency)
    api = start_api(env, args.api_threads)
    url = api.url  # type: ignore[attr-defined]
    errors, samples, jobs, latencies = Errors(), [], {}, []
    followers = [Follower(url, errors) for _ in range(args.clients)]
    try:
        for follower in followers:
            follower.connect()
        pid = api_worker_pid(api.proc.pid)  # type: ignore[union-attr]
        stop = threading.Event()
        http = requests.Session()

        def sample() -> None:
            started = time.monotonic()
            while True:
                rss, threads = proc_stats(pid)
                try:
                    sockets = requests.get(url + "/health", timeout=10).json().get("websocket_connections")
                except (requests.RequestException, ValueError):
                    errors.bump("health request failed")
                    sockets = None
                samples.append({"t": round(time.monotonic() - started), "rss_mb": round(rss, 1), "threads": threads,
                                "sockets": sockets, "jobs": len(jobs)})
                if stop.wait(args.sample_every):
                    return

        def churn() -> None:
            while not stop.wait(1.0):
                idle = [f for f in followers if not f.churning.is_set()]
                for follower in random.sample(idle, min(args.churn_per_s, len(idle))):
                    follower.churning.set()
                    threading.Thread(target=follower.churn, args=(random.uniform(0.1, 1.5),), daemon=True).start()

        threads = [threading.Thread(target=sample, daemon=True), threading.Thread(target=churn, daemon=True)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + args.duration
        while time.monotonic() < deadline:
            if args.no_jobs:
                time.sleep(0.5)
                continue
            failing = random.random() < args.failing_share
            repo = f"{'parse-error' if failing else 'octocat'}/soak-{uuid.uuid4().hex[:10]}"
            try:
                sent = time.perf_counter()
                response = http.post(url + "/analyze", json={"repo": repo}, timeout=10)
                latencies.append(time.perf_counter() - sent)
            except requests.RequestException as exc:
                errors.bump(f"submit {type(exc).__name__}")
                continue
            if response.status_code != 202:
                errors.bump(f"submit HTTP {response.status_code}")
                continue
            job_id = response.json()["job_id"]
            jobs[job_id] = "analysis_error" if failing else "analysis_complete"
            for follower in random.sample(followers, args.followers_per_job):
                follower.follow(job_id)
            time.sleep(args.submit_every)
        stop.set()
        done = lambda: all(f.final for c in followers for j, f in c.follows.items())  # noqa: E731
        try:
            wait_for(done, args.drain, interval=0.5, what="every follower to get its final event")
        except AssertionError:
            errors.bump("drain timed out")
        for thread in threads:
            thread.join(args.sample_every + 11)
        result = summarize(args, jobs, followers, errors, samples, http, url)
        ordered = sorted(latencies) or [0.0]
        result["submit_latency_ms_p50_p99_max"] = [round(1000 * ordered[int(q * (len(ordered) - 1))], 1)
                                                   for q in (0.5, 0.99, 1.0)]
        return result
    finally:
        for follower in followers:
            follower.sio.shutdown()
        api.stop()
        worker.stop()
        sim.stop()
        redis_server.cleanup()


def summarize(args: argparse.Namespace, jobs: dict[str, str], followers: list[Follower], errors: Errors,
              samples: list[dict[str, Any]], http: requests.Session, url: str) -> dict[str, Any]:
    """The figures the report needs."""
    statuses = Counter(http.get(f"{url}/status/{job_id}", timeout=10).json().get("status") for job_id in jobs)
    pairs = [(job_id, follow) for c in followers for job_id, follow in c.follows.items()]
    wrong_final = sum(1 for job_id, f in pairs if f.final and f.final != jobs[job_id])
    missing_final = sum(1 for _, f in pairs if not f.final)
    steady = [f for _, f in pairs if not f.interrupted and f.seqs]
    # from the seq the join answered with to the final event's (a missing final is counted above)
    expected = sum(max(f.seqs) - (f.joined_at_seq if f.joined_at_seq is not None else 0) + 1 for f in steady)
    received = sum(len({seq for seq in f.seqs if seq >= (f.joined_at_seq or 0)}) for f in steady)
    return {
        "duration_s": args.duration, "clients": args.clients, "churn_per_s": args.churn_per_s,
        "api_threads": args.api_threads or "default", "jobs_submitted": len(jobs), "job_statuses": dict(statuses),
        "follows": len(pairs), "follows_interrupted_by_churn": len(pairs) - len(steady),
        "final_events_missing": missing_final, "final_events_wrong": wrong_final,
        "raw_duplicate_finals": sum(max(0, f.raw_finals - 1) for _, f in pairs),
        "events_expected_uninterrupted": expected, "events_received_uninterrupted": received,
        "api_rss_second_half_mb": second_half(samples), "errors": dict(errors), "samples": samples,
    }


def second_half(samples: list[dict[str, Any]]) -> dict[str, float]:
    """The API's RSS over the second half of the run: where it started and ended, its low and its high (flat when
    end - start is within noise and no high runs away)."""
    half = [row["rss_mb"] for row in samples[len(samples) // 2:]] or [0.0]
    return {"start": half[0], "end": half[-1], "min": min(half), "max": max(half)}


def print_table(result: dict[str, Any]) -> None:
    samples = result["samples"]
    print(f"{'t (s)':>6} {'RSS MB':>8} {'threads':>8} {'sockets':>8} {'jobs':>6}")
    step = max(1, len(samples) // 12)
    for row in samples[::step] + ([samples[-1]] if (len(samples) - 1) % step else []):
        print(f"{row['t']:>6} {row['rss_mb']:>8} {row['threads']:>8} {row['sockets']!s:>8} {row['jobs']:>6}")
    for key, value in result.items():
        if key != "samples":
            print(f"{key:>32}: {value}")
    first, last = samples[0], samples[-1]
    print(f"{'API RSS start/end (MB)':>32}: {first['rss_mb']} / {last['rss_mb']}")
    print(f"{'API threads start/end':>32}: {first['threads']} / {last['threads']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of load (default 180)")
    parser.add_argument("--clients", type=int, default=200, help="Socket.IO clients kept connected")
    parser.add_argument("--churn-per-s", type=int, default=3, help="clients dropped and reconnected each second")
    parser.add_argument("--submit-every", type=float, default=0.25, help="seconds between job submissions")
    parser.add_argument("--followers-per-job", type=int, default=3, help="clients that join each job's room")
    parser.add_argument("--failing-share", type=float, default=0.1, help="share of jobs that fail (parse-error)")
    parser.add_argument("--parse-seconds", type=float, default=0.6, help="simulated parse time")
    parser.add_argument("--worker-concurrency", type=int, default=None,
                        help="worker pool size (default: the deployed WORKER_CONCURRENCY; on the gevent pool every job "
                             "waiting for Potpie holds one, so a small pool cannot keep up with the submissions)")
    parser.add_argument("--api-threads", type=int, default=None, help="gunicorn threads (default: the service's)")
    parser.add_argument("--no-jobs", action="store_true", help="only connections and churn (isolates leaks)")
    parser.add_argument("--sample-every", type=float, default=5.0)
    parser.add_argument("--drain", type=float, default=60.0, help="seconds to wait for the last final events")
    parser.add_argument("--out", help="also write the result as JSON here")
    args = parser.parse_args()
    result = run(args)
    print_table(result)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    bad = result["errors"] or result["final_events_missing"] or result["final_events_wrong"]
    return 1 if bad or result["events_received_uninterrupted"] != result["events_expected_uninterrupted"] else 0


if __name__ == "__main__":
    sys.exit(main())
