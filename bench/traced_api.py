"""`python -m bench.traced_api`: the API exactly as `python -m potpie_service api` runs it, plus a bench-only side
channel for bench/socket_memory.py. Never deployed: the service's own code is not changed.

The app that `potpie_service.api.create_app` builds is wrapped (here, before gunicorn loads it) in `SideChannel`,
which answers `POST /__bench/<command>` in the API's worker process and hands every other request on untouched:

- `start?depth=N`: start tracemalloc with N frames (the clients connected from then on are what it sees);
- `snapshot?path=P`: a full collection, then the snapshot dumped to P (when given); answers the process's figures;
- `figures`: the same figures without a snapshot.

The figures: RSS, tracemalloc's traced and own memory, the greenlets with the C stack each has saved to the heap
(`_stack_saved`: tracemalloc sees those copies, made with PyMem_Realloc, but names them after whatever Python line
was running when the switch happened), also grouped by where each waits, and live objects counted by type (count,
shallow bytes).
"""

from __future__ import annotations

import gc
import json
import sys
import tracemalloc
from collections import Counter
from typing import Any, Callable, Iterable
from urllib.parse import parse_qs

PREFIX = "/__bench/"


def rss_kib() -> int:
    """This process's resident memory, KiB."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def waiting_at(green: Any) -> str:
    """Where a switched-out greenlet waits and what it runs: `file:line` of its innermost Python frame, then
    `file:function` of its outermost."""
    frame = green.gr_frame
    if frame is None:
        return "(running, not started or dead)"
    inner = f"{frame.f_code.co_filename}:{frame.f_lineno}"
    while frame.f_back is not None:
        frame = frame.f_back
    return f"{inner} | {frame.f_code.co_filename}:{frame.f_code.co_name}"


def figures() -> dict[str, Any]:
    """The process's memory as the side channel reports it (after a full collection)."""
    import greenlet

    gc.collect()
    objects = gc.get_objects()
    counts: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    greenlets, saved = 0, 0
    waits: Counter[str] = Counter()
    waits_saved: Counter[str] = Counter()
    for obj in objects:
        kind = type(obj)
        name = f"{kind.__module__}.{kind.__qualname__}"
        counts[name] += 1
        sizes[name] += sys.getsizeof(obj)
        if isinstance(obj, greenlet.greenlet):
            greenlets += 1
            saved += obj._stack_saved
            waits[waiting_at(obj)] += 1
            waits_saved[waiting_at(obj)] += obj._stack_saved
    traced, peak = tracemalloc.get_traced_memory()
    return {"rss_kib": rss_kib(), "traced": traced, "traced_peak": peak,
            "tracemalloc_own": tracemalloc.get_tracemalloc_memory(), "tracing": tracemalloc.is_tracing(),
            "greenlets": greenlets, "greenlet_stack_saved": saved, "gc_objects": len(objects),
            "greenlets_by_wait": {where: [waits[where], waits_saved[where]] for where in waits},
            "types": {name: [counts[name], sizes[name]] for name in counts}}


class SideChannel:
    """WSGI middleware answering `POST /__bench/<command>` (see the module's docstring)."""

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if not path.startswith(PREFIX) or environ.get("REQUEST_METHOD") != "POST":
            return self.app(environ, start_response)
        query = {key: values[0] for key, values in parse_qs(environ.get("QUERY_STRING", "")).items()}
        command = path[len(PREFIX):]
        if command == "start":
            tracemalloc.start(int(query.get("depth", "30")))
            body: dict[str, Any] = {"tracing": True}
        elif command in ("snapshot", "figures"):
            if command == "snapshot" and query.get("path"):
                gc.collect()
                tracemalloc.take_snapshot().dump(query["path"])
            body = figures()
        else:
            start_response("404 Not Found", [("Content-Type", "application/json")])
            return [b'{"error": "unknown bench command"}']
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps(body).encode()]


def main() -> int:
    """Patch the standard library for gevent first (as the api command does), wrap the app factory, run the API."""
    from gevent import monkey

    monkey.patch_all()
    import potpie_service.api as api
    from potpie_service.__main__ import main as service_main

    build = api.create_app

    def create_app(settings: Any = None) -> Any:
        app = build(settings)
        app.wsgi_app = SideChannel(app.wsgi_app)
        return app

    api.create_app = create_app  # type: ignore[assignment]
    return service_main(["api"])


if __name__ == "__main__":
    sys.exit(main())
