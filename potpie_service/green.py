"""What a gevent-patched process can do that a threaded one cannot: bound a whole call by a deadline, and abort a
call another greenlet is blocked in. Both are no-ops elsewhere (prefork, threads), where a call is bounded by its
socket timeouts and the pool's time limit instead.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator


def active() -> bool:
    """Whether this process runs on gevent's patched standard library (the worker's default pool)."""
    try:
        from gevent import monkey
    except ImportError:
        return False
    return bool(monkey.is_module_patched("socket"))


class Expired(BaseException):
    """A deadline passed (a BaseException, so no library's `except Exception` swallows it)."""


class Aborted(BaseException):
    """Another greenlet aborted this call (the job was cancelled)."""


class Stopping(BaseException):
    """The worker is stopping and no longer waits for this call: hand the step back."""


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise Expired in this greenlet if the block takes longer than `seconds` (green processes only)."""
    if not active():
        yield
        return
    from gevent import Timeout

    timer = Timeout(seconds, Expired)
    timer.start()
    try:
        yield
    finally:
        timer.close()


class Abortable:
    """Calls that may be aborted by key (a job id): `with calls.watch(key)` around the call, `calls.abort(key)`
    from anywhere in the process. The abort lands only while the watched block still runs. (One thread runs every
    greenlet, and nothing here yields, so no lock is needed.)"""

    def __init__(self) -> None:
        self._inside: dict[str, Any] = {}

    @contextlib.contextmanager
    def watch(self, key: str) -> Iterator[None]:
        if not active():
            yield
            return
        import gevent

        current = gevent.getcurrent()
        self._inside[key] = current
        try:
            yield
        finally:
            if self._inside.get(key) is current:
                del self._inside[key]

    def abort(self, key: str, error: type[BaseException] = Aborted) -> bool:
        """Raise `error` in the call watched under `key`, if one runs; whether one did."""
        target = self._inside.get(key)
        if target is None:
            return False
        import gevent

        def throw() -> None:  # runs in the hub: the block may have ended meanwhile
            if self._inside.get(key) is target is not None:
                target.throw(error)

        gevent.get_hub().loop.run_callback(throw)
        return True

    def abort_all(self, error: type[BaseException]) -> int:
        """Raise `error` in every watched call; how many there were."""
        return sum(self.abort(key, error) for key in list(self._inside))
