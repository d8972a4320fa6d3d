"""The P3 baseline: a bare Celery chain with the pipeline's steps and the same Potpie calls, nothing else.

`celery -A bench.chain_app worker` with BENCH_REDIS_URL, BENCH_QUEUE and BENCH_POTPIE_URL set. Each task makes
one Potpie call with a plain requests.Session and hands a small dict to the next; the last writes the job's
total and Potpie time to Redis. No job store, no leases, no events: the floor the service is compared with.
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis
import requests
from celery import Celery, chain

QUEUE = os.environ.get("BENCH_QUEUE", "bench-chain")
POTPIE = os.environ.get("BENCH_POTPIE_URL", "http://127.0.0.1:8765")
RESULTS = "bench:chain:"

app = Celery("bench_chain", broker=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"))
app.conf.update(task_serializer="json", accept_content=["json"], task_ignore_result=True, result_backend=None,
                task_default_queue=QUEUE, task_acks_late=True, worker_prefetch_multiplier=1,
                broker_connection_retry_on_startup=True)
_session: requests.Session | None = None
_redis: redis.Redis | None = None


def _call(state: dict[str, Any], method: str, path: str, **kwargs: Any) -> requests.Response:
    global _session
    if _session is None:
        _session = requests.Session()
        _session.headers.update({"X-API-Key": "sk-simulator", "Accept": "application/json"})
    started = time.perf_counter()
    response = _session.request(method, POTPIE + path, timeout=10, **kwargs)
    response.raise_for_status()
    body = response.text
    state["potpie"] += time.perf_counter() - started
    state["_body"] = body
    return response


@app.task(name="bench.parse")
def parse(state: dict[str, Any]) -> dict[str, Any]:
    """Step 1: submit the parse."""
    state["project"] = _call(state, "POST", "/api/v2/parse", json={"repo_name": state["repo"],
                                                                  "branch_name": "main"}).json()["project_id"]
    return state


@app.task(name="bench.poll")
def poll(state: dict[str, Any]) -> dict[str, Any]:
    """Step 2: poll the parse status (after the poll interval)."""
    state["parse_status"] = _call(state, "GET", f"/api/v2/parsing-status/{state['project']}").json()["status"]
    return state


@app.task(name="bench.conversation")
def conversation(state: dict[str, Any]) -> dict[str, Any]:
    """Step 3: create the conversation."""
    state["conversation"] = _call(state, "POST", "/api/v2/conversations/", json={
        "project_ids": [state["project"]], "agent_ids": ["codebase_qna_agent"]}).json()["conversation_id"]
    return state


@app.task(name="bench.ask")
def ask(state: dict[str, Any], content: str) -> dict[str, Any]:
    """Steps 4 and 5: send a message and read the whole streamed reply."""
    _call(state, "POST", f"/api/v2/conversations/{state['conversation']}/message/", params={"stream": "true"},
          json={"content": content})
    state.pop("_body", None)
    return state


@app.task(name="bench.finish")
def finish(state: dict[str, Any]) -> None:
    """Step 6: record the job's total and Potpie time."""
    global _redis
    if _redis is None:
        _redis = redis.Redis.from_url(os.environ["BENCH_REDIS_URL"])
    total = time.time() - state["t0"]
    pipe = _redis.pipeline(transaction=False)
    pipe.hset(RESULTS + state["job"], mapping={"total": total, "potpie": state["potpie"], "done": time.time()})
    pipe.incr(RESULTS + "done")
    pipe.execute()


def submit(job: str, repo: str, poll_interval: float) -> None:
    """Start one baseline job: the six steps as one chain, the poll after `poll_interval`."""
    state = {"job": job, "repo": repo, "t0": time.time(), "potpie": 0.0}
    chain(parse.s(state), poll.s().set(countdown=poll_interval), conversation.s(),
          ask.s("Explain the repository architecture."),
          ask.s("Now answer with a structured analysis as JSON only."), finish.s()).apply_async(queue=QUEUE)
