"""P4 waiting capacity: 1,000 jobs whose parse takes 20 s, MAX_CONCURRENT_JOBS=1000, one worker host.

Targets: every job finished within 30 s of the first submission; peak RSS of the worker's whole process tree
<= 500 MB. Reported with it: what one waiting job costs (worker RSS, Redis memory, worker CPU). The baseline
column holds the floor: the parse time itself, and the worker tree's RSS before any job.
"""

from __future__ import annotations

import argparse
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import redis
import requests

from .common import (PeakRss, RedisServer, Report, Row, Service, bench_env, cli, start_api, start_celery,
                     start_simulator, tree_cpu_s, tree_rss_mb, wait_for)

PARSE_SECONDS = 20.0


def run(args: argparse.Namespace) -> Report:
    """Submit `jobs` at once, wait for all to end, sample the worker tree's RSS throughout."""
    config = f"{args.workers} x {args.pool} {args.concurrency}"
    report = Report(f"P4 waiting capacity ({config})")
    server = RedisServer().start()
    services: list[Service] = []
    queue = f"bench-p4-{uuid.uuid4().hex[:6]}"
    client = redis.Redis.from_url(server.url, decode_responses=True)
    prefix = f"psvc:{queue}:"
    try:
        sim = start_simulator(parse_seconds=PARSE_SECONDS)
        services.append(sim)
        env = bench_env(server.url, sim.url, queue, MAX_CONCURRENT_JOBS=str(args.jobs), RATE_LIMIT="off",
                        POTPIE_POLL_INTERVAL=str(args.poll), LOG_LEVEL=args.log_level)
        workers = [start_celery(env, f"bench-p4-worker{i}", pool=args.pool, concurrency=args.concurrency)
                   for i in range(args.workers)]
        services += workers
        roots = [worker.proc.pid for worker in workers]
        api = start_api(env, "bench-p4-api")
        services.append(api)
        time.sleep(1)
        idle_rss, redis_before = tree_rss_mb(roots), int(client.info("memory")["used_memory"])
        cpu_before = tree_cpu_s(roots)
        local = threading.local()

        def submit(i: int) -> str:
            if not hasattr(local, "session"):
                local.session = requests.Session()
            response = local.session.post(api.url + "/analyze", json={"repo": f"octocat/w{i}-{uuid.uuid4().hex[:6]}"},
                                          timeout=30)
            assert response.status_code == 202, response.text
            return response.json()["job_id"]

        with PeakRss(roots, 0.2) as peak:
            started = time.time()
            with ThreadPoolExecutor(8) as pool:
                ids = list(pool.map(submit, range(args.jobs)))
            submitted = time.time() - started
            time.sleep(PARSE_SECONDS / 2)
            waiting_rss = tree_rss_mb(roots)
            redis_waiting = int(client.info("memory")["used_memory"])
            active = client.zcard(prefix + "active")

            def ended() -> bool:
                pipe = client.pipeline(transaction=False)
                for name in ("finished", "failed", "cancelled"):
                    pipe.zcard(prefix + name)
                return sum(pipe.execute()) >= args.jobs

            wait_for(ended, args.timeout, interval=0.2, what="all P4 jobs to end")
        cpu_used = tree_cpu_s(roots) - cpu_before
        pipe = client.pipeline(transaction=False)
        for job_id in ids:
            pipe.hmget(prefix + "job:" + job_id, ["status", "created_ts", "emitted_at"])
        records = pipe.execute()
    finally:
        for service in services[::-1]:
            service.stop()
        server.cleanup()
    finished = sum(1 for r in records if r[0] == "finished")
    makespan = max(float(r[2]) for r in records) - started
    longest = max(float(r[2]) - float(r[1]) for r in records)
    report.rows.append(Row(report.name, f"{args.jobs} jobs, 20 s parse: all finished after s",
                           PARSE_SECONDS, round(makespan, 1), "<= 30 s", makespan <= 30 and finished == args.jobs,
                           f"{finished}/{args.jobs} finished; longest job {longest:.1f} s"))
    report.rows.append(Row(report.name, "peak worker RSS MB (process tree)", round(idle_rss, 1),
                           round(peak.peak, 1), "<= 500 MB", peak.peak <= 500,
                           f"{args.workers} x {args.pool} pool, concurrency {args.concurrency}; baseline: idle"))
    report.facts.update({
        "per waiting job: worker RSS KB": f"{(waiting_rss - idle_rss) * 1024 / args.jobs:.1f}",
        "per waiting job: Redis memory KB": f"{(redis_waiting - redis_before) / 1024 / args.jobs:.1f}",
        "per job: worker CPU ms (whole life, 20 s of polls included)": f"{cpu_used * 1000 / args.jobs:.1f}",
        "active jobs while waiting / submitted in s": f"{active} / {submitted:.1f}",
        "POTPIE_POLL_INTERVAL s": f"{args.poll:g}",
    })
    return report


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--poll", type=float, default=5.0, help="POTPIE_POLL_INTERVAL (the production default: 5)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes on the one host")
    parser.add_argument("--pool", default="prefork")
    parser.add_argument("--concurrency", type=int, default=4, help="the deployed default is 4")
    parser.add_argument("--timeout", type=float, default=75.0)
    parser.add_argument("--log-level", default="info")


if __name__ == "__main__":
    cli("p4_waiting", run, _configure)
