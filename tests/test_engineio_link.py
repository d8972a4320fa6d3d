"""api/engineio_link.py driven in process over a real socket pair, on gevent's hub (not patched): what was queued and
each packet written at once, messages handed to engine.io in order, reading stopped while a backlog waits, 1009 for a
message over the limit, a packet engine.io cannot decode, engine.io's close answered or cut after CLOSE_WAIT."""

from __future__ import annotations

import socket
from typing import Any, Iterator

import engineio
import gevent
import gevent.event
import gevent.socket
import pytest
from engineio import packet
from engineio.socket import Socket as EngineSocket
from wsproto import ConnectionType
from wsproto.connection import Connection
from wsproto.events import CloseConnection, TextMessage

from potpie_service.api.engineio_link import Link, Tally
from potpie_service.api.websocket import BACKLOG


def _server() -> engineio.Server:
    return engineio.Server(async_mode="threading", ping_interval=20, ping_timeout=20, async_handlers=False)


class Client:
    """The client end: wsproto's connection as a client, over a plain blocking socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.ws = sock, Connection(ConnectionType.CLIENT)

    def send(self, text: str) -> None:
        self.sock.sendall(self.ws.send(TextMessage(text)))

    def events(self, wait: float = 2.0) -> list[Any]:
        self.sock.settimeout(wait)
        got: list[Any] = []
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    break
                self.ws.receive_data(data)
                got += list(self.ws.events())
                if got:
                    self.sock.settimeout(0.2)
        except (TimeoutError, socket.timeout, ConnectionResetError):
            pass
        return got


@pytest.fixture
def linked() -> Iterator[tuple[Link, EngineSocket, Client, list[str]]]:
    server = _server()
    server._async = {**server._async, "sleep": gevent.sleep}
    received: list[Any] = []
    server.on("message", lambda sid, data: received.append(data))
    server.on("disconnect", lambda sid, reason: received.append(("gone", reason)))
    session = EngineSocket(server, "s")
    session.connected = session.upgraded = True
    server.sockets["s"] = session
    session.queue = server.create_queue()
    session.queue.put(packet.Packet(packet.OPEN, {"sid": "s"}))
    ours, theirs = socket.socketpair()
    refused: list[str] = []
    tally = Tally(10)
    link = Link(ours, Connection(ConnectionType.SERVER), session, server, 64, refused.append, tally)
    link.start()
    assert tally.open == 1
    session.test_received = received  # type: ignore[attr-defined]
    yield link, session, Client(theirs), refused
    link._finish()  # a test that left it open: its watchers and socket go now
    _run_hub()
    theirs.close()


def _run_hub(seconds: float = 0.05) -> None:
    gevent.sleep(seconds)


def test_the_link_writes_what_was_queued_then_each_packet_at_once(linked: Any) -> None:
    link, session, client, _ = linked
    assert session.queue is link
    session.send(packet.Packet(packet.MESSAGE, "hello"))
    texts = [event.data for event in client.events(0.5) if isinstance(event, TextMessage)]
    assert texts[0].startswith("0{") and texts[1] == "4hello"


def test_the_link_hands_messages_to_engineio_in_order_and_answers_a_close(linked: Any) -> None:
    link, session, client, _ = linked
    for i in range(3):
        client.send(f"4m{i}")
    _run_hub()
    assert session.test_received == ["m0", "m1", "m2"]
    client.sock.sendall(client.ws.send(CloseConnection(1000)))
    _run_hub()
    assert any(isinstance(event, CloseConnection) for event in client.events(0.5)), "the close is answered"
    _run_hub()
    assert session.closed and "s" not in session.server.sockets and link.done and link.tally.open == 0


def test_the_link_stops_reading_while_a_backlog_waits(linked: Any) -> None:
    link, session, client, _ = linked
    blocked = gevent.event.Event()
    session.server.handlers["message"] = lambda sid, data: blocked.wait()
    for i in range(BACKLOG + 5):
        client.send(f"4m{i}")
    _run_hub(0.1)
    assert link.paused and len(link.inbox) >= BACKLOG - 1
    blocked.set()
    _run_hub(0.1)
    assert not link.paused and not link.inbox


def test_a_message_over_the_limit_closes_1009_and_the_session(linked: Any) -> None:
    link, session, client, refused = linked
    client.send("4" + "x" * 100)
    _run_hub()
    closes = [event for event in client.events(0.5) if isinstance(event, CloseConnection)]
    assert closes and closes[0].code == 1009 and refused == ["message_too_big"]
    _run_hub()
    assert session.closed and link.done


def test_a_frame_engineio_cannot_decode_closes_the_session(linked: Any) -> None:
    link, session, client, refused = linked
    client.send("x")
    _run_hub()
    assert refused == ["malformed_packet"] and session.closed


def test_engineios_close_sends_the_close_frame_and_cuts_a_client_that_does_not_answer(linked: Any) -> None:
    link, session, client, _ = linked
    session.close(wait=False, abort=False)
    events = client.events(0.5)
    assert [event.data for event in events if isinstance(event, TextMessage)][-1] == "1", "engine.io's CLOSE"
    assert isinstance(events[-1], CloseConnection) and events[-1].code == 1000
    assert not link.done, "it waits for the client's answer"
    _run_hub(1.2)  # CLOSE_WAIT
    assert link.done and "s" not in session.server.sockets
    client.sock.settimeout(0.5)
    try:
        assert client.sock.recv(1) == b"", "the connection is cut"
    except ConnectionResetError:
        pass
