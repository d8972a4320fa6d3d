"""The WebSocket under Socket.IO (engine.io's simple-websocket transport): no per-message compression, a largest
message, handshake mistakes answered 4xx, and a closed socket released at once.

It serves SOCKETIO_ASYNC_MODE=threading (and a WebSocket under gevent that gunicorn does not serve); under gunicorn's
gevent worker api/engineio_transport.py serves the upgrade, with the same limits, its refusals and its CLOSE_WAIT
taken from here, and no thread or greenlet per socket.

simple-websocket (the WebSocket of Flask-SocketIO's threading mode here, and of its gevent mode as shipped) accepts
every client's permessage-deflate offer, and each accepted offer holds a zlib compressor and decompressor for the
life of the socket: ~140 KB of the ~170 KB a connection cost (tracemalloc under bench/p5_fanout.py). This service's
frames are JSON events of a few hundred bytes, which deflate barely shrinks, so the API declines the offer; Node's
Socket.IO server does the same by default (engine.io `perMessageDeflate: false`) for the same reason. simple-
websocket builds the extension from its module's own name for it, so that name is what is replaced, once per
process.

engine.io builds one `_async["websocket"]` object per upgrade. As shipped (python-engineio 4.15, simple-websocket
1.1), that object:
- buffers a message whole, however large (engine.io compares its size only once it has all of it): a client
  sending most of a 10 MB frame pinned 8 MB per socket. simple-websocket's own `max_message_size` refuses a message
  (close code 1009) as soon as more than SOCKETIO_MAX_MESSAGE_BYTES of it has arrived;
- lets wsproto's handshake errors (a version other than 13, no key, a non-ASCII protocol, no Host) escape, and
  gunicorn answers 500 with a traceback: here they are the 400 or 426 wsproto suggests;
- lets a frame engine.io cannot decode (an empty or non-numeric packet) escape its reader loop the same way: here
  the socket is closed, as Node's server closes one that sends what it cannot parse;
- when engine.io closes the socket (ping timeout, a disconnect), sends the close frame but leaves simple-websocket's
  reader waiting for the client, forever if the client never sends again (a stalled half frame): here the
  connection is cut when the client does not answer the close within a second;
- under gunicorn, raises StopIteration to hand the socket back, which skips engine.io's removal of the closed
  session: it stayed in `eio.sockets` until the monitor task swept it (~5,000 after as many connect/disconnect
  cycles). Here the closed session is removed when its WebSocket ends.

tests/test_websocket.py checks what this relies on in the pinned versions."""

from __future__ import annotations

import json
import logging
import re
import socket
import struct
from typing import Any, Callable

import simple_websocket
import simple_websocket.ws
from engineio.packet import Packet
from wsproto.events import RejectConnection
from wsproto.extensions import PerMessageDeflate
from wsproto.utilities import ProtocolError

from .errors import ApiError, error_body

log = logging.getLogger(__name__)
CLOSE_WAIT = 1.0  # seconds a client has to answer our close frame before its connection is cut
BACKLOG = 16  # messages a socket may have received and not yet had handled before its reader waits


class DeclinedDeflate(PerMessageDeflate):
    """permessage-deflate as a client offers it, declined: the handshake answers without the extension."""

    def accept(self, offer: str) -> bool:
        return False


def decline_compression() -> None:
    """Make every WebSocket this process accepts answer the permessage-deflate offer with no extension."""
    simple_websocket.ws.PerMessageDeflate = DeclinedDeflate


def bound_websockets(eio: Any, max_message_size: int, refused: Callable[[str], None]) -> None:
    """Make the engine.io server `eio` serve its WebSockets through `bounded(...)` of its driver's class."""
    eio._async = {**eio._async, "websocket": bounded(eio._async["websocket"], max_message_size, refused)}


def bounded(base: type, max_message_size: int, refused: Callable[[str], None]) -> type:
    """engine.io's WebSocket class `base`, with the limits and releases the module docstring lists."""

    class BoundedWebSocket(base):
        def __init__(self, handler: Any, server: Any) -> None:
            super().__init__(handler, server)
            self.server_args["max_message_size"] = max_message_size
            self.eio, self.session = server, getattr(handler, "__self__", None)  # the engine.io Socket upgrading
            self.ending = False  # engine.io is done with it: its reader must not wait for a backlog to drain

        def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
            if environ.get("gunicorn.socket") is not None:
                environ["gunicorn.socket"] = TakingTurns(environ["gunicorn.socket"], self.eio.sleep, self._backlog)
            try:
                return super().__call__(environ, start_response)
            except (ProtocolError, UnicodeError, simple_websocket.ConnectionError) as exc:  # nothing written yet
                return self._refuse(exc, start_response)
            finally:
                self.ending = True
                self._release()

        def wait(self) -> Any:
            data = self._receive()
            if data is None:
                if getattr(getattr(self, "ws", None), "incoming_message_len", 0) > max_message_size:
                    refused("message_too_big")
                    log.warning("socket closed: a message over %d bytes (SOCKETIO_MAX_MESSAGE_BYTES)",
                                max_message_size)
                return None
            try:
                Packet(encoded_packet=data)
            except ValueError:  # engine.io would raise this out of its reader loop
                refused("malformed_packet")
                log.warning("socket closed: it sent a frame that is not an Engine.IO packet")
                return None
            return data

        def _receive(self) -> Any:
            """The next message, None once the socket is closed (SimpleWebSocketWSGI.wait). Under threads it looks
            again every second: simple-websocket's reader sets its event before it marks itself closed, and a
            waiter woken in between waits on (4 of 10 sockets closed for a message too big kept their sessions
            and threads until engine.io's ping timeout)."""
            again = 1.0 if self.eio.async_mode == "threading" else None  # greenlets do not run in between
            try:
                while True:
                    data = self.ws.receive(timeout=again)
                    if data is not None or again is None or not self.ws.connected:
                        return data
            except simple_websocket.ConnectionClosed:
                return None

        def close(self) -> None:
            self.ending = True
            try:
                super().close()  # the close frame, if the socket is still open
            except OSError:  # the client is gone: nothing to say goodbye to
                pass
            ws = getattr(self, "ws", None)
            if ws is None:
                return
            ws.thread.join(timeout=CLOSE_WAIT)  # the reader ends when the client answers the close frame
            if not _ended(ws.thread):
                try:  # cut: the reader's recv returns and it ends; the close that follows is a reset, so a
                    # client still sending learns it at once (not after the kernel's FIN timeout)
                    ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    ws.sock.shutdown(socket.SHUT_RDWR)
                except OSError:  # closed meanwhile
                    pass

        def _backlog(self) -> int:
            """Messages received and not yet handled (0 once the socket is closed: nothing more to wait for)."""
            ws = getattr(self, "ws", None)
            return len(ws.input_buffer) if ws is not None and ws.connected and not self.ending else 0

        def _refuse(self, exc: Exception, start_response: Any) -> tuple[bytes]:
            """A handshake wsproto refused: its suggested status (400, or 426 naming the version we speak)."""
            hint = getattr(exc, "event_hint", None)
            status, headers = 400, []
            if isinstance(hint, RejectConnection):
                status = hint.status_code
                headers = [(name.decode(), value.decode()) for name, value in hint.headers]
            message = str(exc) if isinstance(exc, ProtocolError) else "the WebSocket handshake headers must be ASCII"
            named = re.search(r"'([A-Za-z-]+)", message)
            error = ApiError(f"WebSocket upgrade refused: {message}", field=named[1] if named else "Upgrade")
            data = (json.dumps(error_body(error), separators=(",", ":")) + "\n").encode()
            start_response(f"{status} {'Upgrade Required' if status == 426 else 'Bad Request'}",
                           [("Content-Type", "application/json"), ("Content-Length", str(len(data))), *headers])
            refused("bad_upgrade")
            if self.session is not None and not self.session.connected:  # a session opened by this very request
                self.session.close(wait=False, abort=True)
            return (data,)  # a tuple: engine.io passes it on as the body (a list would be taken for packets)

        def _release(self) -> None:
            session = self.session
            if session is not None and session.closed and self.eio.sockets.get(session.sid) is session:
                del self.eio.sockets[session.sid]

    return BoundedWebSocket


class TakingTurns:
    """The connection as simple-websocket's reader sees it: each read lets the other greenlets run first, and waits
    while BACKLOG messages are still to be handled. A gevent socket's recv returns at once while data is waiting,
    so a client sending without pause kept its reader (and only it) running: three other clients saw /livez take
    5 s, one 10 s, while one socket flooded join_project; and the reader buffered whatever the client sent, however
    far ahead of the handler. Now the client's own TCP window fills instead."""

    def __init__(self, sock: Any, sleep: Callable[[float], Any], backlog: Callable[[], int]) -> None:
        self.sock, self.sleep, self.backlog = sock, sleep, backlog

    def recv(self, size: int) -> bytes:
        self.sleep(0)
        while self.backlog() >= BACKLOG:
            self.sleep(0.01)
        data: bytes = self.sock.recv(size)
        return data

    def __getattr__(self, name: str) -> Any:  # send, close, shutdown, fileno ...: the socket's own
        return getattr(self.sock, name)


def _ended(thread: Any) -> bool:
    """Whether simple-websocket's reader has ended: a greenlet under gevent, a thread otherwise."""
    return bool(thread.dead) if hasattr(thread, "dead") else not thread.is_alive()
