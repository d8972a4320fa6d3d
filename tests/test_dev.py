"""`make dev` as a newcomer meets it: the script itself (scripts/dev.py) on a Redis that holds another run's jobs,
then the README's Quick start commands, copy-pasted into bash (only the ports differ, and the `<job_id>`
placeholder is filled with the id the POST answered)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Iterator

import pytest
import requests

from potpie_service.core.job import Job
from potpie_service.store.jobs import JobStore
from tests.stack import ARTIFACTS, ROOT, RedisServer, free_port, wait_for

pytestmark = pytest.mark.e2e  # whole stacks of processes: `make test` runs it, `make test-fast` does not

README = (ROOT / "README.md").read_text()


class DevStack:
    """`scripts/dev.py` running in its own session, its output collected line by line."""

    def __init__(self, env: dict[str, str]) -> None:
        self.port = env["PORT"]
        self.lines: list[str] = []
        self.proc = subprocess.Popen([sys.executable, "scripts/dev.py"], cwd=ROOT, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        with open(ARTIFACTS / "make-dev.log", "a") as log:
            for line in self.proc.stdout:  # type: ignore[union-attr]
                self.lines.append(line.rstrip("\n"))
                log.write(line)

    def line(self, prefix: str) -> str:
        """The banner line that starts with `prefix`, once printed."""
        found = wait_for(lambda: [line for line in self.lines if line.strip().startswith(prefix)], 30,
                         what=f"make dev to print {prefix!r}")
        return found[0]  # type: ignore[index]

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        finally:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.reader.join(5)
            self.proc.stdout.close()  # type: ignore[union-attr]


def dev_env(redis_url: str, **extra: str) -> dict[str, str]:
    """A newcomer's environment: no Potpie key, no API keys, nothing set but the ports this test needs free."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("REDIS_", "POTPIE_", "API_KEYS", "QUEUE_NAME", "AUTH_", "DEV_"))}
    env.update({"REDIS_URL": redis_url, "PORT": str(free_port()), "SIMULATOR_PORT": str(free_port()),
                "FLOWER_PORT": str(free_port()), "SIMULATOR_PARSE_SECONDS": "1", **extra})
    return env


@pytest.fixture
def foreign_redis() -> Iterator[RedisServer]:
    """A Redis already holding three jobs of the default queue from some earlier run."""
    server = RedisServer().start()
    store = JobStore(server.client(), "potpie-analysis", 5, 3600, 3600)
    for i in range(3):
        store.submit(Job(f"old{i}", owner="dev", repo="someone/else"))
    yield server
    server.cleanup()


def quick_start_commands() -> list[str]:
    """The commands of the README's second Quick start block (the one run beside `make dev`)."""
    blocks = re.findall(r"```bash\n(.*?)```", README.split("## Quick start", 1)[1], re.DOTALL)
    joined = blocks[1].replace("\\\n", " ")
    return [line.split("   #")[0].strip() for line in joined.splitlines() if line.strip()]


def test_make_dev_says_the_reused_redis_holds_jobs_and_the_readme_commands_work(foreign_redis) -> None:
    dev = DevStack(dev_env(foreign_redis.url))
    try:
        redis_line = dev.line("Redis")
        assert "holds 3 jobs of queue potpie-analysis" in redis_line, redis_line
        assert "make dev REDIS=fresh" in redis_line
        key = dev.line("API key").split()[2]
        assert (ROOT / ".dev" / "api-key").read_text().strip() == key
        wait_for(lambda: requests.get(f"http://127.0.0.1:{dev.port}/readyz", timeout=2).status_code == 200, 30,
                 what="the dev API to be ready")
        # Readiness and the workers are told apart: the API is ready before the worker's first heartbeat, and
        # nothing calls the stack unhealthy meanwhile (issue 29).
        ready = dev.line("API         ready")
        assert "submits are accepted" in ready, ready
        consuming = dev.line("Workers     1 consuming")
        assert dev.lines.index(ready) < dev.lines.index(consuming)
        assert not [line for line in dev.lines if "unhealthy" in line or "workers down" in line]

        commands = quick_start_commands()
        assert commands[0] == "export KEY=$(cat .dev/api-key)"
        assert commands[-1].startswith("open ")  # a browser: not run here
        shell_env = {**os.environ, "POTPIE_SERVICE_URL": f"http://localhost:{dev.port}"}
        outputs: list[str] = []
        job_id = ""
        for command in commands[1:-1]:
            command = command.replace("localhost:8080", f"localhost:{dev.port}").replace("<job_id>", job_id)
            done = subprocess.run(["bash", "-c", f"{commands[0]} && {command}"], cwd=ROOT, env=shell_env,
                                  capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, (command, done.stdout, done.stderr)
            outputs.append(done.stdout)
            if command.startswith("curl -X POST"):
                accepted = json.loads(done.stdout)
                assert accepted["status"] == "queued", accepted
                job_id = accepted["job_id"]
        assert json.loads(outputs[1])["job_id"] == job_id  # the status command read the submitted job
        assert "octocat/Hello-World" in outputs[2]  # the CLI followed its job to the end (exit 0 above)
        status = requests.get(f"http://127.0.0.1:{dev.port}/status/{job_id}",
                              headers={"Authorization": f"Bearer {key}"}, timeout=5).json()
        assert status["status"] in ("parsing", "ready", "processing_conversations", "finished"), status
    finally:
        assert dev.stop() == 0


def test_make_dev_redis_fresh_starts_an_empty_redis(foreign_redis) -> None:
    dev = DevStack(dev_env(foreign_redis.url, DEV_REDIS="fresh"))
    try:
        redis_line = dev.line("Redis")
        assert "started by make dev, empty" in redis_line and str(foreign_redis.port) not in redis_line, redis_line
        dev.line("API key")
    finally:
        started = time.monotonic()
        assert dev.stop() == 0
        assert time.monotonic() - started < 20
