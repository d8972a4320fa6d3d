"""P4 waiting capacity: 1,000 jobs whose parse takes 20 s, MAX_CONCURRENT_JOBS=1000, one worker host.

P4 (instant Potpie) and P4wan (`--latency-ms 100 --poll 2`: every Potpie call answered after 100 ms, as a
WAN-distant Potpie). Targets: every job finished within 30 s of the last submission; peak RSS of the worker's
whole process tree <= 500 MB. Reported with it: Potpie calls in flight at the peak, CPU per call, what one
waiting job costs. The baseline column holds the floor: the Potpie time of one job (its parse, and its agent
replies when they take time), and the worker tree's idle RSS. bench.p6_slow_agents runs the same with slow
agent replies.
"""

from __future__ import annotations

import argparse
import time
import uuid
from datetime import datetime

import redis
import requests

from .common import (DEPLOYED, PeakRss, RedisServer, Report, Row, Service, bench_env, cli, start_api, start_celery,
                     start_simulator, submit_all, tree_cpu_s, tree_rss_mb, wait_for)



def _ts(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def run(args: argparse.Namespace) -> Report:
    """Submit `jobs` at once, wait for all to end, sample the worker tree's RSS throughout."""
    pool, concurrency = args.pool or DEPLOYED.worker_pool, args.concurrency or DEPLOYED.worker_concurrency
    config = f"{args.workers} x {pool} {concurrency}" + ("" if args.pool or args.concurrency else ", as deployed")
    name = args.name or ("P4wan" if args.latency_ms else "P4")
    what = "slow agents" if args.message_seconds else "waiting capacity"
    report = Report(f"{name} {what} ({config}; Potpie answers after {args.latency_ms:g} ms, agent replies take "
                    f"{args.message_seconds:g} s)")
    floor = args.parse_seconds + 2 * args.message_seconds
    server = RedisServer().start()
    services: list[Service] = []
    queue = f"bench-p4-{uuid.uuid4().hex[:6]}"
    client = redis.Redis.from_url(server.url, decode_responses=True)
    prefix = f"psvc:{queue}:"
    try:
        sim = start_simulator(parse_seconds=args.parse_seconds, latency_ms=args.latency_ms,
                              message_seconds=args.message_seconds)
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
        cpu_before = {"worker": tree_cpu_s(roots), "simulator": tree_cpu_s(sim.proc.pid),
                      "api": tree_cpu_s(api.proc.pid)}
        requests.post(sim.url + "/_sim/reset", timeout=5)

        with PeakRss(roots, 0.2) as peak:
            started = time.time()
            ids = submit_all(api.url, [f"octocat/w{i}-{uuid.uuid4().hex[:6]}" for i in range(args.jobs)])
            last_submit = time.time()
            time.sleep(args.parse_seconds / 2)
            waiting_rss = tree_rss_mb(roots)
            redis_waiting = int(client.info("memory")["used_memory"])
            active = client.zcard(prefix + "active")

            def ended() -> bool:
                pipe = client.pipeline(transaction=False)
                for state in ("finished", "failed", "cancelled"):
                    pipe.zcard(prefix + state)
                return sum(pipe.execute()) >= args.jobs

            wait_for(ended, args.timeout, interval=0.2, what="all P4 jobs to end")
        used = {"worker": tree_cpu_s(roots) - cpu_before["worker"],
                "simulator": tree_cpu_s(sim.proc.pid) - cpu_before["simulator"],
                "api": tree_cpu_s(api.proc.pid) - cpu_before["api"]}
        stats = requests.get(sim.url + "/_sim/stats", timeout=5).json()
        pipe = client.pipeline(transaction=False)
        for job_id in ids:
            pipe.hmget(prefix + "job:" + job_id,
                       ["status", "created_ts", "emitted_at", "parse_started_at", "parsed_at"])
        records = pipe.execute()
    finally:
        for service in services[::-1]:
            service.stop()
        server.cleanup()
    finished = sum(1 for r in records if r[0] == "finished")
    last_end = max(float(r[2]) for r in records)
    after_last = last_end - last_submit
    calls = sum(stats["requests"].values())
    start_lag = sorted(float(r[3]) - float(r[1]) for r in records if r[3])
    finish = sorted(float(r[2]) - _ts(r[4]) for r in records if r[4])
    wall = last_end - started
    report.rows.append(Row(report.name, f"{args.jobs} jobs, {args.parse_seconds:g} s parse"
                           + (f", 2 x {args.message_seconds:g} s replies" if args.message_seconds else "")
                           + ": all finished, s after the last submit", floor, round(after_last, 1),
                           f"<= {args.target:g} s", after_last <= args.target and finished == args.jobs,
                           f"{finished}/{args.jobs} finished; submitted in {last_submit - started:.1f} s; "
                           f"the last ended {wall:.1f} s after the first submit"))
    report.rows.append(Row(report.name, "peak worker RSS MB (process tree)", round(idle_rss, 1),
                           round(peak.peak, 1), "<= 500 MB", peak.peak <= 500,
                           f"{args.workers} x {pool} pool, concurrency {concurrency}; baseline: idle"))
    report.facts.update({
        "first step started after the submit, s (p50 / max)": f"{start_lag[len(start_lag) // 2]:.1f} / "
                                                               f"{start_lag[-1]:.1f}",
        "parse seen ready -> job finished, s (p50 / max)": f"{finish[len(finish) // 2]:.2f} / {finish[-1]:.2f}",
        "Potpie calls: total / in flight at the peak": f"{calls} / {stats['calls_in_flight_peak']}",
        "worker CPU per Potpie call ms (the whole step: task, store, call)": f"{used['worker'] * 1000 / calls:.2f}",
        "CPU during the run (cores: worker tree, simulator, API)":
            ", ".join(f"{key} {value / wall:.2f}" for key, value in used.items()),
        "per waiting job: worker RSS KB": f"{(waiting_rss - idle_rss) * 1024 / args.jobs:.1f}",
        "per waiting job: Redis memory KB": f"{(redis_waiting - redis_before) / 1024 / args.jobs:.1f}",
        "per job: worker CPU ms (whole life, its polls included)": f"{used['worker'] * 1000 / args.jobs:.1f}",
        "active jobs while waiting": f"{active}",
        "POTPIE_POLL_INTERVAL s": f"{args.poll:g}",
    })
    return report


def configure(parser: argparse.ArgumentParser, parse_seconds: float = 20.0, message_seconds: float = 0.0,
              target: float = 30.0, poll: float = 5.0) -> None:
    """The options; bench.p6_slow_agents sets other defaults."""
    parser.add_argument("--name", default="")
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--parse-seconds", type=float, default=parse_seconds)
    parser.add_argument("--message-seconds", type=float, default=message_seconds, help="each agent reply's time")
    parser.add_argument("--target", type=float, default=target, help="s after the last submit")
    parser.add_argument("--poll", type=float, default=poll, help="POTPIE_POLL_INTERVAL (the production default: 5)")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="Potpie answers this much later (P4wan: 100)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes on the one host")
    parser.add_argument("--pool", default=None, help="default: as deployed (WORKER_POOL)")
    parser.add_argument("--concurrency", type=int, default=None, help="default: as deployed (WORKER_CONCURRENCY)")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--log-level", default="info")


if __name__ == "__main__":
    cli("p4_waiting", run, configure)
