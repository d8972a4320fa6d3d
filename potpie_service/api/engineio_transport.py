"""engine.io's WebSocket transport under gevent, without a greenlet per socket.

As shipped (python-engineio 4.15 with simple-websocket 1.1), each WebSocket kept four greenlets for its life: the
gunicorn handler running engine.io's receive loop inside the whole WSGI call, simple-websocket's reader, engine.io's
writer task and its ping task; with their saved C stacks, gevent's bookkeeping, the gunicorn request the handler
kept alive and wsproto's handshake state, ~45 of the ~70 KiB a connected client cost (bench/NOTES.md, issue 31).
Here, once the handshake is done:

- the connection leaves gunicorn: its descriptor is detached from gunicorn's socket and the handler greenlet ends
  (gunicorn's request, parser and environ with it), as simple-websocket's own gunicorn mode ends it, at close;
- it is then a Link (api/engineio_link.py): a libev watcher reads it, wsproto (the WebSocket protocol library
  simple-websocket is built on) frames it, a greenlet lives only while its messages are handed to engine.io, and
  whoever sends to the session writes (the Link is the session's queue: no writer task);
- pings are PingWheel's (api/engineio_pings.py).

What engine.io's `Socket._websocket_handler` does around this is done here the same way (the probe exchange of an
upgrade from polling, `connected`/`upgraded`, a packet it cannot decode, the close that ends the session), and
api/websocket.py's limits hold: the largest message (1009 as it arrives), 400/426 for a refused handshake, a close
that the client does not answer within CLOSE_WAIT cut, the closed session released at once.
tests/test_engineio_transport.py checks what this relies on in the pinned versions."""

from __future__ import annotations

import _socket
import json
import logging
from typing import Any, Callable

from engineio import packet
from wsproto import ConnectionType, WSConnection
from wsproto.connection import Connection
from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, Ping, Request, TextMessage
from wsproto.utilities import ProtocolError

from .engineio_link import RECEIVE_BYTES, UNREADABLE, Link, Tally
from .errors import ApiError, error_body
from .websocket import bounded

log = logging.getLogger(__name__)


def green_websockets(eio: Any, max_message_size: int, refused: Callable[[str], None], most: int = 100_000) -> None:
    """Make the engine.io server `eio` (gevent mode) serve its WebSockets through `green_websocket(...)`."""
    eio._async = {**eio._async, "websocket": green_websocket(eio._async["websocket"], max_message_size, refused,
                                                             Tally(most))}


def green_websocket(base: type, max_message_size: int, refused: Callable[[str], None], tally: Tally) -> type:
    """engine.io's WebSocket class for gevent: a Link once gunicorn's connection is upgraded (`bounded(base)`, the
    simple-websocket one, for a request that gunicorn does not serve)."""

    class GreenWebSocket(bounded(base, max_message_size, refused)):  # type: ignore[misc]
        def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
            sock = environ.get("gunicorn.socket")
            if sock is None:
                return super().__call__(environ, start_response)
            if tally.open >= tally.most:
                log.warning("WebSocket refused: %d open, the most this process holds (API_CONNECTIONS)", tally.open)
                try:
                    return self._full(start_response)
                finally:
                    self._release()
            try:
                answer, connection = handshake(environ)
            except (ProtocolError, UnicodeError) as exc:  # nothing written yet
                try:
                    return self._refuse(exc, start_response)
                finally:
                    self._release()
            session, linked = self.session, False
            upgrade = session.connected  # from polling: the session lives on if the upgrade fails
            try:
                sock.sendall(answer)
                if upgrade and not probed(session, sock, connection, max_message_size):
                    raise StopIteration  # as engine.io's handler returning []: gunicorn closes the connection
                session.connected = session.upgraded = True  # as engine.io's handler, once upgraded
                link = Link(_socket.socket(fileno=sock.detach()), connection, session, self.eio, max_message_size,
                            refused, tally)  # gunicorn's socket object is closed, the connection is the link's
                linked = True
                link.start()
            finally:
                if not linked and not upgrade:  # the client went during the handshake: its new session goes too
                    session.close(wait=False, abort=True, reason=self.eio.reason.TRANSPORT_CLOSE)
                    self._release()
            raise StopIteration  # gunicorn's handler ends here, as simple-websocket ends it under gunicorn

        def _full(self, start_response: Any) -> tuple[bytes]:
            data = (json.dumps(error_body(ApiError("too many open connections on this API process; retry")),
                               separators=(",", ":")) + "\n").encode()
            start_response("503 Service Unavailable", [("Content-Type", "application/json"), ("Retry-After", "1"),
                                                       ("Content-Length", str(len(data)))])
            if not self.session.connected:  # the session this very request opened
                self.session.close(wait=False, abort=True)
            return (data,)

    return GreenWebSocket


def handshake(environ: dict[str, Any]) -> tuple[bytes, Connection]:
    """wsproto's answer to the upgrade request in `environ` (101, no extension, no subprotocol) and the WebSocket
    connection that follows it; the request rebuilt from the environ as simple-websocket rebuilds it."""
    head = ["GET / HTTP/1.1"]
    head += [f"{'-'.join(part.capitalize() for part in key[5:].split('_'))}: {value}"
             for key, value in environ.items() if key.startswith("HTTP_")]
    ws = WSConnection(ConnectionType.SERVER)
    ws.receive_data(("\r\n".join(head) + "\r\n\r\n").encode())
    for event in ws.events():
        if isinstance(event, Request):
            answer = ws.send(AcceptConnection(extensions=[]))  # permessage-deflate declined (api/websocket.py)
            assert ws.connection is not None
            return answer, ws.connection
    raise ProtocolError("not a WebSocket upgrade request")


def probed(session: Any, sock: Any, connection: Connection, max_message_size: int) -> bool:
    """An upgrade from polling, as engine.io's handler does it: "2probe" answered "3probe", the poll ended with a
    NOOP, then the client's UPGRADE (False, and `upgrading` off again, if it does not follow)."""
    session.upgrading = True
    sock.settimeout(session.server.ping_interval + session.server.ping_timeout)
    try:
        if _next_message(sock, connection, max_message_size) != "2probe":
            return _not_upgraded(session)
        sock.sendall(connection.send(TextMessage(packet.Packet(packet.PONG, data="probe").encode())))
        session.queue.put(packet.Packet(packet.NOOP))  # ends the poll in flight
        data = _next_message(sock, connection, max_message_size)
        if data is None or packet.Packet(encoded_packet=data).packet_type != packet.UPGRADE:
            return _not_upgraded(session)
    except (OSError, *UNREADABLE):
        return _not_upgraded(session)
    finally:
        sock.settimeout(None)
    session.upgrading = False
    return True


def _not_upgraded(session: Any) -> bool:
    session.upgrading = False
    return False


def _next_message(sock: Any, connection: Connection, max_message_size: int) -> Any:
    """The next whole message on a socket still served by its greenlet; None once it closes."""
    parts: list[Any] = []
    while True:
        for event in connection.events():
            if isinstance(event, (TextMessage, BytesMessage)):
                parts.append(event.data)
                if sum(len(part) for part in parts) > max_message_size:
                    return None
                if event.message_finished:
                    return "".join(parts) if isinstance(event, TextMessage) else b"".join(parts)
            elif isinstance(event, Ping):
                sock.sendall(connection.send(event.response()))
            elif isinstance(event, CloseConnection):
                return None
        data = sock.recv(RECEIVE_BYTES)
        if not data:
            return None
        connection.receive_data(data)
