"""What every benchmark shares: result rows, the environment record, process-tree RSS/CPU, and stack start-up."""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import requests

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from potpie_service.config import Settings  # noqa: E402
from tests.stack import RedisServer, Service, free_port, service_env, start_api, start_worker, wait_for  # noqa: E402

__all__ = ["RedisServer", "Service", "free_port", "service_env", "start_api", "start_worker", "wait_for"]

DEPLOYED = Settings()  # the defaults a plain deployment runs with (the worker's pool and concurrency)

SIM_KEY = "sk-simulator"
PROBE = "bench:potpie:"  # bench.probe_worker's per-job Potpie time, read by P3
_TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class Row:
    """One line of the results table."""

    benchmark: str
    metric: str
    baseline: float | None
    ours: float
    target: str
    passed: bool | None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        """ours / baseline, when there is a baseline."""
        return None if not self.baseline else self.ours / self.baseline


@dataclass
class Report:
    """A benchmark's rows, its other measured figures, and the conditions it ran under."""

    name: str
    rows: list[Row] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)
    load_before: str = ""
    load_after: str = ""
    seconds: float = 0.0


def loadavg() -> str:
    """The 1/5/15-minute load average, as text."""
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "-"


def environment() -> dict[str, str]:
    """The machine and the versions the numbers were measured with."""
    redis_server = shutil.which("redis-server") or ""
    server_version = subprocess.run([redis_server, "--version"], capture_output=True, text=True).stdout.split()
    wrk = shutil.which("wrk")
    return {
        "cpus": str(os.cpu_count()),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "celery": _version("celery"), "kombu": _version("kombu"), "redis-py": _version("redis"),
        "redis-server": next((part[2:] for part in server_version if part.startswith("v=")), "?"),
        "flask": _version("flask"), "flask-socketio": _version("flask-socketio"),
        "python-socketio": _version("python-socketio"), "gunicorn": _version("gunicorn"),
        "wrk": "4.1.0 (Debian)" if wrk else "not installed",
    }


def raise_fd_limit(wanted: int = 16384) -> int:
    """Raise this process's open-file limit as far as allowed; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(wanted, hard) if hard != resource.RLIM_INFINITY else wanted
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _stat(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as handle:
        return handle.read().rsplit(")", 1)[1].split()


def tree_pids(root: int | list[int]) -> list[int]:
    """`root` (one pid or several) and every descendant process."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                children.setdefault(int(_stat(int(entry))[1]), []).append(int(entry))
            except (OSError, IndexError):
                continue
    found, todo = [], list(root) if isinstance(root, list) else [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def tree_rss_mb(root: int | list[int]) -> float:
    """Resident memory of a process tree, in MiB."""
    total = 0
    for pid in tree_pids(root):
        try:
            with open(f"/proc/{pid}/status") as handle:
                for line in handle:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def tree_cpu_s(root: int | list[int]) -> float:
    """CPU seconds (user + system) used so far by a process tree's live processes."""
    total = 0
    for pid in tree_pids(root):
        try:
            fields = _stat(pid)
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError):
            continue
    return total / _TICK


class PeakRss:
    """Samples a process tree's RSS in a thread and keeps the peak."""

    def __init__(self, root: int | list[int], interval: float = 0.25) -> None:
        self.root, self.interval, self.peak = root, interval, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss_mb(self.root))
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, tree_rss_mb(self.root))


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by nearest rank."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, int(round(q / 100 * len(ordered) + 0.5)) - 1))
    return ordered[index]


def start_simulator(parse_seconds: float = 0.0, latency_ms: float = 0.0, name: str = "bench-sim",
                    message_seconds: float = 0.0) -> Service:
    """The Potpie simulator in its own process (so its CPU is not counted against the bench's clients)."""
    port = free_port()
    args = [sys.executable, "-m", "potpie_service", "simulator", "--port", str(port), "--api-key", SIM_KEY,
            "--parse-seconds", str(parse_seconds), "--latency-ms", str(latency_ms),
            "--message-seconds", str(message_seconds)]
    service = Service(name, args, dict(os.environ)).start()
    service.url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
    wait_for(lambda: requests.get(service.url + "/health", timeout=1).ok, 20, what="simulator")
    return service


def submit_all(api_url: str, repos: list[str], clients: int = 8) -> list[str]:
    """POST /analyze for each repository from `clients` threads (a session each); the job ids, in order."""
    from concurrent.futures import ThreadPoolExecutor

    local = threading.local()

    def submit(repo: str) -> str:
        if not hasattr(local, "session"):
            local.session = requests.Session()
        response = local.session.post(api_url + "/analyze", json={"repo": repo}, timeout=30)
        assert response.status_code == 202, response.text
        return response.json()["job_id"]

    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(submit, repos))


def bench_env(redis_url: str, potpie_url: str, queue: str, **overrides: str) -> dict[str, str]:
    """A service environment for benchmarks: production-like intervals unless overridden."""
    return service_env(redis_url, potpie_url, QUEUE_NAME=queue, WORKER_HEARTBEAT_INTERVAL="2",
                       STEP_GRACE="60", REQUEST_TIMEOUT=str(DEPLOYED.request_timeout_ms), **overrides)


def cli(name: str, body: Callable[[argparse.Namespace], Report],
        configure: Callable[[argparse.ArgumentParser], None] | None = None) -> None:
    """Run one benchmark from the command line: print its rows; `--json PATH` also saves the report."""
    parser = argparse.ArgumentParser(prog=f"python -m bench.{name}")
    parser.add_argument("--json", help="write the report here as JSON (bench.run uses this)")
    if configure:
        configure(parser)
    args = parser.parse_args()
    raise_fd_limit()
    started, before = time.monotonic(), loadavg()
    report = body(args)
    report.load_before, report.load_after = before, loadavg()
    report.seconds = round(time.monotonic() - started, 1)
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(report), indent=1))


def fmt(value: float | None) -> str:
    """A number for the table: 3 significant digits, or '-'."""
    if value is None:
        return "-"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


def format_report(report: Report) -> str:
    """A benchmark's report as plain text for the console."""
    lines = [f"== {report.name}  ({report.seconds} s, load before {report.load_before}, after {report.load_after})"]
    for row in report.rows:
        verdict = {True: "PASS", False: "MISS", None: "info"}[row.passed]
        lines.append(f"  {row.metric:<44} baseline {fmt(row.baseline):>8}  ours {fmt(row.ours):>8}  "
                     f"ratio {fmt(row.ratio):>6}  target {row.target:<22} {verdict}")
    for key, value in report.facts.items():
        lines.append(f"  - {key}: {value}")
    return "\n".join(lines)


def start_celery(env: dict[str, str], name: str, app: str = "workers", pool: str | None = None,
                 concurrency: int | None = None, queues: str | None = None, heartbeat: bool = True) -> Service:
    """A Celery worker of `app`; pool and concurrency as deployed (WORKER_POOL, WORKER_CONCURRENCY) unless given;
    waits for its heartbeat (our app) or a ping (others)."""
    hostname = f"{name}-{free_port()}@localhost"
    args = [sys.executable, "-m", "celery", "-A", app, "worker", "--loglevel=INFO", f"--hostname={hostname}",
            "--without-gossip", "--without-mingle", *([f"--pool={pool}"] if pool else []),
            *([f"--concurrency={concurrency}"] if concurrency else [])]
    if app == "workers" or app == "bench.probe_worker":
        args.append("-E")  # as deployed: Flower sees task events
    if queues:
        args.append(f"--queues={queues}")
    (ROOT / "test-artifacts" / f"{name}.log").unlink(missing_ok=True)
    service = Service(name, args, env).start()
    service.hostname = hostname  # type: ignore[attr-defined]
    if heartbeat:
        import redis as redis_lib
        client = redis_lib.Redis.from_url(env["REDIS_URL"], decode_responses=True)
        key = f"psvc:{env.get('QUEUE_NAME', 'potpie-analysis')}:workers"
        wait_for(lambda: client.zscore(key, hostname) or not service.alive(), 40, what=f"worker {name}")
    else:
        wait_for(lambda: "ready." in service.log() or not service.alive(), 40, what=f"worker {name}")
    assert service.alive(), service.log()[-3000:]
    return service
