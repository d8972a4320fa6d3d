"""One upgraded WebSocket under gevent, once it has left gunicorn (api/engineio_transport.py): engine.io's session
queue, read by a libev watcher, written from the caller; no greenlet while nothing is being handled.

- reads: the hub reads what arrived, wsproto turns it into messages (a message over SOCKETIO_MAX_MESSAGE_BYTES is
  refused with 1009 as it arrives, as simple-websocket refuses it), and a greenlet spawned while messages wait hands
  them to engine.io's `Socket.receive` one at a time, in order, then ends; while BACKLOG messages wait the watcher
  stops and the client's TCP window fills (what api/websocket.py's TakingTurns does for simple-websocket's reader);
- writes: the Link is the session's `queue`; `put` frames a packet and writes what the socket takes at once, the rest
  waits for a write watcher (engine.io's writer task read the queue instead);
- the end, as engine.io's handler ends it: a packet it cannot decode or an error closes the session (no CLOSE packet);
  engine.io's close (`put(None)`) sends the close frame and cuts the connection if the client has not answered
  within CLOSE_WAIT; the closed session leaves `eio.sockets` at once.

tests/test_engineio_link.py drives it over a real socket pair."""

from __future__ import annotations

import logging
import socket
import struct
from typing import Any, Callable

import gevent
from engineio import exceptions, packet
from wsproto.connection import Connection, ConnectionState
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import LocalProtocolError

from .websocket import BACKLOG, CLOSE_WAIT

log = logging.getLogger(__name__)
RECEIVE_BYTES = 4096  # what one read takes, as simple-websocket's reader
UNREADABLE = (ValueError, TypeError, IndexError, KeyError)  # what engine.io's packet decoder raises on garbage


class Tally:
    """The links open in this process, and how many may be (API_CONNECTIONS: gunicorn's pool no longer counts them)."""

    __slots__ = ("open", "most")

    def __init__(self, most: int) -> None:
        self.open, self.most = 0, most


class Link:
    """One upgraded connection: the session's queue (`put`), read by a watcher, written from the caller."""

    __slots__ = ("sock", "ws", "session", "eio", "max_message_size", "refused", "tally", "loop", "reader", "writer",
                 "timer", "out", "inbox", "worker", "parts", "size", "paused", "ending", "done")

    def __init__(self, sock: Any, ws: Connection, session: Any, eio: Any, max_message_size: int,
                 refused: Callable[[str], None], tally: Tally) -> None:
        self.sock, self.ws, self.session, self.eio = sock, ws, session, eio
        self.max_message_size, self.refused, self.tally = max_message_size, refused, tally
        self.loop = gevent.get_hub().loop
        self.reader: Any = self.loop.io(sock.fileno(), 1)
        self.writer: Any = None  # a write watcher, while the socket has not taken all that was written
        self.timer: Any = None  # CLOSE_WAIT after our close frame
        self.out: bytearray | None = None  # written, not yet taken by the socket
        self.inbox: list[Any] = []  # messages not yet handled; None: the connection is over
        self.worker: Any = None  # the greenlet handing the inbox to engine.io, while there is one
        self.parts: list[Any] = []  # the message arriving
        self.size = 0
        self.paused = self.ending = self.done = False

    def start(self) -> None:
        """Take the session's queue over (what it holds is written first) and start reading."""
        self.sock.setblocking(False)
        self.tally.open += 1
        queue, self.session.queue = self.session.queue, self
        while not queue.empty():
            self.put(queue.get_nowait())
        self.reader.start(self._in_hub, self._read, "reading")
        self._take_events()  # what wsproto holds already (sent right behind an upgrade's UPGRADE packet)

    # --- the session's queue (engine.io calls these) ---

    def put(self, pkt: Any) -> None:
        """Write a packet now; None: engine.io is done with this socket (the close frame, then CLOSE_WAIT)."""
        if pkt is None:
            self._end(CloseReason.NORMAL_CLOSURE)
            return
        if self.done or self.ws.state is not ConnectionState.OPEN:
            return
        data = pkt.encode()
        self._write(self.ws.send(TextMessage(data) if isinstance(data, str) else BytesMessage(data)))

    def join(self) -> None:
        """engine.io's close(wait=True) waits for the queue to be written: a put is written when it returns."""

    def task_done(self) -> None:
        """A poll that was in flight when the session was upgraded (it got the probe's NOOP) finishing."""

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        raise self.eio.get_queue_empty_exception()()  # no poll is served once upgraded: nothing for one here

    def empty(self) -> bool:
        return True

    # --- reading (in the hub) ---

    def _in_hub(self, step: Callable[[], None], doing: str) -> None:
        """A watcher's callback: `step` at the hub's edge, where an error is logged with its traceback and the
        connection goes."""
        try:
            step()
        except Exception:
            log.exception("%s a WebSocket failed", doing)
            self._finish()

    def _read(self) -> None:
        try:
            data = self.sock.recv(RECEIVE_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._finish()
            return
        try:
            self.ws.receive_data(data)
        except LocalProtocolError:  # already closed
            self._finish()
            return
        self._take_events()

    def _take_events(self) -> None:
        for event in self.ws.events():
            if isinstance(event, (TextMessage, BytesMessage)):
                if not self._arrived(event):
                    return
            elif isinstance(event, Ping):
                self._send(event.response())
            elif isinstance(event, CloseConnection):
                self._send(event.response())  # the answer to the client's close (nothing once ours has gone)
                self._finish()
                return
        if self.inbox and self.worker is None:
            self.worker = gevent.spawn_raw(self._work)
        if len(self.inbox) >= BACKLOG and not self.paused:
            self.paused = True
            self.reader.stop()

    def _arrived(self, event: Any) -> bool:
        """A piece of a message; False when the message is over the limit (closed 1009, as simple-websocket)."""
        self.size += len(event.data)
        if self.size > self.max_message_size:
            self.refused("message_too_big")
            log.warning("socket closed: a message over %d bytes (SOCKETIO_MAX_MESSAGE_BYTES)", self.max_message_size)
            self._send(CloseConnection(CloseReason.MESSAGE_TOO_BIG, "Message is too big"))
            self._finish()
            return False
        self.parts.append(event.data)
        if event.message_finished:
            parts, self.parts, self.size = self.parts, [], 0
            if not self.ending:  # engine.io is done with the socket: nothing more is served
                self.inbox.append(parts[0] if len(parts) == 1 else
                                  "".join(parts) if isinstance(event, TextMessage) else b"".join(parts))
        return True

    # --- handing messages to engine.io (a greenlet, while there are any) ---

    def _work(self) -> None:
        try:
            while self.inbox:
                data = self.inbox.pop(0)
                if data is None:
                    self._close_session()
                    break
                if not self.ending:
                    self._deliver(data)
                if self.paused and len(self.inbox) < BACKLOG and not self.done:
                    self.paused = False
                    self.reader.start(self._in_hub, self._read, "reading")
        except Exception:  # a greenlet's edge: log it with the traceback; the socket goes
            log.exception("handling a WebSocket message failed")
            self._close_session()
        finally:
            self.worker = None

    def _deliver(self, data: Any) -> None:
        """One message to engine.io, as its handler's loop passes it (and ends on what it cannot take)."""
        try:
            pkt = packet.Packet(encoded_packet=data)
        except UNREADABLE:  # engine.io would raise this out of its handler
            self.refused("malformed_packet")
            log.warning("socket closed: it sent a frame that is not an Engine.IO packet")
            self._close_session()
            return
        try:
            self.session.receive(pkt)
        except exceptions.UnknownPacketError:
            pass
        except exceptions.SocketIsClosedError:
            self._close_session()

    def _close_session(self) -> None:
        """What engine.io's handler does when its loop ends: the close frame, the session closed (no CLOSE packet),
        and here the closed session released."""
        self._end(CloseReason.NORMAL_CLOSURE)
        session = self.session
        if not session.closed:
            session.close(wait=False, abort=True, reason=self.eio.reason.TRANSPORT_CLOSE)
        if session.closed and self.eio.sockets.get(session.sid) is session:
            del self.eio.sockets[session.sid]

    # --- writing ---

    def _write(self, data: bytes) -> None:
        if self.done:
            return
        if self.out:
            self.out += data
            return
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._finish()
            return
        if sent < len(data):
            self.out = bytearray(data[sent:])
            if self.writer is None:
                self.writer = self.loop.io(self.sock.fileno(), 2)
            self.writer.start(self._in_hub, self._flush, "writing")

    def _flush(self) -> None:
        try:
            sent = self.sock.send(self.out) if self.out else 0
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._finish()
            return
        assert self.out is not None
        del self.out[:sent]
        if not self.out:
            self.out = None
            self.writer.stop()
            if self.ending and self.ws.state is ConnectionState.CLOSED:
                self._finish()

    def _send(self, event: Any) -> None:
        """A control frame, when the connection's state allows it."""
        try:
            data = self.ws.send(event)
        except LocalProtocolError:
            return
        self._write(data)

    # --- ending ---

    def _end(self, code: int) -> None:
        """Our close frame; the connection is cut if the client has not answered it within CLOSE_WAIT."""
        if self.ending or self.done:
            return
        self.ending = True
        self._send(CloseConnection(code))
        self.timer = self.loop.timer(CLOSE_WAIT)
        self.timer.start(self._cut)

    def _cut(self) -> None:
        """The client did not answer our close: reset the connection (a client still sending learns it at once)."""
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self._finish()

    def _finish(self) -> None:
        """The connection is over: watchers stopped, the socket closed, the session closed after what is queued."""
        if self.done:
            return
        self.done = self.ending = True
        self.tally.open -= 1
        for watcher in (self.reader, self.writer, self.timer):
            if watcher is not None:
                watcher.stop()
                watcher.close()
        self.sock.close()
        self.out = None
        self.inbox.append(None)
        if self.worker is None:
            self.worker = gevent.spawn_raw(self._work)
