"""The Potpie client against the simulator over real HTTP, the simulator answering as Potpie's server code does:
routes, reply forms, what counts as an answer, error classes and what Potpie said, retries, runs and stops."""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

import pytest
import requests

from potpie_service.potpie.client import (KeyRejected, NoAnswer, PermanentPotpieError, PotpieClient, Response, Trace,
                                          TransientPotpieError, check, parse_stream)
from potpie_service.core.replies import SETUP_BANNER
from tests.conftest import SIM_KEY, simulator_stats
from tests.stack import free_port, wait_for

REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")


def client(url: str, **kwargs: object) -> PotpieClient:
    return PotpieClient(url, kwargs.pop("key", SIM_KEY), kwargs.pop("timeout", 2.0), **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def slow_replies(simulator) -> Iterator[None]:
    """Agent replies that take 3 s (streamed over it, or waited for), for the test only."""
    requests.post(simulator.url + "/_sim/config", json={"message_seconds": 3}, timeout=5).raise_for_status()
    yield
    requests.post(simulator.url + "/_sim/config", json={"message_seconds": 0}, timeout=5).raise_for_status()


def ready_project(potpie: PotpieClient, repo: str, branch: str = "main") -> str:
    project_id, _ = potpie.submit_parse(repo, branch)
    wait_for(lambda: potpie.parse_status(project_id, repo, branch) == "ready", 5, what=f"{repo} parsed")
    return project_id


def test_a_conversation_in_both_reply_forms_holds_only_the_agents_words(simulator) -> None:
    streamed, whole = client(simulator.url, stream=True), client(simulator.url, stream=False)
    project_id, status = whole.submit_parse("octocat/client", "dev")
    assert status == "submitted"
    assert whole.find_project("octocat/client", "dev") == (project_id, "submitted")
    assert whole.find_project("octocat/never-parsed", "main") is None
    wait_for(lambda: whole.parse_status(project_id, "octocat/client", "dev") == "ready", 5, what="the parse")
    conversation = whole.create_conversation(project_id)
    # each project's first run opens with the sandbox's setup banner: its own object in a stream, glued to the
    # answer's first words in a whole reply; neither form lets it into the text
    first = whole.send_message(conversation, "What is it?", "s-whole")
    second = streamed.send_message(conversation, "What is it?", "s-stream")
    assert first.text == second.text and first.text.startswith("The repository octocat/client")
    assert SETUP_BANNER not in first.text and "\u23f3" not in first.text
    assert first.citations == second.citations == []  # the server fills none (§8.4)
    assert REQUEST_ID.fullmatch(first.request_id)


def test_every_request_names_what_it_is_for_in_x_request_id(simulator) -> None:
    potpie = client(simulator.url)
    trace = Trace("0123456789abcdef0123456789abcdef", "submit_parse", attempt=2)
    potpie.submit_parse("flaky/request-ids", "main", trace=trace)  # 503 once, then accepted: two requests
    assert trace.calls == {"parse": 2}
    sent = [rid for route, rid in simulator_stats(simulator)["request_ids"] if route == "POST /parse"][-2:]
    assert sent == [f"psvc-{trace.job_id}-submit_parse-a2-1", f"psvc-{trace.job_id}-submit_parse-a2-2"]
    assert all(REQUEST_ID.fullmatch(rid) for rid in sent)


def test_errors_keep_potpies_code_and_request_id(simulator) -> None:
    started = time.monotonic()
    with pytest.raises(PermanentPotpieError) as rejected:
        client(simulator.url, key="sk-wrong", attempts=3).submit_parse("octocat/x", "main")
    # a 401 may be Potpie's own key lookup failing: tried three times (with backoff) before it blames the key
    assert rejected.value.status == 401 and time.monotonic() - started >= 1.4
    assert "check POTPIE_API_KEY" in rejected.value.reason and "authentication_required" in rejected.value.reason
    assert "3 time(s) in a row" in rejected.value.reason
    project_id, _ = client(simulator.url).submit_parse("usage-limit/client", "main")
    with pytest.raises(PermanentPotpieError) as limited:
        client(simulator.url).create_conversation(project_id, trace=Trace("ab" * 16, "create_conversation"))
    assert re.search(r"usage limit reached \(HTTP 402, request_failed, request_id psvc-(ab){16}-create_conversation",
                     limited.value.reason), limited.value.reason
    with pytest.raises(TransientPotpieError) as failed:
        client(simulator.url, attempts=2).submit_parse("server-error/client", "main")
    assert re.search(r"\(HTTP 500, internal_error, request_id psvc-parse-\w+\)", failed.value.reason)


def test_a_transient_401_is_tried_again(simulator) -> None:
    potpie = client(simulator.url)
    project_id, _ = potpie.submit_parse("auth-flaky/client", "main")
    trace = Trace("cd" * 16, "poll_parse")
    assert potpie.parse_status(project_id, "auth-flaky/client", "main", trace=trace) in ("submitted", "ready")
    assert trace.calls == {"parsing_status_by_repo": 2}  # 401 once (the server's key lookup failed), then fine


def test_polling_never_uses_the_status_route_that_queues_a_parse_again(simulator) -> None:
    potpie, repo = client(simulator.url), "octocat/poll-safely"
    before = simulator_stats(simulator)["requests"]["GET /parsing-status"]
    branch_project, _ = potpie.submit_parse(repo, "main")
    pinned_project, _ = potpie.submit_parse(repo, "main", commit_id="a" * 40)
    # the lookup by branch may name the pinned project of the same branch (no order): the list settles it
    for project_id, commit in ((branch_project, None), (pinned_project, "a" * 40)):
        wait_for(lambda: potpie.parse_status(project_id, repo, "main", commit) == "ready", 5, what="the parse")
    stats = simulator_stats(simulator)
    assert stats["requests"]["GET /parsing-status"] == before
    assert stats["requests"]["GET /projects/list"] >= 1


def test_a_failed_agent_run_is_no_answer_in_either_form(simulator) -> None:
    whole, streamed = client(simulator.url), client(simulator.url, stream=True)
    for repo, form, error in (("agent-error/whole", whole, "agent run failed (HTTP 500, internal_error"),
                              ("agent-error/stream", streamed, "its stream ended with no text (HTTP 200"),
                              ("agent-expired/whole", whole, "its whole reply came with no text (HTTP 200")):
        conversation = form.create_conversation(ready_project(form, repo))
        with pytest.raises(TransientPotpieError, match=re.escape(error)) as info:
            form.send_message(conversation, "What is it?", f"s-{repo}")
        assert info.value.reached, "asked again only after the run is stopped (the job-level retry)"
        assert form.send_message(conversation, "What is it?", f"s2-{repo}").text  # the next run completes


def test_a_stream_cannot_tell_a_run_that_failed_midway_so_replies_are_read_whole(simulator) -> None:
    """Why POTPIE_STREAM defaults to false: a run that fails after its first chunks ends its stream as cleanly as
    a finished one; only the whole reply says it failed (500)."""
    whole, streamed = client(simulator.url), client(simulator.url, stream=True)
    conversation = whole.create_conversation(ready_project(whole, "agent-cut/whole"))
    with pytest.raises(TransientPotpieError, match="agent run failed"):
        whole.send_message(conversation, "What is it?", "s-cut-whole")
    conversation = streamed.create_conversation(ready_project(streamed, "agent-cut/stream"))
    cut = streamed.send_message(conversation, "What is it?", "s-cut-stream")
    complete = streamed.send_message(conversation, "What is it?", "s-cut-stream-2")
    assert cut.text and cut.text != complete.text and complete.text.startswith(cut.text)


def test_status_chunks_never_reach_the_text(simulator) -> None:
    for form in (client(simulator.url), client(simulator.url, stream=True)):
        conversation = form.create_conversation(ready_project(form, "subagent-error/client"))
        reply = form.send_message(conversation, "What is it?", f"s-sub-{form.stream}")
        assert "SUBAGENT_ERROR" not in reply.text and "could not be completed" not in reply.text
        assert reply.text.startswith("The repository subagent-error/client")


def test_stop_ends_a_run_in_flight(simulator, slow_replies) -> None:
    potpie = client(simulator.url, timeout=10.0)
    conversation = potpie.create_conversation(ready_project(potpie, "octocat/stop-me"))
    outcome: list[BaseException | str] = []

    def ask() -> None:
        try:
            outcome.append(potpie.send_message(conversation, "What is it?", "s-stop-me").text)
        except TransientPotpieError as exc:
            outcome.append(exc)

    started = time.monotonic()
    thread = threading.Thread(target=ask)
    thread.start()
    wait_for(lambda: "s-stop-me" in simulator_stats(simulator)["runs_in_flight"], 3, what="the run to start")
    assert potpie.stop(conversation, "s-stop-me") is True
    thread.join(5)
    assert time.monotonic() - started < 2.5, "the 3 s reply ended early"
    assert isinstance(outcome[0], TransientPotpieError) and "agent run failed (HTTP 500" in outcome[0].reason
    assert simulator_stats(simulator)["stops"]["s-stop-me"] == 1


def test_agents_are_listed(simulator) -> None:
    agents = client(simulator.url).agents()
    assert "codebase_qna_agent" in agents and "LLD_agent" in agents


def test_transient_failures_retry_then_give_up_fast(simulator) -> None:
    assert client(simulator.url).submit_parse("flaky/client", "main")[1] == "submitted"  # 503 once, then fine
    started = time.monotonic()
    with pytest.raises(TransientPotpieError, match="cannot reach Potpie"):
        client(f"http://127.0.0.1:{free_port()}", attempts=2).submit_parse("octocat/x", "main")
    assert time.monotonic() - started < 3


def test_429_retry_after_is_honoured(simulator) -> None:
    started = time.monotonic()
    client(simulator.url).submit_parse("rate-limited/client", "main")
    assert time.monotonic() - started >= 0.95  # Retry-After: 1


def test_check_and_stream_parsing_without_a_server() -> None:
    def response(status: int, body: bytes = b"{}", headers: dict | None = None) -> Response:
        return Response(status, body, headers or {})

    with pytest.raises(TransientPotpieError) as limited:
        check(response(429, b'{"detail": "slow down"}', {"Retry-After": "7"}))
    assert limited.value.retry_after == 7.0 and '"slow down"' in limited.value.reason  # an older server's text
    for status in (500, 502, 503, 504):
        with pytest.raises(TransientPotpieError):
            check(response(status))
    with pytest.raises(KeyRejected):
        check(response(401))
    for status in (400, 402, 403, 404, 422):
        with pytest.raises(PermanentPotpieError):
            check(response(status))
    sanitized = b'{"detail":"An internal error occurred. Please try again later.","code":"internal_error",' \
                b'"request_id":"r-1"}'
    with pytest.raises(TransientPotpieError, match=re.escape("(HTTP 500, internal_error, request_id r-1)")):
        check(response(500, sanitized))
    check(response(200))
    items = parse_stream('{"message": "Hel", "citations": []}{"message": "lo", "citations": ["a.py"]}\n')
    assert [item["message"] for item in items] == ["Hel", "lo"]
    with pytest.raises(TransientPotpieError, match="mid-message"):
        parse_stream('{"message": "Hel"}{"message": "l')
    assert issubclass(NoAnswer, TransientPotpieError)


def test_proxy_variables_are_read_once_and_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    """HTTP(S)_PROXY and NO_PROXY apply as requests applies them, read when the client is built (not per call)."""
    seen: list[str] = []

    class Proxy(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            seen.append(self.path)  # a proxy gets the absolute URL
            body = json.dumps([{"id": "codebase_qna_agent"}]).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    proxy = ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.server_address[1]}")
        monkeypatch.setenv("NO_PROXY", "bypassed.invalid")
        proxied = client("http://potpie.invalid")
        bypassed = client("http://bypassed.invalid", attempts=1)
        monkeypatch.delenv("HTTP_PROXY")  # read at construction: later changes do not matter
        assert proxied.agents() == ["codebase_qna_agent"]
        assert seen == ["http://potpie.invalid/api/v2/list-available-agents"]
        with pytest.raises(TransientPotpieError, match="cannot reach Potpie"):
            bypassed.agents()  # direct: the name does not resolve
        assert len(seen) == 1
    finally:
        proxy.shutdown()
        proxy.server_close()
