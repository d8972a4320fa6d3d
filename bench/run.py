"""`python -m bench.run`: every benchmark, each in its own process, then docs/performance.md from their reports.

`--only p1_submit,p3_overhead` runs a subset; `--out` writes elsewhere. A benchmark that crashes is listed as
failed with its last output lines, and the others still run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from .common import ROOT, Report, Row, environment, fmt, loadavg

# (module, arguments): the worker as deployed (one gevent process, WORKER_CONCURRENCY 1000), and P3 also with
# the previous default (prefork, concurrency 4) for comparison; P4wan and P6 with a WAN-distant, slow Potpie.
PREFORK = ["--pool", "prefork", "--concurrency", "4"]
BENCHMARKS = [("p1_submit", []), ("p2_events", []), ("p3_overhead", []), ("p3_overhead", PREFORK),
              ("p4_waiting", []), ("p4_waiting", ["--latency-ms", "100", "--poll", "2"]),
              ("p6_slow_agents", ["--name", "P6"]), ("p7_potpie_calls", []), ("p8_waiting_tax", []), ("p5_fanout", []),
              ("p5_peer", [])]
PEER = "P5 peer"  # the report whose rows compare the API (ours) with a Node socket.io 4 server (baseline)
LIMIT_S = 240  # each benchmark is meant to take <= 2 minutes; this only stops one that hangs


def run_one(name: str, extra: list[str], workdir: Path) -> Report:
    """Run `python -m bench.<name> --json` and load its report (or a failed stand-in)."""
    out = workdir / f"{name}-{len(list(workdir.iterdir()))}.json"
    started = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-m", f"bench.{name}", "--json", str(out), *extra], cwd=ROOT,
                              capture_output=True, text=True, timeout=LIMIT_S)
        print(proc.stdout.strip() or proc.stderr[-2000:], flush=True)
        tail = proc.stderr.strip().splitlines()[-5:]
    except subprocess.TimeoutExpired:
        tail = [f"did not finish within {LIMIT_S} s"]
    if out.exists():
        raw = json.loads(out.read_text())
        raw["rows"] = [Row(**row) for row in raw["rows"]]
        return Report(**raw)
    failed = Report(name, [Row(name, "crashed", None, 0.0, "runs", False, " | ".join(tail)[-300:])])
    failed.seconds = round(time.monotonic() - started, 1)
    return failed


def markdown(reports: list[Report], env: dict[str, str], started: str) -> str:
    """docs/performance.md: the table, the environment, then each benchmark's details."""
    lines = ["# Performance", "",
             "Written by `make bench` (`python -m bench.run`); do not edit by hand. Each benchmark runs its baseline "
             "in the same process tree and the same minute as our figure, so the ratio holds even when the machine's "
             "absolute speed drifts. `bench/` holds one module per benchmark, runnable alone "
             "(`python -m bench.p1_submit`).", "",
             f"Run started {started}.", "",
             "| benchmark | metric | baseline | ours | ratio | target | pass |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for report in reports:
        for row in report.rows:
            verdict = {True: "yes", False: "**no**", None: "-"}[row.passed]
            lines.append(f"| {row.benchmark} | {row.metric} | {fmt(row.baseline)} | {fmt(row.ours)} | "
                         f"{fmt(row.ratio)} | {row.target} | {verdict} |")
    lines += peer_table(reports)
    lines += ["", "## Environment", ""]
    lines += [f"- {key}: {value}" for key, value in env.items()]
    lines += ["", "## Details", ""]
    for report in reports:
        lines.append(f"### {report.name}")
        lines.append("")
        lines.append(f"- took {report.seconds} s; load average before {report.load_before}, after "
                     f"{report.load_after}")
        lines += [f"- {row.metric}: {row.note}" for row in report.rows if row.note]
        lines += [f"- {key}: {value}" for key, value in report.facts.items()]
        lines.append("")
    notes = ROOT / "bench" / "NOTES.md"
    if notes.exists():
        lines += [notes.read_text().strip(), ""]
    return "\n".join(lines)


def peer_table(reports: list[Report]) -> list[str]:
    """The peer table: the same clients and events against a bare Node socket.io 4 server and the API, same run."""
    peer = next((report for report in reports if report.name == PEER), None)
    if peer is None or not peer.rows or peer.rows[0].metric == "crashed":
        return []
    lines = ["", "## Peer: the API against Node socket.io 4, same clients, same run", "",
             "The Node original this service rebuilds (Express, socket.io, BullMQ) measured 16.3 KiB per socket and "
             "1.1 ms event p50 on this machine (issue 31); `bench/node/server.js` stands in for it (P5 peer in the "
             "details).", "",
             "| metric | Node socket.io 4 | API | API / Node | target | pass |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in peer.rows:
        verdict = {True: "yes", False: "**no**", None: "-"}[row.passed]
        lines.append(f"| {row.metric} | {fmt(row.baseline)} | {fmt(row.ours)} | {fmt(row.ratio)} | {row.target} | "
                     f"{verdict} |")
    return lines


def main() -> int:
    """Run the benchmarks and write the page; exit 1 only if a benchmark crashed (missed targets are reported)."""
    parser = argparse.ArgumentParser(prog="python -m bench.run")
    parser.add_argument("--only", help="comma-separated benchmark names (default: all)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "performance.md"))
    args = parser.parse_args()
    wanted = args.only.split(",") if args.only else [name for name, _ in BENCHMARKS]
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC") + f", load average {loadavg()}"
    env = environment()
    with tempfile.TemporaryDirectory(prefix="psvc-bench-") as workdir:
        reports = [run_one(name, extra, Path(workdir)) for name, extra in BENCHMARKS if name in wanted]
    Path(args.out).write_text(markdown(reports, env, started))
    print(f"wrote {args.out}")
    missed = [row for report in reports for row in report.rows if row.passed is False]
    for row in missed:
        print(f"target missed: {row.benchmark}: {row.metric} = {fmt(row.ours)} (target {row.target})")
    return 1 if any(row.metric == "crashed" for row in missed) else 0


if __name__ == "__main__":
    sys.exit(main())
