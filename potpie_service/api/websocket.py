"""The WebSocket under Socket.IO: no per-message compression.

simple-websocket (the WebSocket of Flask-SocketIO's gevent and threading modes) accepts every client's
permessage-deflate offer, and each accepted offer holds a zlib compressor and decompressor for the life of the
socket: ~140 KB of the ~170 KB a connection cost (tracemalloc under bench/p5_fanout.py). This service's frames are
JSON events of a few hundred bytes, which deflate barely shrinks, so the API declines the offer; Node's Socket.IO
server does the same by default (engine.io `perMessageDeflate: false`) for the same reason. simple-websocket builds
the extension from its module's own name for it, so that name is what is replaced, once per process."""

from __future__ import annotations

import simple_websocket.ws
from wsproto.extensions import PerMessageDeflate


class DeclinedDeflate(PerMessageDeflate):
    """permessage-deflate as a client offers it, declined: the handshake answers without the extension."""

    def accept(self, offer: str) -> bool:
        return False


def decline_compression() -> None:
    """Make every WebSocket this process accepts answer the permessage-deflate offer with no extension."""
    simple_websocket.ws.PerMessageDeflate = DeclinedDeflate
