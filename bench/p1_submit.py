"""P1 submit: `POST /analyze` at 50 keep-alive clients (wrk) against two baselines run in the same rounds, and p99 at 8.

- against the same API process's `GET /livez` (its HTTP stack's own ceiling: gunicorn, Flask, the middleware);
- per host, as deployed (one API process per pod, two pods on two cores: 25 clients each) against a bare
  `send_task` loop of a default Celery app (same task name and arguments, same Redis).

No worker runs: every side only enqueues. MAX_CONCURRENT_JOBS is high so every submit enqueues its first step,
exactly what the baseline loop does. The loop over the service's own `make_celery` + `dispatcher` is reported too.
"""

from __future__ import annotations

import argparse
import re
import resource
import shutil
import subprocess
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import redis
from celery import Celery

from potpie_service.auth import hash_key
from potpie_service.config import Settings
from potpie_service.queue import RUN_STEP, dispatcher, make_celery

from .common import RedisServer, Report, Row, bench_env, cli, start_api, tree_cpu_s

API_KEY = "psk_bench_submit_key"


def baseline_rate(redis_url: str, queue: str, seconds: float, bare: bool = True) -> float:
    """Jobs/s of a `send_task(RUN_STEP, [job_id, 0])` loop with no consumer (bare: a default Celery app)."""
    settings = Settings.from_env({"REDIS_URL": redis_url, "QUEUE_NAME": queue})
    if bare:
        app = Celery("bare", broker=redis_url, broker_transport="kombu.transport.redis:Transport")  # kombu's own

        def dispatch(job_id: str, seq: int, _countdown: float) -> None:
            app.send_task(RUN_STEP, args=[job_id, seq], queue=queue)
    else:
        app = make_celery(settings)
        dispatch = dispatcher(app, settings)
    dispatch(uuid.uuid4().hex, 0, 0)  # connect and warm the producer pool outside the timed loop
    count, started = 0, time.perf_counter()
    deadline = started + seconds
    while time.perf_counter() < deadline:
        for _ in range(50):
            dispatch(uuid.uuid4().hex, 0, 0)
        count += 50
    return count / (time.perf_counter() - started)


def _wrk_script() -> str:
    """A wrk script posting a different repository each time (identical requests would be deduplicated)."""
    script = Path(tempfile.mkdtemp(prefix="psvc-wrk-")) / "post.lua"
    script.write_text(f"""
local threads = 0
function setup(thread) threads = threads + 1; thread:set("tid", threads) end
local counter = 0
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-API-Key"] = "{API_KEY}"
function request()
  counter = counter + 1
  local repo = "octocat/r{uuid.uuid4().hex[:8]}-" .. tid .. "-" .. counter
  local body = '{{"repo": "' .. repo .. '", "question": "What does it do?"}}'
  return wrk.format("POST", nil, nil, body)
end
""")
    return str(script)


def wrk(url: str, connections: int, seconds: float, api_pid: int) -> dict[str, float]:
    """Run wrk against POST /analyze; return rate, latency percentiles (ms), errors and CPU use of both sides."""
    threads = min(2, connections)
    cpu_before, wrk_before, started = tree_cpu_s(api_pid), _children_cpu(), time.monotonic()
    proc = subprocess.run(["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s", "--latency",
                           "-s", _wrk_script(), url + "/analyze"], capture_output=True, text=True, check=True)
    wall = time.monotonic() - started
    api_cpu = (tree_cpu_s(api_pid) - cpu_before) / wall
    out = proc.stdout
    percentiles = {}
    for label, value, unit in re.findall(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s)\s*$", out, re.M):
        percentiles[label] = float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    return {"rate": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "requests": int(re.search(r"(\d+) requests in", out).group(1)),
            "p50": percentiles.get("50", 0.0), "p99": percentiles.get("99", 0.0),
            "non2xx": int(errors.group(1)) if errors else 0,
            "socket_errors": socket_errors.group(1) if socket_errors else "",
            "api_cpu": api_cpu, "wrk_cpu": (_children_cpu() - wrk_before) / wall}


def _children_cpu() -> float:
    """CPU seconds of this process's waited-for children (wrk runs as one)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(args: argparse.Namespace) -> Report:
    """Interleaved rounds of the baselines and ours at 50 clients; then latency at 8 clients.

    Ours runs as deployed: API keys on and the rate limiter on (with a limit no client reaches, so every request
    pays for its Redis counter); as many rounds with RATE_LIMIT=off show what the limiter costs, and as many with
    ACCESS_LOG=errors what the access line costs.
    """
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed: `make bench` installs it (scripts/ensure-tool.sh)")
    report = Report("P1 submit")
    server = RedisServer().start()
    queue = f"bench-p1-{uuid.uuid4().hex[:6]}"
    common = dict(MAX_CONCURRENT_JOBS="100000", AUTH_DISABLED="false", API_KEYS=f"bench:{hash_key(API_KEY)}",
                  LOG_LEVEL=args.log_level)
    env = bench_env(server.url, "http://127.0.0.1:9", queue, RATE_LIMIT="100000000/minute", **common)
    api = start_api(env, "bench-p1-api")
    unlimited = start_api(bench_env(server.url, "http://127.0.0.1:9", queue + "-off", RATE_LIMIT="off", **common),
                          "bench-p1-api-nolimit")
    quiet = start_api(bench_env(server.url, "http://127.0.0.1:9", queue, RATE_LIMIT="100000000/minute",
                                ACCESS_LOG="errors", **common), "bench-p1-api-errors")
    second = start_api(env, "bench-p1-api2")
    client = redis.Redis.from_url(server.url, decode_responses=True)
    for name in (queue, queue + "-off"):  # as on a service that has finished jobs: ETAs have durations to use
        client.lpush(f"psvc:{name}:durations", *(30.0 + i for i in range(50)))
    try:
        for service in (api, unlimited, second, quiet):
            wrk(service.url, 50, 2, service.proc.pid)  # warm-up: threads, connection pools, Lua scripts loaded
        base_queue = queue + "-baseline"
        bases, ours, services, offs, quiets, ceilings = [], [], [], [], [], []
        for _ in range(args.rounds):
            bases.append(baseline_rate(server.url, base_queue, args.seconds))
            ceilings.append(wrk_ceiling(api.url))
            services.append(baseline_rate(server.url, base_queue, args.seconds / 2, bare=False))
            queued_before = client.llen(queue)
            result = wrk(api.url, 50, args.seconds, api.proc.pid)
            result["enqueued"] = client.llen(queue) - queued_before
            ours.append(result)
            offs.append(wrk(unlimited.url, 50, args.seconds, unlimited.proc.pid)["rate"])
            quiets.append(wrk(quiet.url, 50, args.seconds, quiet.proc.pid)["rate"])
        with ThreadPoolExecutor(2) as pool:  # the same 50 clients split over two API processes
            pair = list(pool.map(lambda s: wrk(s.url, 25, args.seconds, s.proc.pid), (api, second)))
        best = max(ours, key=lambda r: r["rate"])
        lost = sum(r["requests"] - r["enqueued"] for r in ours if r["enqueued"] < r["requests"])
        errors = sum(r["non2xx"] for r in ours)
        latency = wrk(api.url, 8, args.seconds, api.proc.pid)
    finally:
        api.stop()
        unlimited.stop()
        second.stop()
        quiet.stop()
        server.cleanup()
    base, ceiling, per_host = max(bases), max(ceilings), sum(r["rate"] for r in pair)
    clean = errors == 0 and lost == 0
    report.rows.append(Row("P1 submit", "POST /analyze req/s, 50 clients, one API process", round(ceiling),
                           round(best["rate"]), ">= 0.5x", best["rate"] >= 0.5 * ceiling and clean,
                           "baseline: GET /livez on the same API process, best of the rounds on each side"))
    report.rows.append(Row("P1 submit", "POST /analyze req/s per host, two API processes", round(base),
                           round(per_host), ">= 0.8x", per_host >= 0.8 * base and clean,
                           "baseline: a default Celery send_task loop; ours: 25 clients on each of two API "
                           "processes at once (the deployed topology: one process per pod)"))
    report.rows.append(Row("P1 submit", "latency p99 ms, 8 clients", None, round(latency["p99"], 2), "< 25 ms",
                           latency["p99"] < 25 and latency["non2xx"] == 0, f"p50 {latency['p50']:.2f} ms"))
    report.facts.update({
        "rounds (baseline req/s)": ", ".join(f"{b:.0f}" for b in bases),
        "rounds (the service's own dispatcher in a bare loop, jobs/s)": ", ".join(f"{b:.0f}" for b in services),
        "rounds (ours req/s)": ", ".join(f"{r['rate']:.0f}" for r in ours),
        "rounds (ours with RATE_LIMIT=off, req/s)": ", ".join(f"{r:.0f}" for r in offs),
        "rounds (ours with ACCESS_LOG=errors, req/s)": ", ".join(f"{r:.0f}" for r in quiets),
        "ours on two API processes, 25 clients each (req/s)": " + ".join(f"{r['rate']:.0f}" for r in pair),
        "API CPU on two processes (cores, each)": " + ".join(f"{r['api_cpu']:.2f}" for r in pair),
        "non-2xx responses / accepted but not enqueued": f"{errors} / {lost}",
        "API CPU during the best round (cores)": f"{best['api_cpu']:.2f}",
        "wrk CPU during the best round (cores)": f"{best['wrk_cpu']:.2f}",
        "rounds (GET /livez on the same API, req/s)": ", ".join(f"{c:.0f}" for c in ceilings),
        "latency at 8 clients (req/s, p50, p99 ms)": f"{latency['rate']:.0f}, {latency['p50']:.2f}, "
                                                     f"{latency['p99']:.2f}",
    })
    return report


def wrk_ceiling(url: str) -> float:
    """wrk's rate on the cheapest route of the same API: what the HTTP stack alone allows."""
    proc = subprocess.run(["wrk", "-t2", "-c50", "-d3s", url + "/livez"], capture_output=True, text=True, check=True)
    return float(re.search(r"Requests/sec:\s+([\d.]+)", proc.stdout).group(1))


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each timed round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--log-level", default="info", help="the API's LOG_LEVEL (production default: info)")


if __name__ == "__main__":
    cli("p1_submit", run, _configure)
