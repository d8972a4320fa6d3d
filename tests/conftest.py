"""Shared fixtures: a throwaway Redis, the Potpie simulator, and a running stack (worker + API)."""

from __future__ import annotations

import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from potpie_service.potpie.simulator import Simulator, SimulatorConfig  # noqa: E402
from tests.stack import Emissions, Follower, RedisServer, Service, service_env, start_api, start_worker, wait_for  # noqa: E402

SIM_KEY = "sk-simulator"


@pytest.fixture(autouse=True)
def no_socketio_client_left_reconnecting() -> Iterator[None]:
    """A python-socketio client closed with disconnect() while reconnecting keeps retrying (and drawing from the
    global `random`, which broke the OpenAPI fuzz test's Hypothesis run): every test must shut its clients down."""
    yield

    def reconnecting() -> list[str]:
        return [thread.name for thread in threading.enumerate() if "_handle_reconnect" in thread.name]

    try:
        wait_for(lambda: not reconnecting(), 3, what="Socket.IO clients to stop reconnecting")
    except AssertionError:
        pytest.fail(f"a Socket.IO client was left reconnecting: {reconnecting()} (close it with shutdown())")


@pytest.fixture
def followers() -> Iterator[Callable[..., Follower]]:
    """A factory of connected Followers (`followers(url, **options)`), closed after the test."""
    made: list[Follower] = []

    def follow(url: str, **options: Any) -> Follower:
        made.append(Follower(url, **options))
        return made[-1].connect()

    yield follow
    for follower in made:
        follower.close()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def guarded_api(redis_server: RedisServer) -> Iterator[Service]:
    """An API process alone (no worker), auth on, with short edge deadlines: REQUEST_BODY_TIMEOUT=1,
    SOCKETIO_CONNECT_TIMEOUT=1 (tests/hostile.py)."""
    from tests.hostile import start_guarded_api

    api = start_guarded_api(redis_server.url, "guarded-api", REQUEST_BODY_TIMEOUT="1", SOCKETIO_CONNECT_TIMEOUT="1")
    yield api
    api.stop()


@pytest.fixture
def websockets() -> Iterator[Callable[..., Any]]:
    """A factory of raw WebSockets to an API (`websockets(api)`, tests/hostile.py), closed after the test."""
    from tests.hostile import RawWebSocket

    made: list[RawWebSocket] = []

    def open_one(api: Service) -> RawWebSocket:
        made.append(RawWebSocket(api))
        return made[-1]

    yield open_one
    for ws in made:
        ws.close()


@pytest.fixture(scope="session")
def simulator() -> Iterator[Simulator]:
    sim = Simulator(SimulatorConfig(api_key=SIM_KEY, parse_seconds=0.6, slow_parse_seconds=3.0, hang_seconds=4.0))
    sim.start()
    yield sim
    sim.stop()


@dataclass
class Stack:
    """A running service: its environment, API and workers."""

    env: dict[str, str]
    api: Service
    workers: list[Service]
    redis: RedisServer
    simulator: Simulator

    @property
    def url(self) -> str:
        return self.api.url  # type: ignore[attr-defined]

    def key(self, suffix: str) -> str:
        """A Redis key of this stack's store (layout in potpie_service/jobs.py): `key("job:<id>")`."""
        return f"psvc:{self.env['QUEUE_NAME']}:{suffix}"

    def submit(self, repo: str = "octocat/Hello-World", **body: object) -> dict:
        response = requests.post(self.url + "/analyze", json={"repo": repo, **body}, timeout=5)
        assert response.status_code == 202, response.text
        return response.json()

    def status(self, job_id: str) -> dict:
        return requests.get(f"{self.url}/status/{job_id}", timeout=5).json()

    def wait_final(self, job_id: str, timeout: float = 30.0) -> dict:
        def final() -> dict | None:
            body = self.status(job_id)
            return body if body.get("status") in ("finished", "failed", "cancelled") else None

        return wait_for(final, timeout, interval=0.1, what=f"job {job_id} to end")  # type: ignore[return-value]

    def log_lines(self) -> list[dict[str, Any]]:
        """Every JSON log line of the stack's workers (past and present) and API."""
        return [line for service in [*self.workers, self.api] for line in service.log_lines()]

    def stop(self) -> None:
        """Every process told at once, then waited for: each worker's grace for a running step runs side by side."""
        for service in (self.api, *self.workers):
            service.terminate()
        for service in (self.api, *self.workers):
            service.stopped()


def make_stack(redis_server: RedisServer, simulator: Simulator, name: str, workers: int = 1,
               concurrency: int | None = None, **overrides: str) -> Stack:
    """Start workers and an API on a queue of their own."""
    env = service_env(redis_server.url, simulator.url, QUEUE_NAME=f"q-{name}-{uuid.uuid4().hex[:6]}", **overrides)
    started = [start_worker(env, f"{name}-worker{i}", concurrency) for i in range(workers)]
    api = start_api(env, f"{name}-api")
    return Stack(env, api, started, redis_server, simulator)


@pytest.fixture(scope="session")
def stack(redis_server: RedisServer, simulator: Simulator) -> Iterator[Stack]:
    """The default stack: one worker (2 processes), one API, auth disabled, PARSE_TIMEOUT 4 s."""
    running = make_stack(redis_server, simulator, "main", PARSE_TIMEOUT="4")
    yield running
    running.stop()


def simulator_stats(sim: Any) -> dict:
    """A simulator's request counters, over HTTP (`sim` is anything with its url)."""
    return requests.get(sim.url + "/_sim/stats", timeout=5).json()


@pytest.fixture
def sim_stats(simulator: Simulator) -> Callable[[], dict]:
    """The session simulator's request counters: `sim_stats()`."""
    return lambda: simulator_stats(simulator)


@pytest.fixture
def emissions() -> Iterator[Callable[[Stack], Emissions]]:
    """A factory of Emissions listeners on a stack's channel, closed after the test."""
    made: list[Emissions] = []

    def listen(stack: Stack) -> Emissions:
        made.append(Emissions(stack.env["REDIS_URL"], stack.env["QUEUE_NAME"]))
        time.sleep(0.1)  # the SUBSCRIBE is in place before the test makes events
        return made[-1]

    yield listen
    for listener in made:
        listener.close()
