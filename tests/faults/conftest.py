"""Fault-injection helpers: fast simulators, events counted over the network, process surgery, the liveness probe."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections import Counter
from typing import Any, Callable, Iterator

import pytest
import requests

from potpie_service.potpie.simulator import Simulator, SimulatorConfig
from tests.conftest import SIM_KEY, Stack, make_stack
from tests.stack import ROOT, RedisServer, wait_for

# Every fault stack: no API rate limit (bursts are the point), a heartbeat every 0.5 s (leases live 5 s), overdue
# steps re-dispatched after 2 s, Potpie calls tried once inside a step unless a test says otherwise.
FAULT_ENV = {"RATE_LIMIT": "off", "WORKER_HEARTBEAT_INTERVAL": "0.5", "STEP_GRACE": "2", "REQUEST_TIMEOUT": "2000",
             "POTPIE_POLL_INTERVAL": "0.5", "MAX_CONCURRENT_JOBS": "100"}
FINAL = ("finished", "failed", "cancelled")


def fast_simulator(port: int = 0, **config: Any) -> Simulator:
    """An in-process simulator with these timings, started."""
    sim = Simulator(SimulatorConfig(api_key=SIM_KEY, **config))
    sim.start(port=port)
    return sim


@pytest.fixture(scope="module")
def own_redis() -> Iterator[RedisServer]:
    """A Redis for one test module alone (its memory figures, or restoring every unacked message, touch nothing
    else)."""
    server = RedisServer().start()
    yield server
    server.cleanup()


@pytest.fixture
def simulators() -> Iterator[Callable[..., Simulator]]:
    """A factory of fast simulators, stopped after the test."""
    made: list[Simulator] = []

    def make(port: int = 0, **config: Any) -> Simulator:
        made.append(fast_simulator(port, **config))
        return made[-1]

    yield make
    for sim in made:
        sim.stop()


@pytest.fixture
def stacks() -> Iterator[Callable[..., Stack]]:
    """A factory of stacks (workers + API on a queue of their own), stopped after the test."""
    made: list[Stack] = []

    def make(redis_server: RedisServer, sim: Simulator, name: str, workers: int = 1, concurrency: int | None = None,
             **overrides: str) -> Stack:
        made.append(make_stack(redis_server, sim, name, workers, concurrency, **{**FAULT_ENV, **overrides}))
        return made[-1]

    yield make
    for stack in made:  # signal every process first, so they all shut down at once
        for service in [stack.api, *stack.workers]:
            service.signal(signal.SIGTERM)
    for stack in made:
        stack.stop()


def sim_config(sim: Simulator, **values: float) -> None:
    """Change the simulator's timings live, over HTTP."""
    requests.post(sim.url + "/_sim/config", json=values, timeout=5).raise_for_status()


def submit_many(stack: Stack, repos: list[str]) -> list[str]:
    """Submit one job per repo; their ids in order."""
    return [stack.submit(repo)["job_id"] for repo in repos]


def states(stack: Stack, ids: list[str]) -> list[str | None]:
    """The status of each job, read from Redis in one round trip."""
    client = stack.redis.client()
    prefix = stack.key("job:")
    pipe = client.pipeline(transaction=False)
    for job_id in ids:
        pipe.hget(prefix + job_id, "status")
    return pipe.execute()


def wait_all_final(stack: Stack, ids: list[str], timeout: float) -> list[dict[str, Any]]:
    """Wait until every job has ended (polling Redis), then return each one's /status body over HTTP."""
    def ended() -> bool:
        return all(state in FINAL for state in states(stack, ids))

    try:
        wait_for(ended, timeout, interval=0.2, what=f"{len(ids)} jobs to end")
    except AssertionError:
        pending = Counter(str(state) for state in states(stack, ids) if state not in FINAL)
        raise AssertionError(f"jobs still open after {timeout} s: {dict(pending)}") from None
    return [stack.status(job_id) for job_id in ids]


def worker_health(env: dict[str, str], hostname: str, max_age: float) -> subprocess.CompletedProcess[str]:
    """Run the liveness probe Kubernetes runs (`python -m potpie_service worker-health`) for one worker."""
    return subprocess.run([sys.executable, "-m", "potpie_service", "worker-health", "--hostname", hostname,
                           "--max-age", str(max_age)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=30)


