"""Tests for the Potpie API v2 simulator, talking to it over real HTTP."""
from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from potpie_service.potpie.simulator import STATUSES, Simulator, SimulatorConfig  # noqa: E402

KEY = "sk-test-key"
HEADERS = {"X-API-Key": KEY}
BASE_CONFIG = {"parse_seconds": 0.4, "slow_parse_seconds": 30.0, "latency_ms": 0.0, "hang_seconds": 1.0,
               "message_seconds": 0.0}


@pytest.fixture(scope="module")
def sim() -> Iterator[Simulator]:
    """Run one simulator for the whole module."""
    simulator = Simulator(SimulatorConfig(api_key=KEY, **BASE_CONFIG))
    simulator.start()
    yield simulator
    simulator.stop()


@pytest.fixture(autouse=True)
def fresh(sim: Simulator) -> Iterator[None]:
    """Reset state and timing before every test."""
    requests.post(f"{sim.url}/_sim/reset", timeout=5).raise_for_status()
    requests.post(f"{sim.url}/_sim/config", json=BASE_CONFIG, timeout=5).raise_for_status()
    yield


def post(sim: Simulator, path: str, body: Any = None, **kwargs: Any) -> requests.Response:
    """POST JSON to the simulator with the API key."""
    kwargs.setdefault("headers", HEADERS)
    kwargs.setdefault("timeout", 5)
    return requests.post(f"{sim.url}{path}", json=body, **kwargs)


def get(sim: Simulator, path: str, **kwargs: Any) -> requests.Response:
    """GET from the simulator with the API key."""
    kwargs.setdefault("headers", HEADERS)
    kwargs.setdefault("timeout", 5)
    return requests.get(f"{sim.url}{path}", **kwargs)


def parse(sim: Simulator, repo: str, **extra: Any) -> requests.Response:
    """Submit a repository for parsing."""
    return post(sim, "/api/v2/parse", {"repo_name": repo, **extra})


def project(sim: Simulator, repo: str) -> str:
    """Parse a happy-path-ish repo and return its project id."""
    response = parse(sim, repo)
    assert response.status_code == 200, response.text
    return response.json()["project_id"]


def conversation(sim: Simulator, project_id: str) -> str:
    """Create a conversation with the Q&A agent."""
    response = post(sim, "/api/v2/conversations/", {"project_ids": [project_id], "agent_ids": ["codebase_qna_agent"]})
    assert response.status_code == 200, response.text
    return response.json()["conversation_id"]


def message(sim: Simulator, conversation_id: str, content: str, stream: bool) -> requests.Response:
    """Send a message to a conversation."""
    return post(sim, f"/api/v2/conversations/{conversation_id}/message/", {"content": content},
                params={"stream": str(stream).lower()}, stream=stream)


def split_objects(text: str) -> tuple[list[dict[str, Any]], str]:
    """Split back-to-back JSON objects; return them and any undecodable remainder."""
    decoder, objects, pos = json.JSONDecoder(), [], 0
    while pos < len(text):
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return objects, text[pos:]
        objects.append(obj)
    return objects, ""


def fenced_json(text: str) -> Any:
    """Return the parsed content of the first ```json fence."""
    match = re.search(r"```json\n(.*?)\n```", text, re.S)
    assert match, text
    return json.loads(match.group(1))


def statuses_until(sim: Simulator, project_id: str, stop: set[str], limit: float = 3.0) -> list[str]:
    """Poll the status endpoint until a status in `stop` appears; return the distinct sequence seen."""
    seen: list[str] = []
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        status = get(sim, f"/api/v2/parsing-status/{project_id}").json()["status"]
        if not seen or seen[-1] != status:
            seen.append(status)
        if status in stop:
            break
        time.sleep(0.02)
    return seen


# ---------- auth, routing, transport ----------

def test_missing_key_is_401_with_header(sim: Simulator) -> None:
    response = get(sim, "/api/v2/list-available-agents", headers={})
    assert response.status_code == 401
    assert response.json() == {"detail": "API key is required"}
    assert response.headers["WWW-Authenticate"] == "ApiKey"


def test_wrong_key_is_401_with_header(sim: Simulator) -> None:
    response = post(sim, "/api/v2/parse", {"repo_name": "a/b"}, headers={"X-API-Key": "sk-nope"})
    assert response.status_code == 401
    assert response.json() == {"detail": "Invalid API key"}
    assert response.headers["WWW-Authenticate"] == "ApiKey"
    bearer = get(sim, "/api/v2/list-available-agents", headers={"Authorization": f"Bearer {KEY}"})
    assert bearer.status_code == 401 and bearer.json() == {"detail": "API key is required"}
    assert requests.get(f"{sim.url}/_sim/stats", timeout=5).json()["projects"] == 0


def test_health_needs_no_key(sim: Simulator) -> None:
    response = requests.get(f"{sim.url}/health", timeout=5)
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_trailing_slash_both_forms(sim: Simulator) -> None:
    assert get(sim, "/api/v2/list-available-agents").json() == get(sim, "/api/v2/list-available-agents/").json()
    first = post(sim, "/api/v2/parse", {"repo_name": "acme/slash"}).json()["project_id"]
    second = post(sim, "/api/v2/parse/", {"repo_name": "acme/slash"}).json()["project_id"]
    assert first == second
    assert get(sim, f"/api/v2/parsing-status/{first}/").status_code == 200
    created = post(sim, "/api/v2/conversations", {"project_ids": [first], "agent_ids": ["debugging_agent"]})
    assert created.status_code == 200


def test_unknown_route_is_404_and_wrong_method_405(sim: Simulator) -> None:
    response = get(sim, "/api/v2/nope")
    assert response.status_code == 404 and response.json() == {"detail": "Not Found"}
    assert get(sim, "/api/v2/parse").status_code == 405


def test_agents_list_has_builtin_system_agents(sim: Simulator) -> None:
    agents = get(sim, "/api/v2/list-available-agents").json()
    ids = {agent["id"] for agent in agents}
    assert {"codebase_qna_agent", "debugging_agent", "LLD_agent", "code_generation_agent"} <= ids
    assert all(agent["status"] == "SYSTEM" and agent["visibility"] is None and agent["name"] for agent in agents)


def test_keep_alive_serves_several_requests_on_one_connection(sim: Simulator) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", sim.port, timeout=5)
    for _ in range(3):
        connection.request("POST", "/api/v2/parse", body=json.dumps({"repo_name": "acme/keepalive"}), headers=HEADERS)
        response = connection.getresponse()
        assert response.status == 200 and response.getheader("Content-Length")
        assert json.loads(response.read())["project_id"]
    connection.close()


def test_concurrent_polling(sim: Simulator) -> None:
    project_id = project(sim, "acme/concurrent")
    with ThreadPoolExecutor(max_workers=50) as pool:
        codes = list(pool.map(lambda _: get(sim, f"/api/v2/parsing-status/{project_id}").status_code, range(300)))
    assert codes == [200] * 300
    assert requests.get(f"{sim.url}/_sim/stats", timeout=5).json()["requests"]["GET /parsing-status"] == 300


# ---------- parsing ----------

def test_parse_status_sequence_reaches_ready(sim: Simulator) -> None:
    response = parse(sim, "acme/app", branch_name="dev")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "submitted"
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", body["project_id"])
    seen = statuses_until(sim, body["project_id"], {"ready"})
    assert seen[0] == "submitted" and seen[-1] == "ready" and len(seen) >= 3
    assert [STATUSES.index(s) for s in seen] == sorted(STATUSES.index(s) for s in seen)
    assert get(sim, f"/api/v2/parsing-status/{body['project_id']}").json() == {"status": "ready", "latest": True}


def test_same_repo_returns_same_project(sim: Simulator) -> None:
    first = parse(sim, "acme/same").json()
    second = parse(sim, "acme/same", branch_name="main").json()
    assert first["project_id"] == second["project_id"]
    assert parse(sim, "acme/same", branch_name="other").json()["project_id"] != first["project_id"]
    assert parse(sim, "acme/same", commit_id="abc123").json()["project_id"] != first["project_id"]
    requests.post(f"{sim.url}/_sim/config", json={"parse_seconds": 0}, timeout=5).raise_for_status()
    assert parse(sim, "acme/same").json() == {"project_id": first["project_id"], "status": "ready"}
    calls = requests.get(f"{sim.url}/_sim/stats", timeout=5).json()["parse_calls"]
    assert calls == {"acme/same@main": 4, "acme/same@other": 1}  # the commit-pinned call shares the branch key


def test_already_parsed_owner_is_ready_at_once(sim: Simulator) -> None:
    body = parse(sim, "already-parsed/demo").json()
    assert body["status"] == "ready"
    assert get(sim, f"/api/v2/parsing-status/{body['project_id']}").json() == {"status": "ready", "latest": True}


def test_parse_validation_errors(sim: Simulator) -> None:
    for body in ({}, {"branch_name": "main"}, {"repo_name": 5}, [1]):
        response = post(sim, "/api/v2/parse", body)
        assert response.status_code == 422, body
        detail = response.json()["detail"]
        assert isinstance(detail, list) and {"loc", "msg", "type"} <= set(detail[0])
    not_json = requests.post(f"{sim.url}/api/v2/parse", data="repo=x", headers=HEADERS, timeout=5)
    assert not_json.status_code == 422 and not_json.json()["detail"][0]["type"] == "json_invalid"


def test_parse_local_path_is_400(sim: Simulator) -> None:
    response = post(sim, "/api/v2/parse", {"repo_path": "/tmp/repo"})
    assert response.status_code == 400
    assert response.json() == {"detail": "Parsing local repositories is only supported in development mode"}


def test_parsing_status_unknown_project_is_404(sim: Simulator) -> None:
    response = get(sim, "/api/v2/parsing-status/does-not-exist")
    assert response.status_code == 404 and response.json() == {"detail": "Project not found or access denied"}


def test_parsing_status_by_repo(sim: Simulator) -> None:
    project_id = project(sim, "acme/byrepo")
    found = post(sim, "/api/v2/parsing-status", {"repo_name": "acme/byrepo"})
    assert found.status_code == 200
    assert found.json() == {"project_id": project_id, "repo_name": "acme/byrepo", "status": "submitted", "latest": True}
    missing = post(sim, "/api/v2/parsing-status/", {"repo_name": "acme/byrepo", "branch_name": "nope"})
    assert missing.status_code == 404
    assert missing.json() == {"detail": "Project not found for the given repo_name and commit_id/branch_name"}
    assert post(sim, "/api/v2/parsing-status", {"branch_name": "main"}).status_code == 422


# ---------- conversations and messages ----------

def test_conversation_validation_and_errors(sim: Simulator) -> None:
    project_id = project(sim, "acme/conv")
    assert post(sim, "/api/v2/conversations/", {"project_ids": [project_id]}).status_code == 422
    assert post(sim, "/api/v2/conversations/", {"project_ids": project_id, "agent_ids": ["x"]}).status_code == 422
    error = {"detail": "An unexpected error occurred while creating the conversation."}
    unknown_project = post(sim, "/api/v2/conversations/", {"project_ids": ["x"], "agent_ids": ["codebase_qna_agent"]})
    assert unknown_project.status_code == 500 and unknown_project.json() == error
    unknown_agent = post(sim, "/api/v2/conversations/", {"project_ids": [project_id], "agent_ids": ["no_agent"]})
    assert unknown_agent.status_code == 500 and unknown_agent.json() == error
    ok = post(sim, "/api/v2/conversations/", {"project_ids": [project_id], "agent_ids": ["codebase_qna_agent"]})
    assert ok.status_code == 200 and ok.json()["message"] == "Conversation created successfully."
    assert len(ok.json()["conversation_id"]) == 36


def test_message_non_stream_shape(sim: Simulator) -> None:
    conversation_id = conversation(sim, project(sim, "acme/widget"))
    response = message(sim, conversation_id, "How does auth work in this codebase?", stream=False)
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"message", "citations", "tool_calls", "thinking"}
    assert "acme/widget (branch main)" in body["message"] and "How does auth work" in body["message"]
    assert body["citations"] == ["src/app.py", "src/service.py"]
    assert body["tool_calls"] == [] and body["thinking"] is None


def test_message_validation(sim: Simulator) -> None:
    conversation_id = conversation(sim, project(sim, "acme/valid"))
    empty = message(sim, conversation_id, "   ", stream=False)
    assert empty.status_code == 400 and empty.json() == {"detail": "Message content cannot be empty"}
    assert post(sim, f"/api/v2/conversations/{conversation_id}/message/", {"node_ids": []}).status_code == 422


def test_stream_reassembles_same_text_as_non_stream(sim: Simulator) -> None:
    conversation_id = conversation(sim, project(sim, "acme/stream"))
    full = message(sim, conversation_id, "Explain the architecture", stream=False).json()
    response = message(sim, conversation_id, "Explain the architecture", stream=True)
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/event-stream")
    objects, rest = split_objects(response.content.decode())
    assert rest == "" and len(objects) >= 5
    assert objects[0] == {"message": "", "citations": [], "tool_calls": [], "thinking": None}
    assert "".join(o["message"] for o in objects) == full["message"]
    assert objects[-1]["citations"] == full["citations"] and all(o["citations"] == [] for o in objects[:-1])


def test_json_reply_has_parseable_fenced_block(sim: Simulator) -> None:
    conversation_id = conversation(sim, project(sim, "acme/json"))
    text = message(sim, conversation_id, "Describe the repo. Reply in JSON.", stream=False).json()["message"]
    data = fenced_json(text)
    assert set(data) == {"overview", "snippets", "architecture", "risks_and_gaps"} and "acme/json" in data["overview"]
    assert len(data["snippets"]) == 3
    first = data["snippets"][0]
    assert first == {"node_id": "src/app.py:1-20", "file_path": "src/app.py", "line_start": 1, "line_end": 20,
                     "tags": ["entrypoint"], "description": first["description"]} and first["description"]


def test_unknown_conversation(sim: Simulator) -> None:
    streamed = message(sim, "no-such-conversation", "hi", stream=True)
    assert streamed.status_code == 200 and streamed.content == b""
    plain = message(sim, "no-such-conversation", "hi", stream=False)
    assert plain.status_code == 500 and "detail" in plain.json()


def test_project_message_endpoint(sim: Simulator) -> None:
    project_id = project(sim, "acme/direct")
    response = post(sim, f"/api/v2/project/{project_id}/message/", {"content": "What is this?"})
    assert response.status_code == 200 and "acme/direct" in response.json()["message"]
    assert post(sim, f"/api/v2/project/{project_id}/message", {"content": "x", "agent_id": "bogus"}).status_code == 500
    assert post(sim, "/api/v2/project/unknown/message", {"content": "x"}).status_code == 500


# ---------- scenarios ----------

def test_flaky_first_call_of_each_kind_is_503(sim: Simulator) -> None:
    unavailable = {"detail": "Service temporarily unavailable"}
    first = parse(sim, "flaky/repo")
    assert first.status_code == 503 and first.json() == unavailable
    assert requests.get(f"{sim.url}/_sim/stats", timeout=5).json()["projects"] == 0
    project_id = project(sim, "flaky/repo")
    assert get(sim, f"/api/v2/parsing-status/{project_id}").status_code == 503
    assert get(sim, f"/api/v2/parsing-status/{project_id}").status_code == 200
    body = {"project_ids": [project_id], "agent_ids": ["codebase_qna_agent"]}
    assert post(sim, "/api/v2/conversations/", body).status_code == 503
    conversation_id = conversation(sim, project_id)
    assert message(sim, conversation_id, "hello", stream=False).status_code == 503
    assert message(sim, conversation_id, "hello", stream=False).status_code == 200


def test_rate_limited_first_parse_is_429_with_retry_after(sim: Simulator) -> None:
    first = parse(sim, "rate-limited/repo")
    assert first.status_code == 429 and first.json() == {"detail": "Too many requests"}
    assert first.headers["Retry-After"] == "1"
    assert parse(sim, "rate-limited/repo").status_code == 200


def test_usage_limit_conversation_is_402(sim: Simulator) -> None:
    project_id = project(sim, "usage-limit/repo")
    response = post(sim, "/api/v2/conversations/", {"project_ids": [project_id], "agent_ids": ["codebase_qna_agent"]})
    assert response.status_code == 402 and response.json() == {"detail": "Message limit of 50 reached for free plan."}


def test_parse_error_scenario_ends_in_error_and_reparse_creates_new_project(sim: Simulator) -> None:
    requests.post(f"{sim.url}/_sim/config", json={"parse_seconds": 0.8}, timeout=5).raise_for_status()
    project_id = project(sim, "Parse-Error/repo")
    seen = statuses_until(sim, project_id, {"error", "ready"})
    assert seen == ["submitted", "cloned", "error"]
    time.sleep(0.1)
    assert get(sim, f"/api/v2/parsing-status/{project_id}").json()["status"] == "error"
    assert project(sim, "parse-error/repo") != project_id


def test_stuck_stays_submitted(sim: Simulator) -> None:
    project_id = project(sim, "stuck/repo")
    time.sleep(0.5)
    assert get(sim, f"/api/v2/parsing-status/{project_id}").json()["status"] == "submitted"


def test_slow_parse_uses_slow_parse_seconds(sim: Simulator) -> None:
    requests.post(f"{sim.url}/_sim/config", json={"slow_parse_seconds": 0.8}, timeout=5).raise_for_status()
    slow, fast = project(sim, "slow-parse/repo"), project(sim, "acme/fast")
    time.sleep(0.45)
    assert get(sim, f"/api/v2/parsing-status/{fast}").json()["status"] == "ready"
    assert get(sim, f"/api/v2/parsing-status/{slow}").json()["status"] in {"parsed", "inferring"}
    time.sleep(0.4)
    assert get(sim, f"/api/v2/parsing-status/{slow}").json()["status"] == "ready"


def test_bad_json_first_two_status_bodies_are_invalid(sim: Simulator) -> None:
    project_id = project(sim, "bad-json/repo")
    for _ in range(2):
        response = get(sim, f"/api/v2/parsing-status/{project_id}")
        assert response.status_code == 200 and response.headers["Content-Type"] == "application/json"
        with pytest.raises(ValueError):
            response.json()
    assert get(sim, f"/api/v2/parsing-status/{project_id}").json()["status"] in STATUSES


def test_malformed_reply_has_unparseable_json_but_normal_prose(sim: Simulator) -> None:
    conversation_id = conversation(sim, project(sim, "malformed-reply/repo"))
    text = message(sim, conversation_id, "Answer in JSON please", stream=False).json()["message"]
    assert "```json" in text
    with pytest.raises(json.JSONDecodeError):
        fenced_json(text)
    prose = message(sim, conversation_id, "What does it do?", stream=False).json()
    assert "malformed-reply/repo" in prose["message"] and prose["citations"] == ["src/app.py", "src/service.py"]


def test_truncated_stream_first_reply_cut_mid_object(sim: Simulator) -> None:
    conversation_id = conversation(sim, project(sim, "truncated-stream/repo"))
    response = message(sim, conversation_id, "hello", stream=True)
    received = b""
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        for chunk in response.iter_content(chunk_size=None):
            received += chunk
    objects, rest = split_objects(received.decode())
    assert rest.startswith('{"message": ') and objects
    again = message(sim, conversation_id, "hello", stream=True)
    objects, rest = split_objects(again.content.decode())
    assert rest == "" and objects[-1]["citations"]


def test_truncated_stream_non_stream_first_body_invalid(sim: Simulator) -> None:
    conversation_id = conversation(sim, project(sim, "truncated-stream/plain"))
    first = message(sim, conversation_id, "hello", stream=False)
    assert first.status_code == 200
    with pytest.raises(ValueError):
        first.json()
    assert "truncated-stream/plain" in message(sim, conversation_id, "hello", stream=False).json()["message"]


def test_timeout_first_parse_hangs(sim: Simulator) -> None:
    started = time.monotonic()
    with pytest.raises(requests.exceptions.Timeout):
        post(sim, "/api/v2/parse", {"repo_name": "timeout/repo"}, timeout=0.3)
    assert time.monotonic() - started < 0.9
    started = time.monotonic()
    assert parse(sim, "timeout/repo").status_code == 200
    assert time.monotonic() - started < 0.5


def test_server_error_every_parse_is_500(sim: Simulator) -> None:
    for _ in range(2):
        response = parse(sim, "server-error/repo")
        assert response.status_code == 500 and response.json() == {"detail": "Internal server error"}


def test_not_found_status_is_404(sim: Simulator) -> None:
    project_id = project(sim, "not-found/repo")
    response = get(sim, f"/api/v2/parsing-status/{project_id}")
    assert response.status_code == 404 and response.json() == {"detail": "Project not found or access denied"}
    assert post(sim, "/api/v2/parsing-status", {"repo_name": "not-found/repo"}).status_code == 404


def test_unauthorized_repo_is_401(sim: Simulator) -> None:
    by_repo = post(sim, "/api/v2/parsing-status", {"repo_name": "unauthorized/repo"})
    for response in (parse(sim, "unauthorized/repo"), by_repo):
        assert response.status_code == 401 and response.json() == {"detail": "Invalid API key"}
        assert response.headers["WWW-Authenticate"] == "ApiKey"


# ---------- control endpoints ----------

def test_stats_count_requests_and_parse_calls(sim: Simulator) -> None:
    project_id = project(sim, "acme/stats")
    parse(sim, "acme/stats")
    get(sim, f"/api/v2/parsing-status/{project_id}")
    message(sim, conversation(sim, project_id), "hi", stream=False)
    stats = requests.get(f"{sim.url}/_sim/stats", timeout=5).json()
    assert stats["parse_calls"] == {"acme/stats@main": 2} and stats["projects"] == 1
    expected = {"POST /parse": 2, "GET /parsing-status": 1, "POST /conversations": 1, "POST /message": 1}
    assert {k: stats["requests"][k] for k in expected} == expected
    assert stats["requests"]["POST /parsing-status"] == 0


def test_reset_clears_everything(sim: Simulator) -> None:
    assert parse(sim, "flaky/reset").status_code == 503
    project_id = project(sim, "flaky/reset")
    assert requests.post(f"{sim.url}/_sim/reset", timeout=5).status_code == 200
    stats = requests.get(f"{sim.url}/_sim/stats", timeout=5).json()
    assert stats["projects"] == 0 and stats["parse_calls"] == {} and set(stats["requests"].values()) == {0}
    assert get(sim, f"/api/v2/parsing-status/{project_id}").status_code == 404
    assert parse(sim, "flaky/reset").status_code == 503  # "first call" counters were reset too


def test_config_updates_live(sim: Simulator) -> None:
    response = requests.post(f"{sim.url}/_sim/config", json={"latency_ms": 150, "parse_seconds": 0}, timeout=5)
    assert response.status_code == 200
    assert response.json()["latency_ms"] == 150 and response.json()["parse_seconds"] == 0
    started = time.monotonic()
    body = parse(sim, "acme/instant").json()
    assert time.monotonic() - started >= 0.15
    assert get(sim, f"/api/v2/parsing-status/{body['project_id']}").json()["status"] == "ready"
    assert requests.post(f"{sim.url}/_sim/config", json={"parse_seconds": -1}, timeout=5).status_code == 422
    assert requests.post(f"{sim.url}/_sim/config", json={"api_key": "x"}, timeout=5).status_code == 422


def test_message_seconds_streams_a_reply_over_that_time_and_counts_it_in_flight(sim: Simulator) -> None:
    requests.post(f"{sim.url}/_sim/config", json={"parse_seconds": 0, "message_seconds": 1.5}, timeout=5)
    project = parse(sim, "acme/slow-agent").json()["project_id"]
    conversation = post(sim, "/api/v2/conversations/", {"project_ids": [project],
                                                       "agent_ids": ["codebase_qna_agent"]}).json()["conversation_id"]
    arrivals: list[float] = []
    in_flight: list[int] = []
    started = time.monotonic()
    with post(sim, f"/api/v2/conversations/{conversation}/message/", {"content": "Why?"}, stream=True) as reply:
        for chunk in reply.iter_content(chunk_size=None):
            arrivals.append(time.monotonic() - started)
            in_flight.append(requests.get(f"{sim.url}/_sim/stats", timeout=5).json()["messages_in_flight"])
            assert chunk
    assert arrivals[-1] >= 1.4 and len(arrivals) >= 3, arrivals  # deltas over the whole 1.5 s, not at once
    assert in_flight[0] == 1
    stats = requests.get(f"{sim.url}/_sim/stats", timeout=5).json()
    assert stats["messages_in_flight"] == 0 and stats["messages_in_flight_peak"] == 1
    assert stats["calls_in_flight"] == 0 and stats["calls_in_flight_peak"] >= 1
    started = time.monotonic()
    whole = post(sim, f"/api/v2/conversations/{conversation}/message/", {"content": "Why?"},
                 params={"stream": "false"})
    assert whole.status_code == 200 and time.monotonic() - started >= 1.5  # the agent's time, then one object


# ---------- CLI ----------

def test_cli_serves_prints_banner_accepts_env_key_and_exits_cleanly_on_ctrl_c() -> None:
    env = {**os.environ, "SIMULATOR_API_KEY": "sk-cli-key", "POTPIE_API_KEY": "sk-potpie-env", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "potpie_service.potpie.simulator", "--port", "0", "--parse-seconds", "0"]
    process = subprocess.Popen(command,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        match = re.fullmatch(r"Potpie simulator listening on (http://127\.0\.0\.1:\d+) \(api key: sk-cli…\)", line)
        assert match, line
        for key in ("sk-cli-key", "sk-potpie-env"):
            response = requests.post(f"{match.group(1)}/api/v2/parse", json={"repo_name": "a/b"},
                                     headers={"X-API-Key": key}, timeout=5)
            assert response.status_code == 200 and response.json()["status"] in {"submitted", "ready"}
        wrong = requests.get(f"{match.group(1)}/api/v2/list-available-agents", headers={"X-API-Key": "sk-x"}, timeout=5)
        assert wrong.status_code == 401
    finally:
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=10)
    assert process.returncode == 0 and "Traceback" not in stderr
