"""Guards on what api/engineio_pings.py relies on inside python-engineio beyond its public API (how a session's ping
is scheduled and what `Socket._send_ping` does), each compared with what engine.io itself does at the pinned version,
then the wheel's own loop. An upgrade that moves any of it fails here."""

from __future__ import annotations

from typing import Any

import pytest
from engineio import packet
from engineio.socket import Socket as EngineSocket

from potpie_service.api.engineio_pings import PingWheel, send_ping
from tests.engineio_session import Written, encoded, engineio_server


def test_send_ping_does_what_engineios_send_ping_does_after_its_sleep() -> None:
    server = engineio_server()
    slept: list[float] = []
    server._async = {**server._async, "sleep": slept.append}
    theirs, ours = EngineSocket(server, "a"), EngineSocket(server, "b")
    theirs.queue, ours.queue = Written(), Written()
    theirs.last_ping = ours.last_ping = None
    theirs._send_ping()
    send_ping(ours)
    assert slept == [20], "Socket._send_ping no longer sleeps ping_interval first"
    assert encoded(theirs.queue) == encoded(ours.queue) == ["2"]
    assert theirs.last_ping and ours.last_ping, "Socket._send_ping no longer stamps last_ping"
    for state in ("closing", "closed"):
        theirs, ours = EngineSocket(server, "c"), EngineSocket(server, "d")
        theirs.queue, ours.queue = Written(), Written()
        setattr(theirs, state, True)
        setattr(ours, state, True)
        theirs._send_ping()
        send_ping(ours)
        assert theirs.queue == ours.queue == [], f"a {state} session is pinged now"


def test_engineio_schedules_each_ping_as_a_background_task_of_send_ping_which_the_wheel_takes() -> None:
    server = engineio_server()
    started: list[Any] = []
    server.start_background_task = lambda target, *a, **k: started.append(target)  # type: ignore[method-assign]
    wheel = PingWheel(server)
    session = EngineSocket(server, "a")
    session.queue = Written()
    server.sockets["a"] = session
    session.schedule_ping()  # as engine.io does on connect and after each PONG
    assert [target.__func__ for target in started] == [PingWheel._run], \
        "Socket.schedule_ping no longer starts Socket._send_ping through server.start_background_task"
    assert [sid for _, sid in wheel.due] == ["a"] and session.last_ping is None
    session.receive(packet.Packet(packet.PONG))  # no ping pending: nothing new is scheduled
    assert len(wheel.due) == 1
    other = server.start_background_task(print)
    assert other is None and started[-1] is print, "other tasks are engine.io's own"


def test_the_wheel_pings_each_session_when_due_and_skips_closed_ones() -> None:
    server = engineio_server()
    server.ping_interval = 0
    wheel = PingWheel(server)
    wheel.start_task = lambda target, *a, **k: None
    sessions = [EngineSocket(server, sid) for sid in "abc"]
    for session in sessions:
        session.queue = Written()
        server.sockets[session.sid] = session
        session.schedule_ping()
    sessions[1].closed = True
    del server.sockets["c"]

    class Stop(Exception):
        pass

    def sleep(seconds: float) -> None:
        raise Stop

    server._async = {**server._async, "sleep": sleep}
    with pytest.raises(Stop):
        wheel._run()
    assert [encoded(session.queue) for session in sessions] == [["2"], [], []]
    assert not wheel.due
