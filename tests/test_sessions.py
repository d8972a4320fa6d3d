"""Which Socket.IO sessions the API keeps (api/sessions.py): a refused or silent session is closed, one that sends
a malformed packet or floods events is closed, the others are served. The first tests drive the guard over
python-socketio's own Engine.IO handlers in process (what it relies on in the pinned versions); the rest use raw
WebSockets against a running API with SOCKETIO_CONNECT_TIMEOUT=1."""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Iterator

import pytest
import socketio
from engineio.socket import Socket as EngineSocket

from potpie_service.api.sessions import SessionGuard, lean, well_formed
from potpie_service.config import Settings
from tests.hostile import ALICE, Process, metric, refusals
from tests.stack import Service, wait_for


@pytest.mark.parametrize("data, kind", [
    ("0", 0), ('0{"token":"k"}', 0), ("1", 1), ('2["join_project","abc"]', 2), ('21["join_project"]', 2),
    ("31[]", 3), ('0"k"', None), ("2{}", None), ("2", None), ("2[1]", None), ("2[]", None), ("3{}", None),
    ('51-["a",{"_placeholder":true,"num":0}]', None), ("4", None), ("7", None), ("x", None), (b"\x00", None),
    ("2" + "[" * 100_000, None), ("2[", None),
], ids=lambda value: repr(value)[:24])
def test_well_formed_takes_what_this_service_handles(data: Any, kind: int | None) -> None:
    assert well_formed(socketio.packet.Packet, data) == kind


def _server(refused: list[str]) -> tuple[socketio.Server, SessionGuard]:
    server = socketio.Server(async_mode="threading", async_handlers=False, ping_interval=0.05)
    server.on("connect", lambda sid, environ, auth=None: bool(auth and auth.get("token") == "good"))
    guard = SessionGuard(server, Settings(), refused.append)
    guard.sweeper = "not started"  # the connect deadline is tested against a running API below
    return server, guard


def _open(server: socketio.Server, sid: str) -> EngineSocket:
    """An Engine.IO session as engine.io opens one: registered, then its `connect` handler called."""
    session = EngineSocket(server.eio, sid)
    session.connected = True
    server.eio.sockets[sid] = session
    server.eio._trigger_event("connect", sid, {"REMOTE_ADDR": "192.0.2.1"}, run_async=False)
    return session


def _sent(session: EngineSocket) -> list[str]:
    return [packet.encode() for packet in list(session.queue.queue) if packet is not None]


def test_the_guard_wraps_python_socketios_engineio_handlers_and_closes_a_refused_session() -> None:
    refused: list[str] = []
    server, guard = _server(refused)
    assert (guard.on_connect, guard.on_message, guard.on_disconnect) == (
        server._handle_eio_connect, server._handle_eio_message, server._handle_eio_disconnect)
    assert server.eio.handlers == {"connect": guard.connect, "message": guard.message,
                                   "disconnect": guard.disconnect}

    refused_session = _open(server, "a")
    assert server.environ["a"]["REMOTE_ADDR"] == "192.0.2.1"
    server.eio._trigger_event("message", "a", '0{"token":"bad"}', run_async=False)
    sent = _sent(refused_session)
    assert sent[-2].startswith("44") and sent[-1] == "1", "CONNECT_ERROR, then Engine.IO's CLOSE"
    assert refused_session.closed and "a" not in server.eio.sockets and "a" not in server.environ
    assert refused == ["unauthenticated"] and guard.pending == {} and guard.budgets == {}

    accepted = _open(server, "b")
    server.eio._trigger_event("message", "b", '0{"token":"good"}', run_async=False)
    assert _sent(accepted)[-1].startswith("40") and not accepted.closed and guard.connected("b")
    assert "b" not in guard.pending, "authenticated: no deadline"
    server.environ["b"]["werkzeug.request"] = object()  # as Flask-SocketIO's request context leaves it
    server.eio._trigger_event("message", "b", '2["nothing"]', run_async=False)
    assert "werkzeug.request" not in server.environ["b"], "the last event's request is not kept"
    server.eio._trigger_event("message", "b", "1", run_async=False)  # it leaves the namespace
    assert accepted.closed and "b" not in server.eio.sockets and refused == ["unauthenticated"]


def test_the_guard_closes_a_session_over_its_event_budget() -> None:
    refused: list[str] = []
    server, guard = _server(refused)
    guard.burst, guard.rate = 5.0, 0.001
    session = _open(server, "c")
    server.eio._trigger_event("message", "c", '0{"token":"good"}', run_async=False)
    for _ in range(4):
        server.eio._trigger_event("message", "c", '2["nothing"]', run_async=False)
    assert not session.closed
    server.eio._trigger_event("message", "c", '2["nothing"]', run_async=False)
    assert session.closed and refused == ["event_budget"]


def test_lean_keeps_the_strings_and_drops_the_servers_per_request_objects() -> None:
    environ = {"REQUEST_METHOD": "GET", "HTTP_HOST": "x", "REMOTE_ADDR": "192.0.2.1", "wsgi.url_scheme": "http",
               "wsgi.version": (1, 0), "flask.app": object(), "gunicorn.socket": object(), "wsgi.input": object(),
               "wsgi.early_hints": print, "eventlet.input": object()}
    kept = lean(environ)
    assert {key for key in kept if not key.startswith("wsgi.")} == {"REQUEST_METHOD", "HTTP_HOST", "REMOTE_ADDR",
                                                                    "flask.app"}
    assert kept["flask.app"] is environ["flask.app"] and kept["wsgi.input"].read() == b""
    assert "gunicorn.socket" in environ, "the request's own environ is left as it is"


def test_engineio_reports_a_clients_mistake_as_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """A poll for an unknown session: engine.io's `_log_error_once` would say ERROR (then INFO) for it."""
    server, _ = _server([])
    environ = {"REQUEST_METHOD": "GET", "QUERY_STRING": "EIO=4&transport=polling&sid=gone", "PATH_INFO": "/socket.io/"}
    answered: list[str] = []
    with caplog.at_level(logging.INFO, logger="engineio.server"):
        for _ in range(2):
            server.eio.handle_request(environ, lambda status, headers: answered.append(status))
    assert answered == ["400 BAD REQUEST"] * 2
    assert [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "engineio.server"] == [
        ("WARNING", "Invalid session gone"), ("INFO", "Invalid session gone")]


# --- against a running API ----------------------------------------------------------------------------------

@pytest.fixture
def api(guarded_api: Service) -> Iterator[Service]:
    process = Process(guarded_api)
    yield guarded_api
    process.check_log()
    wait_for(lambda: metric(guarded_api, "potpie_socketio_sessions") == 0, 3, what="no session left")


def test_a_refused_connect_is_answered_then_closed(api: Service, websockets: Any) -> None:
    before = refusals(api, "unauthenticated")
    ws = websockets(api)
    answer = ws.connect_namespace(None)
    assert answer == b'44{"message":"Connection rejected by server"}', answer
    started = time.monotonic()
    assert ws.closed_within(2)
    assert time.monotonic() - started < 1.5, "closed at once (the client's close frame answered within 1 s)"
    assert refusals(api, "unauthenticated") == before + 1


def test_a_session_that_never_authenticates_is_closed_after_the_connect_timeout(api: Service,
                                                                             websockets: Any) -> None:
    before = refusals(api, "connect_timeout")
    sockets = [websockets(api) for _ in range(5)]
    assert metric(api, "potpie_socketio_sessions") >= 5
    started = time.monotonic()
    assert all(ws.closed_within(4) for ws in sockets)
    took = time.monotonic() - started
    assert 0.5 <= took <= 3, f"closed after {took:.2f} s (SOCKETIO_CONNECT_TIMEOUT=1)"
    assert refusals(api, "connect_timeout") == before + 5


def test_an_event_before_connecting_closes_the_session(api: Service, websockets: Any) -> None:
    ws = websockets(api)
    ws.receive()
    ws.send_text('42["join_project","' + "a" * 32 + '"]')
    assert ws.closed_within(2)


@pytest.mark.parametrize("packet", ["42{}", "42", "42[1]", '451-["join_project",{"_placeholder":true,"num":0}]',
                                    "4x", "47"], ids=["object", "nothing", "number", "binary", "junk", "type-7"])
def test_a_malformed_socketio_packet_closes_the_session_without_a_traceback(api: Service, websockets: Any,
                                                                          packet: str) -> None:
    before = refusals(api, "malformed_packet")
    ws = websockets(api)
    assert ws.connect_namespace(ALICE).startswith(b"40{")
    ws.send_text('421["join_project","' + "a" * 32 + '"]')
    opcode, ack = ws.receive()
    assert ack.startswith(b"431["), ack
    ws.send_text(packet)
    assert ws.closed_within(2)
    assert refusals(api, "malformed_packet") == before + 1


def test_a_socket_over_its_event_budget_is_closed_and_one_within_it_is_served(api: Service,
                                                                              websockets: Any) -> None:
    """SOCKETIO_EVENT_BURST=200 (the default): 150 joins at once are all answered; 400 close the socket."""
    within = websockets(api)
    assert within.connect_namespace(ALICE).startswith(b"40{")
    for i in range(150):
        within.send_text(f'42{i}["join_project",{json.dumps("a" * 32)}]')
    acks = [within.receive()[1] for _ in range(150)]
    assert all(ack.startswith(b"43") and b"Job not found" in ack for ack in acks)
    within.close()

    before = refusals(api, "event_budget")
    flood = websockets(api)
    assert flood.connect_namespace(ALICE).startswith(b"40{")
    frame = f'42["join_project",{json.dumps("a" * 32)}]'
    try:
        for _ in range(400):
            flood.send_text(frame)
    except (BrokenPipeError, ConnectionResetError):
        pass
    assert flood.closed_within(5)
    assert refusals(api, "event_budget") == before + 1
