"""The worker liveness probe (`worker-health`): a frozen or non-consuming worker is caught, a busy one is not."""

from __future__ import annotations

import signal
import time
from typing import Iterator

import pytest

from potpie_service.config import Settings
from potpie_service.queue import make_celery
from tests.conftest import Stack, make_stack
from tests.faults.conftest import FAULT_ENV, fast_simulator, worker_health
from tests.stack import start_worker, wait_for

pytestmark = pytest.mark.slow

MAX_AGE = 3.0  # the probe's --max-age in these tests (6 heartbeat intervals)


@pytest.fixture(scope="module")
def probe_stack(redis_server) -> Iterator[Stack]:
    """An API and a queue; each test starts the worker it needs. Potpie's first parse call hangs 13 s."""
    sim = fast_simulator(parse_seconds=0.5, hang_seconds=13)
    stack = make_stack(redis_server, sim, "probe", workers=0,
                       **{**FAULT_ENV, "REQUEST_TIMEOUT": "20000", "POTPIE_CALL_ATTEMPTS": "1"})
    yield stack
    stack.stop()
    sim.stop()


def _healthy(stack: Stack, worker) -> bool:
    return worker_health(stack.env, worker.hostname, MAX_AGE).returncode == 0


def test_frozen_worker_is_reported_and_healthy_again_when_thawed(probe_stack: Stack) -> None:
    worker = start_worker(probe_stack.env, "probe-frozen")
    probe_stack.workers.append(worker)
    assert _healthy(probe_stack, worker)
    worker.signal(signal.SIGSTOP)  # a wedged main process: the PID exists, nothing happens
    try:
        time.sleep(MAX_AGE + 1)
        probe = worker_health(probe_stack.env, worker.hostname, MAX_AGE)  # type: ignore[attr-defined]
        assert probe.returncode == 1 and probe.stdout.startswith("unhealthy"), probe.stdout
    finally:
        worker.signal(signal.SIGCONT)
    wait_for(lambda: _healthy(probe_stack, worker), 10, interval=0.5, what="the thawed worker to be healthy")
    worker.stop()


def test_worker_that_silently_stops_consuming_is_reported_and_exits(probe_stack: Stack) -> None:
    worker = start_worker(probe_stack.env, "probe-deaf")
    probe_stack.workers.append(worker)
    # What Celery does after some broker resets (celery#8030): the process lives on, nothing is consumed.
    control = make_celery(Settings.from_env(probe_stack.env)).control
    hostname = worker.hostname  # type: ignore[attr-defined]
    wait_for(lambda: _healthy(probe_stack, worker), 20, interval=0.5, what="the worker to be healthy first")
    for queue in (probe_stack.env["QUEUE_NAME"], f"{hostname}.dq2"):
        replies = control.cancel_consumer(queue, destination=[hostname], reply=True, timeout=5)
        assert replies and "ok" in replies[0][hostname], replies
    stopped = time.monotonic()
    wait_for(lambda: not _healthy(probe_stack, worker), MAX_AGE + 5, interval=0.5, what="the probe to fail")
    worker.proc.wait(20)  # type: ignore[union-attr]  # the supervisor makes it exit for a restart
    took = time.monotonic() - stopped
    assert took < 10 + 8, f"exited {took:.1f} s after it stopped consuming"
    assert "stopped consuming its heartbeat" in worker.log()


def test_worker_busy_with_a_long_step_stays_healthy(probe_stack: Stack) -> None:
    for earlier in probe_stack.workers:
        earlier.stop()
    worker = start_worker(probe_stack.env, "probe-busy", concurrency=1)
    probe_stack.workers.append(worker)
    job_id = probe_stack.submit("timeout/probe-busy")["job_id"]  # its one process waits 13 s on Potpie
    client = probe_stack.redis.client()
    lock = probe_stack.key(f"job:{job_id}:lock")
    wait_for(lambda: client.exists(lock), 15, what="the step to start")
    busy_since = time.monotonic()
    while client.exists(lock) and time.monotonic() - busy_since < 20:
        assert _healthy(probe_stack, worker), "a worker busy with a bounded step is not wedged"
        time.sleep(1)
    busy = time.monotonic() - busy_since
    assert busy > 10 + 1, f"the step held the only process {busy:.1f} s, longer than the 10 s stall limit"
    assert probe_stack.wait_final(job_id, timeout=30)["status"] == "finished"
    assert worker.alive() and "stopped consuming" not in worker.log()
