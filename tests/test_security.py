"""Security end to end: API keys and ownership, GitHub tokens never at rest in plaintext, input hardening,
Redis-backed rate limits, security headers. Real API, worker and Flower processes, real Redis, real Socket.IO."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
import redis
import requests
import socketio
from cryptography.fernet import Fernet

from potpie_service.auth import new_key
from potpie_service.config import Settings
from potpie_service.queue import make_celery
from potpie_service.tokens import new_key as new_token_key
from tests.conftest import Stack, make_stack
from tests.stack import ARTIFACTS, ROOT, RedisServer, Service, free_port, service_env, start_api, wait_for

pytestmark = pytest.mark.e2e  # whole stacks of processes: `make test` runs it, `make test-fast` does not

ALICE, ALICE_ENTRY = new_key("alice")
BOB, BOB_ENTRY = new_key("bob")
OPS, OPS_ENTRY = new_key("ops")
FLOWER_AUTH = ("flower", "flower-pw")
SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer",
                    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'"}


def auth_env(**overrides: str) -> dict[str, str]:
    """Service settings with authentication on: alice and bob are clients, ops an operator."""
    return {"AUTH_DISABLED": "false", "API_KEYS": f"{ALICE_ENTRY},{BOB_ENTRY}", "OPS_API_KEYS": OPS_ENTRY,
            **overrides}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@dataclass
class Secured:
    """A stack with auth on, a token key, and a Flower process watching it."""

    stack: Stack
    flower: Service
    flower_url: str
    token_key: str
    responses: list[str]

    @property
    def url(self) -> str:
        return self.stack.url

    def call(self, method: str, path: str, key: str | None = ALICE, **kwargs: Any) -> requests.Response:
        """One API request; every response body is kept for the token scan."""
        headers = {**(bearer(key) if key else {}), **kwargs.pop("headers", {})}
        response = requests.request(method, self.url + path, headers=headers, timeout=10, **kwargs)
        self.responses.append(f"{response.headers}\n{response.text}")
        return response

    def submit(self, key: str = ALICE, **body: Any) -> dict[str, Any]:
        response = self.call("POST", "/analyze", key, json=body)
        assert response.status_code == 202, response.text
        return response.json()

    def wait_final(self, job_id: str, key: str = ALICE, timeout: float = 30) -> dict[str, Any]:
        def final() -> dict[str, Any] | None:
            body = self.call("GET", f"/status/{job_id}", key).json()
            return body if body.get("status") in ("finished", "failed", "cancelled") else None
        return wait_for(final, timeout, interval=0.1, what=f"job {job_id} to end")  # type: ignore[return-value]


def start_flower(env: dict[str, str], name: str) -> tuple[Service, str]:
    """A real Flower process (`celery -A workers flower`) with basic auth, on a free port."""
    port = free_port()
    flower = Service(name, [sys.executable, "-m", "celery", "-A", "workers", "flower", f"--port={port}",
                            "--address=127.0.0.1", f"--basic-auth={FLOWER_AUTH[0]}:{FLOWER_AUTH[1]}"], env).start()
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: requests.get(url + "/api/workers", auth=FLOWER_AUTH, timeout=2).ok or not flower.alive(), 30,
             what="flower")
    assert flower.alive(), flower.log()[-3000:]
    return flower, url


@pytest.fixture(scope="module")
def secured(redis_server: RedisServer, simulator) -> Iterator[Secured]:
    token_key = new_token_key()
    stack = make_stack(redis_server, simulator, "sec", **auth_env(TOKEN_ENCRYPTION_KEY=token_key,
                                                                   RATE_LIMIT="1000/minute",
                                                                   GITHUB_API_URL=simulator.url + "/github"))
    flower, flower_url = start_flower(stack.env, "sec-flower")
    yield Secured(stack, flower, flower_url, token_key, [])
    flower.stop()
    stack.stop()


# --- authentication and ownership -------------------------------------------------------------------------

NO_KEY_FORMS = [{}, bearer("psk_wrong"), {"X-API-Key": "psk_wrong"}, {"Authorization": "Bearer "},
                {"Authorization": f"Basic {ALICE}"}, {"X-API-Key": OPS}]


@pytest.mark.parametrize("headers", NO_KEY_FORMS, ids=["none", "bearer-wrong", "x-api-key-wrong", "bearer-empty",
                                                        "basic-scheme", "ops-key-is-no-client-key"])
@pytest.mark.parametrize("method, path", [("POST", "/analyze"), ("GET", "/status/" + "a" * 32)])
def test_client_endpoints_answer_401_json_without_a_valid_client_key(secured: Secured, headers: dict[str, str],
                                                                    method: str, path: str) -> None:
    response = secured.call(method, path, key=None, headers=headers, json={"repo": "octocat/Hello-World"})
    assert response.status_code == 401
    assert response.headers["Content-Type"] == "application/json"
    assert response.json()["success"] is False and "API key" in response.json()["error"]
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert "psk_" not in response.text, "a presented key must never be echoed"


def test_both_header_forms_authenticate(secured: Secured) -> None:
    for headers in (bearer(ALICE), {"X-API-Key": ALICE}, {"Authorization": f"bearer {ALICE}"}):
        response = secured.call("POST", "/analyze", key=None, headers=headers,
                                json={"repo": f"octocat/hdr-{uuid.uuid4().hex[:6]}"})
        assert response.status_code == 202, response.text


def test_another_owners_job_is_indistinguishable_from_a_missing_one(secured: Secured) -> None:
    job_id = secured.submit(repo="octocat/owned")["job_id"]
    assert secured.call("GET", f"/status/{job_id}", ALICE).status_code == 200
    foreign = secured.call("GET", f"/status/{job_id}", BOB)
    unknown_id = uuid.uuid4().hex
    missing = secured.call("GET", f"/status/{unknown_id}", BOB)
    assert foreign.status_code == missing.status_code == 404
    assert foreign.text.replace(job_id, "ID") == missing.text.replace(unknown_id, "ID"), "no existence leak"
    assert foreign.headers["Content-Length"] == missing.headers["Content-Length"]


def test_join_project_of_another_owner_gets_the_same_error_ack_as_a_missing_job(secured: Secured) -> None:
    job_id = secured.submit(repo="octocat/owned-socket")["job_id"]
    bob, alice = socketio.Client(), socketio.Client()
    bob.connect(secured.url, transports=["websocket"], auth={"token": BOB}, wait_timeout=5)
    alice.connect(secured.url, transports=["websocket"], auth={"token": ALICE}, wait_timeout=5)
    try:
        foreign = bob.call("join_project", job_id, timeout=5)
        unknown_id = uuid.uuid4().hex
        missing = bob.call("join_project", unknown_id, timeout=5)
        assert foreign["ok"] is False and missing["ok"] is False
        assert json.dumps(foreign).replace(job_id, "ID") == json.dumps(missing).replace(unknown_id, "ID")
        assert alice.call("join_project", job_id, timeout=5)["ok"] is True
    finally:
        bob.disconnect()
        alice.disconnect()


@pytest.mark.parametrize("auth", [None, {"token": "psk_wrong"}, {"token": OPS}], ids=["none", "wrong", "ops-key"])
def test_socket_connect_is_refused_without_a_client_key(secured: Secured, auth: dict[str, str] | None) -> None:
    client = socketio.Client(reconnection=False)
    with pytest.raises(socketio.exceptions.ConnectionError):
        client.connect(secured.url, transports=["websocket"], auth=auth, wait_timeout=5)
    assert not client.connected


def test_internals_need_a_key_and_ops_keys_read_them(secured: Secured) -> None:
    anonymous = secured.call("GET", "/health", key=None)
    assert set(anonymous.json()) == {"status", "timestamp", "details"}, "no internals without a key"
    assert secured.call("GET", "/queue/stats", key=None).status_code == 401
    for key in (OPS, ALICE):
        health = secured.call("GET", "/health", key)
        assert health.json()["checks"]["redis"]["status"] == "up" and health.json()["auth"] == "enabled"
        stats = secured.call("GET", "/queue/stats", key)
        assert stats.status_code == 200 and "waiting" in stats.json()["stats"]


@pytest.mark.parametrize("path", ["/", "/livez", "/readyz", "/openapi.json"])
def test_public_endpoints_need_no_key(secured: Secured, path: str) -> None:
    response = secured.call("GET", path, key=None)
    assert response.status_code == 200 and response.headers["Content-Type"] == "application/json"


def _run_entry(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """Run an API entry point in an empty directory (no .env) with the given settings."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("API_KEYS", "AUTH_", "OPS_API_KEYS"))}
    full = {**base, "PYTHONPATH": str(ROOT), "REDIS_URL": "redis://127.0.0.1:1/0", "LOG_FORMAT": "text", **env}
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=full, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("entry", [["-m", "potpie_service", "api"], ["-c", "import potpie_service.wsgi"]],
                         ids=["api-command", "wsgi"])
def test_api_refuses_to_start_without_client_keys(tmp_path: Path, entry: list[str]) -> None:
    started = time.monotonic()
    done = _run_entry(entry, tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("potpie-service api: API_KEYS is empty"), done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert time.monotonic() - started < 20


def test_api_refuses_key_entries_that_are_not_hashes_without_echoing_them(tmp_path: Path) -> None:
    raw = f"psk_{uuid.uuid4().hex}"
    done = _run_entry(["-m", "potpie_service", "api"], tmp_path, API_KEYS=f"carol:{raw}")
    assert done.returncode == 2
    assert "API_KEYS=(hidden): entries for carol are not 'name:sha256hex'" in done.stderr
    assert raw not in done.stderr


def test_keygen_prints_a_key_and_its_hash_entry_and_refuses_bad_names(tmp_path: Path) -> None:
    done = _run_entry(["-m", "potpie_service", "keygen", "--name", "carol"], tmp_path)
    key = re.search(r"key \(give to the client, shown once\): (psk_\S+)", done.stdout).group(1)  # type: ignore
    entry = re.search(r"API_KEYS entry \(store on the server\): (\S+)", done.stdout).group(1)  # type: ignore
    assert entry == f"carol:{hashlib.sha256(key.encode()).hexdigest()}" and len(key) > 40
    assert Settings.from_env({"API_KEYS": entry}).api_keys == (entry,)
    refused = _run_entry(["-m", "potpie_service", "keygen", "--name", "my team"], tmp_path)
    assert refused.returncode == 2 and "--name" in refused.stderr


def test_auth_disabled_is_explicit_and_loud(redis_server: RedisServer, simulator) -> None:
    name = "sec-noauth-api"
    (ARTIFACTS / f"{name}.log").unlink(missing_ok=True)
    env = service_env(redis_server.url, simulator.url, QUEUE_NAME=f"q-noauth-{uuid.uuid4().hex[:6]}",
                      AUTH_DISABLED="true")
    api = start_api(env, name)
    try:
        health = requests.get(api.url + "/health", timeout=5).json()  # type: ignore[attr-defined]
        assert health["auth"] == "disabled"
        wait_for(lambda: "AUTH IS DISABLED" in api.log(), 5, what="the start-up warning")
    finally:
        api.stop()


# --- GitHub tokens: never at rest in plaintext -------------------------------------------------------------

_BASE64 = re.compile(rb"[A-Za-z0-9+/=_-]{16,}")


def _decoded(blob: bytes) -> list[bytes]:
    """Base64 runs inside a value, decoded (Celery stores message bodies base64-encoded)."""
    found = []
    for run in _BASE64.findall(blob):
        for decode in (base64.b64decode, base64.urlsafe_b64decode):
            try:
                found.append(decode(run + b"=" * (-len(run) % 4)))
            except (binascii.Error, ValueError):
                continue
    return found


def redis_everything(url: str) -> tuple[list[bytes], list[bytes]]:
    """(every key and value of every type, the base64-decoded contents of those values)."""
    client = redis.Redis.from_url(url)
    raw: list[bytes] = []
    for key in client.scan_iter(count=1000):
        kind = client.type(key)
        raw.append(key)
        if kind == b"string":
            raw.append(client.get(key) or b"")
        elif kind == b"hash":
            raw.extend(b for pair in client.hgetall(key).items() for b in pair)
        elif kind == b"list":
            raw.extend(client.lrange(key, 0, -1))
        elif kind == b"set":
            raw.extend(client.smembers(key))
        elif kind == b"zset":
            raw.extend(member for member, _ in client.zrange(key, 0, -1, withscores=True))
        elif kind == b"stream":
            for entry_id, entry in client.xrange(key):
                raw.extend([entry_id, *(b for pair in entry.items() for b in pair)])
    client.close()
    return raw, [part for value in raw for part in _decoded(value)]


class Monitor:
    """Every command Redis executes, recorded from MONITOR while the test runs (message bodies, events, scripts'
    arguments: whatever only lives in Redis for a moment is seen here too)."""

    def __init__(self, url: str) -> None:
        self.commands: list[bytes] = []
        self._monitor = redis.Redis.from_url(url).monitor()
        self._monitor.__enter__()
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        try:
            for command in self._monitor.listen():
                self.commands.append(command["command"].encode())
        except (redis.RedisError, OSError, ValueError):  # closed by stop()
            pass

    def stop(self) -> list[bytes]:
        self._monitor.__exit__(None, None, None)
        self._thread.join(5)
        return self.commands


def _hits(marker: str, blobs: list[bytes]) -> list[bytes]:
    return [blob[:200] for blob in blobs if marker.encode() in blob]


def test_github_token_reads_the_branch_head_and_never_reaches_potpie_redis_logs_or_answers(secured: Secured, sim_stats,
                                                                                           followers) -> None:
    marker = uuid.uuid4().hex
    token = f"ghp_{marker}"
    slow, fast = f"slow-parse/tok-{marker[:6]}", f"octocat/tok-{marker[:6]}"
    watcher = followers(secured.url, token=ALICE)
    others: list[Any] = []  # any event other than the three the follower records
    watcher.client.on("*", lambda name, data: others.append([name, data]))
    monitor = Monitor(secured.stack.redis.url)
    time.sleep(0.2)  # MONITOR is in place before the first command of the jobs
    slow_id = secured.submit(repo=slow, github_token=token, question="which token?")["job_id"]
    assert watcher.join(slow_id)["ok"] is True
    fast_id = secured.submit(repo=fast, github_token=token)["job_id"]
    url = secured.stack.redis.url

    secret = redis.Redis.from_url(url).get(secured.stack.key(f"secret:{slow_id}"))
    assert secret and token.encode() not in secret, "the token is stored only encrypted"
    assert Fernet(secured.token_key.encode()).decrypt(secret).decode() == token

    scans = 0
    while secured.call("GET", f"/status/{slow_id}").json()["status"] in ("queued", "parsing", "ready"):
        raw, decoded = redis_everything(url)
        scans += 1
        assert _hits(marker, raw) == [] and _hits(marker, decoded) == [], "token in Redis while in flight"
        time.sleep(0.2)
    assert scans >= 3, "the scans covered the job in flight"

    finals = [secured.wait_final(job_id) for job_id in (slow_id, fast_id)]
    assert [final["status"] for final in finals] == ["finished", "finished"], finals
    assert all(final["result"]["metadata"]["has_github_token"] is True for final in finals)
    digest = hashlib.sha256(token.encode()).hexdigest()
    assert sim_stats()["github"]["token_sha256"].count(digest) == 2, "the worker read each branch head with it"
    assert all(final["commit"]["source"] == "github" for final in finals)
    received = sim_stats()["github_token_sha256"]
    assert f"{slow}@main" not in received and f"{fast}@main" not in received, "the token went to Potpie's /parse"

    raw, decoded = redis_everything(url)
    assert _hits(marker, raw) == [] and _hits(marker, decoded) == [], "token in Redis after the jobs"
    sent = monitor.stop()
    decoded_sent = [part for command in sent for part in _decoded(command)]
    assert any(b"LPUSH" in command for command in sent if slow_id.encode() in b"".join(_decoded(command))), \
        "MONITOR saw the job's Celery messages"
    assert _hits(marker, sent) == [] and _hits(marker, decoded_sent) == [], "token in a command sent to Redis"
    assert not [key for key in raw if key.endswith(f"secret:{slow_id}".encode())], "deleted when the job ended"
    wait_for(lambda: any(slow_id in str(task.get("args")) for task in _flower_tasks(secured).values()), 10,
             what="flower to record the job's tasks")
    tasks = _flower_tasks(secured)
    assert marker not in json.dumps(tasks)
    for task_id in list(tasks)[:20]:
        info = requests.get(f"{secured.flower_url}/api/task/info/{task_id}", auth=FLOWER_AUTH, timeout=5)
        assert info.ok and marker not in info.text
    # /status said finished; the event travels on through Redis, the API and the socket
    assert watcher.wait_final(slow_id, timeout=10)[0] == "analysis_complete"
    assert marker not in json.dumps([watcher.events, others]), "token in a Socket.IO event"
    assert [text for text in secured.responses if marker in text] == [], "token in an API response"
    logs = {path.name: path.read_text(errors="replace") for path in ARTIFACTS.glob("*.log")}
    assert {"sec-api.log", "sec-worker0.log", "sec-flower.log"} <= set(logs)
    assert [name for name, text in logs.items() if marker in text] == [], "token in a log"


def _flower_tasks(secured: Secured) -> dict[str, Any]:
    response = requests.get(f"{secured.flower_url}/api/tasks", params={"limit": 1000}, auth=FLOWER_AUTH,
                            timeout=5)
    assert response.ok, response.text
    return response.json()


def test_flower_masks_secret_looking_task_arguments_and_needs_its_password(secured: Secured) -> None:
    assert requests.get(f"{secured.flower_url}/api/tasks", timeout=5).status_code == 401
    probe = f"ghp_{uuid.uuid4().hex}"
    queue = f"psvc-mask-probe-{uuid.uuid4().hex[:6]}"  # consumed by nobody
    app = make_celery(Settings.from_env(secured.stack.env))
    result = app.send_task("potpie.heartbeat", args=[probe], kwargs={}, queue=queue)
    try:
        info = wait_for(lambda: requests.get(f"{secured.flower_url}/api/task/info/{result.id}", auth=FLOWER_AUTH,
                                             timeout=5).json(), 10, what="flower to see the probe task")
        assert "***" in info["args"] and probe not in json.dumps(info)
    finally:
        redis.Redis.from_url(secured.stack.redis.url).delete(queue)  # the raw message held the probe token
        app.close()


# --- input hardening --------------------------------------------------------------------------------------

BAD_FIELDS = [
    ({}, "repo"), ({"repo": 42}, "repo"), ({"repo": "octocat"}, "repo"), ({"repo": "octocat/.."}, "repo"),
    ({"repo": "octocat/x.git"}, "repo"), ({"repo": "-octocat/x"}, "repo"), ({"repo": "o" * 40 + "/x"}, "repo"),
    ({"repo": "octocat/" + "x" * 101}, "repo"), ({"repo": " octocat/x"}, "repo"), ({"repo": "octocat/x\n"}, "repo"),
    ({"repo": "<b>x</b>/y"}, "repo"),
    ({"branch": ".."}, "branch"), ({"branch": "a..b"}, "branch"), ({"branch": "-x"}, "branch"),
    ({"branch": "x.lock"}, "branch"), ({"branch": "a//b"}, "branch"), ({"branch": "a b"}, "branch"),
    ({"branch": "é"}, "branch"), ({"branch": "b" * 256}, "branch"), ({"branch": 1}, "branch"),
    ({"branch": ".hidden"}, "branch"), ({"branch": "x/"}, "branch"), ({"branch": "main\n"}, "branch"),
    ({"question": 5}, "question"), ({"question": "q" * 4001}, "question"), ({"question": "nul\x00"}, "question"),
    ({"question": "\x1b[31mred"}, "question"), ({"question": "\ud800"}, "question"),
    ({"github_token": "bad-token!"}, "github_token"), ({"github_token": ""}, "github_token"),
    ({"github_token": ["ghp_x"]}, "github_token"), ({"github_token": "ghp_x\n"}, "github_token"),
    ({"unexpected": 1}, "unexpected"), ({"<script>alert(1)</script>": 1}, "(a name that is not shown)"),
]


@pytest.mark.parametrize("body, field", BAD_FIELDS, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD_FIELDS)])
def test_every_bad_field_is_a_400_naming_it(secured: Secured, body: dict[str, Any], field: str) -> None:
    full = {"repo": "octocat/Hello-World", **body} if field != "repo" else body
    response = secured.call("POST", "/analyze", data=json.dumps(full), headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.headers["Content-Type"] == "application/json"
    assert response.json()["details"]["field"] == field
    assert "<script>" not in response.text and "<b>" not in response.text, "no echo of raw input"


@pytest.mark.parametrize("data, content_type, status", [
    ("[]", "application/json", 400), ('"text"', "application/json", 400), ("null", "application/json", 400),
    ("{", "application/json", 400), ("{'repo': 'a/b'}", "application/json", 400),
    (b'{"repo": "\xff"}', "application/json", 400), ("[" * 6000 + "]" * 6000, "application/json", 400),
    ("repo=octocat/x", "application/x-www-form-urlencoded", 415), ('{"repo": "a/b"}', "text/plain", 415),
    ('{"repo": "a/b"}', None, 415), ("<repo>a/b</repo>", "application/xml", 415),
], ids=["array", "string", "null", "truncated", "single-quotes", "not-utf8", "deeply-nested", "form", "text",
        "no-type", "xml"])
def test_bodies_that_are_not_a_json_object_are_rejected(secured: Secured, data: Any, content_type: str | None,
                                                        status: int) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    response = secured.call("POST", "/analyze", data=data, headers=headers)
    assert response.status_code == status, response.text
    assert response.json()["details"]["field"] == "body"


@pytest.mark.parametrize("size, chunked", [(16 * 1024 + 1, False), (100 * 1024, False), (20 * 1024, True)],
                         ids=["just-over-16KiB", "100KiB", "chunked-20KiB"])
def test_bodies_over_16_kib_are_413(secured: Secured, size: int, chunked: bool) -> None:
    body = json.dumps({"repo": "octocat/Hello-World", "question": "q"})
    body = body[:-1] + " " * (size - len(body)) + "}"
    assert len(body) == size
    data: Any = iter([body[i:i + 4096].encode() for i in range(0, size, 4096)]) if chunked else body
    response = secured.call("POST", "/analyze", data=data, headers={"Content-Type": "application/json"})
    assert response.status_code == 413, response.text
    assert response.json()["success"] is False


def test_a_body_of_exactly_16_kib_is_accepted(secured: Secured) -> None:
    body = json.dumps({"repo": f"octocat/edge-{uuid.uuid4().hex[:6]}", "question": "q"})
    body = body[:-1] + " " * (16 * 1024 - len(body)) + "}"
    response = secured.call("POST", "/analyze", data=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 202, response.text


@pytest.mark.parametrize("payload", [None, 42, "not-a-job-id", {"project_id": ["x"]}, {"project_id": "A" * 32},
                                     "a" * 10_000, ["a" * 32]])
def test_bad_join_project_payloads_get_an_error_ack_and_the_socket_survives(secured: Secured, payload: Any) -> None:
    client = socketio.Client(reconnection=False)
    client.connect(secured.url, transports=["websocket"], auth={"token": ALICE}, wait_timeout=5)
    try:
        ack = client.call("join_project", payload, timeout=5)
        assert ack["ok"] is False and "project_id" in ack["error"]
        assert client.connected
        after = client.call("join_project", uuid.uuid4().hex, timeout=5)
        assert after == {"ok": False, "error": "Job not found", "project_id": after["project_id"]}, "still served"
    finally:
        client.disconnect()


@pytest.mark.parametrize("query, field", [
    ("page=%C2%B2", "page"), ("page=" + "9" * 2000, "page"), ("per_page=0", "per_page"), ("per_page=101", "per_page"),
    ("page=-1", "page"), ("status=running", "status"), ("status=%3Cscript%3E", "status"),
], ids=["superscript-digit", "2000-digits", "zero", "over-100", "negative", "unknown-status", "html"])
def test_bad_list_queries_are_400_naming_the_parameter(secured: Secured, query: str, field: str) -> None:
    response = secured.call("GET", f"/jobs?{query}")
    assert response.status_code == 400, response.text
    assert response.json()["details"]["field"] == field and "<script>" not in response.text


# --- security headers -------------------------------------------------------------------------------------

@pytest.mark.parametrize("method, path, kwargs, status", [
    ("GET", "/", {}, 200), ("POST", "/analyze", {"json": {"repo": "octocat/hdr-ok"}}, 202),
    ("POST", "/analyze", {"json": {"repo": 1}}, 400), ("GET", "/queue/stats", {"key": None}, 401),
    ("GET", "/no/such/route", {}, 404), ("DELETE", "/analyze", {}, 405),
    ("POST", "/analyze", {"data": "x" * 70_000, "headers": {"Content-Type": "application/json"}}, 413),
    ("POST", "/analyze", {"data": "x", "headers": {"Content-Type": "text/plain"}}, 415),
], ids=["200", "202", "400", "401", "404", "405", "413", "415"])
def test_security_headers_on_every_response(secured: Secured, method: str, path: str, kwargs: dict[str, Any],
                                            status: int) -> None:
    kwargs = dict(kwargs)
    key = kwargs.pop("key", ALICE)
    response = secured.call(method, path, key, **kwargs)
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == "application/json"
    for name, value in SECURITY_HEADERS.items():
        assert response.headers.get(name) == value, (name, response.headers)
    assert "Strict-Transport-Security" not in response.headers, "HSTS only behind TLS"
    if status == 405:
        assert set(response.headers["Allow"].split(", ")) >= {"POST"}


def test_security_headers_on_socketio_answers(secured: Secured) -> None:
    """engine.io answers outside Flask's after_request: a handshake and a refused transport carry them too."""
    handshake = secured.call("GET", "/socket.io/?EIO=4&transport=polling", key=None)
    refused = secured.call("GET", "/socket.io/?EIO=4&transport=carrier-pigeon", key=None)
    assert handshake.status_code == 200 and handshake.text.startswith("0{"), handshake.text
    assert refused.status_code == 400
    for response in (handshake, refused):
        for name, value in SECURITY_HEADERS.items():
            assert response.headers.get(name) == value, (name, response.headers)
    behind_tls = secured.call("GET", "/socket.io/?EIO=4&transport=polling", key=None,
                              headers={"X-Forwarded-Proto": "https"})
    assert behind_tls.headers["Strict-Transport-Security"].startswith("max-age=31536000")


def _raw_http(url: str, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes no HTTP library would send; return the status, headers and body of the answer."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as conn:
        conn.sendall(request)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    return int(status_line.split()[1]), dict(line.split(": ", 1) for line in lines), body


@pytest.mark.parametrize("request_bytes, status, field", [
    (b"POST /analyze HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: KW$\r\n\r\n{}",
     400, "Transfer-Encoding"),
    (b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "request line"),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n", 431, "headers"),
    (b"GET / HTTP/1.1\r\nHost: x\r\nBad Header: x\r\n\r\n", 400, None),
], ids=["transfer-coding", "request-line", "header-size", "header-name"])
def test_requests_gunicorn_rejects_get_json_errors_with_the_headers(secured: Secured, request_bytes: bytes,
                                                                     status: int, field: str | None) -> None:
    """What gunicorn refuses before the app sees it: the API's JSON error shape, never its HTML page or a 5xx."""
    got, headers, body = _raw_http(secured.url, request_bytes)
    assert got == status, body
    error = json.loads(body)
    assert error["success"] is False and error["error"] and error["details"] == ({"field": field} if field else {})
    assert headers["Content-Type"] == "application/json" and int(headers["Content-Length"]) == len(body)
    for name, value in SECURITY_HEADERS.items():
        assert headers.get(name) == value, (name, headers)
    assert secured.call("GET", "/livez", key=None).status_code == 200, "the worker survived it"


def test_hsts_when_served_behind_tls(secured: Secured) -> None:
    response = secured.call("GET", "/livez", key=None, headers={"X-Forwarded-Proto": "https"})
    assert response.headers["Strict-Transport-Security"].startswith("max-age=31536000")


# --- rate limits ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def limited(simulator) -> Iterator[tuple[RedisServer, list[Service]]]:
    """Two API processes sharing RATE_LIMIT=5/minute through their own Redis (stopped by the last test)."""
    server = RedisServer().start()
    env = service_env(server.url, simulator.url, QUEUE_NAME=f"q-rl-{uuid.uuid4().hex[:6]}",
                      **auth_env(RATE_LIMIT="5/minute", TRUSTED_PROXIES="1"))
    apis = [start_api(env, "sec-rl-api-a"), start_api(env, "sec-rl-api-b")]
    yield server, apis
    for api in apis:
        api.stop()
    server.cleanup()


def _post(api: Service, key: str | None, headers: dict[str, str] | None = None) -> requests.Response:
    return requests.post(api.url + "/analyze", json={"repo": f"octocat/rl-{uuid.uuid4().hex[:8]}"},  # type: ignore
                         headers={**(bearer(key) if key else {}), **(headers or {})}, timeout=10)


def test_rate_limit_per_key_holds_across_two_api_processes(limited: tuple[RedisServer, list[Service]]) -> None:
    server, (api_a, api_b) = limited
    answers = [_post(api, ALICE) for api in (api_a, api_b)]
    answers.append(requests.post(api_a.url + "/analyze", json={"repo": "no slash"},  # type: ignore[attr-defined]
                                 headers=bearer(ALICE), timeout=10))
    answers += [_post(api, ALICE) for api in (api_b, api_a, api_b)]
    assert [r.status_code for r in answers] == [202, 202, 400, 202, 202, 429], \
        "a request refused before the submit script counts too (once)"
    assert [r.headers["X-RateLimit-Remaining"] for r in answers] == ["4", "3", "2", "1", "0", "0"]
    assert {r.headers["X-RateLimit-Limit"] for r in answers} == {"5"}
    assert len({r.headers["X-RateLimit-Reset"] for r in answers}) <= 2, "one window (its end rounded up to a second)"
    refused = answers[-1]
    assert refused.headers["Content-Type"] == "application/json" and refused.json()["success"] is False
    assert 1 <= int(refused.headers["Retry-After"]) <= 61
    assert refused.json()["details"]["limit"] == "5 per 1 minute"
    for name, value in SECURITY_HEADERS.items():
        assert refused.headers[name] == value
    assert _post(api_a, BOB).status_code == 202, "another key has its own budget"
    retries = [requests.post(f"{api.url}/jobs/{uuid.uuid4().hex}/retry", headers=bearer(BOB),  # type: ignore
                             timeout=10).status_code for api in (api_a, api_b) * 3]
    assert retries == [404] * 4 + [429] * 2, "retries create work too: one budget with new jobs (bob used one)"
    keys = server.client().keys("psvc:q-rl-*:ratelimit*")
    assert keys, "the counters live in Redis"


def test_rate_limit_without_a_valid_key_is_per_client_ip(limited: tuple[RedisServer, list[Service]]) -> None:
    _, (api_a, api_b) = limited
    first = {"X-Forwarded-For": "203.0.113.7"}
    answers = [_post(api, None, first).status_code for api in (api_a, api_b) * 3]
    assert answers == [401] * 5 + [429], "unauthenticated attempts count against the client's IP"
    assert _post(api_a, "psk_guess", first).status_code == 429, "a wrong key does not buy a new budget"
    assert _post(api_b, None, {"X-Forwarded-For": "203.0.113.8"}).status_code == 401, "another IP is not limited"


def test_redis_down_answers_503_fast_never_500(limited: tuple[RedisServer, list[Service]]) -> None:
    server, (api_a, _) = limited
    server.stop()
    for key in (BOB, BOB, ALICE):
        started = time.monotonic()
        response = _post(api_a, key)
        assert time.monotonic() - started < 2.0
        assert response.status_code == 503, response.text
        assert response.json()["success"] is False
        for name, value in SECURITY_HEADERS.items():
            assert response.headers[name] == value
    # the other routes reach Redis too: the app's one Redis error handler answers them the same way
    for method, path, key in (("GET", "/jobs", BOB), ("GET", "/queue/stats", OPS),
                              ("DELETE", f"/jobs/{uuid.uuid4().hex}", BOB)):
        response = requests.request(method, api_a.url + path, headers=bearer(key), timeout=5)  # type: ignore
        assert response.status_code == 503, (path, response.text)
        assert response.json() == {"success": False, "error": "Redis connection failed", "details": {}}, path
    assert requests.get(api_a.url + "/livez", timeout=5).status_code == 200  # type: ignore[attr-defined]
