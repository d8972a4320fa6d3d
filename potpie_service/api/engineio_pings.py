"""One task sends every Engine.IO session's pings, instead of a task per session.

python-engineio (4.15) schedules a session's next PING by starting a background task that sleeps `ping_interval`
and then sends it (`Socket.schedule_ping` -> `start_background_task(Socket._send_ping)`, again after each PONG): a
gevent Greenlet per connected client asleep for 20 s, with its saved C stack and gevent's bookkeeping (~4 KiB of the
~70 KiB a socket cost, bench/NOTES.md), or an OS thread per client in threading mode. Every session waits the same
interval, so sessions come due in the order they were scheduled: one FIFO of (due, sid) and one task that does, when
each is due, what `_send_ping` does after its sleep. A session closed meanwhile is skipped; the queue holds its sid,
not the session. tests/test_engineio_pings.py checks that this does what `_send_ping` does in the pinned version."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any

from engineio import packet
from engineio.socket import Socket as EngineSocket

log = logging.getLogger(__name__)
BATCH = 200  # pings sent before the task lets the other greenlets run


def send_ping(session: Any) -> None:
    """What `Socket._send_ping` does once its sleep is over."""
    if session is not None and not session.closing and not session.closed:
        session.last_ping = time.time()
        session.send(packet.Packet(packet.PING))


class PingWheel:
    """Takes over `eio.start_background_task` for `Socket._send_ping` (`PingWheel(eio)` installs it)."""

    def __init__(self, eio: Any) -> None:
        self.eio = eio
        self.due: deque[tuple[float, str]] = deque()
        self.task: Any = None
        self.starting = threading.Lock()
        self.start_task = eio.start_background_task
        eio.start_background_task = self.start

    def start(self, target: Any, *args: Any, **kwargs: Any) -> Any:
        """engine.io's start_background_task; a session's ping is queued instead (None: there is no task)."""
        if getattr(target, "__func__", None) is not EngineSocket._send_ping:
            return self.start_task(target, *args, **kwargs)
        self.due.append((time.monotonic() + self.eio.ping_interval, target.__self__.sid))
        if self.task is None:  # started with the first session, in the serving process (not before a fork)
            with self.starting:  # threading mode: two first sessions at once start one task
                if self.task is None:
                    self.task = self.start_task(self._run)
        return None

    def _run(self) -> None:
        while True:
            now = time.monotonic()
            sent = 0
            while self.due and self.due[0][0] <= now:
                _, sid = self.due.popleft()
                try:
                    send_ping(self.eio.sockets.get(sid))
                except Exception:  # a background task's edge: log it with the traceback and keep pinging the rest
                    log.exception("sending an Engine.IO ping failed")
                sent += 1
                if sent % BATCH == 0:
                    self.eio.sleep(0)
                    now = time.monotonic()
            self.eio.sleep(min(1.0, self.due[0][0] - now) if self.due else 1.0)
