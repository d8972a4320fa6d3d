"""P7 Potpie calls per job: 100 jobs over 10 repositories (a different question each), against the simulator
answering as Potpie's server code does (only `submitted` until `ready`, a second `/parse` of a running parse
queues it again, agent replies that take time).

What Potpie pays for: parses started (the floor is one per repository, the baseline column), and per job the
polls, agent messages and all calls. A parse is shared by the jobs that need the same project
(store/flights.py), and one poll of it serves them all.
"""

from __future__ import annotations

import argparse
import time
import uuid
from collections import Counter

import redis
import requests

from .common import (RedisServer, Report, Row, Service, bench_env, cli, start_api, start_celery, start_simulator,
                     tree_cpu_s, wait_for)


def run(args: argparse.Namespace) -> Report:
    """Submit the jobs in a burst, wait for every one to end, read the simulator's counters and each job's own."""
    report = Report(f"P7 Potpie calls per job ({args.jobs} jobs over {args.repos} repositories; a "
                    f"{args.parse_seconds:g} s parse, {args.message_seconds:g} s replies, Potpie answering after "
                    f"{args.latency_ms:g} ms)")
    server = RedisServer().start()
    services: list[Service] = []
    queue = f"bench-p7-{uuid.uuid4().hex[:6]}"
    client = redis.Redis.from_url(server.url, decode_responses=True)
    try:
        sim = start_simulator(parse_seconds=args.parse_seconds, latency_ms=args.latency_ms,
                              message_seconds=args.message_seconds)
        services.append(sim)
        env = bench_env(server.url, sim.url, queue, MAX_CONCURRENT_JOBS=str(args.jobs), RATE_LIMIT="off",
                        POTPIE_POLL_INTERVAL=str(args.poll), DEDUP_ENABLED="false")
        worker = start_celery(env, "bench-p7-worker")
        api = start_api(env, "bench-p7-api")
        services += [worker, api]
        requests.post(sim.url + "/_sim/reset", timeout=5)
        cpu_before = tree_cpu_s(worker.proc.pid)
        tag = uuid.uuid4().hex[:6]
        repos = [f"octocat/calls-{tag}-{i % args.repos}" for i in range(args.jobs)]
        started = time.time()
        session = requests.Session()
        ids = []
        for i, repo in enumerate(repos):
            answer = session.post(api.url + "/analyze", json={"repo": repo, "question": f"Question {i}?"}, timeout=30)
            assert answer.status_code == 202, answer.text
            ids.append(answer.json()["job_id"])

        def ended() -> bool:
            return sum(client.zcard(f"psvc:{queue}:{state}") for state in ("finished", "failed")) >= args.jobs

        wait_for(ended, args.timeout, interval=0.2, what="all P7 jobs to end")
        wall = time.time() - started
        worker_cpu = tree_cpu_s(worker.proc.pid) - cpu_before
        stats = requests.get(sim.url + "/_sim/stats", timeout=5).json()
        finals = [session.get(f"{api.url}/status/{job_id}", timeout=10).json() for job_id in ids]
    finally:
        for service in services[::-1]:
            service.stop()
        server.cleanup()
    finished = sum(1 for final in finals if final["status"] == "finished")
    parses = sum(stats["parses_started"].values())
    counted = stats["requests"]
    polls = counted["GET /parsing-status"] + counted["POST /parsing-status"] + counted["GET /projects/list"]
    reported: Counter[str] = Counter()  # what the jobs themselves report (potpie_calls in /status)
    for final in finals:
        reported.update(final.get("potpie_calls") or {})
    report.rows.append(Row(report.name, "parses Potpie started", args.repos, parses, f"= {args.repos} (one per repo)",
                           parses == args.repos and finished == args.jobs,
                           f"{finished}/{args.jobs} finished in {wall:.1f} s; /parse requests "
                           f"{counted['POST /parse']}; projects {stats['projects']}"))
    report.rows.append(Row(report.name, "polls per job", None, round(polls / args.jobs, 2), "-", None,
                           f"POTPIE_POLL_INTERVAL {args.poll:g} s; of them GET /parsing-status (re-queues long "
                           f"parses) {counted['GET /parsing-status']}"))
    report.rows.append(Row(report.name, "agent messages per job", 2, round(counted["POST /message"] / args.jobs, 2),
                           "= 2", counted["POST /message"] == 2 * args.jobs))
    report.rows.append(Row(report.name, "Potpie calls per job (all)", None,
                           round(sum(counted.values()) / args.jobs, 2), "-", None,
                           "the simulator's count; the jobs' own potpie_calls add up to "
                           f"{sum(reported.values()) / args.jobs:.2f}"))
    report.facts.update({
        "the simulator counted, all jobs": ", ".join(f"{k} {v}" for k, v in sorted(counted.items()) if v),
        "worker CPU per job, ms": f"{worker_cpu * 1000 / args.jobs:.1f}",
    })
    return report


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--repos", type=int, default=10)
    parser.add_argument("--parse-seconds", type=float, default=20.0)
    parser.add_argument("--message-seconds", type=float, default=2.0)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--poll", type=float, default=5.0, help="POTPIE_POLL_INTERVAL (the production default: 5)")
    parser.add_argument("--timeout", type=float, default=120.0)


if __name__ == "__main__":
    cli("p7_potpie_calls", run, configure)
