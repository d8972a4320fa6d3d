"""`make dev`: the whole stack in the foreground — Redis, the Potpie simulator (without a key), API, worker, Flower.

Ctrl-C stops everything this script started. Settings come from .env and the environment, as in production.
`make dev REDIS=fresh` (DEV_REDIS=fresh) starts a throwaway Redis on a free port instead of reusing one.
The run's API key is written to .dev/api-key, which the README's commands read.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import redis
from dotenv import load_dotenv
from redis.exceptions import RedisError

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from potpie_service.auth import new_key  # noqa: E402
from potpie_service.config import ConfigError, Settings  # noqa: E402
from potpie_service.store import make_store  # noqa: E402
from potpie_service.tokens import new_key as new_token_key  # noqa: E402

KEY_FILE = ROOT / ".dev" / "api-key"


def reachable(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1).ping())
    except redis.RedisError:
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def held_jobs(url: str, queue_name: str) -> int:
    """How many job records of this queue a reused Redis holds already (counted from the store's indexes)."""
    settings = Settings.from_env({"REDIS_URL": url, "QUEUE_NAME": queue_name})
    try:
        return make_store(settings).stats()["total"]
    except RedisError:
        return 0


class Readiness:
    """What the stack can do, said once it changes: the API ready to serve (GET /readyz: its Redis answers) and the
    workers consuming (their heartbeats, read from Redis), apart. A worker still starting never makes the API look
    down: submits are accepted and queue until it consumes."""

    def __init__(self, port: str, settings: Settings) -> None:
        self.url = f"http://127.0.0.1:{port}/readyz"
        self.store = make_store(settings)
        self.max_age = settings.worker_max_age
        self.ready: bool | None = None
        self.workers: int | None = None

    def _api_ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url, timeout=1) as answer:
                return bool(answer.status == 200)
        except (urllib.error.URLError, OSError):  # not listening yet, or 503: not ready
            return False

    def _workers(self) -> int | None:
        try:
            return self.store.workers_alive(self.max_age)
        except RedisError:
            return None

    def poll(self) -> None:
        """Print a line for each change: the API's readiness, then how many workers consume."""
        ready = self._api_ready()
        if ready != self.ready and (ready or self.ready):
            state = "ready (GET /readyz: its Redis answers); submits are accepted" if ready else \
                "not ready: GET /readyz says why (its Redis)"
            print(f"  API         {state}", flush=True)
        self.ready = ready
        workers = self._workers()
        if ready and workers is not None and workers != self.workers:
            print(f"  Workers     {workers} consuming" if workers else
                  "  Workers     none consuming yet (starting): submits queue until one does", flush=True)
            self.workers = workers


def main() -> int:
    if (ROOT / ".env").exists():
        load_dotenv(ROOT / ".env", override=False)
    env = dict(os.environ)
    sim_port, flower_port = env.get("SIMULATOR_PORT", "8765"), env.get("FLOWER_PORT", "5555")
    children: list[tuple[str, subprocess.Popen]] = []
    data_dir = None

    def start(name: str, args: list[str]) -> None:
        children.append((name, subprocess.Popen(args, cwd=ROOT, env=env, start_new_session=True)))

    try:
        settings = Settings.from_env(env)
    except ConfigError as exc:
        print(f"make dev: {exc}", file=sys.stderr)
        return 2

    fresh = env.get("DEV_REDIS", "").lower() == "fresh"
    if fresh or not reachable(settings.redis_url):
        if env.get("REDIS_URL") and not fresh:
            print("make dev: REDIS_URL is set but Redis does not answer there", file=sys.stderr)
            return 2
        port = free_port() if fresh else settings.redis_port
        binary = shutil.which("redis-server")
        if not binary:
            print("make dev: no Redis reachable and no redis-server binary (apt-get install redis-server)",
                  file=sys.stderr)
            return 2
        data_dir = tempfile.mkdtemp(prefix="psvc-dev-redis-")
        start("redis", [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", data_dir,
                        "--appendonly", "yes", "--maxmemory-policy", "noeviction", "--loglevel", "warning"])
        env["REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
        for _ in range(50):
            if reachable(env["REDIS_URL"]):
                break
            time.sleep(0.1)
        redis_note = "(started by make dev, empty; gone when it stops)"
    else:
        env.setdefault("REDIS_URL", settings.redis_url)
        held = held_jobs(env["REDIS_URL"], settings.queue_name)
        redis_note = "(already running: reused"
        if held:
            redis_note += (f"; it holds {held} jobs of queue {settings.queue_name} from earlier runs, which show in "
                           "/jobs and on the board. For an empty Redis: make dev REDIS=fresh")
        redis_note += ")"

    if not env.get("POTPIE_API_KEY"):
        env["POTPIE_API_KEY"] = env["SIMULATOR_API_KEY"] = "sk-simulator"
        env["POTPIE_BASE_URL"] = f"http://127.0.0.1:{sim_port}"
        env.setdefault("POTPIE_POLL_INTERVAL", "1")
        # the simulator also answers GitHub's branch heads: each job is pinned to a commit, nothing leaves the machine
        env.setdefault("GITHUB_API_URL", f"http://127.0.0.1:{sim_port}/github")
        env.setdefault("GITHUB_TOKEN", "ghp_simulator")
        start("simulator", [sys.executable, "-m", "potpie_service", "simulator", "--port", sim_port,
                            "--parse-seconds", env.get("SIMULATOR_PARSE_SECONDS", "8")])
    if not env.get("TOKEN_ENCRYPTION_KEY"):
        env["TOKEN_ENCRYPTION_KEY"] = new_token_key()  # this run only; set one in .env to keep tokens across runs
    dev_key = None
    if not env.get("API_KEYS") and env.get("AUTH_DISABLED", "").lower() not in ("1", "true", "yes", "on"):
        dev_key, entry = new_key("dev")
        env["API_KEYS"] = entry
    env.setdefault("LOG_FORMAT", "text")
    flower_auth = env.setdefault("FLOWER_BASIC_AUTH", "admin:admin")

    start("api", [sys.executable, "-m", "potpie_service", "api"])
    start("worker", [sys.executable, "-m", "celery", "-A", "workers", "worker", "--loglevel=INFO", "-E"])
    start("flower", [sys.executable, "-m", "celery", "-A", "workers", "flower", f"--port={flower_port}"])

    port = env.get("PORT", "8080")
    lines = [
        "",
        "potpie-service dev stack is starting (Ctrl-C stops everything):",
        f"  API         http://localhost:{port}/        (ready: /readyz, dependencies: /health, Socket.IO at "
        "/socket.io/)",
        f"  Job board   http://localhost:{port}/board",
        f"  Flower      http://localhost:{flower_port}/  (user:password {flower_auth})",
        f"  Redis       {env['REDIS_URL'].split('@')[-1]}  {redis_note}",
        f"  Potpie      {env.get('POTPIE_BASE_URL', 'https://production-api.potpie.ai')}"
        + ("  (simulator: no POTPIE_API_KEY set)" if env.get("SIMULATOR_API_KEY") else ""),
        f"  GitHub      {env.get('GITHUB_API_URL', 'https://api.github.com')}  (branch heads, to pin each job's "
        "commit; " + ("read with GITHUB_TOKEN" if env.get("GITHUB_TOKEN") else "for jobs that bring a github_token")
        + ")",
    ]
    if dev_key:
        KEY_FILE.parent.mkdir(exist_ok=True)
        KEY_FILE.write_text(dev_key + "\n")
        KEY_FILE.chmod(0o600)
        lines += [f"  API key     {dev_key}   (this run only; also in {KEY_FILE.relative_to(ROOT)})",
                  "",
                  "Try it (in another terminal, in this directory):",
                  f"  export KEY=$(cat {KEY_FILE.relative_to(ROOT)})",
                  f"  curl -X POST localhost:{port}/analyze -H \"Authorization: Bearer $KEY\" "
                  "-H 'Content-Type: application/json' -d '{\"repo\": \"octocat/Hello-World\"}'",
                  "  POTPIE_SERVICE_API_KEY=$KEY .venv/bin/python -m potpie_service analyze octocat/Hello-World"]
    print("\n".join(lines) + "\n", flush=True)

    def stop(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    readiness = Readiness(str(port), Settings.from_env(env))
    try:
        while True:
            for name, proc in children:
                if proc.poll() is not None:
                    print(f"make dev: {name} exited with status {proc.returncode}; stopping the stack",
                          file=sys.stderr)
                    return 1
            readiness.poll()
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("\nstopping...", file=sys.stderr)
        return 0
    finally:
        for _, proc in reversed(children):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.time() + 15
        for _, proc in children:
            try:
                proc.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        if data_dir:
            shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
