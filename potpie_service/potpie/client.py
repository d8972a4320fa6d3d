"""Potpie.ai API v2 client: the calls the pipeline makes, with bounded retries for transient failures."""

from __future__ import annotations

import json
import os
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol
from urllib.parse import urlencode, urlsplit

import urllib3
from urllib3.exceptions import ConnectTimeoutError, HTTPError, ProtocolError, ReadTimeoutError

from .. import green
from ..core.replies import agent_words, join_chunks

AGENT_ID = "codebase_qna_agent"
MAX_INLINE_RETRY_AFTER = 30.0  # a longer Retry-After is handed to the job-level retry instead

Observer = Callable[[str, str, float], None]  # (endpoint, outcome, seconds)


class Limiter(Protocol):
    """A rate limit shared by every worker (the store's TokenBucket): `acquire` raises TimeoutError."""

    def acquire(self, max_wait: float) -> float: ...

    def pause(self, seconds: float) -> None: ...


class PotpieError(Exception):
    """A Potpie call failed; `reason` says what Potpie sent (its error code and request id, when it gave them)."""

    def __init__(self, reason: str, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


class PermanentPotpieError(PotpieError):
    """A failure that retrying cannot fix (bad key, usage limit, unknown project, bad request)."""


class TransientPotpieError(PotpieError):
    """A failure that may pass (connection, timeout, 5xx, 429, a broken or empty reply)."""

    def __init__(self, reason: str, status: int | None = None, retry_after: float | None = None,
                 reached: bool = False) -> None:
        super().__init__(reason, status)
        self.retry_after = retry_after
        self.reached = reached  # the request may have been processed (timeout, cut-off or malformed reply)


class KeyRejected(TransientPotpieError):
    """A 401: Potpie's server also answers it when its own key lookup fails (a database error), so it is tried
    again a few times before it counts as a bad POTPIE_API_KEY."""


class NoAnswer(TransientPotpieError):
    """An agent run that ended without the agent's words: Potpie's stream simply ends (empty, or only its status
    chunks) when the run failed or its stream expired, and `stream=false` answers 200 with no text when it expired."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, 200, reached=True)


@dataclass
class Trace:
    """What a Potpie call is for: named in each request's X-Request-ID (Potpie echoes it and keeps it with its
    error, so its support can find the request), and counted per endpoint for the job's `potpie_calls`."""

    job_id: str
    step: str
    attempt: int = 1
    calls: dict[str, int] = field(default_factory=dict)

    def added_to(self, calls: Mapping[str, int]) -> dict[str, int]:
        """`calls` (a job's Potpie calls by endpoint) with this trace's added."""
        total = dict(calls)
        for endpoint, count in self.calls.items():
            total[endpoint] = total.get(endpoint, 0) + count
        return total

    def request_id(self, endpoint: str) -> str:
        """The next request's id, `psvc-<job>-<step>-a<attempt>-<n>` ([A-Za-z0-9._-], at most 128 characters)."""
        self.calls[endpoint] = self.calls.get(endpoint, 0) + 1
        return f"psvc-{self.job_id}-{self.step}-a{self.attempt}-{sum(self.calls.values())}"[:128]


@dataclass(frozen=True)
class Response:
    """A Potpie answer: its status, headers and whole body."""

    status_code: int
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


@dataclass(frozen=True)
class Reply:
    """An agent's answer: the agent's own words, the files Potpie cited (none, on today's server) and the id of the
    request that brought it."""

    text: str
    citations: list[str] = field(default_factory=list)
    request_id: str = ""


_PERMANENT = {
    400: "Potpie rejected the request",
    401: "Potpie rejected the API key: check POTPIE_API_KEY",
    403: "Potpie denied access: check POTPIE_API_KEY and the repository's permissions",
    402: "Potpie usage limit reached",
    404: "Potpie does not know this project",
    422: "Potpie rejected the request as invalid",
}


def _error_fields(response: Response) -> tuple[str, str, str]:
    """(detail, code, request_id) of an error answer: Potpie's sanitized body `{detail, code, request_id}`, or an
    older server's `{detail}`, and the X-Request-ID header."""
    try:
        body = response.json()
    except ValueError:
        body = None
    body = body if isinstance(body, dict) else {}
    detail = body.get("detail")
    text = detail if isinstance(detail, str) else (json.dumps(detail)[:300] if detail else "")
    request_id = str(body.get("request_id") or response.headers.get("X-Request-ID") or "")
    return text, str(body.get("code") or ""), request_id[:128]


def described(base: str, response: Response) -> str:
    """`base` with what Potpie said: `(HTTP 500, internal_error, request_id ...)`; an older server's detail
    text instead of a code."""
    detail, code, request_id = _error_fields(response)
    said = [f"HTTP {response.status_code}", code or (f'"{detail}"' if detail else ""),
            f"request_id {request_id}" if request_id else ""]
    return f"{base} ({', '.join(part for part in said if part)})"


def _retry_after(response: Response) -> float | None:
    try:
        return max(0.0, float(response.headers.get("Retry-After", "")))
    except ValueError:
        return None


def check(response: Response, what: str = "") -> None:
    """Raise the right PotpieError for a non-2xx response (`what`: the call, for a 5xx's reason)."""
    status = response.status_code
    if status < 400:
        return
    if status == 429:
        raise TransientPotpieError(described("Potpie rate limit", response), status, _retry_after(response))
    if status == 401:
        raise KeyRejected(described(_PERMANENT[401], response), status)
    if status >= 500 or status == 408:
        # `what` names a call whose 500 means the work ran and failed (an agent run): it reached Potpie. A 502-504
        # is a gateway's, or the server's "temporarily unavailable": nothing ran.
        ran = bool(what) and status in (500, 501)
        raise TransientPotpieError(described(what if ran else "Potpie server error", response), status, reached=ran)
    raise PermanentPotpieError(described(_PERMANENT.get(status, "Potpie refused the request"), response), status)


def parse_stream(body: str) -> list[dict[str, Any]]:
    """Split Potpie's streamed reply: ChatMessageResponse objects written back to back (no framing, no end)."""
    decoder = json.JSONDecoder()
    items: list[dict[str, Any]] = []
    index = 0
    while index < len(body):
        while index < len(body) and body[index].isspace():
            index += 1
        if index >= len(body):
            break
        try:
            item, index = decoder.raw_decode(body, index)
        except json.JSONDecodeError:
            raise TransientPotpieError("Potpie's streamed reply ended mid-message", reached=True) from None
        if not isinstance(item, dict):
            raise TransientPotpieError("Potpie's streamed reply held an unexpected value", reached=True)
        items.append(item)
    return items


def _citations(items: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(str(c) for item in items for c in item.get("citations") or []))


def _retry_inline(error: TransientPotpieError) -> bool:
    """Retry inside the step only for transient errors with a short (or no) Retry-After."""
    return (error.retry_after or 0) <= MAX_INLINE_RETRY_AFTER


def _cause(error: BaseException) -> str:
    """The kind of a connection failure, for failed_reason (never the URL's query or a header)."""
    reason = getattr(error, "reason", None)
    return type(reason if isinstance(reason, BaseException) else error).__name__


def backoff(attempt: int, error: TransientPotpieError) -> float:
    """Seconds before try `attempt + 1`: exponential from 0.5 s (at most 8 s) plus up to 25% jitter, or the
    Retry-After Potpie asked for when that is longer."""
    base = min(8.0, 0.5 * 2 ** (attempt - 1))
    jitter = base * 0.25 * (time.monotonic_ns() % 1000) / 1000
    return max(base + jitter, error.retry_after or 0.0)


def _pool(base_url: str, connections: int) -> urllib3.PoolManager:
    """Connections to Potpie: through HTTP(S)_PROXY unless NO_PROXY names the host (read once, here), verified
    against REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE when set, else the system's CAs."""
    options: dict[str, Any] = {"num_pools": 4, "maxsize": connections, "block": False}
    bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    if bundle:
        options["ca_certs"] = bundle
    where = urlsplit(base_url)
    proxy = urllib.request.getproxies().get(where.scheme)
    if proxy and not urllib.request.proxy_bypass(where.hostname or ""):
        return urllib3.ProxyManager(proxy, **options)
    return urllib3.PoolManager(**options)


class PotpieClient:
    """Blocking client for the Potpie v2 routes the pipeline uses (cooperative under gevent).

    It speaks urllib3 directly: requests cost about four times the client CPU per call, and a green worker makes
    hundreds of calls a second. Every request carries an X-Request-ID: the job, step and attempt it serves (a
    `Trace`), or what else asked."""

    def __init__(self, base_url: str, api_key: str, timeout: float, attempts: int = 3,
                 observer: Observer | None = None, stream: bool = False, limiter: Limiter | None = None,
                 connections: int = 32) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.attempts = attempts
        self.stream = stream
        self.observer = observer
        self.limiter = limiter  # POTPIE_RATE_LIMIT's bucket, or None
        # one kept-alive connection per call in flight: a green worker makes WORKER_CONCURRENCY calls at once
        self.http = _pool(self.base_url, connections)
        self.headers = {"X-API-Key": api_key, "Accept": "application/json"}
        self._timeouts = urllib3.Timeout(connect=min(timeout, 10.0), read=timeout)

    def _send(self, method: str, path: str, request_id: str, body: Any = None, params: dict[str, str] | None = None,
              timeout: urllib3.Timeout | None = None) -> Response:
        """One HTTP exchange, the whole body read; the connection goes back to the pool only after a clean one."""
        url = self.base_url + path + (f"?{urlencode(params)}" if params else "")
        headers = {**self.headers, "X-Request-ID": request_id}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        raw = self.http.request(method, url, body=data, headers=headers, timeout=timeout or self._timeouts,
                                preload_content=False, redirect=False, retries=False)  # retries are ours
        try:
            content = raw.read()
        except BaseException:
            raw.close()  # cut off or aborted mid-body: this connection is not reused
            raise
        raw.release_conn()
        return Response(raw.status, content, raw.headers)

    def _once(self, endpoint: str, method: str, path: str, trace: Trace | None, what: str = "",
              **kwargs: Any) -> Response:
        if self.limiter is not None:
            try:
                self.limiter.acquire(max_wait=self.timeout)
            except TimeoutError as exc:  # the shared bucket (store/throttle.py) had no slot in time
                raise TransientPotpieError(str(exc)) from None
        request_id = trace.request_id(endpoint) if trace else f"psvc-{endpoint}-{uuid.uuid4().hex[:12]}"
        started = time.perf_counter()
        outcome = "error"
        try:
            with green.deadline(self.timeout):  # the whole call, a slowly trickling reply included
                response = self._send(method, path, request_id, **kwargs)
            outcome = str(response.status_code)
            if response.status_code == 429 and self.limiter is not None:
                self.limiter.pause(_retry_after(response) or 1.0)
            check(response, what)
            return response
        except (ReadTimeoutError, green.Expired):
            outcome = "timeout"
            raise TransientPotpieError(f"Potpie did not answer within {self.timeout:g} s (request_id {request_id})",
                                       reached=True) from None
        except green.Aborted:
            outcome = "aborted"
            raise
        except ProtocolError as exc:
            if "IncompleteRead" not in str(exc) and "InvalidChunkLength" not in str(exc):
                outcome = "connection_error"
                raise TransientPotpieError(f"cannot reach Potpie at {self.base_url}: {_cause(exc)}") from None
            outcome = "cut_off"
            raise TransientPotpieError(f"Potpie's reply to {endpoint} ended mid-stream (request_id {request_id})",
                                       reached=True) from None
        except (ConnectTimeoutError, HTTPError, OSError) as exc:  # refused, unresolvable, TLS, reset
            outcome = "connection_error"
            raise TransientPotpieError(f"cannot reach Potpie at {self.base_url}: {_cause(exc)}") from None
        finally:
            if self.observer:
                self.observer(endpoint, outcome, time.perf_counter() - started)

    def _call(self, endpoint: str, method: str, path: str, decode: Callable[[Response], Any],
              repeatable: bool = True, trace: Trace | None = None, what: str = "", **kwargs: Any) -> Any:
        """One call, tried up to `attempts` times while it fails transiently. A call that must not be repeated
        blindly (starting a parse, asking the agent) is tried again only when Potpie certainly did not process
        it; otherwise the job-level retry decides (it looks the project up, or stops the run, first). A 401 that
        outlasts the tries is a bad key."""
        attempt = 1
        while True:
            try:
                response = self._once(endpoint, method, path, trace, what, **kwargs)
                try:
                    return decode(response)
                except (ValueError, KeyError, TypeError):
                    raise TransientPotpieError(f"Potpie sent a malformed reply to {endpoint}", reached=True) from None
            except TransientPotpieError as error:
                again = _retry_inline(error) and (repeatable or not error.reached)
                if not again or attempt >= self.attempts:
                    if isinstance(error, KeyRejected):
                        raise PermanentPotpieError(f"{error.reason}, {attempt} time(s) in a row", 401) from None
                    raise
                time.sleep(backoff(attempt, error))
                attempt += 1

    # --- parsing ---------------------------------------------------------------------------------------------

    @staticmethod
    def _repo_body(repo: str, branch: str, commit_id: str | None) -> dict[str, str]:
        body = {"repo_name": repo, "branch_name": branch}
        if commit_id:
            body["commit_id"] = commit_id
        return body

    def submit_parse(self, repo: str, branch: str, commit_id: str | None = None, github_token: str | None = None,
                     trace: Trace | None = None) -> tuple[str, str]:
        """Start parsing; return (project_id, status). `github_token` only for a self-hosted Potpie that reads
        one (Potpie's own server has no such field and drops it)."""
        body = self._repo_body(repo, branch, commit_id)
        if github_token:
            body["github_token"] = github_token
        data = self._call("parse", "POST", "/api/v2/parse", lambda r: r.json(), repeatable=False, body=body,
                          trace=trace)
        return str(data["project_id"]), str(data.get("status") or "submitted")

    def find_project(self, repo: str, branch: str, commit_id: str | None = None,
                     trace: Trace | None = None) -> tuple[str, str] | None:
        """(project id, parse status) of the project Potpie holds for repo@commit (else @branch), or None when it
        has none. A lookup only: it never queues a parse."""
        try:
            data = self._call("parsing_status_by_repo", "POST", "/api/v2/parsing-status", lambda r: r.json(),
                              body=self._repo_body(repo, branch, commit_id), trace=trace)
        except PermanentPotpieError as exc:
            if exc.status == 404:
                return None
            raise
        return str(data["project_id"]), str(data.get("status") or "submitted")

    def parse_status(self, project_id: str, repo: str, branch: str, commit_id: str | None = None,
                     trace: Trace | None = None) -> str:
        """A project's parsing status, read without side effects. GET /parsing-status/{id} would queue the parse
        again once it has run 10 minutes (§8.1), so the project is looked up by repository; when that lookup
        names another project of the branch (it has no order), the caller's project list says."""
        found = self.find_project(repo, branch, commit_id, trace=trace)
        if found is not None and found[0] == project_id:
            return found[1]
        projects = self._call("projects", "GET", "/api/v2/projects/list", lambda r: list(r.json()), trace=trace)
        for project in projects:
            if isinstance(project, dict) and project.get("id") == project_id:
                return str(project["status"])
        raise PermanentPotpieError(f"Potpie no longer lists project {project_id}", 404)

    # --- conversations ---------------------------------------------------------------------------------------

    def create_conversation(self, project_id: str, agent_id: str = AGENT_ID, trace: Trace | None = None) -> str:
        """Create a conversation with an agent; return its id."""
        data = self._call("conversations", "POST", "/api/v2/conversations/", lambda r: r.json(),
                          body={"project_ids": [project_id], "agent_ids": [agent_id]}, trace=trace)
        return str(data["conversation_id"])

    def send_message(self, conversation_id: str, content: str, session_id: str,
                     trace: Trace | None = None) -> Reply:
        """Send a message as run `session_id` and wait for the agent's whole answer.

        A reply counts only when it holds the agent's words. `stream=false` (the default) tells a failed or
        cancelled run (500) from a completed one; a stream always ends as a clean 200, so there an empty reply
        is the only failure visible, and a run that failed after its first chunks looks complete (§8.2). Not
        repeated inline once it may have reached Potpie: the run must be stopped before it is asked again."""
        path = f"/api/v2/conversations/{conversation_id}/message/"
        params = {"stream": "true" if self.stream else "false", "session_id": session_id}

        def decode(response: Response) -> Reply:
            request_id = response.headers.get("X-Request-ID", "")
            if self.stream:
                items = parse_stream(response.text)
                text = join_chunks([str(item.get("message") or "") for item in items])
                citations = _citations(items)
            else:
                data = response.json()
                text, citations = agent_words(str(data["message"])), [str(c) for c in data.get("citations") or []]
            if not text.strip():
                kind = "stream ended" if self.stream else "whole reply came"
                raise NoAnswer(f"Potpie's agent run ended without an answer: its {kind} with no text (HTTP 200, "
                               f"request_id {request_id}); the run failed or expired on Potpie's side")
            return Reply(text, citations, request_id)

        return self._call("message", "POST", path, decode, repeatable=False, params=params,
                          body={"content": content}, trace=trace, what="Potpie's agent run failed")

    def stop(self, conversation_id: str, session_id: str, trace: Trace | None = None) -> bool:
        """Stop agent run `session_id` (its stream ends, its task is revoked); whether it had text to save."""
        data = self._call("stop", "POST", f"/api/v2/conversations/{conversation_id}/stop", lambda r: r.json(),
                          params={"session_id": session_id}, trace=trace)
        return bool(data.get("saved_partial")) if isinstance(data, dict) else False

    def agents(self) -> list[str]:
        """The ids of the agents this key may use."""
        data = self._call("agents", "GET", "/api/v2/list-available-agents", lambda r: list(r.json()))
        return [str(agent["id"]) for agent in data if isinstance(agent, dict) and "id" in agent]

    def health(self, timeout: float = 2.0) -> bool:
        """Whether Potpie's /health answers ok."""
        try:
            response = self._send("GET", "/health", f"psvc-health-{uuid.uuid4().hex[:12]}",
                                  timeout=urllib3.Timeout(total=timeout))
            return response.status_code == 200
        except (HTTPError, OSError):
            return False
