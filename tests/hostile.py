"""Hostile clients against a real API process (auth on): raw HTTP and WebSocket bytes no library would send, the
victims that measure /livez meanwhile, and what the API process holds (RSS, descriptors, Engine.IO sessions) and
logs."""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any

import requests

from potpie_service.auth import new_key
from tests.stack import Service, service_env, start_api, wait_for

ALICE, ALICE_ENTRY = new_key("alice")
OPEN_PACKET = b'0{"sid"'


def guarded_env(redis_url: str, queue: str, **overrides: str) -> dict[str, str]:
    """An API's settings with auth on (alice is the one client) and no worker needed: jobs stay queued."""
    return service_env(redis_url, "http://127.0.0.1:9", QUEUE_NAME=queue, AUTH_DISABLED="false",
                       API_KEYS=ALICE_ENTRY, RATE_LIMIT="off", **overrides)


def start_guarded_api(redis_url: str, name: str, **overrides: str) -> Service:
    """A guarded API process (see guarded_env), answering."""
    return start_api(guarded_env(redis_url, f"q-{name}-{os.getpid()}", **overrides), name)


def address(api: Service) -> tuple[str, int]:
    host, port = api.url.removeprefix("http://").split(":")  # type: ignore[attr-defined]
    return host, int(port)


def connect(api: Service, timeout: float = 10) -> socket.socket:
    return socket.create_connection(address(api), timeout=timeout)


def read_until_closed(sock: socket.socket, limit: float = 10) -> tuple[bytes, bool]:
    """What the server sends until it closes the connection (True) or `limit` seconds pass (False)."""
    sock.settimeout(limit)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        return data, False
    except ConnectionResetError:
        pass
    return data, True


def status_of(answer: bytes) -> int:
    """The status code of a raw HTTP answer (0 when there is none)."""
    head = answer.split(b"\r\n", 1)[0].split()
    return int(head[1]) if len(head) > 1 and head[1].isdigit() else 0


def body_of(answer: bytes) -> dict[str, Any]:
    return json.loads(answer.partition(b"\r\n\r\n")[2])


def polling_sid(api: Service, headers: dict[str, str] | None = None) -> str:
    """A new Engine.IO session over long-polling (no key needed to open one)."""
    answer = requests.get(api.url + "/socket.io/?EIO=4&transport=polling", headers=headers, timeout=5)  # type: ignore[attr-defined]
    assert answer.status_code == 200, answer.text
    return json.loads(answer.text[1:])["sid"]


def upgrade_request(host: str = "x", version: str = "13", key: str | None = None, extra: str = "") -> bytes:
    """A WebSocket upgrade of /socket.io/ (Engine.IO v4), with the headers the test chooses."""
    key = base64.b64encode(os.urandom(16)).decode() if key is None else key
    lines = ["GET /socket.io/?EIO=4&transport=websocket HTTP/1.1", f"Host: {host}" if host else "",
             "Upgrade: websocket", "Connection: Upgrade", f"Sec-WebSocket-Version: {version}" if version else "",
             f"Sec-WebSocket-Key: {key}" if key else "", extra]
    return ("\r\n".join(line for line in lines if line) + "\r\n\r\n").encode("latin-1")


class RawWebSocket:
    """A WebSocket client over a plain socket: masked frames of any size, sent a piece at a time if wanted."""

    def __init__(self, api: Service, timeout: float = 10) -> None:
        self.sock = connect(api, timeout)
        self.sock.sendall(upgrade_request())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            assert chunk, f"closed during the handshake: {head!r}"
            head += chunk
        assert head.startswith(b"HTTP/1.1 101"), head
        self.pending = head.split(b"\r\n\r\n", 1)[1]

    def frame_header(self, length: int, opcode: int = 0x1) -> bytes:
        """A final frame's header with an all-zero mask (the payload goes as it is)."""
        if length < 126:
            size = bytes([0x80 | length])
        elif length < 65536:
            size = bytes([0x80 | 126]) + struct.pack("!H", length)
        else:
            size = bytes([0x80 | 127]) + struct.pack("!Q", length)
        return bytes([0x80 | opcode]) + size + bytes(4)

    def send_text(self, text: str) -> None:
        data = text.encode()
        self.sock.sendall(self.frame_header(len(data)) + data)

    def receive(self) -> tuple[int, bytes]:
        """The next frame the server sends: (opcode, payload); (-1, b"") when the connection closed."""
        while True:
            if len(self.pending) >= 2:
                length, start = self.pending[1] & 0x7F, 2
                if length == 126:
                    length, start = struct.unpack("!H", self.pending[2:4])[0], 4
                elif length == 127:
                    length, start = struct.unpack("!Q", self.pending[2:10])[0], 10
                if len(self.pending) >= start + length:
                    opcode, payload = self.pending[0] & 0x0F, self.pending[start:start + length]
                    self.pending = self.pending[start + length:]
                    return opcode, payload
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                chunk = b""
            if not chunk:
                return -1, b""
            self.pending += chunk

    def connect_namespace(self, token: str | None) -> bytes:
        """Read the open packet, send Socket.IO's CONNECT (with the key, if any); the server's answer."""
        opcode, payload = self.receive()
        assert payload.startswith(OPEN_PACKET), payload
        self.send_text("40" + (json.dumps({"token": token}) if token else ""))
        return self.receive()[1]

    def closed_within(self, seconds: float) -> bool:
        """Whether the server closes the connection within `seconds` (frames it sends meanwhile are read)."""
        self.sock.settimeout(seconds)
        deadline = time.monotonic() + seconds
        try:
            while time.monotonic() < deadline:
                if self.receive()[0] == -1:
                    return True
        except TimeoutError:
            return False
        return False

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "RawWebSocket":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class Victims:
    """`clients` threads asking /livez every 50 ms while an attack runs: the slowest answer and every status."""

    def __init__(self, api: Service, clients: int = 3) -> None:
        self.url = api.url + "/livez"  # type: ignore[attr-defined]
        self.stop = threading.Event()
        self.latencies: list[float] = []
        self.statuses: list[int] = []
        self.threads = [threading.Thread(target=self._ask, daemon=True) for _ in range(clients)]

    def _ask(self) -> None:
        session = requests.Session()
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                status = session.get(self.url, timeout=10).status_code
            except requests.RequestException:
                status = 0
            self.latencies.append(time.monotonic() - started)
            self.statuses.append(status)
            time.sleep(0.05)

    def __enter__(self) -> "Victims":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(15)

    @property
    def slowest(self) -> float:
        return max(self.latencies, default=0.0)

    def check(self, within: float = 1.0) -> None:
        """Every victim was answered 200, each within `within` seconds."""
        assert self.latencies, "the victims asked nothing"
        assert set(self.statuses) == {200}, f"victims' statuses: {sorted(set(self.statuses))}"
        assert self.slowest <= within, f"/livez took up to {self.slowest:.2f} s for other clients"
        print(f"others' /livez: {len(self.latencies)} answers, the slowest in {self.slowest * 1000:.0f} ms")


class Process:
    """The API's gunicorn worker (the process serving requests): its memory, descriptors and log."""

    def __init__(self, api: Service) -> None:
        self.api = api
        master = api.proc.pid  # type: ignore[union-attr]
        children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
        assert len(children) == 1, children
        self.pid = int(children[0])
        self.log_from = len(api.log())

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def usage(self) -> tuple[float, int]:
        return self.rss_mb(), self.fds()

    def settles(self, baseline: tuple[float, int], rss_slack_mb: float, fd_slack: int = 2,
                timeout: float = 15) -> tuple[float, int]:
        """Wait until RSS and descriptors are back near `baseline`; what they came back to."""
        wait_for(lambda: self.rss_mb() <= baseline[0] + rss_slack_mb and self.fds() <= baseline[1] + fd_slack,
                 timeout, interval=0.2, what=f"RSS and fds back to {baseline} (now {self.usage()})")
        return self.usage()

    def new_lines(self) -> list[dict[str, Any]]:
        """The JSON log lines written since this object was made (or since `mark`)."""
        lines = []
        for raw in self.api.log()[self.log_from:].splitlines():
            if raw.startswith("{"):
                lines.append(json.loads(raw))
        return lines

    def mark(self) -> None:
        self.log_from = len(self.api.log())

    def check_log(self) -> None:
        """No traceback and no 5xx since the mark."""
        text = self.api.log()[self.log_from:]
        assert "Traceback" not in text, text[text.index("Traceback") - 300:][:3000]
        errors = [line for line in self.new_lines() if line.get("status", 0) >= 500 or line["level"] == "error"]
        assert not errors, errors[:5]


def metric(api: Service, name: str) -> float:
    """One sample of the API's /metrics, read with alice's key (a series it lacks fails the test)."""
    text = requests.get(api.url + "/metrics", headers={"Authorization": f"Bearer {ALICE}"}, timeout=10).text  # type: ignore[attr-defined]
    for line in text.splitlines():
        key, _, value = line.rpartition(" ")
        if key == name:
            return float(value)
    raise AssertionError(f"/metrics has no {name}")


def refusals(api: Service, reason: str) -> float:
    return metric(api, f'potpie_edge_refusals_total{{reason="{reason}"}}')
