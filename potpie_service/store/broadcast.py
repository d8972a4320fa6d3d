"""Events as the store publishes them: python-socketio's Redis message (its 5.x `emit`) for a job's room, built
here and published by the script that commits the change it announces, with the seq that script takes."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from ..core.events import Event, room

# python-socketio servers relay pub/sub messages from any host id but their own: no server has this one
STORE_HOST_ID = "potpie-service-store"


@dataclass(frozen=True)
class Broadcast:
    """Messages to PUBLISH on `channel`; in message i the JSON string `"@seq:<nonce>"` becomes the seq + i."""

    channel: str = ""
    nonce: str = ""
    messages: tuple[str, ...] = ()

    def args(self) -> dict[str, Any]:
        """The `news` argument of the commit, finish and announce scripts."""
        return {"channel": self.channel, "nonce": self.nonce, "messages": list(self.messages)}


def broadcast(channel: str, job_id: str, events: list[Event]) -> Broadcast:
    """`events` for the job's room, each `seq` left as the marker the script fills in (the first event gets the
    seq the script takes, the next one seq + 1)."""
    nonce = uuid.uuid4().hex
    messages = tuple(json.dumps({"method": "emit", "event": name, "data": [{**payload, "seq": f"@seq:{nonce}"}],
                                 "binary": False, "namespace": "/", "room": room(job_id), "skip_sid": None,
                                 "callback": None, "host_id": STORE_HOST_ID}, separators=(",", ":"))
                     for name, payload in events)
    return Broadcast(channel, nonce, messages)
