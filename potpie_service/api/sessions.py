"""Which Socket.IO sessions this process keeps: an Engine.IO session must authenticate within
SOCKETIO_CONNECT_TIMEOUT, stays only while authenticated, sends well-formed Socket.IO packets and keeps within its
event budget; any other is closed at once.

python-socketio (5.18) answers a refused connect with a CONNECT_ERROR packet and keeps the Engine.IO session, its
request environ included, for as long as the client answers pings; it has no connect timeout (Node's server closes
a connection that has not connected a namespace after 45 s); it logs a traceback for a packet it cannot decode; and
nothing limits how many events one socket may send. This guard sits between engine.io and python-socketio, as the
Engine.IO `connect`, `message` and `disconnect` handlers python-socketio registers, and calls them. Events are
handled one at a time per socket (`async_handlers=False` in api/__init__.py), so a socket's flood waits on itself
instead of filling the process with handlers; beyond SOCKETIO_EVENT_BURST events above SOCKETIO_EVENT_RATE a second
the socket is closed. tests/test_websocket.py checks the handlers this relies on in the pinned versions."""

from __future__ import annotations

import io
import logging
import sys
import time
from typing import Any, Callable

from socketio import packet as sio_packet

from ..config import Settings

log = logging.getLogger(__name__)
NAMESPACE = "/"


# What a session's environ keeps besides strings: shared, immutable, or the app Flask-SocketIO's handlers look up
SHARED = frozenset(("wsgi.version", "wsgi.multithread", "wsgi.multiprocess", "wsgi.run_once", "wsgi.file_wrapper",
                    "wsgi.input_terminated", "flask.app"))
NO_BODY = io.BytesIO(b"")  # a session's request body: it has none to read (Flask builds each event's request on it)


def lean(environ: dict[str, Any]) -> dict[str, Any]:
    """The environ python-socketio keeps for a session's life (Flask-SocketIO builds each event's request from it):
    the strings and the shared entries, without the server's per-request objects (gunicorn's body reader and parser,
    socket, error stream and early-hints callback holding its request and response; engine.io's `Input`, a class
    made per request). Once a WebSocket has left gunicorn (api/engineio_transport.py) nothing else holds them:
    5.3 KiB a socket (bench/NOTES.md)."""
    kept = {key: value for key, value in environ.items() if isinstance(value, str) or key in SHARED}
    kept["wsgi.input"], kept["wsgi.errors"] = NO_BODY, sys.stderr
    return kept


def well_formed(packet_class: Any, data: Any) -> int | None:
    """The Socket.IO packet type of a message this service takes, or None: text only (no binary events here),
    a connect with an object or nothing, an event as [name, ...], an ack as a list, or a disconnect."""
    if not isinstance(data, str):
        return None
    try:
        packet = packet_class(encoded_packet=data)
    except (ValueError, TypeError, IndexError, RecursionError):
        return None
    kind, payload = packet.packet_type, packet.data
    if kind == sio_packet.CONNECT and (payload is None or isinstance(payload, dict)):
        return kind
    if kind == sio_packet.EVENT and isinstance(payload, list) and payload and isinstance(payload[0], str):
        return kind
    if (kind == sio_packet.ACK and isinstance(payload, list)) or kind == sio_packet.DISCONNECT:
        return kind
    return None


class SessionGuard:
    """Wraps the Engine.IO handlers of a python-socketio server (`SessionGuard(server, ...)` installs it)."""

    def __init__(self, server: Any, settings: Settings, refused: Callable[[str], None]) -> None:
        self.server, self.eio, self.refused = server, server.eio, refused
        self.timeout = settings.socketio_connect_timeout
        self.rate, self.burst = settings.socketio_event_rate, float(settings.socketio_event_burst)
        self.pending: dict[str, float] = {}  # session -> when it must have connected (in that order)
        self.budgets: dict[str, list[float]] = {}  # session -> [events it may still send, when that was counted]
        self.sweeper: Any = None
        self.eio._log_error_once = self._client_mistake
        handlers = self.eio.handlers
        self.on_connect, self.on_message, self.on_disconnect = (
            handlers["connect"], handlers["message"], handlers["disconnect"])
        self.eio.on("connect", self.connect)
        self.eio.on("message", self.message)
        self.eio.on("disconnect", self.disconnect)

    def connect(self, sid: str, environ: dict[str, Any]) -> Any:
        now = time.monotonic()
        self.pending[sid] = now + self.timeout
        self.budgets[sid] = [self.burst, now]
        if self.sweeper is None:  # started with the first session, in the serving process (not before a fork)
            self.sweeper = self.eio.start_background_task(self._sweep)
        return self.on_connect(sid, lean(environ))

    def message(self, sid: str, data: Any) -> None:
        session = self.eio.sockets.get(sid)
        if session is None or session.closed:
            return  # closed here already: what is still in flight is not served
        if not self._spend(sid):
            log.warning("socket of %s closed: over its event budget (SOCKETIO_EVENT_RATE=%g, "
                        "SOCKETIO_EVENT_BURST=%d)", self._address(sid), self.rate, self.burst)
            self.close(sid, "event_budget")
            return
        kind = well_formed(self.server.packet_class, data)
        if kind is None:
            log.warning("socket of %s closed: it sent a malformed Socket.IO packet", self._address(sid))
            self.close(sid, "malformed_packet")
            return
        self.on_message(sid, data)
        environ = self.server.environ.get(sid)
        if environ is not None:  # the last event's Flask request (werkzeug keeps it there), kept for nothing
            environ.pop("werkzeug.request", None)
        if self.connected(sid):
            self.pending.pop(sid, None)
        elif kind == sio_packet.DISCONNECT:
            self.close(sid, None)  # it left its namespace: nothing more to serve
        else:  # refused at connect (sockets.py logs why), or an event before connecting
            self.close(sid, "unauthenticated")

    def disconnect(self, sid: str, reason: Any = None) -> Any:
        self.pending.pop(sid, None)
        self.budgets.pop(sid, None)
        return self.on_disconnect(sid, reason)

    def connected(self, sid: str) -> bool:
        """Whether the session has passed the connect handler (authenticated)."""
        manager = self.server.manager
        socket_id = manager.sid_from_eio_sid(sid, NAMESPACE)
        return socket_id is not None and manager.is_connected(socket_id, NAMESPACE)

    def close(self, sid: str, reason: str | None) -> None:
        """Close the session now and forget it: what it was sent so far (a CONNECT_ERROR, say) goes out first,
        then Engine.IO's close; its environ goes at once (python-socketio's disconnect handler)."""
        self.pending.pop(sid, None)
        session = self.eio.sockets.get(sid)
        if session is None or session.closed:
            return
        if reason is not None:
            self.refused(reason)
        session.close(wait=False, abort=False, reason=self.eio.reason.SERVER_DISCONNECT)
        if self.eio.sockets.get(sid) is session:  # a poll waiting on it, or its WebSocket, still hold it and send
            del self.eio.sockets[sid]  # what was queued (engine.io would refuse any new request of a closed one)

    def _spend(self, sid: str) -> bool:
        """Take one event from the session's budget (a token bucket); False when it is spent."""
        budget = self.budgets.get(sid)
        if budget is None:
            return True
        now = time.monotonic()
        budget[0] = min(self.burst, budget[0] + (now - budget[1]) * self.rate)
        budget[1] = now
        if budget[0] < 1:
            return False
        budget[0] -= 1
        return True

    def _address(self, sid: str) -> str:
        environ = self.server.environ.get(sid) or {}
        return str(environ.get("REMOTE_ADDR", "an unknown address"))

    def _client_mistake(self, message: str, key: str) -> None:
        """engine.io's `_log_error_once` one level down: what it reports so (an unknown or closed session, a bad
        transport, origin or version) is a client's mistake, a warning the first time and info after."""
        level = logging.INFO if key in self.eio.log_message_keys else logging.WARNING
        self.eio.log_message_keys.add(key)
        self.eio.logger.log(level, message)

    def _sweep(self) -> None:
        """Close the sessions that did not authenticate in time, for the life of the process."""
        while True:
            self.eio.sleep(min(1.0, self.timeout / 2))
            now = time.monotonic()
            try:
                for sid, deadline in list(self.pending.items()):
                    if deadline > now:
                        break  # the rest came later
                    if self.connected(sid):
                        self.pending.pop(sid, None)
                    else:
                        log.info("socket of %s closed: not authenticated within %g s (SOCKETIO_CONNECT_TIMEOUT)",
                                 self._address(sid), self.timeout)
                        self.close(sid, "connect_timeout")
            except Exception:  # a background task's edge: log it with the traceback and keep sweeping
                log.exception("the Socket.IO connect-timeout sweep failed")
