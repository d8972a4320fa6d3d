"""The simulator's agent side: conversations, agent runs and their replies, as Potpie's server code answers them
(shared/potpie/API-FACTS.md §8.2-8.4, §8.7): a reply streams JSON objects back to back and simply ends however the
run ended (a whole reply answers 500 for a failed or stopped run), each project's first run opens with the setup
banner, citations stay empty, a tool call is a chunk with no text, `session_id` names a run and `stop` ends it.

A mixin of `Simulator` (simulator.py), which holds the state these routes share."""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from .sim_http import ApiError, Reply, validate

SETUP_BANNER = "\u23f3 Setting up repository workspace, please wait..."
SUBAGENT_ERROR = "[[SUBAGENT_ERROR]]\nThe operation could not be completed."
RUN_CLAIM_SECONDS = 120.0  # a run id stays taken this long (SET NX EX 120)
STREAM_PACE = 0.5  # seconds between the deltas of a reply that takes message_seconds (an LLM's token stream)
AGENTS = {
    "codebase_qna_agent": ("Codebase Q&A Agent", "Answers questions about the codebase using the knowledge graph."),
    "debugging_agent": ("Debugging with Knowledge Graph Agent", "Debugs issues using the knowledge graph."),
    "unit_test_agent": ("Unit Test Agent", "Writes unit tests for named functions."),
    "integration_test_agent": ("Integration Test Agent", "Writes integration tests from entry-point functions."),
    "LLD_agent": ("Low-Level Design Agent", "Writes a low-level design plan for a new feature."),
    "code_changes_agent": ("Code Changes Agent", "Reviews the blast radius of the current branch's changes."),
    "code_generation_agent": ("Code Generation Agent", "Writes code for features and fixes."),
    "general_purpose_agent": ("General Purpose Agent", "Handles queries that need no repository access."),
    "sweb_debug_agent": ("SWE-bench Debug Agent", "A SWE-bench style debugging agent."),
}


@dataclass
class Project:
    """A simulated repository parse; its status follows from the age of its current parse run."""

    id: str
    repo_name: str
    branch: str
    commit_id: str | None
    scenario: str
    started: float = field(default_factory=time.monotonic)  # the current parse run's start
    updated: float = field(default_factory=time.monotonic)  # the row's updated_at
    sandbox: bool = False  # its workspace is set up (the first agent run does it, after the banner)


@dataclass
class Run:
    """An agent run, named by its run id (the message's session_id)."""

    id: str
    conversation_id: str
    stopped: threading.Event = field(default_factory=threading.Event)


def compose_reply(project: Project, content: str) -> tuple[str, list[str]]:
    """The deterministic agent answer for a question about the project, and the files it rests on."""
    repo, branch = project.repo_name, project.branch
    if not re.search(r"\bJSON\b", content):
        return (f"The repository {repo} (branch {branch}) is organised around an entrypoint in src/app.py that "
                f"delegates to a service layer in src/service.py. You asked: \"{content[:80]}\". Requests enter "
                f"through src/app.py and the business logic lives in src/service.py.", ["src/app.py", "src/service.py"])
    if project.scenario == "malformed-reply":
        return f"Here is the overview of {repo}.\n\n```json\n{{\"overview\": \"x\", snippets: [}}\n```\n", []
    snippets = [("src/app.py", 1, 20, "entrypoint", "Application entrypoint that wires the routes."),
                ("src/service.py", 10, 60, "core-logic", "Service layer holding the business logic."),
                ("tests/test_app.py", 1, 30, "tests", "Tests covering the entrypoint.")]
    payload = {
        "overview": f"{repo} (branch {branch}) is a small service with an entrypoint and a service layer.",
        "snippets": [{"node_id": f"{path}:{a}-{b}", "file_path": path, "line_start": a, "line_end": b,
                      "tags": [tag], "description": text} for path, a, b, tag, text in snippets],
        "architecture": "src/app.py receives requests and calls src/service.py, which holds the logic.",
        "risks_and_gaps": ["Error handling in src/service.py is thin.", "There are no integration tests."],
    }
    fence = json.dumps(payload, indent=2)
    text = f"Here is the structured overview of {repo} you asked for.\n\n```json\n{fence}\n```\n"
    return text, [s[0] for s in snippets]


def chat(message: str, citations: list[str] | None = None, tool_calls: list[str] | None = None) -> dict[str, Any]:
    """Build a ChatMessageResponse dict."""
    return {"message": message, "citations": citations or [], "tool_calls": tool_calls or [], "thinking": None}


def _tool_call() -> str:
    """A tool call as the server streams it: a ToolCallResponse serialized as a JSON string (§8.4)."""
    return json.dumps({"call_id": "call_1", "event_type": "call", "tool_name": "get_code_from_probable_node_name",
                       "tool_response": "Fetching code", "tool_call_details": {}, "stream_part": None,
                       "is_complete": True, "is_truncated": False, "original_length": None})


class AgentRoutes:
    """The conversation, message, stop, project-message and agent-list routes."""

    config: Any
    _lock: threading.Lock
    projects: dict[str, Project]
    conversations: dict[str, tuple[str, str]]
    runs: dict[str, Run]
    claimed: dict[str, float]
    sessions: Any
    stops: dict[str, int]

    # provided by Simulator
    _hit: Callable[[str, str], int]
    _count: Callable[[dict[str, int], str], None]
    _fail_common: Callable[[str, bool], None]
    _in_flight: Callable[[int], None]

    # --- conversations and agent runs ----------------------------------------------------------------------

    def _create_conversation(self, raw: bytes, **_: Any) -> Reply:
        """Answer POST /conversations/ using project_ids[0] and agent_ids[0]."""
        body = validate(raw, {"project_ids": "list[str]!", "agent_ids": "list[str]!"})
        project = self.projects.get(body["project_ids"][0]) if body["project_ids"] else None
        agent_id = body["agent_ids"][0] if body["agent_ids"] else ""
        if project is not None:
            self._fail_common(project.scenario, self._hit("conversations", project.id) == 1)
            if project.scenario == "usage-limit":
                raise ApiError(402, "Message limit of 50 reached for free plan.")
        if project is None or agent_id not in AGENTS:  # re-wrapped as a generic service error: 500 (§2.6)
            raise ApiError(500, "An unexpected error occurred while creating the conversation.")
        conversation_id = str(uuid.uuid4())
        with self._lock:
            self.conversations[conversation_id] = (project.id, agent_id)
        return Reply(body={"message": "Conversation created successfully.", "conversation_id": conversation_id})

    def _claim_run(self, wanted: str, conversation_id: str) -> Run:
        """Start a run under `wanted`, or `wanted-1`, `-2`, ... while those are taken (§8.7)."""
        with self._lock:
            now, run_id, suffix = time.monotonic(), wanted, 0
            if len(self.claimed) > 10_000:  # ids older than the claim no longer matter
                self.claimed = {k: t for k, t in self.claimed.items() if now - t < RUN_CLAIM_SECONDS}
            while run_id in self.runs or now - self.claimed.get(run_id, -RUN_CLAIM_SECONDS) < RUN_CLAIM_SECONDS:
                suffix += 1
                run_id = f"{wanted}-{suffix}"
            self.claimed[run_id] = now
            self.runs[run_id] = run = Run(run_id, conversation_id)
            self.sessions.append(run_id)
        return run

    def _end_run(self, run: Run) -> None:
        with self._lock:
            self.runs.pop(run.id, None)

    def _run_failure(self, project: Project) -> str | None:
        """How this run fails on Potpie's side, by scenario: before its first chunk, after some, or its stream
        expires; None when it completes."""
        scenario = project.scenario
        if scenario == "agent-down":
            return "before"
        first = self._hit("run", project.id) == 1
        return {"agent-error": "before", "agent-cut": "after", "agent-expired": "expired"}.get(scenario) \
            if first else None

    def _chunks(self, project: Project, content: str, failure: str | None) -> list[dict[str, Any]]:
        """The objects the run publishes: the banner when its workspace must be set up first, a tool call, the
        answer's deltas (the last carrying its citations in the rich walk); cut per `failure`."""
        text, citations = compose_reply(project, content)
        if self.config.walk != "rich":
            citations = []  # nothing on the server fills them (§8.4)
        with self._lock:
            banner, project.sandbox = not project.sandbox or project.scenario == "banner", True
        count = max(5, int(self.config.message_seconds / STREAM_PACE))
        step = max(1, -(-len(text) // count))
        pieces = [text[i:i + step] for i in range(0, len(text), step)]
        objects = [chat(piece, citations if i == len(pieces) - 1 else []) for i, piece in enumerate(pieces)]
        objects.insert(1, chat("", tool_calls=[_tool_call()]))  # a chunk with only a tool call: no text
        if project.scenario == "subagent-error":
            objects.insert(1, chat(SUBAGENT_ERROR))
        if failure in ("before", "expired"):
            objects = []
        elif failure == "after":
            objects = objects[:2]
        return ([chat(SETUP_BANNER)] if banner else []) + objects

    def _message(self, conversation_id: str, raw: bytes, query: dict[str, str], **_: Any) -> Reply:
        """Answer POST /conversations/{id}/message/, streaming unless ?stream=false."""
        body = validate(raw, {"content": "str!", "node_ids": "list"})
        stream = query.get("stream", "true").lower() not in ("false", "0", "no", "off")
        if not body["content"].strip():
            raise ApiError(400, "Message content cannot be empty")
        conversation = self.conversations.get(conversation_id)
        project = self.projects.get(conversation[0]) if conversation else None
        if project is not None:
            self._fail_common(project.scenario, self._hit("message", project.id) == 1)
        run = self._claim_run(query.get("session_id") or f"conversation:sim-user:"
                              f"{query.get('prev_human_message_id') or 'new'}", conversation_id)
        failure = self._run_failure(project) if project else "before"  # an unknown conversation fails in the worker
        objects = self._chunks(project, body["content"], failure) if project else []
        truncate = project is not None and project.scenario == "truncated-stream" and self._hit("cut", project.id) == 1
        if stream:
            return Reply(headers={"Content-Type": "text/event-stream; charset=utf-8"}, truncate=truncate,
                         stream=self._paced(run, objects, truncate))
        return self._whole(run, objects, failure, truncate)

    def _paced(self, run: Run, objects: list[dict[str, Any]], truncate: bool) -> Iterator[bytes]:
        """The stream's parts over message_seconds, ending early (cleanly) when the run is stopped; a truncated
        one is cut mid-object (the connection breaks)."""
        parts = [json.dumps(o).encode() for o in objects]
        if truncate and len(parts) > 3:
            parts = parts[:3] + [parts[3][: len(parts[3]) // 2]]
        pace = self.config.message_seconds / max(1, len(parts) - 1)
        self._in_flight(+1)
        try:
            for i, part in enumerate(parts):
                if i and pace and run.stopped.wait(pace):
                    return
                if run.stopped.is_set():
                    return
                yield part
        finally:
            self._in_flight(-1)
            self._end_run(run)

    def _whole(self, run: Run, objects: list[dict[str, Any]], failure: str | None, truncate: bool) -> Reply:
        """A `stream=false` answer once the run ends: 500 for a failed or stopped run, 200 with the text collected
        (`""` for an expired stream), the banner glued to the answer (§8.2, §8.3)."""
        self._in_flight(+1)
        try:
            stopped = run.stopped.wait(self.config.message_seconds)  # the agent works before a whole reply leaves
        finally:
            self._in_flight(-1)
            self._end_run(run)
        if stopped or failure in ("before", "after"):
            raise ApiError(500, "Task was cancelled" if stopped else "An internal error occurred.")
        citations = [c for o in objects for c in o["citations"]]
        tool_calls = [t for o in objects for t in o["tool_calls"]]
        whole = chat("".join(o["message"] for o in objects), list(dict.fromkeys(citations)), tool_calls)
        data = json.dumps(whole, ensure_ascii=False).encode()  # FastAPI's JSON keeps the banner's raw UTF-8
        return Reply(body=data[: len(data) // 2] if truncate else data)

    def _stop(self, conversation_id: str, query: dict[str, str], **_: Any) -> Reply:
        """Answer POST /conversations/{id}/stop?session_id=: end that run cleanly (its stream ends, a whole reply
        answers 500); success also for an unknown session (§8.7)."""
        session = query.get("session_id") or ""
        self._count(self.stops, session)
        with self._lock:
            if session:
                run = self.runs.get(session)
            else:  # the conversation's latest run
                run = next((r for r in reversed(list(self.runs.values())) if r.conversation_id == conversation_id),
                           None)
        if run is None and not session:
            return Reply(body={"status": "success", "message": "No active session to stop"})
        time.sleep(self.config.stop_seconds + (0.5 if run is not None else 0.0))  # revoke, then clean up
        if run is not None:
            run.stopped.set()
        return Reply(body={"status": "success", "message": "Cancellation signal sent and task revoked",
                           "saved_partial": run is not None, "message_id": None})

    def _project_message(self, project_id: str, raw: bytes, **_: Any) -> Reply:
        """Answer POST /project/{id}/message/: a hidden conversation and one reply run in the API process (no
        banner, no stream)."""
        body = validate(raw, {"content": "str!", "agent_id": "str", "node_ids": "list"})
        if not body["content"].strip():
            raise ApiError(400, "Message content cannot be empty")
        project, agent_id = self.projects.get(project_id), body.get("agent_id") or "codebase_qna_agent"
        if project is None or agent_id not in AGENTS:
            raise ApiError(500, "An unexpected error occurred while creating the conversation.")
        with self._lock:
            self.conversations[str(uuid.uuid4())] = (project_id, agent_id)
        text, citations = compose_reply(project, body["content"])
        time.sleep(self.config.message_seconds)
        return Reply(body=chat(text, citations if self.config.walk == "rich" else []))

    def _agents(self, **_: Any) -> Reply:
        """Answer GET /list-available-agents with the built-in system agents."""
        return Reply(body=[{"id": agent_id, "name": name, "description": text, "status": "SYSTEM", "visibility": None}
                           for agent_id, (name, text) in AGENTS.items()])

