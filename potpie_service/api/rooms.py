"""The Socket.IO room registry with an index from each socket to its rooms.

python-socketio finds a socket's rooms by scanning every room of the namespace (`get_rooms`, and a copy of the
whole room table on each disconnect). Every socket has a room of its own, so with N sockets a disconnect costs
O(N) and N sockets leaving at once (a deploy, a proxy restart, a client-side network blip) cost O(N²): measured
with 10,000 Node clients leaving together, the API stopped answering HTTP for 37 s. Keeping `sid -> rooms` beside
the room table makes both O(rooms of that socket). Everything else, the Redis fan-out included, is RedisManager's.

Pub/sub keeps nothing for a subscriber that is away: while the relay is subscribing again after losing Redis (a
failover, a restart, a dropped connection), the events the store publishes reach no socket here, and a follower
that stayed connected would never hear its job finish. So after each re-subscription the manager calls
`resubscribed`, which replays the current state to the rooms this process holds (sockets.py); a state published
in between arrives twice, with the same seq, never zero times. A subscription comes back two ways: redis-py
reconnects a dropped one at once by itself (`PubSub.on_connect`), and when that fails (no master yet) the
listener loop below subscribes again after a pause.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Iterator

import redis
import socketio as python_socketio

log = logging.getLogger(__name__)


class ReplayingPubSub(redis.client.PubSub):
    """redis-py's subscription, which calls `reconnected` after it has reconnected and subscribed again by itself
    (redis-py keeps only a weak reference to `on_connect`, so it stays a method)."""

    def __init__(self, pool: redis.ConnectionPool, reconnected: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(pool, **kwargs)
        self.reconnected = reconnected

    def on_connect(self, connection: Any) -> None:
        super().on_connect(connection)
        self.reconnected()


class IndexedRedisManager(python_socketio.RedisManager):
    """RedisManager with `member_of[(namespace, sid)]`: the rooms each socket is in, kept with every join and leave."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.member_of: dict[tuple[str, str], set[Any]] = {}
        self.resubscribed: Callable[[], None] = lambda: None

    def _redis_connect(self) -> None:
        super()._redis_connect()
        self.pubsub = ReplayingPubSub(self.redis.connection_pool, self._replay, ignore_subscribe_messages=True)

    def _replay(self) -> None:
        log.info("Socket.IO relay subscribed again: replaying the state of this process's rooms")
        self.server.start_background_task(self.resubscribed)

    def _redis_listen_with_retries(self) -> Iterator[Any]:
        """RedisManager's listener loop (subscribe and listen; on an error wait 1, 2, 4 ... 60 s and subscribe
        again), calling `resubscribed` each time it has subscribed again after losing Redis."""
        retry_sleep, lost = 1, False
        while True:
            try:
                self._redis_connect()
                self.pubsub.subscribe(self.channel)
                retry_sleep = 1
                if lost:
                    self._replay()
                    lost = False
                yield from self.pubsub.listen()
            except Exception as exc:
                log.warning("Socket.IO relay lost Redis (%s); subscribing again in %s s", type(exc).__name__,
                            retry_sleep)
                lost = True
                time.sleep(retry_sleep)
                retry_sleep = min(retry_sleep * 2, 60)

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
