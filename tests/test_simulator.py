"""Tests for the Potpie API v2 simulator, talking to it over real HTTP."""
from __future__ import annotations

import hashlib
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

from potpie_service.potpie.simulator import SETUP_BANNER, STATUSES, Simulator, SimulatorConfig  # noqa: E402

KEY = "sk-test-key"
HEADERS = {"X-API-Key": KEY}
BASE_CONFIG = {"parse_seconds": 0.4, "slow_parse_seconds": 30.0, "latency_ms": 0.0, "hang_seconds": 1.0,
               "message_seconds": 0.0, "stuck_threshold_seconds": 600.0, "register_ms": 0.0, "stop_seconds": 0.2,
               "walk": "server"}


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


def message(sim: Simulator, conversation_id: str, content: str, stream: bool, **params: str) -> requests.Response:
    """Send a message to a conversation."""
    return post(sim, f"/api/v2/conversations/{conversation_id}/message/", {"content": content},
                params={"stream": str(stream).lower(), **params}, stream=stream)


def stats(sim: Simulator) -> dict[str, Any]:
    """The simulator's counters."""
    return requests.get(f"{sim.url}/_sim/stats", timeout=5).json()


def sanitized(response: requests.Response, status: int, detail: str, code: str) -> bool:
    """Whether the response is Potpie's sanitized error: the fixed text, its code and the request's id."""
    body = response.json()
    return (response.status_code == status and body == {"detail": detail, "code": code,
                                                        "request_id": response.headers["X-Request-ID"]})


def configure(sim: Simulator, **values: Any) -> None:
    """Change the simulator's settings for this test (the autouse fixture restores them)."""
    requests.post(f"{sim.url}/_sim/config", json=values, timeout=5).raise_for_status()


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
    assert sanitized(response, 401, "Authentication required.", "authentication_required")
    assert response.headers["WWW-Authenticate"] == "ApiKey"


def test_wrong_key_is_401_with_header(sim: Simulator) -> None:
    response = post(sim, "/api/v2/parse", {"repo_name": "a/b"}, headers={"X-API-Key": "sk-nope"})
    assert sanitized(response, 401, "Authentication required.", "authentication_required")
    assert response.headers["WWW-Authenticate"] == "ApiKey"
    bearer = get(sim, "/api/v2/list-available-agents", headers={"Authorization": f"Bearer {KEY}"})
    assert sanitized(bearer, 401, "Authentication required.", "authentication_required")
    assert stats(sim)["projects"] == 0


def test_every_answer_carries_the_request_id_a_client_sent_or_a_new_one(sim: Simulator) -> None:
    mine = get(sim, "/api/v2/list-available-agents", headers={**HEADERS, "X-Request-ID": "psvc-job.step-a1_2"})
    assert mine.headers["X-Request-ID"] == "psvc-job.step-a1_2"
    for bad in ("has space", "x" * 129, ""):
        other = get(sim, "/api/v2/nope", headers={**HEADERS, "X-Request-ID": bad})
        assert re.fullmatch(r"[0-9a-f-]{36}", other.headers["X-Request-ID"])
        assert other.json()["request_id"] == other.headers["X-Request-ID"]


def test_health_needs_no_key(sim: Simulator) -> None:
    response = requests.get(f"{sim.url}/health", timeout=5)
    assert response.status_code == 200 and response.json()["status"] == "ok"


def test_trailing_slash_both_forms(sim: Simulator) -> None:
    assert get(sim, "/api/v2/list-available-agents").json() == get(sim, "/api/v2/list-available-agents/").json()
    first = post(sim, "/api/v2/parse", {"repo_name": "acme/slash"}).json()["project_id"]
    second = post(sim, "/api/v2/parse/", {"repo_name": "acme/slash"}).json()["project_id"]
    assert first == second
    assert get(sim, f"/api/v2/parsing-status/{first}/").status_code == 200
    created = post(sim, "/api/v2/conversations", {"project_ids": [first], "agent_ids": ["debugging_agent"]})
    assert created.status_code == 200


def test_unknown_route_is_404_and_wrong_method_405(sim: Simulator) -> None:
    assert sanitized(get(sim, "/api/v2/nope"), 404, "Resource not found.", "not_found")
    assert sanitized(get(sim, "/api/v2/parse"), 405, "Method not allowed.", "method_not_allowed")


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
    assert stats(sim)["requests"]["GET /parsing-status"] == 300


# ---------- parsing: what the server code does (§8.1) ----------

def test_a_parse_says_only_submitted_until_ready(sim: Simulator) -> None:
    response = parse(sim, "acme/app", branch_name="dev")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "submitted"
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", body["project_id"])
    assert statuses_until(sim, body["project_id"], {"ready"}) == ["submitted", "ready"]
    # a branch parse stores no commit, so the server never calls it the latest
    assert get(sim, f"/api/v2/parsing-status/{body['project_id']}").json() == {"status": "ready", "latest": False}


def test_the_rich_walk_is_an_option_for_demos(sim: Simulator) -> None:
    configure(sim, walk="rich")
    project_id = project(sim, "acme/rich")
    seen = statuses_until(sim, project_id, {"ready"})
    assert seen[0] == "submitted" and seen[-1] == "ready" and len(seen) >= 3
    assert [STATUSES.index(s) for s in seen] == sorted(STATUSES.index(s) for s in seen)
    reply = message(sim, conversation(sim, project_id), "What is it?", stream=False).json()
    assert reply["citations"] == ["src/app.py", "src/service.py"]
    assert requests.post(f"{sim.url}/_sim/config", json={"walk": "kind"}, timeout=5).status_code == 422


def test_the_same_repo_returns_the_same_project_and_a_second_parse_runs_under_it(sim: Simulator) -> None:
    first = parse(sim, "acme/same").json()
    second = parse(sim, "acme/same", branch_name="main").json()
    # found still `submitted`: parsed again under the same id (the running parse goes on)
    assert second == {"project_id": first["project_id"], "status": "submitted"}
    assert parse(sim, "acme/same", branch_name="other").json()["project_id"] != first["project_id"]
    assert parse(sim, "acme/same", commit_id="abc1234").json()["project_id"] != first["project_id"]
    assert parse(sim, "Acme/Same").json()["project_id"] != first["project_id"]  # names are not normalized
    configure(sim, parse_seconds=0)
    assert parse(sim, "acme/same").json() == {"project_id": first["project_id"], "status": "ready"}
    counted = stats(sim)
    assert counted["parse_calls"] == {"acme/same@main": 4, "acme/same@other": 1, "Acme/Same@main": 1}
    # two parses of the branch project (new, re-parse), one of the pinned project; none for the ready answer
    assert counted["parses_started"] == {"acme/same@main": 3, "acme/same@other": 1, "Acme/Same@main": 1}


def test_two_first_parses_at_once_make_two_projects(sim: Simulator) -> None:
    configure(sim, register_ms=300)
    with ThreadPoolExecutor(max_workers=2) as pool:
        ids = list(pool.map(lambda _: parse(sim, "acme/race").json()["project_id"], range(2)))
    assert ids[0] != ids[1]
    assert stats(sim)["projects_by_repo"] == {"acme/race@main": 2}


def test_a_long_parse_is_queued_again_by_the_status_route_not_by_the_lookup(sim: Simulator) -> None:
    configure(sim, stuck_threshold_seconds=0.3)
    project_id = project(sim, "stuck/long")
    time.sleep(0.4)
    for _ in range(3):
        assert post(sim, "/api/v2/parsing-status", {"repo_name": "stuck/long"}).json()["status"] == "submitted"
    assert stats(sim)["parses_started"]["stuck/long@main"] == 1
    assert get(sim, f"/api/v2/parsing-status/{project_id}").json()["status"] == "submitted"
    assert get(sim, f"/api/v2/parsing-status/{project_id}").json()["status"] == "submitted"  # updated_at was reset
    assert stats(sim)["parses_started"]["stuck/long@main"] == 2


def test_a_pinned_commit_is_latest_until_the_branch_moves(sim: Simulator) -> None:
    head = requests.get(f"{sim.url}/github/repos/acme/pinned/commits/main",
                        headers={"Accept": "application/vnd.github.sha"}, timeout=5).text
    project_id = parse(sim, "acme/pinned", commit_id=head).json()["project_id"]
    assert get(sim, f"/api/v2/parsing-status/{project_id}").json()["latest"] is True
    requests.post(f"{sim.url}/_sim/github/push", json={"repo": "acme/pinned", "branch": "main"}, timeout=5)
    assert get(sim, f"/api/v2/parsing-status/{project_id}").json()["latest"] is False
    assert parse(sim, "acme/pinned", commit_id=head).json()["project_id"] == project_id  # found by its commit


def test_already_parsed_owner_is_ready_at_once(sim: Simulator) -> None:
    body = parse(sim, "already-parsed/demo").json()
    assert body["status"] == "ready"
    assert get(sim, f"/api/v2/parsing-status/{body['project_id']}").json() == {"status": "ready", "latest": False}


def test_parse_validation_errors(sim: Simulator) -> None:
    for body in ({}, {"branch_name": "main"}, {"repo_name": 5}, [1]):
        response = post(sim, "/api/v2/parse", body)
        assert response.status_code == 422, body
        detail = response.json()["detail"]
        assert isinstance(detail, list) and {"loc", "msg", "type"} <= set(detail[0])
        assert response.json()["code"] == "validation_error"
    not_json = requests.post(f"{sim.url}/api/v2/parse", data="repo=x", headers=HEADERS, timeout=5)
    assert not_json.status_code == 422 and not_json.json()["detail"][0]["type"] == "json_invalid"


def test_parse_local_path_is_400(sim: Simulator) -> None:
    assert sanitized(post(sim, "/api/v2/parse", {"repo_path": "/tmp/repo"}), 400, "Invalid request.",
                     "invalid_request")


def test_parsing_status_unknown_project_is_404(sim: Simulator) -> None:
    assert sanitized(get(sim, "/api/v2/parsing-status/does-not-exist"), 404, "Resource not found.", "not_found")


def test_parsing_status_by_repo_and_the_project_list(sim: Simulator) -> None:
    project_id = project(sim, "acme/byrepo")
    found = post(sim, "/api/v2/parsing-status", {"repo_name": "acme/byrepo"})
    assert found.status_code == 200
    assert found.json() == {"project_id": project_id, "repo_name": "acme/byrepo", "status": "submitted",
                            "latest": False}
    missing = post(sim, "/api/v2/parsing-status/", {"repo_name": "acme/byrepo", "branch_name": "nope"})
    assert sanitized(missing, 404, "Resource not found.", "not_found")
    assert post(sim, "/api/v2/parsing-status", {"branch_name": "main"}).status_code == 422
    listed = get(sim, "/api/v2/projects/list").json()
    assert listed == [{"id": project_id, "repo_name": "acme/byrepo", "branch_name": "main", "status": "submitted"}]


# ---------- conversations, runs and replies (§8.2-8.4, §8.7) ----------

def test_conversation_validation_and_errors(sim: Simulator) -> None:
    project_id = project(sim, "acme/conv")
    assert post(sim, "/api/v2/conversations/", {"project_ids": [project_id]}).status_code == 422
    assert post(sim, "/api/v2/conversations/", {"project_ids": project_id, "agent_ids": ["x"]}).status_code == 422
    internal = ("An internal error occurred. Please try again later.", "internal_error")
    unknown_project = post(sim, "/api/v2/conversations/", {"project_ids": ["x"], "agent_ids": ["codebase_qna_agent"]})
    assert sanitized(unknown_project, 500, *internal)
    unknown_agent = post(sim, "/api/v2/conversations/", {"project_ids": [project_id], "agent_ids": ["no_agent"]})
    assert sanitized(unknown_agent, 500, *internal)
    ok = post(sim, "/api/v2/conversations/", {"project_ids": [project_id], "agent_ids": ["codebase_qna_agent"]})
    assert ok.status_code == 200 and ok.json()["message"] == "Conversation created successfully."
    assert len(ok.json()["conversation_id"]) == 36


def test_a_projects_first_reply_opens_with_the_setup_banner(sim: Simulator) -> None:
    conversation_id = conversation(sim, project(sim, "acme/widget"))
    response = message(sim, conversation_id, "How does auth work in this codebase?", stream=False)
    assert response.status_code == 200
    assert SETUP_BANNER.encode() in response.content  # raw UTF-8, as FastAPI's JSON writes it
    body = response.json()
    assert set(body) == {"message", "citations", "tool_calls", "thinking"}
    assert body["message"].startswith(SETUP_BANNER + "The repository acme/widget (branch main)")  # glued
    assert "How does auth work" in body["message"]
    assert body["citations"] == [] and body["thinking"] is None
    assert [json.loads(call)["event_type"] for call in body["tool_calls"]] == ["call"]  # JSON strings (§8.4)
    again = message(sim, conversation_id, "How does auth work in this codebase?", stream=False).json()
    assert again["message"] == body["message"][len(SETUP_BANNER):]  # the workspace is set up now


def test_message_validation(sim: Simulator) -> None:
    conversation_id = conversation(sim, project(sim, "acme/valid"))
    assert sanitized(message(sim, conversation_id, "   ", stream=False), 400, "Invalid request.", "invalid_request")
    assert post(sim, f"/api/v2/conversations/{conversation_id}/message/", {"node_ids": []}).status_code == 422


def test_a_stream_is_objects_back_to_back_with_no_end_marker(sim: Simulator) -> None:
    conversation_id = conversation(sim, project(sim, "acme/stream"))
    response = message(sim, conversation_id, "Explain the architecture", stream=True)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert b"\\u23f3" in response.content  # json.dumps' ASCII escapes
    objects, rest = split_objects(response.content.decode())
    assert rest == "" and len(objects) >= 6
    assert objects[0] == {"message": SETUP_BANNER, "citations": [], "tool_calls": [], "thinking": None}
    assert objects[2]["message"] == "" and objects[2]["tool_calls"]  # a chunk with only a tool call
    full = message(sim, conversation_id, "Explain the architecture", stream=False).json()
    assert "".join(o["message"] for o in objects[1:]) == full["message"]
    assert all(o["citations"] == [] for o in objects)


def test_json_reply_has_parseable_fenced_block(sim: Simulator) -> None:
    conversation_id = conversation(sim, project(sim, "acme/json"))
    text = message(sim, conversation_id, "Describe the repo. Reply in JSON.", stream=False).json()["message"]
    data = fenced_json(text)
    assert set(data) == {"overview", "snippets", "architecture", "risks_and_gaps"} and "acme/json" in data["overview"]
    assert len(data["snippets"]) == 3
    first = data["snippets"][0]
    assert first == {"node_id": "src/app.py:1-20", "file_path": "src/app.py", "line_start": 1, "line_end": 20,
                     "tags": ["entrypoint"], "description": first["description"]} and first["description"]


def test_unknown_conversation_fails_in_the_worker(sim: Simulator) -> None:
    streamed = message(sim, "no-such-conversation", "hi", stream=True)
    assert streamed.status_code == 200 and streamed.content == b""
    plain = message(sim, "no-such-conversation", "hi", stream=False)
    assert sanitized(plain, 500, "An internal error occurred. Please try again later.", "internal_error")


@pytest.mark.parametrize("owner, streamed_text, whole_status", [
    ("agent-error", "", 500),            # fails before its first chunk
    ("agent-cut", "The repository", 500),  # fails after some chunks
    ("agent-expired", "", 200),          # its stream expires: a whole reply gets the text so far
])
def test_a_failed_run_ends_as_a_clean_200_stream_and_a_whole_reply_says_so(sim: Simulator, owner: str,
                                                                              streamed_text: str,
                                                                              whole_status: int) -> None:
    streamed_project, whole_project = project(sim, f"{owner}/stream"), project(sim, f"{owner}/whole")
    time.sleep(0.45)
    streamed = message(sim, conversation(sim, streamed_project), "What is it?", stream=True)
    objects, rest = split_objects(streamed.content.decode())
    assert streamed.status_code == 200 and rest == ""
    assert objects[0]["message"] == SETUP_BANNER  # the banner comes first either way
    text = "".join(o["message"] for o in objects[1:])
    assert text.startswith(streamed_text) and len(text) < 80
    whole = message(sim, conversation(sim, whole_project), "What is it?", stream=False)
    assert whole.status_code == whole_status
    if whole_status == 200:
        assert whole.json()["message"] == SETUP_BANNER  # the text collected: only the banner
    complete = message(sim, conversation(sim, whole_project), "What is it?", stream=False).json()
    assert complete["message"].startswith(f"The repository {owner}/whole")  # the next run completes


def test_a_run_is_named_by_its_session_id_and_a_taken_one_gets_a_suffix(sim: Simulator) -> None:
    conversation_id = conversation(sim, project(sim, "acme/sessions"))
    for _ in range(2):
        assert message(sim, conversation_id, "hi", stream=False, session_id="run-a").status_code == 200
    message(sim, conversation_id, "hi", stream=False)
    assert stats(sim)["sessions"] == ["run-a", "run-a-1", "conversation:sim-user:new"]


def test_stop_ends_a_streaming_run_cleanly(sim: Simulator) -> None:
    configure(sim, message_seconds=3)
    conversation_id = conversation(sim, project(sim, "acme/stop"))
    started = time.monotonic()
    with message(sim, conversation_id, "Why?", stream=True, session_id="run-stop") as reply:
        stopper = ThreadPoolExecutor(max_workers=1).submit(
            lambda: post(sim, f"/api/v2/conversations/{conversation_id}/stop", params={"session_id": "run-stop"}))
        received = b"".join(reply.iter_content(chunk_size=None))
    answer = stopper.result(5)
    assert answer.status_code == 200 and answer.json() == {"status": "success", "saved_partial": True,
                                                            "message": "Cancellation signal sent and task revoked",
                                                            "message_id": None}
    assert time.monotonic() - started < 2.0, "the 3 s reply ended at the stop"
    objects, rest = split_objects(received.decode())
    assert rest == "" and len(objects) < 6  # ended cleanly, after the chunks sent so far
    assert stats(sim)["stops"] == {"run-stop": 1} and stats(sim)["runs_in_flight"] == []
    nothing = post(sim, f"/api/v2/conversations/{conversation_id}/stop")
    assert nothing.json() == {"status": "success", "message": "No active session to stop"}


def test_project_message_endpoint(sim: Simulator) -> None:
    project_id = project(sim, "acme/direct")
    response = post(sim, f"/api/v2/project/{project_id}/message/", {"content": "What is this?"})
    assert response.status_code == 200 and response.json()["message"].startswith("The repository acme/direct")
    assert post(sim, f"/api/v2/project/{project_id}/message", {"content": "x", "agent_id": "bogus"}).status_code == 500
    assert post(sim, "/api/v2/project/unknown/message", {"content": "x"}).status_code == 500


# ---------- GitHub's branch heads (/github) ----------

def test_github_answers_a_branch_head_and_keeps_only_token_hashes(sim: Simulator) -> None:
    url = f"{sim.url}/github/repos/acme/gh/commits/feature/x"
    sha = requests.get(url, headers={"Accept": "application/vnd.github.sha", "Authorization": "Bearer ghp_marker"},
                       timeout=5)
    assert sha.status_code == 200 and re.fullmatch(r"[0-9a-f]{40}", sha.text)
    assert requests.get(url, timeout=5).json()["sha"] == sha.text
    moved = requests.post(f"{sim.url}/_sim/github/push", json={"repo": "acme/gh", "branch": "feature/x"}, timeout=5)
    assert moved.json()["sha"] != sha.text and requests.get(url, timeout=5).json()["sha"] == moved.json()["sha"]
    assert requests.get(f"{sim.url}/github/repos/github-missing/x/commits/main", timeout=5).status_code == 404
    assert requests.get(f"{sim.url}/github/repos/github-down/x/commits/main", timeout=5).status_code == 503
    private = f"{sim.url}/github/repos/github-private/x/commits/main"
    assert requests.get(private, timeout=5).status_code == 404
    assert requests.get(private, headers={"Authorization": "Bearer t"}, timeout=5).status_code == 200
    github = stats(sim)["github"]
    assert github["calls"] == 7 and "ghp_marker" not in json.dumps(stats(sim))
    assert hashlib.sha256(b"ghp_marker").hexdigest() in github["token_sha256"]


# ---------- scenarios ----------

def test_flaky_first_call_of_each_kind_is_503(sim: Simulator) -> None:
    unavailable = ("Service temporarily unavailable. Please try again later.", "service_unavailable")
    assert sanitized(parse(sim, "flaky/repo"), 503, *unavailable)
    assert stats(sim)["projects"] == 0
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
    assert sanitized(first, 429, "Too many requests. Please try again later.", "rate_limited")
    assert first.headers["Retry-After"] == "1"
    assert parse(sim, "rate-limited/repo").status_code == 200


def test_usage_limit_conversation_is_402(sim: Simulator) -> None:
    project_id = project(sim, "usage-limit/repo")
    response = post(sim, "/api/v2/conversations/", {"project_ids": [project_id], "agent_ids": ["codebase_qna_agent"]})
    assert sanitized(response, 402, "The request could not be completed.", "request_failed")


def test_a_parse_that_errors_is_parsed_again_under_the_same_id(sim: Simulator) -> None:
    configure(sim, parse_seconds=0.8)
    project_id = project(sim, "parse-error/repo")
    assert statuses_until(sim, project_id, {"error", "ready"}) == ["submitted", "error"]
    assert parse(sim, "parse-error/repo").json() == {"project_id": project_id, "status": "submitted"}
    assert get(sim, f"/api/v2/parsing-status/{project_id}").json()["status"] == "submitted"  # a fresh run
    assert stats(sim)["parses_started"] == {"parse-error/repo@main": 2}


def test_stuck_stays_submitted(sim: Simulator) -> None:
    project_id = project(sim, "stuck/repo")
    time.sleep(0.5)
    assert get(sim, f"/api/v2/parsing-status/{project_id}").json()["status"] == "submitted"


def test_slow_parse_uses_slow_parse_seconds(sim: Simulator) -> None:
    configure(sim, slow_parse_seconds=0.8)
    slow, fast = project(sim, "slow-parse/repo"), project(sim, "acme/fast")
    time.sleep(0.45)
    assert get(sim, f"/api/v2/parsing-status/{fast}").json()["status"] == "ready"
    assert get(sim, f"/api/v2/parsing-status/{slow}").json()["status"] == "submitted"
    time.sleep(0.4)
    assert get(sim, f"/api/v2/parsing-status/{slow}").json()["status"] == "ready"


def test_bad_json_first_two_status_bodies_are_invalid(sim: Simulator) -> None:
    project_id = project(sim, "bad-json/repo")
    for _ in range(2):
        response = get(sim, f"/api/v2/parsing-status/{project_id}")
        assert response.status_code == 200 and response.headers["Content-Type"] == "application/json"
        with pytest.raises(ValueError):
            response.json()
    assert get(sim, f"/api/v2/parsing-status/{project_id}").json()["status"] in ("submitted", "ready")


def test_auth_flaky_answers_one_401_to_a_valid_key(sim: Simulator) -> None:
    project_id = project(sim, "auth-flaky/repo")
    assert sanitized(get(sim, f"/api/v2/parsing-status/{project_id}"), 401, "Authentication required.",
                     "authentication_required")
    assert get(sim, f"/api/v2/parsing-status/{project_id}").status_code == 200


def test_malformed_reply_has_unparseable_json_but_normal_prose(sim: Simulator) -> None:
    conversation_id = conversation(sim, project(sim, "malformed-reply/repo"))
    text = message(sim, conversation_id, "Answer in JSON please", stream=False).json()["message"]
    assert "```json" in text
    with pytest.raises(json.JSONDecodeError):
        fenced_json(text)
    prose = message(sim, conversation_id, "What does it do?", stream=False).json()
    assert "malformed-reply/repo" in prose["message"]


def test_subagent_error_chunk_is_part_of_the_reply(sim: Simulator) -> None:
    conversation_id = conversation(sim, project(sim, "subagent-error/repo"))
    text = message(sim, conversation_id, "What does it do?", stream=False).json()["message"]
    assert "[[SUBAGENT_ERROR]]\nThe operation could not be completed." in text


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
    assert rest == "" and "truncated-stream/repo" in "".join(o["message"] for o in objects)


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
        assert sanitized(parse(sim, "server-error/repo"), 500, "An internal error occurred. Please try again later.",
                         "internal_error")


def test_not_found_status_is_404(sim: Simulator) -> None:
    project_id = project(sim, "not-found/repo")
    assert sanitized(get(sim, f"/api/v2/parsing-status/{project_id}"), 404, "Resource not found.", "not_found")
    assert post(sim, "/api/v2/parsing-status", {"repo_name": "not-found/repo"}).status_code == 404


def test_unauthorized_repo_is_401(sim: Simulator) -> None:
    by_repo = post(sim, "/api/v2/parsing-status", {"repo_name": "unauthorized/repo"})
    for response in (parse(sim, "unauthorized/repo"), by_repo):
        assert sanitized(response, 401, "Authentication required.", "authentication_required")
        assert response.headers["WWW-Authenticate"] == "ApiKey"


# ---------- control endpoints ----------

def test_stats_count_requests_and_parse_calls(sim: Simulator) -> None:
    project_id = project(sim, "acme/stats")
    parse(sim, "acme/stats")
    get(sim, f"/api/v2/parsing-status/{project_id}")
    message(sim, conversation(sim, project_id), "hi", stream=False)
    counted = stats(sim)
    assert counted["parse_calls"] == {"acme/stats@main": 2} and counted["projects"] == 1
    expected = {"POST /parse": 2, "GET /parsing-status": 1, "POST /conversations": 1, "POST /message": 1}
    assert {k: counted["requests"][k] for k in expected} == expected
    assert counted["requests"]["POST /parsing-status"] == 0


def test_reset_clears_everything(sim: Simulator) -> None:
    assert parse(sim, "flaky/reset").status_code == 503
    project_id = project(sim, "flaky/reset")
    assert requests.post(f"{sim.url}/_sim/reset", timeout=5).status_code == 200
    counted = stats(sim)
    assert counted["projects"] == 0 and counted["parse_calls"] == {} and set(counted["requests"].values()) == {0}
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
    configure(sim, parse_seconds=0, message_seconds=1.5)
    project = parse(sim, "acme/slow-agent").json()["project_id"]
    conversation = post(sim, "/api/v2/conversations/", {"project_ids": [project],
                                                       "agent_ids": ["codebase_qna_agent"]}).json()["conversation_id"]
    arrivals: list[float] = []
    in_flight: list[int] = []
    started = time.monotonic()
    with post(sim, f"/api/v2/conversations/{conversation}/message/", {"content": "Why?"}, stream=True) as reply:
        for chunk in reply.iter_content(chunk_size=None):
            arrivals.append(time.monotonic() - started)
            in_flight.append(stats(sim)["messages_in_flight"])
            assert chunk
    assert arrivals[-1] >= 1.4 and len(arrivals) >= 3, arrivals  # deltas over the whole 1.5 s, not at once
    assert in_flight[0] == 1
    counted = stats(sim)
    assert counted["messages_in_flight"] == 0 and counted["messages_in_flight_peak"] == 1
    assert counted["calls_in_flight"] == 0 and counted["calls_in_flight_peak"] >= 1
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
        match = re.fullmatch(r"Potpie simulator listening on (http://127\.0\.0\.1:\d+) \(api key: sk-cli…; GitHub API "
                             r"at http://127\.0\.0\.1:\d+/github\)", line)
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
