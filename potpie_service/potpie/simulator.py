"""A faithful, deterministic simulator of the subset of Potpie.ai's HTTP API v2 that the service uses."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

STATUSES = ("submitted", "cloned", "parsed", "inferring", "ready")
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
CONVERSATION_ERROR = "An unexpected error occurred while creating the conversation."
TUNABLE = ("parse_seconds", "slow_parse_seconds", "latency_ms", "hang_seconds", "message_seconds")
STREAM_PACE = 0.5  # seconds between the deltas of a reply that takes message_seconds (an LLM's token stream)
ROUTES = [(method, re.compile(rx), name, stat) for method, rx, name, stat in [  # stat None = control route, no key
    ("GET", r"/health", "health", None),
    ("GET", r"/_sim/stats", "sim_stats", None),
    ("POST", r"/_sim/reset", "sim_reset", None),
    ("POST", r"/_sim/config", "sim_config", None),
    ("POST", r"/api/v2/parse", "parse", "POST /parse"),
    ("GET", r"/api/v2/parsing-status/([^/]+)", "status_by_id", "GET /parsing-status"),
    ("POST", r"/api/v2/parsing-status", "status_by_repo", "POST /parsing-status"),
    ("POST", r"/api/v2/conversations", "create_conversation", "POST /conversations"),
    ("POST", r"/api/v2/conversations/([^/]+)/message", "message", "POST /message"),
    ("POST", r"/api/v2/project/([^/]+)/message", "project_message", "POST /project-message"),
    ("GET", r"/api/v2/list-available-agents", "agents", "GET /list-available-agents"),
]]
TYPE_CHECKS = {  # kind -> (check, pydantic msg, pydantic type); a trailing "!" on a kind marks the field required
    "str": (lambda v: isinstance(v, str), "Input should be a valid string", "string_type"),
    "list": (lambda v: isinstance(v, list), "Input should be a valid list", "list_type"),
    "list[str]": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
                  "Input should be a valid list of strings", "list_type"),
}


@dataclass
class SimulatorConfig:
    """Simulator settings; the timing fields can be changed live via POST /_sim/config."""

    api_key: str = "sk-simulator"
    parse_seconds: float = 4.0
    slow_parse_seconds: float = 30.0
    latency_ms: float = 0  # added to every answer: a WAN-distant Potpie
    hang_seconds: float = 5.0
    message_seconds: float = 0  # how long an agent reply takes: streamed over it, or the wait before a whole one
    verbose: bool = False
    extra_api_keys: tuple[str, ...] = ()


class ApiError(Exception):
    """An HTTP error answered with a FastAPI-style `{"detail": ...}` body."""

    def __init__(self, status: int, detail: Any, headers: dict[str, str] | None = None) -> None:
        super().__init__(str(detail))
        self.status, self.detail, self.headers = status, detail, headers or {}


@dataclass
class Reply:
    """A response: a JSON value or raw bytes, or a chunked stream that may be cut off mid-object."""

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    stream: list[bytes] | None = None
    truncate: bool = False
    pace: float = 0.0  # seconds between stream parts


@dataclass
class Project:
    """A simulated repository whose parsing status is derived from its age."""

    id: str
    repo_name: str
    branch: str
    commit_id: str | None
    scenario: str
    created: float = field(default_factory=time.monotonic)


def scenario_of(repo_name: str) -> str:
    """Return the lower-cased owner part of `owner/name`, which selects the scenario."""
    return repo_name.split("/", 1)[0].strip().lower()


def invalid(loc: list[Any], msg: str, kind: str) -> ApiError:
    """Build a 422 validation error in FastAPI's shape."""
    return ApiError(422, [{"loc": loc, "msg": msg, "type": kind}])


def unauthorized() -> ApiError:
    """Build the 401 error for an unknown or revoked key."""
    return ApiError(401, "Invalid API key", {"WWW-Authenticate": "ApiKey"})


def validate(raw: bytes, fields: dict[str, str]) -> dict[str, Any]:
    """Decode a JSON object body and check it against {name: kind} like pydantic, raising 422."""
    if not raw.strip():
        raise invalid(["body"], "Field required", "missing")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise invalid(["body", 0], f"JSON decode error: {exc}", "json_invalid") from exc
    if not isinstance(body, dict):
        raise invalid(["body"], "Input should be a valid dictionary or object", "model_attributes_type")
    errors = []
    for name, kind in fields.items():
        value, (check, msg, err) = body.get(name), TYPE_CHECKS[kind.rstrip("!")]
        if value is None and kind.endswith("!"):
            errors.append({"loc": ["body", name], "msg": "Field required", "type": "missing"})
        elif value is not None and not check(value):
            errors.append({"loc": ["body", name], "msg": msg, "type": err})
    if errors:
        raise ApiError(422, errors)
    return body


def compose_reply(project: Project, content: str) -> tuple[str, list[str]]:
    """Return the deterministic agent answer and citations for a question about the project."""
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


def chat(message: str, citations: list[str] | None = None) -> dict[str, Any]:
    """Build a ChatMessageResponse dict."""
    return {"message": message, "citations": citations or [], "tool_calls": [], "thinking": None}


def stream_reply(text: str, citations: list[str], truncate: bool, seconds: float = 0.0) -> Reply:
    """Split a reply into a queued object plus back-to-back deltas (~5, or one per STREAM_PACE over `seconds`),
    optionally cut mid-object."""
    count = max(5, int(seconds / STREAM_PACE))
    step = max(1, -(-len(text) // count))
    pieces = [text[i:i + step] for i in range(0, len(text), step)]
    objs = [chat("")] + [chat(p, citations if i == len(pieces) - 1 else []) for i, p in enumerate(pieces)]
    parts = [json.dumps(o).encode() for o in objs]
    if truncate:
        parts = parts[:3] + [parts[3][: len(parts[3]) // 2]]
    return Reply(headers={"Content-Type": "text/event-stream"}, stream=parts, truncate=truncate,
                 pace=seconds / max(1, len(parts) - 1))


class Simulator:
    """An in-process Potpie API v2 server with deterministic failure scenarios."""

    def __init__(self, config: SimulatorConfig | None = None) -> None:
        self.config = config or SimulatorConfig()
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self.url, self.port = "", 0  # set once bound, e.g. "http://127.0.0.1:8765" and 8765
        self._clear()

    def _bind(self, host: str, port: int) -> _Server:
        """Create the listening server."""
        self._server = _Server((host, port), type("BoundHandler", (_Handler,), {"sim": self}))
        self._server.verbose = self.config.verbose
        self.port = int(self._server.server_address[1])
        self.url = f"http://{self._server.server_address[0]!s}:{self.port}"
        return self._server

    def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve in a background thread and return the base URL."""
        server = self._bind(host, port)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()
        return self.url

    def stop(self) -> None:
        """Stop serving and release the socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def run_forever(self, host: str = "127.0.0.1", port: int = 8765,
                    on_ready: Callable[[str], None] | None = None) -> None:
        """Serve in the current thread until Ctrl-C."""
        server = self._bind(host, port)
        try:
            if on_ready:
                on_ready(self.url)
            server.serve_forever(poll_interval=0.2)
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()

    def _clear(self) -> None:
        """Drop all projects, conversations and counters (caller holds the lock or is __init__)."""
        self.projects: dict[str, Project] = {}
        self.by_key: dict[tuple[str, str, str | None], str] = {}
        self.conversations: dict[str, tuple[str, str]] = {}
        self.requests = {stat: 0 for *_, stat in ROUTES if stat}
        self.parse_calls: dict[str, int] = {}
        self.github_tokens: dict[str, str] = {}  # repo@branch -> SHA-256 of the last github_token (never the value)
        self.hits: dict[tuple[str, str], int] = {}
        # agent replies being worked on or streamed right now (a reset leaves open ones counted)
        self.messages_in_flight = getattr(self, "messages_in_flight", 0)
        self.messages_in_flight_peak = self.messages_in_flight
        self.calls_in_flight = getattr(self, "calls_in_flight", 0)  # every API request being answered
        self.calls_in_flight_peak = self.calls_in_flight

    def _in_flight(self, delta: int) -> None:
        with self._lock:
            self.messages_in_flight += delta
            self.messages_in_flight_peak = max(self.messages_in_flight_peak, self.messages_in_flight)

    def _calling(self, delta: int) -> None:
        with self._lock:
            self.calls_in_flight += delta
            self.calls_in_flight_peak = max(self.calls_in_flight_peak, self.calls_in_flight)

    def _hit(self, kind: str, key: str) -> int:
        """Count one `kind` event for `key` under the lock and return the running count (1 = first)."""
        with self._lock:
            self.hits[(kind, key)] = count = self.hits.get((kind, key), 0) + 1
        return count

    def status_of(self, project: Project) -> str:
        """Compute a project's parsing status from its age and scenario."""
        elapsed, scenario, cfg = time.monotonic() - project.created, project.scenario, self.config
        if scenario == "stuck":
            return "submitted"
        if scenario == "already-parsed":
            return "ready"
        if scenario == "parse-error":
            half = cfg.parse_seconds / 2
            return "error" if elapsed >= half else ("cloned" if elapsed >= half / 2 else "submitted")
        total = cfg.slow_parse_seconds if scenario == "slow-parse" else cfg.parse_seconds
        return "ready" if total <= 0 or elapsed >= total else STATUSES[min(4, int(elapsed * 4 / total))]

    def dispatch(self, method: str, target: str, headers: Any, raw: bytes) -> Reply:
        """Route one request to its handler; error answers are raised as ApiError."""
        url = urlsplit(target)
        path = url.path.rstrip("/")
        matches = [(m, match, name, stat) for m, rx, name, stat in ROUTES if (match := rx.fullmatch(path))]
        route = next((r for r in matches if r[0] == method), None)
        if route is None:
            raise ApiError(405, "Method Not Allowed") if matches else ApiError(404, "Not Found")
        _, match, name, stat = route
        if stat:
            with self._lock:
                self.requests[stat] += 1
            key = headers.get("X-API-Key")
            if not key:
                raise ApiError(401, "API key is required", {"WWW-Authenticate": "ApiKey"})
            if key != self.config.api_key and key not in self.config.extra_api_keys:
                raise unauthorized()
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        return getattr(self, "_" + name)(*match.groups(), raw=raw, query=query)

    def _health(self, **_: Any) -> Reply:
        """Answer GET /health."""
        return Reply(body={"status": "ok"})

    def _sim_stats(self, **_: Any) -> Reply:
        """Answer GET /_sim/stats with request, parse-call and project counts."""
        with self._lock:
            return Reply(body={"requests": dict(self.requests), "parse_calls": dict(self.parse_calls),
                               "github_token_sha256": dict(self.github_tokens),
                               "projects": len(self.projects), "messages_in_flight": self.messages_in_flight,
                               "messages_in_flight_peak": self.messages_in_flight_peak,
                               "calls_in_flight": self.calls_in_flight,
                               "calls_in_flight_peak": self.calls_in_flight_peak})

    def _sim_reset(self, **_: Any) -> Reply:
        """Answer POST /_sim/reset by dropping all state."""
        with self._lock:
            self._clear()
        return Reply(body={"status": "reset"})

    def _sim_config(self, raw: bytes, **_: Any) -> Reply:
        """Answer POST /_sim/config by updating the timing settings live."""
        body = validate(raw, {})
        for key, value in body.items():
            if key not in TUNABLE or isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise invalid(["body", key], f"Must be one of {TUNABLE} with a non-negative number", "value_error")
        with self._lock:
            for key, value in body.items():
                setattr(self.config, key, float(value))
        return Reply(body={k: v for k, v in asdict(self.config).items() if k in TUNABLE})

    def _fail_common(self, scenario: str, first: bool) -> None:
        """Apply the revoked-key and flaky scenarios shared by every endpoint."""
        if scenario == "unauthorized":
            raise unauthorized()
        if scenario == "flaky" and first:
            raise ApiError(503, "Service temporarily unavailable")

    def _parse(self, raw: bytes, **_: Any) -> Reply:
        """Answer POST /parse, reusing a non-failed project for the same repo key."""
        body = validate(raw, {"repo_name": "str", "repo_path": "str", "branch_name": "str", "commit_id": "str"})
        repo: str = body.get("repo_name") or ""
        commit: str | None = body.get("commit_id")
        branch: str = body.get("branch_name") or "main"
        if not repo and not body.get("repo_path"):
            raise invalid(["body"], "Value error, Either repo_name or repo_path must be provided", "value_error")
        if body.get("repo_path") or repo.startswith(("/", "~", ".")):
            raise ApiError(400, "Parsing local repositories is only supported in development mode")
        key, scenario = (repo, branch, commit), scenario_of(repo)
        with self._lock:
            self.parse_calls[f"{repo}@{branch}"] = self.parse_calls.get(f"{repo}@{branch}", 0) + 1
            if isinstance(body.get("github_token"), str):
                self.github_tokens[f"{repo}@{branch}"] = hashlib.sha256(body["github_token"].encode()).hexdigest()
        first = self._hit("parse", repr(key)) == 1
        self._fail_common(scenario, first)
        if scenario == "server-error":
            raise ApiError(500, "Internal server error")
        if scenario == "rate-limited" and first:
            raise ApiError(429, "Too many requests", {"Retry-After": "1"})
        with self._lock:
            existing = self.projects.get(self.by_key.get(key, ""))
            if existing is not None and (status := self.status_of(existing)) != "error":
                return Reply(body={"project_id": existing.id, "status": status})
            project = Project(str(uuid.uuid4()), repo, branch, commit, scenario)
            self.projects[project.id] = project
            self.by_key[key] = project.id
        if scenario == "timeout" and first:  # the project is saved, the answer is slow (as a busy server)
            time.sleep(self.config.hang_seconds)
        # a new project starts `submitted`; Potpie's demo repositories (here: the already-parsed owner) are `ready`
        return Reply(body={"project_id": project.id, "status": self.status_of(project) if scenario == "already-parsed"
                           else "submitted"})

    def _status_reply(self, project: Project, missing: str, payload: dict[str, Any]) -> Reply:
        """Answer a parsing-status request for a known project, applying its scenario."""
        count = self._hit("status", project.id)
        self._fail_common(project.scenario, count == 1)
        if project.scenario == "not-found":
            raise ApiError(404, missing)
        if project.scenario == "bad-json" and count <= 2:
            return Reply(body=b'{"status": "clon')
        return Reply(body={**payload, "status": self.status_of(project), "latest": True})

    def _status_by_id(self, project_id: str, **_: Any) -> Reply:
        """Answer GET /parsing-status/{project_id}."""
        project = self.projects.get(project_id)
        if project is None:
            raise ApiError(404, "Project not found or access denied")
        return self._status_reply(project, "Project not found or access denied", {})

    def _status_by_repo(self, raw: bytes, **_: Any) -> Reply:
        """Answer POST /parsing-status by repo_name plus commit_id or branch_name."""
        body = validate(raw, {"repo_name": "str!", "branch_name": "str", "commit_id": "str"})
        repo, commit, branch = body["repo_name"], body.get("commit_id"), body.get("branch_name") or "main"
        missing = "Project not found for the given repo_name and commit_id/branch_name"
        if scenario_of(repo) == "unauthorized":
            raise unauthorized()
        with self._lock:
            project = self.projects.get(self.by_key.get((repo, branch, commit), ""))
            matching = [p for p in self.projects.values()
                        if p.repo_name == repo and (p.commit_id == commit if commit else p.branch == branch)]
        project = project or (matching[-1] if matching else None)
        if project is None:
            raise ApiError(404, missing)
        return self._status_reply(project, missing, {"project_id": project.id, "repo_name": repo})

    def _create_conversation(self, raw: bytes, **_: Any) -> Reply:
        """Answer POST /conversations/ using project_ids[0] and agent_ids[0]."""
        body = validate(raw, {"project_ids": "list[str]!", "agent_ids": "list[str]!"})
        project = self.projects.get(body["project_ids"][0]) if body["project_ids"] else None
        agent_id = body["agent_ids"][0] if body["agent_ids"] else ""
        if project is not None:
            self._fail_common(project.scenario, self._hit("conversations", project.id) == 1)
            if project.scenario == "usage-limit":
                raise ApiError(402, "Message limit of 50 reached for free plan.")
        if project is None or agent_id not in AGENTS:
            raise ApiError(500, CONVERSATION_ERROR)
        conversation_id = str(uuid.uuid4())
        with self._lock:
            self.conversations[conversation_id] = (project.id, agent_id)
        return Reply(body={"message": "Conversation created successfully.", "conversation_id": conversation_id})

    def _answer(self, project: Project, content: str, stream: bool) -> Reply:
        """Apply the message scenarios for the project and build the (maybe truncated) reply."""
        self._fail_common(project.scenario, self._hit("message", project.id) == 1)
        truncate = project.scenario == "truncated-stream" and self._hit("reply", project.id) == 1
        text, citations = compose_reply(project, content)
        if stream:
            return stream_reply(text, citations, truncate, self.config.message_seconds)
        self._in_flight(+1)
        try:
            time.sleep(self.config.message_seconds)  # the agent works before a whole reply leaves
        finally:
            self._in_flight(-1)
        body = json.dumps(chat(text, citations)).encode()
        return Reply(body=body[: len(body) // 2] if truncate else body)

    def _message(self, conversation_id: str, raw: bytes, query: dict[str, str], **_: Any) -> Reply:
        """Answer POST /conversations/{id}/message/, streaming unless ?stream=false."""
        body = validate(raw, {"content": "str!", "node_ids": "list"})
        stream = query.get("stream", "true").lower() not in ("false", "0", "no", "off")
        if not body["content"].strip():
            raise ApiError(400, "Message content cannot be empty")
        conversation = self.conversations.get(conversation_id)
        project = self.projects.get(conversation[0]) if conversation else None
        if project is None and stream:
            return Reply(headers={"Content-Type": "text/event-stream"}, stream=[])
        if project is None:
            raise ApiError(500, f"Conversation {conversation_id} not found")
        return self._answer(project, body["content"], stream)

    def _project_message(self, project_id: str, raw: bytes, **_: Any) -> Reply:
        """Answer POST /project/{id}/message/ with a hidden conversation and a non-streamed reply."""
        body = validate(raw, {"content": "str!", "agent_id": "str", "node_ids": "list"})
        if not body["content"].strip():
            raise ApiError(400, "Message content cannot be empty")
        project, agent_id = self.projects.get(project_id), body.get("agent_id") or "codebase_qna_agent"
        if project is None or agent_id not in AGENTS:
            raise ApiError(500, CONVERSATION_ERROR)
        with self._lock:
            self.conversations[str(uuid.uuid4())] = (project_id, agent_id)
        return self._answer(project, body["content"], stream=False)

    def _agents(self, **_: Any) -> Reply:
        """Answer GET /list-available-agents with the built-in system agents."""
        return Reply(body=[{"id": agent_id, "name": name, "description": text, "status": "SYSTEM", "visibility": None}
                           for agent_id, (name, text) in AGENTS.items()])


class _Server(ThreadingHTTPServer):
    """Threaded HTTP server with a deep accept backlog and quiet error handling."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024
    verbose = False

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Print handler tracebacks only in verbose mode."""
        if self.verbose:
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    """Translates HTTP/1.1 keep-alive requests into Simulator.dispatch calls."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else each reply waits ~40 ms for the client's delayed ACK
    sim: Simulator

    def _handle(self) -> None:
        """Read the body, dispatch, wait the configured latency, and write the reply."""
        length = self.headers.get("Content-Length", "0")
        raw = self.rfile.read(int(length)) if length.isdigit() and int(length) > 0 else b""
        api = self.path.startswith("/api/")
        if api:
            self.sim._calling(+1)
        try:
            try:
                reply = self.sim.dispatch(self.command, self.path, self.headers, raw)
            except ApiError as exc:
                reply = Reply(exc.status, {"detail": exc.detail}, exc.headers)
            except Exception as exc:  # noqa: BLE001 - a simulator bug must still answer the way FastAPI would
                self.log_message("internal error: %r", exc)
                reply = Reply(500, {"detail": "Internal server error"})
            if self.sim.config.latency_ms > 0:
                time.sleep(self.sim.config.latency_ms / 1000)
            self._send(reply)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            if api:
                self.sim._calling(-1)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

    def _send(self, reply: Reply) -> None:
        """Write a reply with Content-Length, or chunked for streams (cut off without a terminator when truncating)."""
        self.send_response(reply.status)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        if reply.stream is None:
            data = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.sim._in_flight(+1)
        try:
            for i, part in enumerate(reply.stream):
                if i and reply.pace:
                    time.sleep(reply.pace)
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                self.wfile.flush()
        finally:  # also when the client went away mid-stream (the write fails)
            self.sim._in_flight(-1)
        self.close_connection = reply.truncate or self.close_connection
        self.wfile.write(b"" if reply.truncate else b"0\r\n\r\n")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class names it `format`
        """Log to stderr only when the simulator is verbose."""
        if self.sim.config.verbose:
            super().log_message(format, *args)


def main(argv: list[str] | None = None) -> int:
    """Run the simulator from the command line until Ctrl-C."""
    parser = argparse.ArgumentParser(prog="potpie_service simulator", description="Local Potpie.ai API v2 simulator.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--api-key", help="key to require (default: $SIMULATOR_API_KEY, else sk-simulator)")
    parser.add_argument("--parse-seconds", type=float, default=SimulatorConfig.parse_seconds)
    parser.add_argument("--slow-parse-seconds", type=float, default=SimulatorConfig.slow_parse_seconds)
    parser.add_argument("--latency-ms", type=float, default=SimulatorConfig.latency_ms,
                        help="added to every answer (a WAN-distant Potpie)")
    parser.add_argument("--message-seconds", type=float, default=SimulatorConfig.message_seconds,
                        help="how long each agent reply takes (streamed over it, or waited for)")
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = parser.parse_args(argv)
    api_key = args.api_key or os.environ.get("SIMULATOR_API_KEY") or SimulatorConfig.api_key
    potpie_key = "" if args.api_key else os.environ.get("POTPIE_API_KEY", "")
    config = SimulatorConfig(api_key=api_key, parse_seconds=args.parse_seconds,
                             slow_parse_seconds=args.slow_parse_seconds, latency_ms=args.latency_ms,
                             message_seconds=args.message_seconds,
                             verbose=args.verbose, extra_api_keys=(potpie_key,) if potpie_key else ())

    def announce(url: str) -> None:
        print(f"Potpie simulator listening on {url} (api key: {api_key[:6]}…)", flush=True)

    Simulator(config).run_forever(args.host, args.port, on_ready=announce)
    return 0


if __name__ == "__main__":
    sys.exit(main())
