"""The store's Lua scripts: loaded from store/lua/*.lua with the shared library (lib.lua) in front and the
statuses from core filled in, called with their keys and their arguments by name (one JSON object)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import redis

from ..core.model import TERMINAL, JobStatus

LUA = Path(__file__).with_name("lua")


def source(name: str) -> str:
    """A script's text as Redis runs it."""
    text = (LUA / "lib.lua").read_text() + "\n" + (LUA / f"{name}.lua").read_text()
    return (text.replace("@TERMINAL@", ", ".join(f"{status.value}=true" for status in sorted(TERMINAL)))
            .replace("@QUEUED@", JobStatus.QUEUED.value))


class Lua:
    """One script, registered on a client (redis-py loads it again when Redis has forgotten it: NOSCRIPT)."""

    def __init__(self, client: redis.Redis, name: str) -> None:
        self._script = client.register_script(source(name))

    def __call__(self, keys: list[str], client: Any = None, raw: tuple[str, ...] = (), **args: Any) -> Any:
        """Run on `keys` with the named arguments (on `client`: a pipeline, to batch); `raw` strings follow as
        ARGV[2], ... as they are (a large JSON text is not escaped into the arguments' JSON, then decoded)."""
        return self._script(keys=keys, args=[json.dumps(args, separators=(",", ":")), *raw], client=client)

    def queue(self, pipe: Any, keys: list[str], raw: tuple[str, ...] = (), **args: Any) -> None:
        """Put one EVALSHA on `pipe`, without the SCRIPT EXISTS round trip redis-py makes for a script on a
        pipeline: a NOSCRIPT reply (Redis restarted, or flushed its scripts) is the caller's to handle."""
        pipe.execute_command("EVALSHA", self._script.sha, len(keys), *keys,
                             json.dumps(args, separators=(",", ":")), *raw)


class Scripts:
    """The job store's scripts."""

    NAMES = ("submit", "claim", "commit", "finish", "announce", "admit", "renew", "release", "snapshot", "withdraw",
             "flight")

    def __init__(self, client: redis.Redis) -> None:
        self._scripts = {name: Lua(client, name) for name in self.NAMES}

    def call(self, name: str, keys: list[str], client: Any = None, raw: tuple[str, ...] = (), **args: Any) -> Any:
        """Run script `name` on `keys` with the named arguments (on `client`: a pipeline, to batch)."""
        return self._scripts[name](keys, client=client, raw=raw, **args)

    def __getitem__(self, name: str) -> Lua:
        """Script `name` itself."""
        return self._scripts[name]
