"""A local simulator of the subset of Potpie.ai's HTTP API v2 the service uses, as unkind as Potpie's server code.

It behaves as the server code of record does (shared/potpie/API-FACTS.md §8), not as the docs promise:
- a parse reports only `submitted` until `ready` or `error` (the richer walk `submitted → cloned → parsed →
  inferring → ready` is `walk="rich"`, for demos, with citations filled in);
- `/parse` of a project found `submitted` or `error` queues another parse under the same id (the running one goes
  on); two first `/parse` calls at once make two projects; `GET /parsing-status/{id}` queues a parse again once it
  has said `submitted` for `stuck_threshold_seconds`; `POST /parsing-status` has no such side effect;
- an agent reply streams JSON objects back to back with no end marker: a run that failed ends as a clean 200 (empty,
  or after the chunks it sent), `stream=false` answers 500 for it; each project's first run opens with the setup
  banner (its own object; glued to the text when `stream=false`); `citations` is always `[]`;
- `session_id` names a run (taken ids get `-1`, `-2`, ...); `POST /conversations/{id}/stop` ends it cleanly;
- every error body is sanitized (`{"detail": <fixed text>, "code", "request_id"}`) and every answer carries
  `X-Request-ID`.
The repository owner picks a failure scenario (see `status_of`, `_run_failure` and the routes); GitHub's branch
heads are served under `/github` (github_simulator.py).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
import threading
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Callable
from urllib.parse import parse_qs, unquote, urlsplit

from .github_simulator import GitHubSimulator
from .sim_agents import SETUP_BANNER, AgentRoutes, Project, Run, compose_reply
from .sim_http import ApiError, Handler, Reply, Server, invalid, validate

__all__ = ["SETUP_BANNER", "STATUSES", "Simulator", "SimulatorConfig", "compose_reply"]

STATUSES = ("submitted", "cloned", "parsed", "inferring", "ready")  # the rich walk (walk="rich")
WALKS = ("server", "rich")
TUNABLE = ("parse_seconds", "slow_parse_seconds", "latency_ms", "hang_seconds", "message_seconds",
           "stuck_threshold_seconds", "register_ms", "stop_seconds")
ROUTES = [(method, re.compile(rx), name, stat) for method, rx, name, stat in [  # stat None = control route, no key
    ("GET", r"/health", "health", None),
    ("GET", r"/_sim/stats", "sim_stats", None),
    ("POST", r"/_sim/reset", "sim_reset", None),
    ("POST", r"/_sim/config", "sim_config", None),
    ("POST", r"/_sim/github/push", "github_push", None),
    ("POST", r"/api/v2/parse", "parse", "POST /parse"),
    ("GET", r"/api/v2/parsing-status/([^/]+)", "status_by_id", "GET /parsing-status"),
    ("POST", r"/api/v2/parsing-status", "status_by_repo", "POST /parsing-status"),
    ("GET", r"/api/v2/projects/list", "projects", "GET /projects/list"),
    ("POST", r"/api/v2/conversations", "create_conversation", "POST /conversations"),
    ("POST", r"/api/v2/conversations/([^/]+)/message", "message", "POST /message"),
    ("POST", r"/api/v2/conversations/([^/]+)/stop", "stop", "POST /stop"),
    ("POST", r"/api/v2/project/([^/]+)/message", "project_message", "POST /project-message"),
    ("GET", r"/api/v2/list-available-agents", "agents", "GET /list-available-agents"),
]]


@dataclass
class SimulatorConfig:
    """Simulator settings; the numeric ones (TUNABLE) and `walk` can be changed live via POST /_sim/config."""

    api_key: str = "sk-simulator"
    parse_seconds: float = 4.0
    slow_parse_seconds: float = 30.0
    latency_ms: float = 0  # added to every answer: a WAN-distant Potpie
    hang_seconds: float = 5.0
    message_seconds: float = 0  # how long an agent reply takes: streamed over it, or the wait before a whole one
    stuck_threshold_seconds: float = 600.0  # PARSING_STUCK_THRESHOLD_MINUTES: a GET poll re-queues older parses
    register_ms: float = 0.0  # /parse registering a new project after its lookup: two first calls inside the window
    # make two projects (a race the server leaves open at any width; tests widen it to hit it on purpose)
    stop_seconds: float = 0.2  # a stop's own pause before it answers
    walk: str = "server"  # "rich": the docs' status walk and filled-in citations, for demos
    verbose: bool = False
    extra_api_keys: tuple[str, ...] = ()


def scenario_of(repo_name: str) -> str:
    """Return the lower-cased owner part of `owner/name`, which selects the scenario."""
    return repo_name.split("/", 1)[0].strip().lower()


def unauthorized() -> ApiError:
    """The 401 for a missing, unknown or (transiently) unverifiable key."""
    return ApiError(401, "Invalid API key", {"WWW-Authenticate": "ApiKey"})


class Simulator(AgentRoutes):
    """An in-process Potpie API v2 server with deterministic failure scenarios."""

    def __init__(self, config: SimulatorConfig | None = None) -> None:
        self.config = config or SimulatorConfig()
        self.github = GitHubSimulator()
        self._lock = threading.Lock()
        self._server: Server | None = None
        self.url, self.port = "", 0  # set once bound, e.g. "http://127.0.0.1:8765" and 8765
        self.messages_in_flight = self.calls_in_flight = 0  # a reset leaves open ones counted
        self._clear()

    # --- serving -------------------------------------------------------------------------------------------

    def _bind(self, host: str, port: int) -> Server:
        """Create the listening server."""
        handler = type("BoundHandler", (Handler,), {
            "dispatch": staticmethod(self.dispatch), "latency": staticmethod(lambda: self.config.latency_ms / 1000),
            "calling": staticmethod(self._calling), "verbose": staticmethod(lambda: self.config.verbose)})
        self._server = Server((host, port), handler)
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

    # --- state and counters --------------------------------------------------------------------------------

    def _clear(self) -> None:
        """Drop all projects, conversations, runs and counters (caller holds the lock or is __init__)."""
        self.projects: dict[str, Project] = {}
        self.conversations: dict[str, tuple[str, str]] = {}
        self.runs: dict[str, Run] = {}  # runs in flight
        self.claimed: dict[str, float] = {}  # run id -> when claimed
        self.requests = {stat: 0 for *_, stat in ROUTES if stat}
        self.parse_calls: dict[str, int] = {}  # repo@branch -> POST /parse requests
        self.parses_started: dict[str, int] = {}  # repo@branch -> parse tasks queued (new, re-parse, re-queue)
        self.github_tokens: dict[str, str] = {}  # repo@branch -> SHA-256 of a github_token sent to /parse
        self.stops: dict[str, int] = {}  # run id ("" without one) -> POST /stop requests
        self.sessions: deque[str] = deque(maxlen=500)  # run ids of the agent runs started, in order
        self.request_ids: deque[tuple[str, str]] = deque(maxlen=2000)  # (route, X-Request-ID sent) of API calls
        self.hits: dict[tuple[str, str], int] = {}
        self.messages_in_flight_peak = self.messages_in_flight
        self.calls_in_flight_peak = self.calls_in_flight
        self.github.reset()

    def _in_flight(self, delta: int) -> None:
        with self._lock:
            self.messages_in_flight += delta
            self.messages_in_flight_peak = max(self.messages_in_flight_peak, self.messages_in_flight)

    def _calling(self, path: str, delta: int) -> None:
        if not path.startswith("/api/"):
            return
        with self._lock:
            self.calls_in_flight += delta
            self.calls_in_flight_peak = max(self.calls_in_flight_peak, self.calls_in_flight)

    def _hit(self, kind: str, key: str) -> int:
        """Count one `kind` event for `key` under the lock and return the running count (1 = first)."""
        with self._lock:
            self.hits[(kind, key)] = count = self.hits.get((kind, key), 0) + 1
        return count

    def _count(self, table: dict[str, int], key: str) -> None:
        with self._lock:
            table[key] = table.get(key, 0) + 1

    # --- parse model ---------------------------------------------------------------------------------------

    def status_of(self, project: Project) -> str:
        """A project's parsing status, from the age of its current parse run, its scenario and the walk."""
        elapsed, scenario, cfg = time.monotonic() - project.started, project.scenario, self.config
        rich = cfg.walk == "rich"
        if scenario == "stuck":
            return "submitted"
        if scenario == "already-parsed":
            return "ready"
        if scenario == "parse-error":
            half = cfg.parse_seconds / 2
            if elapsed >= half:
                return "error"
            return "cloned" if rich and elapsed >= half / 2 else "submitted"
        total = cfg.slow_parse_seconds if scenario == "slow-parse" else cfg.parse_seconds
        if total <= 0 or elapsed >= total:
            return "ready"
        return STATUSES[min(4, int(elapsed * 4 / total))] if rich else "submitted"

    def _latest(self, project: Project) -> bool:
        """`latest` as the server computes it: false for every branch parse (no commit stored), else whether the
        pinned commit is still the branch head (§8.1)."""
        if project.commit_id is None:
            return False
        return project.commit_id == self.github.head(project.repo_name, project.branch)

    def _find(self, repo: str, branch: str, commit: str | None, newest: bool = False) -> Project | None:
        """A project of `repo` (exact name) at the commit when given, else at the branch (which may also be a
        commit-pinned project of it: the lookup has no commit filter and no order; `newest` takes the other end
        of the table, as an unordered query may)."""
        with self._lock:
            found = [p for p in self.projects.values()
                     if p.repo_name == repo and (p.commit_id == commit if commit else p.branch == branch)]
        return (found[-1] if newest else found[0]) if found else None

    def _queue_parse(self, project: Project, fresh: bool) -> None:
        """Queue a parse task for the project: a fresh run (new, or after `error`) restarts its clock; one queued
        while another runs leaves the running one going (both write their end)."""
        now = time.monotonic()
        with self._lock:
            if fresh:
                project.started = now
            project.updated = now
        self._count(self.parses_started, f"{project.repo_name}@{project.branch}")

    # --- dispatch ------------------------------------------------------------------------------------------

    def dispatch(self, method: str, target: str, headers: Any, raw: bytes) -> Reply:
        """Route one request to its handler; error answers are raised as ApiError."""
        url = urlsplit(target)
        path = url.path.rstrip("/")
        github = self.github.answer(unquote(path), headers) if path.startswith("/github/") else None
        if github is not None:
            return github
        matches = [(m, match, name, stat) for m, rx, name, stat in ROUTES if (match := rx.fullmatch(path))]
        route = next((r for r in matches if r[0] == method), None)
        if route is None:
            raise ApiError(405, "Method Not Allowed") if matches else ApiError(404, "Not Found")
        _, match, name, stat = route
        if stat:
            with self._lock:
                self.requests[stat] += 1
                self.request_ids.append((stat, headers.get("X-Request-ID") or ""))
            key = headers.get("X-API-Key")
            if not key:
                raise ApiError(401, "API key is required", {"WWW-Authenticate": "ApiKey"})
            if key != self.config.api_key and key not in self.config.extra_api_keys:
                raise unauthorized()
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        handler: Callable[..., Reply] = getattr(self, "_" + name)
        return handler(*match.groups(), raw=raw, query=query)

    def _health(self, **_: Any) -> Reply:
        """Answer GET /health."""
        return Reply(body={"status": "ok", "version": "simulator"})

    def _sim_stats(self, **_: Any) -> Reply:
        """Answer GET /_sim/stats with request, parse, run and project counts."""
        with self._lock:
            by_repo: dict[str, int] = {}
            for project in self.projects.values():
                key = f"{project.repo_name}@{project.branch}"
                by_repo[key] = by_repo.get(key, 0) + 1
            return Reply(body={"requests": dict(self.requests), "parse_calls": dict(self.parse_calls),
                               "parses_started": dict(self.parses_started), "projects_by_repo": by_repo,
                               "github_token_sha256": dict(self.github_tokens), "stops": dict(self.stops),
                               "sessions": list(self.sessions), "runs_in_flight": sorted(self.runs),
                               "request_ids": [list(pair) for pair in self.request_ids],
                               "projects": len(self.projects), "messages_in_flight": self.messages_in_flight,
                               "messages_in_flight_peak": self.messages_in_flight_peak,
                               "calls_in_flight": self.calls_in_flight,
                               "calls_in_flight_peak": self.calls_in_flight_peak,
                               "github": self.github.stats()})

    def _sim_reset(self, **_: Any) -> Reply:
        """Answer POST /_sim/reset by dropping all state."""
        with self._lock:
            self._clear()
        return Reply(body={"status": "reset"})

    def _sim_config(self, raw: bytes, **_: Any) -> Reply:
        """Answer POST /_sim/config by updating the timing settings (and the walk) live."""
        body = validate(raw, {})
        for key, value in body.items():
            if key == "walk":
                if value not in WALKS:
                    raise invalid(["body", key], f"Must be one of {WALKS}", "value_error")
            elif key not in TUNABLE or isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise invalid(["body", key], f"Must be one of {TUNABLE} with a non-negative number", "value_error")
        with self._lock:
            for key, value in body.items():
                setattr(self.config, key, value if key == "walk" else float(value))
        return Reply(body={k: v for k, v in asdict(self.config).items() if k in TUNABLE or k == "walk"})

    def _github_push(self, raw: bytes, **_: Any) -> Reply:
        """Answer POST /_sim/github/push: move a branch's head to a new commit."""
        body = validate(raw, {"repo": "str!", "branch": "str!"})
        return Reply(body={"sha": self.github.push(body["repo"], body["branch"])})

    def _fail_common(self, scenario: str, first: bool) -> None:
        """Apply the revoked-key and flaky scenarios shared by every endpoint."""
        if scenario == "unauthorized":
            raise unauthorized()
        if scenario == "flaky" and first:
            raise ApiError(503, "Service temporarily unavailable")

    # --- parsing -------------------------------------------------------------------------------------------

    def _parse(self, raw: bytes, **_: Any) -> Reply:
        """Answer POST /parse: reuse a current project, parse a found one again under its id, or register a new
        one (§8.1)."""
        body = validate(raw, {"repo_name": "str", "repo_path": "str", "branch_name": "str", "commit_id": "str"})
        repo: str = body.get("repo_name") or ""
        commit: str | None = body.get("commit_id")
        branch: str = body.get("branch_name") or "main"
        if not repo and not body.get("repo_path"):
            raise invalid(["body"], "Value error, Either repo_name or repo_path must be provided", "value_error")
        if body.get("repo_path") or repo.startswith(("/", "~", ".")):
            raise ApiError(400, "Parsing local repositories is only supported in development mode")
        scenario = scenario_of(repo)
        self._count(self.parse_calls, f"{repo}@{branch}")
        if isinstance(body.get("github_token"), str):  # no such field: the server drops it (§8.8)
            with self._lock:
                self.github_tokens[f"{repo}@{branch}"] = hashlib.sha256(body["github_token"].encode()).hexdigest()
        first = self._hit("parse", repr((repo, branch, commit))) == 1
        self._fail_common(scenario, first)
        if scenario == "server-error":
            raise ApiError(500, "Internal server error")
        if scenario == "rate-limited" and first:
            raise ApiError(429, "Too many requests", {"Retry-After": "1"})
        found = self._find(repo, branch, commit)
        if found is not None:
            status = self.status_of(found)
            if status in ("ready", "inferring"):
                return Reply(body={"project_id": found.id, "status": status})
            self._queue_parse(found, fresh=status == "error")  # `submitted`: a second task under the same id
            return Reply(body={"project_id": found.id, "status": "submitted"})
        time.sleep(self.config.register_ms / 1000)  # the row is written after the lookup, with no unique constraint
        project = Project(str(uuid.uuid4()), repo, branch, commit, scenario)
        with self._lock:
            self.projects[project.id] = project
        self._queue_parse(project, fresh=True)
        if scenario == "timeout" and first:  # the project is saved, the answer is slow (as a busy server)
            time.sleep(self.config.hang_seconds)
        # a new project starts `submitted`; Potpie's demo repositories (here: the already-parsed owner) are `ready`
        return Reply(body={"project_id": project.id, "status": self.status_of(project) if scenario == "already-parsed"
                           else "submitted"})

    def _status_reply(self, project: Project, payload: dict[str, Any]) -> Reply:
        """Answer a parsing-status request for a known project, applying its scenario."""
        count = self._hit("status", project.id)
        self._fail_common(project.scenario, count == 1)
        if project.scenario == "auth-flaky" and count == 1:  # the server's own key lookup failed (§8.6)
            raise unauthorized()
        if project.scenario == "not-found":
            raise ApiError(404, "Project not found or access denied")
        if project.scenario == "bad-json" and count <= 2:
            return Reply(body=b'{"status": "submi')
        return Reply(body={**payload, "status": self.status_of(project), "latest": self._latest(project)})

    def _status_by_id(self, project_id: str, **_: Any) -> Reply:
        """Answer GET /parsing-status/{project_id}; a parse `submitted` for longer than the stuck threshold is
        queued again (its updated_at reset), as the server does."""
        project = self.projects.get(project_id)
        if project is None:
            raise ApiError(404, "Project not found or access denied")
        reply = self._status_reply(project, {})
        answer = reply.body if isinstance(reply.body, dict) else {}
        stuck = time.monotonic() - project.updated > self.config.stuck_threshold_seconds
        if answer.get("status") == "submitted" and not answer.get("latest") and stuck:
            self._queue_parse(project, fresh=False)
        return reply

    def _status_by_repo(self, raw: bytes, **_: Any) -> Reply:
        """Answer POST /parsing-status by repo_name plus commit_id or branch_name (no side effect)."""
        body = validate(raw, {"repo_name": "str!", "branch_name": "str", "commit_id": "str"})
        repo = body["repo_name"]
        if scenario_of(repo) == "unauthorized":
            raise unauthorized()
        project = self._find(repo, body.get("branch_name") or "main", body.get("commit_id"), newest=True)
        if project is None:
            raise ApiError(404, "Project not found for the given repo_name and commit_id/branch_name")
        return self._status_reply(project, {"project_id": project.id, "repo_name": repo})

    def _projects(self, **_: Any) -> Reply:
        """Answer GET /projects/list with the caller's projects."""
        with self._lock:
            projects = list(self.projects.values())
        return Reply(body=[{"id": p.id, "repo_name": p.repo_name, "branch_name": p.branch,
                            "status": self.status_of(p)} for p in projects])



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
    parser.add_argument("--walk", choices=WALKS, default=SimulatorConfig.walk,
                        help="server: submitted until ready, as Potpie's server code (default); rich: the docs' "
                             "status walk and citations, for demos")
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = parser.parse_args(argv)
    api_key = args.api_key or os.environ.get("SIMULATOR_API_KEY") or SimulatorConfig.api_key
    potpie_key = "" if args.api_key else os.environ.get("POTPIE_API_KEY", "")
    config = SimulatorConfig(api_key=api_key, parse_seconds=args.parse_seconds,
                             slow_parse_seconds=args.slow_parse_seconds, latency_ms=args.latency_ms,
                             message_seconds=args.message_seconds, walk=args.walk,
                             verbose=args.verbose, extra_api_keys=(potpie_key,) if potpie_key else ())

    def announce(url: str) -> None:
        print(f"Potpie simulator listening on {url} (api key: {api_key[:6]}…; GitHub API at {url}/github)",
              flush=True)

    Simulator(config).run_forever(args.host, args.port, on_ready=announce)
    return 0


if __name__ == "__main__":
    sys.exit(main())
