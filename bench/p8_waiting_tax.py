"""P8 the waiting tax: how much of a job's wall time is the service's own (waiting for its next poll, scheduling,
steps), against Potpie's time, for quick and long parses, at the production POTPIE_POLL_INTERVAL (5 s).

Against the server-like simulator; agent replies are instant, so Potpie's time is the parse. Each job runs alone
(one worker, as deployed); a job with an instant parse runs first, as a deployment that has parsed before would, so
the recent parses the first poll is timed from exist. Target (issue 31): the service's share <= max(1 s, 10%) of
Potpie's time; polls per minute no more than a fixed interval's (12 a minute at 5 s) once the first minute is past.
"""

from __future__ import annotations

import argparse
import time
import uuid

import requests

from .common import (RedisServer, Report, Row, Service, bench_env, cli, start_api, start_celery, start_simulator,
                     wait_for)

INTERVAL = 5.0


def _run_job(api_url: str, sim_url: str, parse_s: float) -> tuple[float, dict[str, int]]:
    """One job on a parse of `parse_s` seconds, alone: its wall time, submit to `finished`, and its Potpie calls."""
    requests.post(sim_url + "/_sim/config", json={"parse_seconds": parse_s}, timeout=5).raise_for_status()
    started = time.monotonic()
    job_id = requests.post(api_url + "/analyze", json={"repo": f"octocat/tax-{uuid.uuid4().hex[:8]}"},
                           timeout=10).json()["job_id"]

    def finished() -> dict | None:
        body = requests.get(f"{api_url}/status/{job_id}", timeout=10).json()
        return body if body["status"] in ("finished", "failed") else None

    body = wait_for(finished, parse_s + 60, interval=0.02, what=f"the {parse_s:g} s job")
    assert isinstance(body, dict) and body["status"] == "finished", body
    return time.monotonic() - started, body["potpie_calls"]


def run(args: argparse.Namespace) -> Report:
    report = Report(f"P8 waiting tax (POTPIE_POLL_INTERVAL {INTERVAL:g} s, one job at a time, instant replies)")
    server = RedisServer().start()
    services: list[Service] = []
    try:
        sim = start_simulator(parse_seconds=0)
        services.append(sim)
        env = bench_env(server.url, sim.url, f"bench-p8-{uuid.uuid4().hex[:6]}", RATE_LIMIT="off",
                        POTPIE_POLL_INTERVAL=str(INTERVAL))
        services += [start_celery(env, "bench-p8-worker"), start_api(env, "bench-p8-api")]
        api = services[-1].url  # type: ignore[attr-defined]
        _run_job(api, sim.url, 0.0)  # a deployment that has parsed before: recent parses exist
        for parse_s in args.parses:
            wall, calls = _run_job(api, sim.url, parse_s)
            tax, allowed = wall - parse_s, max(1.0, 0.1 * parse_s)
            polls = calls.get("parsing_status_by_repo", 0) + calls.get("projects", 0)
            report.rows.append(Row(report.name, f"{parse_s:g} s parse: the service's own time, s", parse_s,
                                   round(tax, 2), f"<= {allowed:g} s", tax <= allowed,
                                   f"wall {wall:.2f} s; {polls} polls ({polls / max(wall, 60) * 60:.1f} a minute over "
                                   f"its first minute or its life); all calls {dict(calls)}"))
    finally:
        for service in services[::-1]:
            service.stop()
        server.cleanup()
    return report


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--parses", type=float, nargs="+", default=[0.0, 3.0, 12.0, 60.0],
                        help="parse durations to measure, s")


if __name__ == "__main__":
    cli("p8_waiting_tax", run, configure)
