"""Real processes for tests and benchmarks: a throwaway redis-server, Celery workers and API servers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

import redis
import requests

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"


def in_order(client: Any) -> Any:
    """Make a python-socketio client handle received messages one at a time, in arrival order, on its reader
    thread. python-engineio's client starts a thread per message, so two back-to-back events could be recorded
    in either order; these tests check the order on the wire (no handler here blocks on the connection)."""
    trigger = client.eio._trigger_event

    def in_arrival_order(event: str, *args: Any, **kwargs: Any) -> Any:
        if event == "message":
            kwargs["run_async"] = False
        return trigger(event, *args, **kwargs)

    client.eio._trigger_event = in_arrival_order
    return client


FINAL_EVENTS = ("analysis_complete", "analysis_error")


class Follower:
    """A python-socketio client following jobs over the network: it records every event in arrival order and
    re-joins its jobs on every (re)connect, as a documented client does."""

    def __init__(self, url: str, token: str | None = None, origin: str | None = None,
                 reconnection_delay_max: float = 0.5) -> None:
        import socketio  # only the real-time tests need it

        options = {"websocket_extra_options": {"origin": origin}} if origin else {}
        self.client = in_order(socketio.Client(reconnection=True, reconnection_delay=0.2,
                                               reconnection_delay_max=reconnection_delay_max, **options))
        self.url, self.token = url, token
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.acks: list[Any] = []
        self.connects = 0
        self.jobs: list[str] = []
        self.lock = threading.Lock()
        self.client.on("connect", self._on_connect)
        for name in ("status_update", *FINAL_EVENTS):
            self.client.on(name, lambda payload, name=name: self._record(name, payload))

    def _on_connect(self) -> None:
        self.connects += 1
        for job_id in list(self.jobs):  # the client's part of "reconnects miss nothing": join again
            self.client.emit("join_project", job_id, callback=self.acks.append)

    def _record(self, name: str, payload: dict[str, Any]) -> None:
        with self.lock:
            self.events.append((name, payload))

    def connect(self) -> "Follower":
        self.client.connect(self.url, transports=["websocket"], auth={"token": self.token} if self.token else None,
                            wait_timeout=5)
        return self

    def join(self, job_id: Any) -> Any:
        """join_project with its ack; a job joined successfully is re-joined on every reconnect."""
        ack = self.client.call("join_project", job_id, timeout=5)
        if isinstance(ack, dict) and ack.get("ok"):
            self.jobs.append(job_id)
        return ack

    def follow(self, job_ids: list[str]) -> None:
        """Join every job's room, each acknowledged."""
        for job_id in job_ids:
            ack = self.join(job_id)
            assert ack["ok"], ack

    def of(self, job_id: str) -> list[tuple[str, dict[str, Any]]]:
        """(event name, payload) received for the job, in arrival order."""
        with self.lock:
            return [(name, payload) for name, payload in self.events if payload.get("project_id") == job_id]

    def finals(self, job_id: str) -> list[tuple[str, dict[str, Any]]]:
        """The final events (analysis_complete / analysis_error) received for the job, in arrival order."""
        return [(name, payload) for name, payload in self.of(job_id) if name in FINAL_EVENTS]

    def deduped(self, job_id: str) -> list[tuple[str, dict[str, Any]]]:
        """What a documented client keeps: events whose seq is above the last one seen."""
        kept, last = [], -1
        for name, payload in self.of(job_id):
            if payload["seq"] > last:
                kept.append((name, payload))
                last = payload["seq"]
        return kept

    def wait_final(self, job_id: str, timeout: float = 30.0) -> tuple[str, dict[str, Any]]:
        """The last final event received for the job, once there is one."""
        found = wait_for(lambda: self.finals(job_id), timeout, what=f"the final event of {job_id}")
        return found[-1]  # type: ignore[index]

    def close(self) -> None:
        self.client.shutdown()  # disconnect() would leave a reconnecting client retrying after the test


class Emissions:
    """Every event the store publishes, read from the Redis channel all API processes listen on: (name, payload)
    in publish order, whether or not any Socket.IO client was there to get it."""

    def __init__(self, redis_url: str, queue_name: str) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.lock = threading.Lock()
        self.lost: BaseException | None = None  # why the subscription ended, when it ended before close()
        self.pubsub = redis.Redis.from_url(redis_url).pubsub(ignore_subscribe_messages=True)
        self.pubsub.subscribe(**{f"psvc-{queue_name}": self._on_message})
        self.thread = self.pubsub.run_in_thread(sleep_time=0.05, daemon=True, exception_handler=self._on_error)

    def _on_error(self, error: BaseException, pubsub: Any, thread: Any) -> None:
        """The subscription is gone (Redis closed it, e.g. past its pubsub output buffer limit): what is read from
        now on fails at once, naming why, instead of a wait for events that can no longer arrive."""
        self.lost = error
        thread.stop()

    def _on_message(self, message: dict[str, Any]) -> None:
        packet = json.loads(message["data"])
        if packet.get("method") == "emit":
            with self.lock:
                self.events.append((packet["event"], packet["data"][0]))

    def _listening(self) -> None:
        if self.lost is not None:
            raise Hopeless(f"the test's subscription to the event channel was lost: {self.lost!r}")

    def of(self, job_id: str) -> list[tuple[str, dict[str, Any]]]:
        """(event name, payload) published for the job, in order."""
        self._listening()
        with self.lock:
            return [(name, payload) for name, payload in self.events if payload.get("job_id") == job_id]

    def count(self, event: str, job_id: str) -> int:
        """How many times `event` was published for the job."""
        return sum(1 for name, _ in self.of(job_id) if name == event)

    def jobs_with(self, event: str) -> Counter[str]:
        """Job id -> number of `event`s published."""
        self._listening()
        with self.lock:
            return Counter(payload.get("job_id", "") for name, payload in self.events if name == event)

    def expect_once(self, event: str, job_ids: list[str], timeout: float = 10.0) -> None:
        """Wait until each job published `event`, give a duplicate time to follow, then require exactly one."""
        wait_for(lambda: len(self.jobs_with(event)) >= len(job_ids), timeout, what=f"every job's {event}")
        time.sleep(0.5)
        assert self.jobs_with(event) == {job_id: 1 for job_id in job_ids}, f"one {event} per job"

    def close(self) -> None:
        self.thread.stop()
        self.thread.join(timeout=2)  # the thread's last read ends before its socket closes
        self.pubsub.close()


class Receiver:
    """A webhook endpoint on 127.0.0.1 recording each POST (headers, body, status); the first `fail_first` get 500."""

    def __init__(self, fail_first: int = 0) -> None:
        self.calls: list[tuple[dict, bytes, int]] = []
        self.arrived: list[float] = []  # monotonic time of each call
        self.fail_first = fail_first
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                status = 500 if len(receiver.calls) < receiver.fail_first else 204
                receiver.arrived.append(time.monotonic())
                receiver.calls.append((dict(self.headers), body, status))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def free_port() -> int:
    """A TCP port that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Hopeless(AssertionError):
    """What a predicate raises when waiting longer cannot help: wait_for gives up at once."""


def wait_for(predicate: Callable[[], object], timeout: float = 20.0, interval: float = 0.05,
              what: str = "condition") -> object:
    """Poll until `predicate()` is truthy; raise AssertionError naming `what` on timeout."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Hopeless:
            raise
        except Exception as exc:  # the thing polled may not be up yet
            last_error = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last error: {last_error!r})")


class RedisServer:
    """A redis-server on a free port with its own data directory."""

    def __init__(self, port: int | None = None, appendonly: bool = False, password: str | None = None,
                 extra: list[str] | None = None) -> None:
        binary = shutil.which("redis-server")
        if not binary:
            raise RuntimeError("redis-server not found: `make test` installs it (apt-get install redis-server)")
        self.binary = binary
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="psvc-redis-")
        self.appendonly = appendonly
        self.password = password
        self.extra = extra or []
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def args(self) -> list[str]:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir, "--save", "",
                "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "always",
                "--maxmemory-policy", "noeviction", "--loglevel", "warning"]
        if self.password:
            args += ["--requirepass", self.password]
        return args + self.extra

    def start(self) -> "RedisServer":
        self.proc = subprocess.Popen(self.args(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self.ping, 10, what=f"redis on port {self.port}")
        return self

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, decode_responses=True, socket_timeout=5)

    def ping(self) -> bool:
        return bool(self.client().ping())

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)
        self.proc = None

    def restart(self, down_for: float = 0.0) -> None:
        self.stop()
        time.sleep(down_for)
        self.start()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class Service:
    """A service process (API or worker) with its output in test-artifacts/<name>.log."""

    def __init__(self, name: str, args: list[str], env: dict[str, str]) -> None:
        self.name = name
        self.args = args
        self.env = env
        ARTIFACTS.mkdir(exist_ok=True)
        self.log_path = ARTIFACTS / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Service":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.args, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        log.close()
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = 20.0) -> int | None:
        self.terminate()
        return self.stopped(timeout)

    def terminate(self) -> None:
        """SIGTERM, without waiting: several services stop side by side (see stopped)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stopped(self, timeout: float = 20.0) -> int | None:
        """The exit code once the process has ended after terminate, killed if it takes longer than timeout."""
        if not self.proc:
            return None
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        code = self.proc.returncode
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # pool children left behind, if any
        except ProcessLookupError:
            pass
        return code

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_lines(self) -> list[dict[str, Any]]:
        """The JSON lines of the process's log (past runs under the same name included)."""
        lines: list[dict[str, Any]] = []
        for raw in self.log().splitlines():
            if raw.startswith("{"):
                try:
                    lines.append(json.loads(raw))
                except ValueError:  # a line cut by a kill -9
                    continue
        return lines


def service_env(redis_url: str, potpie_url: str, **overrides: str) -> dict[str, str]:
    """Environment for a service process under test: fast polls and retries, JSON logs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "POTPIE_", "API_KEYS"))}
    env.update({
        "REDIS_URL": redis_url, "POTPIE_BASE_URL": potpie_url, "POTPIE_API_KEY": "sk-simulator",
        "QUEUE_NAME": "psvc-test", "POTPIE_POLL_INTERVAL": "0.2", "REQUEST_TIMEOUT": "3000",
        "RETRY_BASE_DELAY": "0.3", "WORKER_HEARTBEAT_INTERVAL": "0.5", "STEP_GRACE": "5",
        "MAX_CONCURRENT_JOBS": "5", "LOG_FORMAT": "json", "LOG_LEVEL": "info", "AUTH_DISABLED": "true",
        "PYTHONUNBUFFERED": "1", "DEDUP_ENABLED": "false",  # tests submit identical jobs on purpose
    })
    env.update(overrides)
    return env


def start_worker(env: dict[str, str], name: str = "worker", concurrency: int | None = None,
                 extra: list[str] | None = None) -> Service:
    """A Celery worker process started as deployed (`celery -A workers worker`: the pool and concurrency from
    WORKER_POOL / WORKER_CONCURRENCY unless `concurrency` says otherwise); returns once it consumes its own
    heartbeat."""
    hostname = f"{name}-{free_port()}@localhost"
    args = [sys.executable, "-m", "celery", "-A", "workers", "worker", "--loglevel=INFO", "-E",
            f"--hostname={hostname}", "--without-gossip", "--without-mingle",
            *([f"--concurrency={concurrency}"] if concurrency else []), *(extra or [])]
    service = Service(name, args, env).start()
    service.hostname = hostname  # type: ignore[attr-defined]
    client = redis.Redis.from_url(env["REDIS_URL"], decode_responses=True)
    key = f"psvc:{env.get('QUEUE_NAME', 'potpie-analysis')}:workers"
    wait_for(lambda: client.zscore(key, hostname) or not service.alive(), 30, what=f"worker {name} heartbeat")
    assert service.alive(), service.log()[-3000:]
    return service


def start_api(env: dict[str, str], name: str = "api", port: int | None = None) -> Service:
    """An API process on `port` (default: a free one); returns once it answers."""
    port = port or free_port()
    service = Service(name, [sys.executable, "-m", "potpie_service", "api"], {**env, "PORT": str(port),
                                                                             "HOST": "127.0.0.1"}).start()
    service.url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
    wait_for(lambda: requests.get(service.url + "/livez", timeout=1).ok or not service.alive(), 30,
             what=f"api {name}")
    assert service.alive(), service.log()[-3000:]
    return service
