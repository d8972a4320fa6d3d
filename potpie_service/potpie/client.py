"""Potpie.ai API v2 client: the calls the pipeline makes, with bounded retries for transient failures."""

from __future__ import annotations

import json
import os
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol
from urllib.parse import urlencode, urlsplit

import urllib3
from urllib3.exceptions import ConnectTimeoutError, HTTPError, ProtocolError, ReadTimeoutError

from .. import green

AGENT_ID = "codebase_qna_agent"
MAX_INLINE_RETRY_AFTER = 30.0  # a longer Retry-After is handed to the job-level retry instead

Observer = Callable[[str, str, float], None]  # (endpoint, outcome, seconds)


class Limiter(Protocol):
    """A rate limit shared by every worker (the store's TokenBucket): `acquire` raises TimeoutError."""

    def acquire(self, max_wait: float) -> float: ...

    def pause(self, seconds: float) -> None: ...


class PotpieError(Exception):
    """A Potpie call failed."""

    def __init__(self, reason: str, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


class PermanentPotpieError(PotpieError):
    """A failure that retrying cannot fix (bad key, usage limit, unknown project, bad request)."""


class TransientPotpieError(PotpieError):
    """A failure that may pass (connection, timeout, 5xx, 429, a broken reply)."""

    def __init__(self, reason: str, status: int | None = None, retry_after: float | None = None,
                 reached: bool = False) -> None:
        super().__init__(reason, status)
        self.retry_after = retry_after
        self.reached = reached  # the request may have been processed (timeout, cut-off or malformed reply)


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
    """An agent's answer: the full text and the files it cited."""

    text: str
    citations: list[str] = field(default_factory=list)


_PERMANENT = {
    400: "Potpie rejected the request",
    401: "Potpie rejected the API key (401): check POTPIE_API_KEY",
    403: "Potpie denied access (403): check POTPIE_API_KEY and the repository's permissions",
    402: "Potpie usage limit reached (402)",
    404: "Potpie does not know this project (404)",
    422: "Potpie rejected the request as invalid (422)",
}


def _detail(response: Response) -> str:
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        return ""
    return detail if isinstance(detail, str) else json.dumps(detail)[:300]


def _retry_after(response: Response) -> float | None:
    try:
        return max(0.0, float(response.headers.get("Retry-After", "")))
    except ValueError:
        return None


def check(response: Response) -> None:
    """Raise the right PotpieError for a non-2xx response."""
    status = response.status_code
    if status < 400:
        return
    detail = _detail(response)
    if status == 429:
        raise TransientPotpieError(f"Potpie rate limit (429) {detail}".strip(), status, _retry_after(response))
    if status >= 500 or status == 408:
        raise TransientPotpieError(f"Potpie server error ({status}) {detail}".strip(), status)
    base = _PERMANENT.get(status, f"Potpie answered {status}")
    raise PermanentPotpieError(f"{base}: {detail}" if detail else base, status)


def parse_stream(body: str) -> Reply:
    """Join Potpie's streamed reply: ChatMessageResponse objects written back to back."""
    decoder = json.JSONDecoder()
    parts: list[str] = []
    citations: list[str] = []
    index = 0
    while index < len(body):
        while index < len(body) and body[index].isspace():
            index += 1
        if index >= len(body):
            break
        try:
            item, index = decoder.raw_decode(body, index)
        except json.JSONDecodeError:
            raise TransientPotpieError("Potpie's streamed reply ended mid-message") from None
        if not isinstance(item, dict):
            raise TransientPotpieError("Potpie's streamed reply held an unexpected value")
        parts.append(str(item.get("message") or ""))
        citations.extend(c for c in item.get("citations") or [] if c not in citations)
    return Reply("".join(parts), citations)


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
    hundreds of calls a second."""

    def __init__(self, base_url: str, api_key: str, timeout: float, attempts: int = 3,
                 observer: Observer | None = None, stream: bool = True, limiter: Limiter | None = None,
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

    def _send(self, method: str, path: str, body: Any = None, params: dict[str, str] | None = None,
              timeout: urllib3.Timeout | None = None) -> Response:
        """One HTTP exchange, the whole body read; the connection goes back to the pool only after a clean one."""
        url = self.base_url + path + (f"?{urlencode(params)}" if params else "")
        headers = self.headers
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers = {**headers, "Content-Type": "application/json"}
        raw = self.http.request(method, url, body=data, headers=headers, timeout=timeout or self._timeouts,
                                preload_content=False, redirect=False, retries=False)  # retries are ours
        try:
            content = raw.read()
        except BaseException:
            raw.close()  # cut off or aborted mid-body: this connection is not reused
            raise
        raw.release_conn()
        return Response(raw.status, content, raw.headers)

    def _once(self, endpoint: str, method: str, path: str, **kwargs: Any) -> Response:
        if self.limiter is not None:
            try:
                self.limiter.acquire(max_wait=self.timeout)
            except TimeoutError as exc:  # the shared bucket (store/throttle.py) had no slot in time
                raise TransientPotpieError(str(exc)) from None
        started = time.perf_counter()
        outcome = "error"
        try:
            with green.deadline(self.timeout):  # the whole call, a slowly trickling reply included
                response = self._send(method, path, **kwargs)
            outcome = str(response.status_code)
            if response.status_code == 429 and self.limiter is not None:
                self.limiter.pause(_retry_after(response) or 1.0)
            check(response)
            return response
        except (ReadTimeoutError, green.Expired):
            outcome = "timeout"
            raise TransientPotpieError(f"Potpie did not answer within {self.timeout:g} s", reached=True) from None
        except green.Aborted:
            outcome = "aborted"
            raise
        except ProtocolError as exc:
            if "IncompleteRead" not in str(exc) and "InvalidChunkLength" not in str(exc):
                outcome = "connection_error"
                raise TransientPotpieError(f"cannot reach Potpie at {self.base_url}: {_cause(exc)}") from None
            outcome = "cut_off"
            raise TransientPotpieError(f"Potpie's reply to {endpoint} ended mid-stream", reached=True) from None
        except (ConnectTimeoutError, HTTPError, OSError) as exc:  # refused, unresolvable, TLS, reset
            outcome = "connection_error"
            raise TransientPotpieError(f"cannot reach Potpie at {self.base_url}: {_cause(exc)}") from None
        finally:
            if self.observer:
                self.observer(endpoint, outcome, time.perf_counter() - started)

    def _call(self, endpoint: str, method: str, path: str, decode: Callable[[Response], Any],
              repeatable: bool = True, **kwargs: Any) -> Any:
        """One call, tried up to `attempts` times while it fails transiently. A call that must not be repeated
        blindly (starting a parse) is tried again only when Potpie certainly did not process it; otherwise the
        job-level retry looks the project up first."""
        attempt = 1
        while True:
            try:
                response = self._once(endpoint, method, path, **kwargs)
                try:
                    return decode(response)
                except (ValueError, KeyError, TypeError):
                    raise TransientPotpieError(f"Potpie sent a malformed reply to {endpoint}", reached=True) from None
            except TransientPotpieError as error:
                again = _retry_inline(error) and (repeatable or not error.reached)
                if not again or attempt >= self.attempts:
                    raise
                time.sleep(backoff(attempt, error))
                attempt += 1

    def submit_parse(self, repo: str, branch: str, github_token: str | None = None) -> tuple[str, str]:
        """Start parsing; return (project_id, status)."""
        body = {"repo_name": repo, "branch_name": branch}
        if github_token:
            body["github_token"] = github_token  # hosted Potpie ignores it; self-hosted forks use it
        data = self._call("parse", "POST", "/api/v2/parse", lambda r: r.json(), repeatable=False, body=body)
        return str(data["project_id"]), str(data.get("status") or "submitted")

    def find_project(self, repo: str, branch: str) -> tuple[str, str] | None:
        """(project id, parse status) of the project Potpie holds for repo@branch, or None when it has none."""
        try:
            data = self._call("parsing_status_by_repo", "POST", "/api/v2/parsing-status", lambda r: r.json(),
                              body={"repo_name": repo, "branch_name": branch})
        except PermanentPotpieError as exc:
            if exc.status == 404:
                return None
            raise
        return str(data["project_id"]), str(data.get("status") or "submitted")

    def parse_status(self, project_id: str) -> str:
        """Potpie's parsing status for a project (submitted, cloned, parsed, inferring, ready, error…)."""
        data = self._call("parsing_status", "GET", f"/api/v2/parsing-status/{project_id}", lambda r: r.json())
        return str(data["status"])

    def create_conversation(self, project_id: str, agent_id: str = AGENT_ID) -> str:
        """Create a conversation with an agent; return its id."""
        data = self._call("conversations", "POST", "/api/v2/conversations/", lambda r: r.json(),
                          body={"project_ids": [project_id], "agent_ids": [agent_id]})
        return str(data["conversation_id"])

    def send_message(self, conversation_id: str, content: str) -> Reply:
        """Send a message and wait for the agent's whole reply (streamed or not)."""
        path = f"/api/v2/conversations/{conversation_id}/message/"
        if self.stream:
            return self._call("message", "POST", path, lambda r: parse_stream(r.text),
                              params={"stream": "true"}, body={"content": content})

        def decode(response: Response) -> Reply:
            data = response.json()
            return Reply(str(data["message"]), [str(c) for c in data.get("citations") or []])

        return self._call("message", "POST", path, decode, params={"stream": "false"}, body={"content": content})

    def health(self, timeout: float = 2.0) -> bool:
        """Whether Potpie's /health answers ok."""
        try:
            return self._send("GET", "/health", timeout=urllib3.Timeout(total=timeout)).status_code == 200
        except (HTTPError, OSError):
            return False
