"""P3 job overhead: jobs/s end to end and the service's own time per job, against a bare Celery chain.

The simulator answers at once (parse_seconds 0). A job is 6 steps (parse, poll after POTPIE_POLL_INTERVAL,
conversation, question, structured question, finish) and 5 Potpie calls; the baseline chain (bench.chain_app)
makes the same calls as 6 chained tasks. Own time = total - time inside Potpie calls - the poll interval.
Ours runs the deployed worker plus a probe that sums Potpie time per job (bench.probe_worker).
"""

from __future__ import annotations

import argparse
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import redis
import requests

from . import chain_app
from .chain_app import RESULTS
from .common import (DEPLOYED, PROBE, RedisServer, Report, Row, Service, bench_env, cli, pct, start_api, start_celery,
                     start_simulator, tree_cpu_s, wait_for)

POLL = 0.05


class Ours:
    """Submits jobs through the API and reads their timings from the job store and the probe."""

    def __init__(self, api_url: str, client: redis.Redis, queue: str) -> None:
        self.url, self.redis, self.prefix = api_url, client, f"psvc:{queue}:"
        self.session = requests.Session()

    def submit(self, repo: str, session: requests.Session | None = None) -> str:
        response = (session or self.session).post(self.url + "/analyze", json={"repo": repo}, timeout=10)
        assert response.status_code == 202, response.text
        return response.json()["job_id"]

    def ended(self) -> int:
        pipe = self.redis.pipeline(transaction=False)
        for name in ("finished", "failed", "cancelled"):
            pipe.zcard(self.prefix + name)
        return sum(pipe.execute())

    def timings(self, ids: list[str]) -> list[tuple[float, float, float, str]]:
        """(created, ended, potpie seconds, status) per job."""
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hmget(self.prefix + "job:" + job_id, ["created_ts", "emitted_at", "status"])
            pipe.hget(PROBE + job_id, "potpie")
        replies = pipe.execute()
        return [(float(r[0]), float(r[1]), float(p or 0), r[2]) for r, p in zip(replies[::2], replies[1::2])]


def _sequential(submit: Callable[[], str], done: Callable[[str], bool], count: int) -> list[str]:
    ids = []
    for _ in range(count):
        job = submit()
        wait_for(lambda: done(job), 20, interval=0.003, what="a job to end")
        ids.append(job)
    return ids


def run(args: argparse.Namespace) -> Report:
    """Sequential jobs for own time, then a burst for throughput, ours and the baseline, same Redis and simulator."""
    pool, concurrency = args.pool or DEPLOYED.worker_pool, args.concurrency or DEPLOYED.worker_concurrency
    config = f"{args.workers} x {pool} {concurrency}" + ("" if args.pool or args.concurrency else ", as deployed")
    report = Report(f"P3 job overhead ({config})")
    server, sim = RedisServer().start(), start_simulator(parse_seconds=0)
    services: list[Service] = [sim]
    queue = f"bench-p3-{uuid.uuid4().hex[:6]}"
    env = bench_env(server.url, sim.url, queue, MAX_CONCURRENT_JOBS="100000", POTPIE_POLL_INTERVAL=str(POLL),
                    RATE_LIMIT="off", LOG_LEVEL=args.log_level)
    chain_env = {**os.environ, "BENCH_REDIS_URL": server.url, "BENCH_QUEUE": queue + "-chain",
                 "BENCH_POTPIE_URL": sim.url}
    os.environ.update({k: chain_env[k] for k in ("BENCH_REDIS_URL", "BENCH_QUEUE", "BENCH_POTPIE_URL")})
    client = redis.Redis.from_url(server.url, decode_responses=True)
    try:
        services.append(start_api(env, "bench-p3-api"))
        workers = [start_celery(env, f"bench-p3-worker{i}", "bench.probe_worker", args.pool, args.concurrency)
                   for i in range(args.workers)]
        # the baseline: a bare chain as Celery runs by default (prefork 4), unless a pool is named for both
        chain_workers = [start_celery(chain_env, f"bench-p3-chain{i}", "bench.chain_app", args.pool or "prefork",
                                      args.concurrency or 4,
                                      queues=queue + "-chain", heartbeat=False) for i in range(args.workers)]
        services += [*workers, *chain_workers]
        roots = [w.proc.pid for w in workers]
        ours = Ours(services[1].url, client, queue)
        chain_app.app.conf.broker_url = server.url  # the producer side of the baseline, on the same Redis
        chain_app.QUEUE = queue + "-chain"

        def chain_job() -> str:
            job = uuid.uuid4().hex
            chain_app.submit(job, f"octocat/c{job[:12]}", POLL)
            return job

        def chain_done(job: str) -> bool:
            return client.exists(RESULTS + job) == 1

        def our_done(job: str) -> bool:
            return client.hget(ours.prefix + "job:" + job, "status") in ("finished", "failed")

        _sequential(lambda: ours.submit(f"octocat/w{uuid.uuid4().hex[:12]}"), our_done, 5)  # warm-up
        _sequential(chain_job, chain_done, 5)
        own, base_own, potpie, base_potpie = [], [], [], []
        for _ in range(args.rounds):
            ids = _sequential(lambda: ours.submit(f"octocat/s{uuid.uuid4().hex[:12]}"), our_done, args.sequential)
            for created, ended, spent, status in ours.timings(ids):
                assert status == "finished", status
                own.append((ended - created - spent - POLL) * 1000)
                potpie.append(spent * 1000)
            chain_ids = _sequential(chain_job, chain_done, args.sequential)
            for job in chain_ids:
                total, spent = (float(v) for v in client.hmget(RESULTS + job, ["total", "potpie"]))
                base_own.append((total - spent - POLL) * 1000)
                base_potpie.append(spent * 1000)

        # Throughput: a burst of N jobs each, ours through the API (8 submitting clients), the baseline direct.
        cpu = {"worker": tree_cpu_s(roots), "api": tree_cpu_s(services[1].proc.pid),
               "simulator": tree_cpu_s(sim.proc.pid)}
        ended_before, started = ours.ended(), time.time()
        local = threading.local()

        def submit_one(i: int) -> str:
            if not hasattr(local, "session"):
                local.session = requests.Session()
            return ours.submit(f"octocat/t{i}-{uuid.uuid4().hex[:8]}", local.session)

        with ThreadPoolExecutor(8) as submitters:
            burst = list(submitters.map(submit_one, range(args.jobs)))
        submitted_in = time.time() - started
        wait_for(lambda: ours.ended() - ended_before >= args.jobs, 120, interval=0.05, what="the burst to end")
        timings = ours.timings(burst)
        our_rate = args.jobs / (max(t[1] for t in timings) - started)
        failed = sum(1 for t in timings if t[3] != "finished")
        used = {name: tree_cpu_s(pids) - cpu[name]
                for name, pids in (("worker", roots), ("api", services[1].proc.pid), ("simulator", sim.proc.pid))}
        used_wall = max(t[1] for t in timings) - started
        burst_own = [(t[1] - t[0] - t[2] - POLL) * 1000 for t in timings]

        done_before, started = int(client.get(RESULTS + "done") or 0), time.time()
        chain_burst = [chain_job() for _ in range(args.jobs)]
        wait_for(lambda: int(client.get(RESULTS + "done") or 0) - done_before >= args.jobs, 120, interval=0.05,
                 what="the baseline burst to end")
        ends = [float(v) for v in (client.hget(RESULTS + job, "done") for job in chain_burst)]
        base_rate = args.jobs / (max(ends) - started)
    finally:
        for service in services[::-1]:
            service.stop()
        server.cleanup()
    report.rows.append(Row(report.name, f"jobs/s end to end, burst of {args.jobs}", round(base_rate, 1),
                           round(our_rate, 1), ">= 100 jobs/s", our_rate >= 100 and failed == 0,
                           f"{args.workers} x {pool} pool, concurrency {concurrency}; baseline: "
                           f"{args.pool or 'prefork'} {args.concurrency or 4}"))
    report.rows.append(Row(report.name, "own time per job p50 ms (one job at a time)", round(pct(base_own, 50), 2),
                           round(pct(own, 50), 2), "<= 30 ms", pct(own, 50) <= 30,
                           f"p99 ours {pct(own, 99):.1f} / baseline {pct(base_own, 99):.1f} ms"))
    report.facts.update({
        "jobs per sequential sample": f"{args.sequential} x {args.rounds} rounds",
        "time inside Potpie calls per job p50 ms (ours / baseline)": f"{pct(potpie, 50):.2f} / "
                                                                      f"{pct(base_potpie, 50):.2f}",
        "own time per job during the burst p50 / p99 ms (queueing included)": f"{pct(burst_own, 50):.0f} / "
                                                                              f"{pct(burst_own, 99):.0f}",
        "burst: submitted in s / failed jobs": f"{submitted_in:.2f} / {failed}",
        "CPU during our burst (cores: worker tree, API, simulator)":
            ", ".join(f"{name} {seconds / used_wall:.2f}" for name, seconds in used.items()),
        "CPU per job (ms: worker tree, API, simulator)":
            ", ".join(f"{name} {seconds / args.jobs * 1000:.1f}" for name, seconds in used.items()),
    })
    return report


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--jobs", type=int, default=600, help="jobs in the throughput burst")
    parser.add_argument("--sequential", type=int, default=20, help="one-at-a-time jobs per round (own time)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1, help="worker processes on the one host")
    parser.add_argument("--pool", default=None, help="worker pool (default: as deployed, WORKER_POOL's default)")
    parser.add_argument("--concurrency", type=int, default=None, help="default: as deployed (WORKER_CONCURRENCY)")
    parser.add_argument("--log-level", default="info")


if __name__ == "__main__":
    cli("p3_overhead", run, _configure)
