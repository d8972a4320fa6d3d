"""Guards on python-socketio's internals that api/rooms.py overrides (its RedisManager's connect and listener loop,
the base manager's room bookkeeping) and on the redis-py hook it uses (PubSub.on_connect). Each fails with a message
naming what an upgrade moved; the behaviour itself is tests/test_realtime.py's (and the replay after a lost
subscription, tests/test_realtime.py::test_a_follower_hears_what_was_published_while_the_relay_was_subscribing_again).
The Redis message the store publishes for python-socketio is compared with its own in tests/test_store_events.py."""

from __future__ import annotations

import inspect

import redis
import socketio
import socketio.base_manager as base_manager

from potpie_service.api.rooms import IndexedRedisManager


def test_the_redis_manager_still_connects_and_listens_where_the_relay_hooks_in() -> None:
    manager = socketio.RedisManager
    assert "self.pubsub =" in inspect.getsource(manager._redis_connect), \
        "RedisManager._redis_connect no longer sets self.pubsub (IndexedRedisManager replaces it after)"
    assert "_redis_listen_with_retries" in inspect.getsource(manager._listen), \
        "RedisManager._listen no longer runs _redis_listen_with_retries (IndexedRedisManager's own loop)"
    assert inspect.isgeneratorfunction(manager._redis_listen_with_retries)
    assert "connection" in inspect.signature(redis.client.PubSub.on_connect).parameters, \
        "redis-py's PubSub.on_connect(connection) changed (ReplayingPubSub hooks the re-subscription there)"


def test_the_base_managers_room_bookkeeping_is_what_the_index_mirrors() -> None:
    base = base_manager.BaseManager
    assert list(inspect.signature(base.basic_enter_room).parameters) == ["self", "sid", "namespace", "room",
                                                                         "eio_sid"]
    assert list(inspect.signature(base.basic_leave_room).parameters) == ["self", "sid", "namespace", "room"]
    assert list(inspect.signature(base.get_rooms).parameters) == ["self", "sid", "namespace"]
    disconnect = inspect.getsource(base.basic_disconnect)
    for state in ("callbacks", "pending_connect", "pending_disconnect"):
        assert state in disconnect, f"BaseManager.basic_disconnect no longer clears {state} (our copy does)"


def test_the_index_answers_as_the_scan_would(redis_server) -> None:
    ours = IndexedRedisManager(redis_server.url, write_only=True)
    theirs = socketio.RedisManager(redis_server.url, write_only=True)
    for manager in (ours, theirs):
        manager.basic_enter_room("s1", "/", "s1", eio_sid="e1")
        manager.basic_enter_room("s1", "/", "project_a", eio_sid="e1")
        manager.basic_enter_room("s2", "/", "project_a", eio_sid="e2")
        manager.basic_leave_room("s2", "/", "project_a")
    assert sorted(ours.get_rooms("s1", "/")) == sorted(theirs.get_rooms("s1", "/")) == ["project_a", "s1"]
    assert ours.get_rooms("s2", "/") == theirs.get_rooms("s2", "/") == []
    for manager in (ours, theirs):
        manager.basic_disconnect("s1", "/")
    assert ours.get_rooms("s1", "/") == theirs.get_rooms("s1", "/") == [] and ours.member_of == {}
