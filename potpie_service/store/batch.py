"""Group commit: the same script called by concurrent requests (greenlets or threads) at the same moment goes to
Redis in one pipeline, one round trip for the lot, instead of one each."""

from __future__ import annotations

import threading
from typing import Any, Callable

import redis

from .errors import StoreUnavailable

Queue = Callable[[Any], None]  # puts one command on a pipeline


class _Call:
    __slots__ = ("queue", "reply", "done")

    def __init__(self, queue: Queue) -> None:
        self.queue = queue
        self.reply: Any = None
        self.done = False


class GroupCommit:
    """One batch on the wire at a time. A call made while none is goes at once, alone (no wait is added); calls
    made while one is gather, and the first of them to wake when it returns sends them all in the next. Each
    caller gets its own reply, or its own error raised: a command Redis refuses fails alone, a lost connection
    fails the batch (the pipeline is retried as one command would be)."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._turn = threading.Condition()
        self._gathering: list[_Call] = []
        self._sending = False

    def run(self, queue: Queue) -> Any:
        """Put one command on the next batch's pipeline (`queue(pipe)` does) and return its reply."""
        call = _Call(queue)
        with self._turn:
            self._gathering.append(call)
            while self._sending and not call.done:
                self._turn.wait()
            batch: list[_Call] = []
            if not call.done:  # this call is still gathering: it sends, and takes every other one with it
                batch, self._gathering = self._gathering, []
                self._sending = bool(batch)
        if batch:
            try:
                self._send(batch)
            finally:
                with self._turn:
                    for waiting in batch:  # a sender killed mid-batch must not leave its followers without a reply
                        if not waiting.done:
                            waiting.reply = StoreUnavailable("the batch it was in did not complete", sent=True)
                            waiting.done = True
                    self._sending = False
                    self._turn.notify_all()
        if isinstance(call.reply, Exception):
            raise call.reply
        return call.reply

    def _send(self, batch: list[_Call]) -> None:
        """Send the batch as one pipeline; mark each call done with its reply or its error."""
        pipe = self._client.pipeline(transaction=False)
        for call in batch:
            call.queue(pipe)
        try:
            replies = pipe.execute(raise_on_error=False)
        except StoreUnavailable as exc:  # the connection: every command in the batch fails with it
            replies = [exc] * len(batch)
        for call, reply in zip(batch, replies):
            call.reply, call.done = reply, True
