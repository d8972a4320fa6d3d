"""Scenario 8: 5,000 submissions in a burst against a low-latency Potpie: every job finishes once, and Redis
memory returns to its baseline once the (short) job TTLs pass."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Iterator

import pytest
import requests

from tests.conftest import SIM_KEY, simulator_stats
from tests.stack import ROOT, RedisServer, free_port, wait_for

pytestmark = pytest.mark.slow

JOBS = 5000
TTL = 8


@pytest.fixture
def sim_process() -> Iterator[SimpleNamespace]:
    """The simulator in a process of its own, so the load it serves does not share this process's GIL."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "potpie_service", "simulator", "--port", str(port),
                             "--parse-seconds", "0", "--api-key", SIM_KEY], cwd=ROOT)
    sim = SimpleNamespace(url=f"http://127.0.0.1:{port}")
    try:
        wait_for(lambda: requests.get(sim.url + "/health", timeout=1).ok, 15, what="the simulator process")
        yield sim
    finally:
        proc.terminate()
        proc.wait(10)


def _memory(server: RedisServer) -> int:
    """Memory the data takes: used_memory without the clients' query and output buffers. The API's connection
    pool grows with the burst (under gevent one connection per concurrent greenlet), and those buffers are the
    connections', not the jobs'."""
    info = server.client().info("memory")
    return int(info["used_memory"]) - int(info["mem_clients_normal"])


@pytest.mark.timeout(420)  # the wait below gives up first, saying where the jobs are
def test_burst_of_5000_jobs_all_finish_once_and_memory_returns(own_redis, sim_process, stacks, emissions) -> None:
    stack = stacks(own_redis, sim_process, "burst", MAX_CONCURRENT_JOBS="200",
                   POTPIE_POLL_INTERVAL="0.1", STEP_GRACE="30", JOB_TTL_COMPLETED=str(TTL),
                   JOB_TTL_FAILED=str(TTL), LOG_LEVEL="warning")
    time.sleep(1)
    baseline = _memory(own_redis)
    keys_before = set(own_redis.client().scan_iter())
    published = emissions(stack)

    local = threading.local()

    def submit(index: int) -> str:
        if not hasattr(local, "session"):
            local.session = requests.Session()
        response = local.session.post(stack.url + "/analyze", json={"repo": f"octocat/burst-{index}"}, timeout=30)
        assert response.status_code == 202, response.text
        return response.json()["job_id"]

    started = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        ids = list(pool.map(submit, range(JOBS)))
    submitted = time.monotonic() - started
    assert len(set(ids)) == JOBS

    peak = baseline

    def all_done() -> bool:
        nonlocal peak
        peak = max(peak, _memory(own_redis))
        return len(published.jobs_with("analysis_complete")) + len(published.jobs_with("analysis_error")) >= JOBS

    try:
        wait_for(all_done, 240, interval=0.5, what=f"{JOBS} final events")
    except AssertionError as exc:  # say where the jobs are, from their records, beside what was published
        pipe = own_redis.client().pipeline(transaction=False)
        for job_id in ids:
            pipe.hget(stack.key(f"job:{job_id}"), "status")
        statuses = Counter(pipe.execute())
        pytest.fail(f"{exc}; final events seen for {len(published.jobs_with('analysis_complete'))} jobs; "
                    f"the jobs' records say {dict(statuses)}; simulator {simulator_stats(sim_process)['requests']}")
    took = time.monotonic() - started
    published.expect_once("analysis_complete", ids)
    assert not published.jobs_with("analysis_error")
    stats = simulator_stats(sim_process)
    assert len(stats["parse_calls"]) == JOBS and set(stats["parse_calls"].values()) == {1}
    assert (stats["requests"]["POST /conversations"], stats["requests"]["POST /message"]) == (JOBS, 2 * JOBS), \
        "no step ran twice"

    # Once the TTLs pass, nothing of the jobs is left: no records, no index entries, memory at its baseline.
    prefix = stack.key("")
    client = own_redis.client()
    wait_for(lambda: not any(True for _ in client.scan_iter(prefix + "job:*", count=1000)), TTL + 15,
             interval=0.5, what="every job record to expire")
    allowed = {prefix + name for name in ("tickets", "durations", "parse-durations", "lock:sweeper", "metrics")}

    def leftovers() -> set[bytes]:  # kombu's unacked keys live a moment around each heartbeat; the jobs' stay
        return set(client.scan_iter()) - keys_before - allowed

    try:
        wait_for(lambda: not leftovers(), 5, interval=0.2, what="only the service's own keys to remain")
    except AssertionError:
        pytest.fail(f"keys the jobs left behind: {leftovers()}")
    after = _memory(own_redis)
    # Without the connections' buffers, what remains above the baseline is a few hash-table and allocator pages,
    # well under 1 MB where the jobs took ~20 MB at the peak.
    assert after - baseline < min(1024 * 1024, (peak - baseline) // 10), (baseline, after, peak)
    print(f"\n{JOBS} jobs: submitted in {submitted:.1f} s ({JOBS / submitted:.0f}/s), all finished in {took:.1f} s "
          f"({JOBS / took:.0f} jobs/s); Redis used_memory {baseline / 1e6:.2f} MB -> peak {peak / 1e6:.2f} MB "
          f"-> {after / 1e6:.2f} MB after the TTLs")
