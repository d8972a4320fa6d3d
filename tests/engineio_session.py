"""What the engine.io guard tests share: a session queue that keeps what engine.io puts in it, and a server."""

from __future__ import annotations

from typing import Any

import engineio


class Written(list):
    """A session's queue that keeps what engine.io puts in it."""

    def put(self, item: Any) -> None:
        self.append(item)

    def join(self) -> None:
        pass


def engineio_server() -> engineio.Server:
    """An engine.io server as the API configures it (the pings' timings), without threads of its own per event."""
    return engineio.Server(async_mode="threading", ping_interval=20, ping_timeout=20, async_handlers=False)


def encoded(items: list[Any]) -> list[Any]:
    """Packets as they go on the wire (None: the close)."""
    return [item if item is None else item.encode() for item in items]
