"""Under Sentinel, what each sentinel says of the store's master (for /health)."""

from __future__ import annotations

from typing import Any

import redis
from redis.sentinel import SentinelConnectionPool


def sentinel_view(client: redis.Redis) -> dict[str, Any] | None:
    """What each sentinel says of the client's master (None without sentinels)."""
    pool = client.connection_pool
    if not isinstance(pool, SentinelConnectionPool):
        return None
    name = pool.service_name
    seen = []
    for sentinel in pool.sentinel_manager.sentinels:
        options = sentinel.connection_pool.connection_kwargs
        entry: dict[str, Any] = {"address": f"{options.get('host')}:{options.get('port')}"}
        try:
            state = sentinel.sentinel_master(name)
        except redis.RedisError as exc:  # a sentinel down is part of the picture, not a failed check
            entry.update(status="down", error=type(exc).__name__)
        else:
            entry.update(status="up", master=f"{state['ip']}:{state['port']}",
                         master_down=bool(state.get("is_sdown") or state.get("is_odown")),
                         replicas=int(state.get("num-slaves", 0)),
                         other_sentinels=int(state.get("num-other-sentinels", 0)), quorum=int(state.get("quorum", 0)))
        seen.append(entry)
    address = pool.master_address
    return {"master_name": name, "master": f"{address[0]}:{address[1]}" if address else None, "sentinels": seen}
