"""Guards on what api/engineio_transport.py relies on inside python-engineio, wsproto and gevent beyond their public
API (what `Socket._websocket_handler` sets and how a session writes, simple-websocket's handshake answer, a gevent
socket's detach), each compared with what the library itself does at the pinned version, and its refusals. An
upgrade that moves any of it fails here. The same behaviours against a running API: tests/test_websocket.py,
tests/test_sessions.py, tests/faults/test_hostile_clients.py."""

from __future__ import annotations

import base64
import inspect
import os
import socket
from typing import Any

import gevent
import gevent.event
import gevent.socket
import pytest
import simple_websocket
from engineio import packet
from engineio.async_drivers import _websocket_wsgi
from engineio.socket import Socket as EngineSocket
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request

from potpie_service.api.engineio_link import Tally
from potpie_service.api.engineio_transport import green_websocket, handshake
from potpie_service.api.websocket import DeclinedDeflate
from tests.engineio_session import Written, encoded, engineio_server


def test_engineios_websocket_handler_sets_what_the_link_sets_and_writes_through_the_queue() -> None:
    """What `Socket._websocket_handler` does that GreenWebSocket does itself: a session connected by WebSocket is
    `connected` and `upgraded`, its packets go out through `queue.put` (a writer task reads them), its close puts
    None, and an upgraded session never polls."""
    server = engineio_server()
    tasks: list[Any] = []
    server.start_background_task = lambda target, *a, **k: tasks.append(target) or _Joined()  # type: ignore

    class Gone:
        def wait(self) -> None:
            return None

        def close(self) -> None:
            pass

    session = EngineSocket(server, "a")
    session.queue = Written()
    assert session._websocket_handler(Gone()) == []
    assert session.connected and session.upgraded, "engine.io's handler no longer marks the session so"
    assert [task.__name__ for task in tasks] == ["writer"]
    assert session.closed and encoded(session.queue)[-1] is None

    session = EngineSocket(server, "b")
    session.queue = Written()
    session.send(packet.Packet(packet.MESSAGE, "x"))
    session.close(wait=True)
    assert encoded(session.queue) == ["4x", "1", None], "Socket.send/close no longer go through queue.put"
    assert "self.queue" in inspect.getsource(EngineSocket.poll)

    session = EngineSocket(server, "c")
    session.connected = session.upgraded = True
    server.sockets["c"] = session
    answered: list[str] = []
    server.handle_request({"REQUEST_METHOD": "GET", "QUERY_STRING": "EIO=4&transport=polling&sid=c",
                           "PATH_INFO": "/socket.io/"}, lambda status, headers: answered.append(status))
    assert answered == ["400 BAD REQUEST"], "engine.io polls an upgraded session now"


class _Joined:
    def join(self) -> None:
        pass


def _upgrade_environ(sock: Any) -> dict[str, Any]:
    key = base64.b64encode(os.urandom(16)).decode()
    return {"gunicorn.socket": sock, "HTTP_HOST": "x", "HTTP_UPGRADE": "websocket", "HTTP_CONNECTION": "Upgrade",
            "HTTP_SEC_WEBSOCKET_KEY": key, "HTTP_SEC_WEBSOCKET_VERSION": "13", "REQUEST_METHOD": "GET",
            "HTTP_SEC_WEBSOCKET_EXTENSIONS": "permessage-deflate; client_max_window_bits",
            "PATH_INFO": "/socket.io/", "QUERY_STRING": "EIO=4&transport=websocket"}


def test_the_handshake_answers_as_simple_websocket_answers_with_compression_declined(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(simple_websocket.ws, "PerMessageDeflate", DeclinedDeflate)
    ours, theirs = socket.socketpair()
    environ = _upgrade_environ(ours)

    def handler(ws: Any) -> list[Any]:
        ws.close()
        return []

    with pytest.raises(StopIteration):
        _websocket_wsgi.SimpleWebSocketWSGI(handler, None)(environ, lambda *_: None)
    answer = theirs.recv(4096).split(b"\r\n\r\n")[0] + b"\r\n\r\n"
    mine, connection = handshake(environ)
    assert mine == answer, (mine, answer)
    assert b"101 Switching Protocols" in mine and b"permessage-deflate" not in mine
    assert connection.state.name == "OPEN"
    ours.close()
    theirs.close()


def test_a_gevent_socket_detaches_its_descriptor_and_gunicorns_close_leaves_it_open() -> None:
    ours, theirs = gevent.socket.socketpair()
    fd = ours.detach()
    ours.close()  # what gunicorn does once its handler has ended
    os.write(fd, b"still open")
    assert theirs.recv(16) == b"still open"
    os.close(fd)
    theirs.close()


def test_green_websocket_refuses_a_bad_handshake_before_writing() -> None:
    server = engineio_server()
    session = EngineSocket(server, "r")
    server.sockets["r"] = session
    counted: list[str] = []
    cls = green_websocket(server._async["websocket"], 64, counted.append, Tally(10))
    ours, theirs = socket.socketpair()
    answered: list[Any] = []
    body = cls(session._websocket_handler, server)({**_upgrade_environ(ours), "HTTP_SEC_WEBSOCKET_VERSION": "99"},
                                                   lambda status, headers: answered.append(status))
    assert answered == ["426 Upgrade Required"] and b"Sec-WebSocket-Version" in b"".join(body)
    assert counted == ["bad_upgrade"] and "r" not in server.sockets
    ours.close()
    theirs.close()


def test_wsproto_accepts_without_extensions_when_none_are_given() -> None:
    ws = WSConnection(ConnectionType.SERVER)
    ws.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    b"Sec-WebSocket-Key: " + base64.b64encode(b"0" * 16) + b"\r\nSec-WebSocket-Version: 13\r\n"
                    b"Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n")
    assert isinstance(next(ws.events()), Request)
    assert b"Sec-WebSocket-Extensions" not in ws.send(AcceptConnection(extensions=[]))


def test_green_websocket_refuses_an_upgrade_past_api_connections() -> None:
    server = engineio_server()
    session = EngineSocket(server, "f")
    server.sockets["f"] = session
    cls = green_websocket(server._async["websocket"], 64, [].append, Tally(0))
    ours, theirs = socket.socketpair()
    answered: list[Any] = []
    body = cls(session._websocket_handler, server)(_upgrade_environ(ours), lambda status, headers: answered.append(
        (status, dict(headers))))
    assert answered[0][0] == "503 Service Unavailable" and answered[0][1]["Retry-After"] == "1"
    assert b"too many open connections" in b"".join(body) and "f" not in server.sockets
    ours.close()
    theirs.close()
