"""The Socket.IO room registry with an index from each socket to its rooms.

python-socketio finds a socket's rooms by scanning every room of the namespace (`get_rooms`, and a copy of the
whole room table on each disconnect). Every socket has a room of its own, so with N sockets a disconnect costs
O(N) and N sockets leaving at once (a deploy, a proxy restart, a client-side network blip) cost O(N²): measured
with 10,000 Node clients leaving together, the API stopped answering HTTP for 37 s. Keeping `sid -> rooms` beside
the room table makes both O(rooms of that socket). Everything else, the Redis fan-out included, is RedisManager's.
"""

from __future__ import annotations

from typing import Any

import socketio as python_socketio


class IndexedRedisManager(python_socketio.RedisManager):
    """RedisManager with `member_of[(namespace, sid)]`: the rooms each socket is in, kept with every join and leave."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.member_of: dict[tuple[str, str], set[Any]] = {}

    def basic_enter_room(self, sid: str, namespace: str, room: Any, eio_sid: Any = None) -> None:
        super().basic_enter_room(sid, namespace, room, eio_sid=eio_sid)
        self.member_of.setdefault((namespace, sid), set()).add(room)

    def basic_leave_room(self, sid: str, namespace: str, room: Any) -> None:
        super().basic_leave_room(sid, namespace, room)
        rooms = self.member_of.get((namespace, sid))
        if rooms is not None:
            rooms.discard(room)
            if not rooms:
                del self.member_of[(namespace, sid)]

    def get_rooms(self, sid: str, namespace: str) -> list[Any]:
        return [room for room in self.member_of.get((namespace, sid), ()) if room is not None]

    def basic_disconnect(self, sid: str, namespace: str, **kwargs: Any) -> None:
        """What the base class does, without its scan: leave the socket's rooms, drop its callbacks and its
        pending connect/disconnect marks."""
        for room in list(self.member_of.get((namespace, sid), ())):
            self.basic_leave_room(sid, namespace, room)
        self.callbacks.pop(sid, None)
        for pending in (self.pending_connect, self.pending_disconnect):
            sids = pending.get(namespace)
            if sids is not None and sid in sids:
                sids.remove(sid)
                if not sids:
                    del pending[namespace]
