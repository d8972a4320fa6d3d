"""The WebSocket under Socket.IO (api/websocket.py): handshake mistakes are 400/426, a message over
SOCKETIO_MAX_MESSAGE_BYTES is refused as it arrives, a frame engine.io cannot decode closes the socket, a closed
socket's session goes at once. The first tests check what the override relies on in the pinned python-engineio and
simple-websocket, on a real socket pair: an upgrade that changes it fails here, not in production."""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import time
from typing import Any, Iterator

import engineio
import pytest
from engineio.async_drivers import _websocket_wsgi, threading as threading_driver
from engineio.socket import Socket as EngineSocket

from potpie_service.api.websocket import BACKLOG, TakingTurns, bounded
from tests.hostile import (ALICE, Process, body_of, connect, metric, read_until_closed, refusals, status_of,
                           upgrade_request)
from tests.stack import Service, wait_for


def _upgrade_environ(sock: socket.socket) -> dict[str, Any]:
    key = base64.b64encode(os.urandom(16)).decode()
    return {"gunicorn.socket": sock, "HTTP_HOST": "x", "HTTP_UPGRADE": "websocket", "HTTP_CONNECTION": "Upgrade",
            "HTTP_SEC_WEBSOCKET_KEY": key, "HTTP_SEC_WEBSOCKET_VERSION": "13", "REQUEST_METHOD": "GET",
            "PATH_INFO": "/socket.io/", "QUERY_STRING": "EIO=4&transport=websocket"}


def test_engineio_builds_each_websocket_from_its_driver_class_with_the_sessions_handler() -> None:
    """bound_websockets replaces `_async["websocket"]`; BoundedWebSocket finds the session as its handler's
    `__self__` and adds `max_message_size` to the `server_args` simple_websocket.Server is built with."""
    made: list[tuple[Any, Any]] = []

    class Recorder:
        def __init__(self, handler: Any, server: Any) -> None:
            made.append((handler, server))

        def __call__(self, environ: dict[str, Any], start_response: Any) -> tuple[bytes]:
            return (b"",)

    server = engineio.Server(async_mode="threading")
    server._async = {**server._async, "websocket": Recorder}
    session = EngineSocket(server, "sid-1")
    session._upgrade_websocket({}, lambda *_: None)
    [(handler, got_server)] = made
    assert handler.__self__ is session and got_server is server
    assert handler == session._websocket_handler
    assert issubclass(threading_driver._async["websocket"], _websocket_wsgi.SimpleWebSocketWSGI)
    assert _websocket_wsgi.SimpleWebSocketWSGI(handler, server, thread_class=None).server_args == {"thread_class": None}


def test_simple_websocket_under_gunicorn_raises_stop_iteration_past_engineios_session_removal() -> None:
    """Why BoundedWebSocket removes a closed session itself: in gunicorn mode the WebSocket ends in StopIteration,
    which skips engine.io's `del self.sockets[sid]`. Also the reader attributes the override reads."""
    ours, theirs = socket.socketpair()
    seen: dict[str, Any] = {}

    def handler(ws: Any) -> list[Any]:
        server_ws = ws.ws
        seen.update(buffer=server_ws.input_buffer, length=server_ws.incoming_message_len,
                    size=server_ws.max_message_size, thread=server_ws.thread, sock=server_ws.sock,
                    connected=server_ws.connected)
        ws.close()
        return []

    wrapper = _websocket_wsgi.SimpleWebSocketWSGI(handler, None, max_message_size=1234)
    with pytest.raises(StopIteration):
        wrapper(_upgrade_environ(ours), lambda *_: None)
    assert seen["buffer"] == [] and seen["length"] == 0 and seen["size"] == 1234 and seen["connected"] is True
    assert hasattr(seen["thread"], "join") and seen["sock"] is ours
    assert b"101 Switching Protocols" in theirs.recv(4096)
    ours.close()
    theirs.close()


def test_taking_turns_yields_before_each_read_and_waits_on_a_backlog() -> None:
    ours, theirs = socket.socketpair()
    theirs.sendall(b"data")
    naps: list[float] = []
    backlog = iter([BACKLOG, BACKLOG, 0])
    turns = TakingTurns(ours, naps.append, lambda: next(backlog))
    assert turns.recv(16) == b"data"
    assert naps == [0, 0.01, 0.01]
    assert turns.fileno() == ours.fileno()
    ours.close()
    theirs.close()


def test_bounded_passes_the_message_limit_and_answers_handshake_mistakes() -> None:
    """In process, with a real socket pair: the limit reaches simple-websocket; a handshake wsproto refuses is the
    status it suggests, with nothing written to the socket before."""
    ours, theirs = socket.socketpair()
    server = engineio.Server(async_mode="threading")
    session = EngineSocket(server, "sid-2")
    server.sockets["sid-2"] = session
    counted: list[str] = []
    cls = bounded(server._async["websocket"], 4096, counted.append)
    ws = cls(session._websocket_handler, server)
    assert ws.server_args["max_message_size"] == 4096
    environ = {**_upgrade_environ(ours), "HTTP_SEC_WEBSOCKET_VERSION": "99"}
    answered: list[Any] = []
    body = ws(environ, lambda status, headers: answered.append((status, dict(headers))))
    assert answered[0][0] == "426 Upgrade Required" and answered[0][1]["Sec-WebSocket-Version"] == "13"
    assert json.loads(b"".join(body))["details"] == {"field": "Sec-WebSocket-Version"}
    assert counted == ["bad_upgrade"] and "sid-2" not in server.sockets, "the session it opened is gone"
    theirs.setblocking(False)
    with pytest.raises(BlockingIOError):
        theirs.recv(1)
    ours.close()
    theirs.close()


# --- against a running API ----------------------------------------------------------------------------------

@pytest.fixture
def api(guarded_api: Service) -> Iterator[Service]:
    process = Process(guarded_api)
    yield guarded_api
    process.check_log()


@pytest.mark.parametrize("request_bytes, status, field", [
    (upgrade_request(version="99"), 426, "Sec-WebSocket-Version"),
    (upgrade_request(key=""), 400, "Sec-WebSocket-Key"),
    (upgrade_request(extra="Sec-WebSocket-Protocol: \xe9t\xe9"), 400, "Upgrade"),
    (upgrade_request(host=""), 400, "Upgrade"),
], ids=["version-99", "no-key", "non-ascii-protocol", "no-host"])
def test_websocket_handshake_mistakes_are_4xx_and_leave_no_session(api: Service, request_bytes: bytes, status: int,
                                                                   field: str) -> None:
    before = refusals(api, "bad_upgrade")
    with connect(api) as sock:
        sock.sendall(request_bytes)
        answer, _ = read_until_closed(sock, limit=1)
    assert status_of(answer) == status, answer
    assert body_of(answer)["details"] == {"field": field}
    assert b"X-Content-Type-Options: nosniff" in answer
    assert refusals(api, "bad_upgrade") == before + 1
    wait_for(lambda: metric(api, "potpie_socketio_sessions") == 0, 3, what="no session left")


@pytest.mark.parametrize("frame", ["", "x", "bAAA!"], ids=["empty", "not-a-type", "bad-base64"])
def test_a_frame_engineio_cannot_decode_closes_the_socket(api: Service, websockets: Any, frame: str) -> None:
    before = refusals(api, "malformed_packet")
    ws = websockets(api)
    assert ws.connect_namespace(ALICE).startswith(b"40{")
    ws.send_text(frame)
    assert ws.closed_within(3)
    assert refusals(api, "malformed_packet") == before + 1
    wait_for(lambda: metric(api, "potpie_socketio_sessions") == 0, 3, what="its session gone")


def test_a_message_over_the_limit_is_refused_as_it_arrives(api: Service, websockets: Any) -> None:
    """A 10 MB frame: the server closes with 1009 once 64 KiB of it are in, and the client's sending stops."""
    before = refusals(api, "message_too_big")
    ws = websockets(api)
    assert ws.connect_namespace(ALICE).startswith(b"40{")
    ws.sock.sendall(ws.frame_header(10_000_000))
    sent = 0
    ws.sock.settimeout(5)
    try:
        while sent < 10_000_000:
            ws.sock.sendall(b"4" * 65536)
            sent += 65536
    except (BrokenPipeError, ConnectionResetError):
        pass
    assert sent < 8_000_000, f"the server took {sent} bytes of a frame over its limit"
    opcode, payload = ws.receive()
    while opcode not in (0x8, -1):
        opcode, payload = ws.receive()
    if opcode == 0x8:  # the close frame may be lost to the reset of a connection the client kept writing to
        assert struct.unpack("!H", payload[:2])[0] == 1009, payload
    wait_for(lambda: refusals(api, "message_too_big") == before + 1, 3, what="the refusal counted")
    wait_for(lambda: metric(api, "potpie_socketio_sessions") == 0, 3, what="its session gone")


@pytest.fixture(scope="module")
def threaded_api(redis_server: Any) -> Iterator[Service]:
    """The guarded API in SOCKETIO_ASYNC_MODE=threading (gunicorn gthread, a thread per WebSocket)."""
    from tests.hostile import start_guarded_api

    service = start_guarded_api(redis_server.url, "threaded-api", SOCKETIO_ASYNC_MODE="threading", API_THREADS="50")
    yield service
    service.stop()


def test_under_threads_every_socket_over_the_limit_is_closed_and_released(threaded_api: Service,
                                                                           websockets: Any) -> None:
    process = Process(threaded_api)
    before = refusals(threaded_api, "message_too_big")
    for _ in range(6):
        ws = websockets(threaded_api)
        assert ws.connect_namespace(ALICE).startswith(b"40{")
        ws.sock.sendall(ws.frame_header(1_000_000))
        try:
            ws.sock.sendall(b"4" * 200_000)
        except (BrokenPipeError, ConnectionResetError):
            pass
    wait_for(lambda: refusals(threaded_api, "message_too_big") == before + 6, 5, what="every refusal counted")
    wait_for(lambda: metric(threaded_api, "potpie_socketio_sessions") == 0, 5, what="every session released")
    process.check_log()


def test_closed_websocket_sessions_are_removed_at_once(api: Service) -> None:
    import socketio

    for _ in range(20):
        client = socketio.Client(reconnection=False)
        client.connect(api.url, transports=["websocket"], auth={"token": ALICE}, wait_timeout=5)  # type: ignore[attr-defined]
        client.disconnect()
    started = time.monotonic()
    wait_for(lambda: metric(api, "potpie_socketio_sessions") == 0, 5, what="every session removed")
    assert time.monotonic() - started < 1



def test_a_client_starting_with_polling_upgrades_and_is_served_over_the_websocket(api: Service) -> None:
    """python-socketio's default transports: a polling session, then the probe exchange and the upgrade; events and
    acks go over the WebSocket, and its session goes when it disconnects."""
    import socketio

    client = socketio.Client(reconnection=False)
    client.connect(api.url, auth={"token": ALICE}, wait_timeout=5)  # type: ignore[attr-defined]
    try:
        wait_for(lambda: client.transport() == "websocket", 5, what="the upgrade")
        for _ in range(3):
            ack = client.call("join_project", "not-a-job", timeout=5)
            assert ack["ok"] is False and "invalid project_id" in ack["error"]
    finally:
        client.disconnect()
    wait_for(lambda: metric(api, "potpie_socketio_sessions") == 0, 3, what="its session gone")
