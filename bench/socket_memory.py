"""`python -m bench.socket_memory`: where the API's bytes per Socket.IO client go (issue 31), by tracemalloc.

Not a benchmark (`make bench` does not run it): a breakdown. Two fresh API processes in turn, each started through
bench/traced_api.py (the API as deployed plus a bench-only side channel), on one Redis, loaded by the same Node
clients as P5 (bench/node/p5_clients.js, `auth: {token}`, the first F following a job each):

1. untraced: RSS per connected socket, the greenlets and the C stack they have saved to the heap, live objects
   by type;
2. traced: tracemalloc started just before the clients connect (after a warm-up round of clients, so what the
   first connection builds once is not counted per socket), one snapshot once they are all connected and settled.
   Every allocation still alive is then grouped by where it was made: by library (the innermost frame outside the
   standard library, so a `threading.Event` that gevent made for simple-websocket counts as simple_websocket), by
   allocation site, and by the chain of libraries that led to it.

What tracemalloc cannot see is estimated as the untraced run's RSS per socket minus the traced bytes per socket:
malloc's own overhead and fragmentation, pymalloc arenas not yet given back, memory that C code takes with plain
malloc (libev's, the kernel's socket buffers are not RSS at all). greenlet saves a switched-out greenlet's C stack
with PyMem_Realloc, which tracemalloc does see, attributed to whatever Python line was running at the switch.
"""

from __future__ import annotations

import argparse
import json
import sys
import sysconfig
import tempfile
import time
import tracemalloc
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import requests

from potpie_service.auth import hash_key

from .common import RedisServer, Service, bench_env, free_port, raise_fd_limit, tree_rss_mb, wait_for
from .p5_fanout import Clients

TOKEN = "psk_bench-memory-token"
SIDE_CHANNEL = "bench/traced_api.py"
PASS_ON = next(number for number, text in enumerate(Path(__file__).with_name("traced_api.py").read_text().splitlines(),
                                                    1) if "return self.app(environ, start_response)" in text)
STDLIB = (sysconfig.get_paths()["stdlib"], "<frozen ")
SITE = "site-packages/"


def library(filename: str) -> str:
    """The library (or standard-library module) a source file belongs to."""
    if SITE in filename:
        top = filename.split(SITE, 1)[1].split("/", 1)[0]
        return top.removesuffix(".py")
    if "/potpie_service/" in filename:
        return "potpie_service." + filename.split("/potpie_service/", 1)[1].removesuffix(".py").replace("/", ".")
    if filename.startswith(STDLIB):
        return "stdlib:" + Path(filename).stem
    return Path(filename).name


def where(filename: str) -> str:
    """A source file's path as short as it stays unambiguous: inside site-packages, the repository or the stdlib."""
    if SITE in filename:
        return filename.split(SITE, 1)[1]
    if "/potpie_service/" in filename:
        return "potpie_service/" + filename.split("/potpie_service/", 1)[1]
    return "stdlib/" + Path(filename).name if filename.startswith(STDLIB) else filename


def is_stdlib(filename: str) -> bool:
    return filename.startswith(STDLIB)


def start_traced_api(env: dict[str, str], name: str) -> Service:
    """An API process started through bench/traced_api.py; returns once it answers."""
    port = free_port()
    service = Service(name, [sys.executable, "-m", "bench.traced_api"],
                      {**env, "PORT": str(port), "HOST": "127.0.0.1"}).start()
    service.url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
    wait_for(lambda: requests.get(service.url + "/livez", timeout=1).ok or not service.alive(), 30,
             what=f"api {name}")
    assert service.alive(), service.log()[-3000:]
    return service


def bench(url: str, command: str, **query: Any) -> dict[str, Any]:
    """A side-channel command (bench/traced_api.py)."""
    response = requests.post(f"{url}/__bench/{command}", params=query, timeout=600)
    response.raise_for_status()
    return response.json()


def phase(redis_url: str, args: argparse.Namespace, traced: bool, snapshot_path: str) -> dict[str, Any]:
    """One fresh API: jobs, a warm-up round of clients, then the measured clients; its figures."""
    env = bench_env(redis_url, "http://127.0.0.1:9", f"bench-mem-{uuid.uuid4().hex[:6]}", RATE_LIMIT="off",
                    AUTH_DISABLED="false", API_KEYS=f"bench:{hash_key(TOKEN)}", MAX_CONCURRENT_JOBS=str(args.followers))
    api = start_traced_api(env, "bench-mem-api-" + ("traced" if traced else "plain"))
    url = api.url  # type: ignore[attr-defined]
    try:
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {TOKEN}"
        jobs = [session.post(url + "/analyze", json={"repo": f"octocat/mem{i}-{uuid.uuid4().hex[:6]}"},
                             timeout=30).json()["job_id"] for i in range(args.followers)]
        warm = Clients(url, args.warmup, jobs[: max(1, args.warmup // 10)], args.in_flight, token=TOKEN)
        warm.until("ready", 60)
        warm.report()
        warm.proc.wait(30)
        time.sleep(1)
        before = bench(url, "figures")
        before["tree_rss_mb"] = tree_rss_mb(api.proc.pid)  # type: ignore[union-attr]
        if traced:
            bench(url, "start", depth=args.depth)
        clients = Clients(url, args.clients, jobs, args.in_flight, token=TOKEN)
        try:
            ready = clients.until("ready", args.connect_timeout)
            time.sleep(args.settle)
            after = bench(url, "snapshot", path=snapshot_path if traced else "")
            after["tree_rss_mb"] = tree_rss_mb(api.proc.pid)  # type: ignore[union-attr]
            result = clients.report()
        finally:
            clients.stop()
    finally:
        api.stop()
    return {"before": before, "after": after, "connected": result["still_connected"], "failed": ready["failed"],
            "joined": sum(1 for follower in result["followers"] if follower["joined"] >= 0)}


def group(snapshot_path: str, clients: int, top: int) -> dict[str, Any]:
    """The snapshot's live allocations grouped three ways, in bytes per client; the side channel's own left out."""
    snapshot = tracemalloc.Snapshot.load(snapshot_path)
    by_library: Counter[str] = Counter()
    by_site: Counter[str] = Counter()
    site_count: Counter[str] = Counter()
    by_chain: Counter[str] = Counter()
    total = 0
    for _domain, size, frames, _total in snapshot.traces._traces:  # frames: most recent first
        if any(filename.endswith(SIDE_CHANNEL) and line != PASS_ON for filename, line in frames):
            continue  # made by the side channel itself (every request passes through it on line PASS_ON)
        files = [filename for filename, _ in frames]
        total += size
        owner = next((filename for filename in files if not is_stdlib(filename)), files[0])
        by_library[library(owner)] += size
        innermost, line = frames[0]
        site = f"{where(innermost)}:{line}"
        if is_stdlib(innermost) and owner != innermost:
            site += f" (from {library(owner)})"
        by_site[site] += size
        site_count[site] += 1
        chain: list[str] = []
        for filename in reversed(files):  # outermost first
            name = library(filename)
            if not is_stdlib(filename) and (not chain or chain[-1] != name):
                chain.append(name)
        by_chain[" > ".join(chain[-4:]) or "stdlib"] += size
    per = float(clients)
    return {"traced_bytes_per_client": total / per,
            "by_library": [(name, size / per) for name, size in by_library.most_common(top)],
            "by_site": [(name, size / per, site_count[name] / per) for name, size in by_site.most_common(top)],
            "by_chain": [(name, size / per) for name, size in by_chain.most_common(top)]}


def census(before: dict[str, Any], after: dict[str, Any], clients: int, top: int) -> list[tuple[str, float, float]]:
    """Live GC-tracked objects gained per client, by type: (type, count, shallow bytes)."""
    gained = []
    for name, (count, size) in after["types"].items():
        was = before["types"].get(name, [0, 0])
        gained.append((name, (count - was[0]) / clients, (size - was[1]) / clients))
    return sorted(gained, key=lambda row: -row[2])[:top]


def short(location: str) -> str:
    """`file:rest` with the file as `where` gives it."""
    filename, sep, rest = location.rpartition(":")
    return f"{where(filename)}{sep}{rest}" if sep else location


def waits(before: dict[str, Any], after: dict[str, Any], clients: int) -> list[tuple[str, float, float]]:
    """Greenlets gained per client by where they wait: (where, count, saved stack bytes), the most common first."""
    gained = []
    for at, (count, saved) in after["greenlets_by_wait"].items():
        was = before["greenlets_by_wait"].get(at, [0, 0])
        if count - was[0] > 0:
            gained.append((at, (count - was[0]) / clients, (saved - was[1]) / clients))
    return sorted(gained, key=lambda row: -row[1])


def render(args: argparse.Namespace, plain: dict[str, Any], traced: dict[str, Any], grouped: dict[str, Any]) -> str:
    """The breakdown as Markdown."""
    n = args.clients
    rss = (plain["after"]["tree_rss_mb"] - plain["before"]["tree_rss_mb"]) * 1024 / n
    traced_rss = (traced["after"]["tree_rss_mb"] - traced["before"]["tree_rss_mb"]) * 1024 / n
    own = (traced["after"]["tracemalloc_own"] - traced["before"]["tracemalloc_own"]) / 1024 / n
    seen = grouped["traced_bytes_per_client"] / 1024
    stacks = (plain["after"]["greenlet_stack_saved"] - plain["before"]["greenlet_stack_saved"]) / 1024 / n
    greenlets = (plain["after"]["greenlets"] - plain["before"]["greenlets"]) / n
    lines = [f"{n} clients ({args.followers} following a job), {plain['connected']} / {traced['connected']} "
             f"connected (untraced / traced run), {plain['joined']} / {traced['joined']} joined; tracemalloc depth "
             f"{args.depth}, snapshot {args.settle:g} s after the last connect.", "",
             "| per connected client | KiB |", "| --- | --- |",
             f"| RSS, untraced API | {rss:.1f} |",
             f"| RSS, traced API (tracemalloc's own tables included) | {traced_rss:.1f} |",
             f"| tracemalloc's own tables | {own:.1f} |",
             f"| seen by tracemalloc (Python allocations still alive) | {seen:.1f} |",
             f"| not seen: untraced RSS - traced bytes (allocator overhead, fragmentation, plain malloc) | "
             f"{rss - seen:.1f} |",
             f"| of the traced bytes: greenlet C stacks saved to the heap ({greenlets:.2f} greenlets a client) | "
             f"{stacks:.1f} |", "",
             "By library (the innermost frame outside the standard library):", "",
             "| library | KiB per client |", "| --- | --- |"]
    lines += [f"| {name} | {size / 1024:.2f} |" for name, size in grouped["by_library"]]
    lines += ["", "By allocation site (innermost frame; `(from X)`: a standard-library line called by X):", "",
              "| site | KiB per client | blocks per client |", "| --- | --- | --- |"]
    lines += [f"| {name} | {size / 1024:.2f} | {count:.1f} |" for name, size, count in grouped["by_site"]]
    lines += ["", "By the chain of libraries that led to the allocation (outermost first, last four):", "",
              "| chain | KiB per client |", "| --- | --- |"]
    lines += [f"| {name} | {size / 1024:.2f} |" for name, size in grouped["by_chain"]]
    lines += ["", "Greenlets gained per client by where they wait (innermost Python frame | what they run), with the "
              "C stack each has saved to the heap (untraced run):", "",
              "| waits at | runs | greenlets per client | saved stack KiB per client |", "| --- | --- | --- | --- |"]
    for at, count, saved in waits(plain["before"], plain["after"], n):
        inner, _, outer = at.partition(" | ")
        lines.append(f"| {short(inner)} | {short(outer)} | {count:.2f} | {saved / 1024:.2f} |")
    lines += ["", "Live GC-tracked objects gained per client (untraced run; shallow sizes, so a dict's own table but "
              "not the strings it holds):", "", "| type | objects per client | shallow bytes per client |",
              "| --- | --- | --- |"]
    lines += [f"| {name} | {count:.2f} | {size:.0f} |" for name, count, size in
              census(plain["before"], plain["after"], n, args.top)]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.socket_memory")
    parser.add_argument("--clients", type=int, default=2000)
    parser.add_argument("--followers", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=100, help="clients connected and gone before measuring")
    parser.add_argument("--in-flight", type=int, default=200)
    parser.add_argument("--depth", type=int, default=40, help="tracemalloc frames per allocation")
    parser.add_argument("--settle", type=float, default=2.0)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--connect-timeout", type=float, default=300.0)
    parser.add_argument("--json", help="also write the figures here as JSON")
    args = parser.parse_args()
    raise_fd_limit()
    server = RedisServer().start()
    snapshot_path = str(Path(tempfile.mkdtemp(prefix="psvc-mem-")) / "after.snapshot")
    try:
        plain = phase(server.url, args, False, snapshot_path)
        traced = phase(server.url, args, True, snapshot_path)
    finally:
        server.cleanup()
    grouped = group(snapshot_path, args.clients, args.top)
    print(render(args, plain, traced, grouped))
    if args.json:
        for run in (plain, traced):
            for side in ("before", "after"):
                run[side].pop("types", None)
        Path(args.json).write_text(json.dumps({"untraced": plain, "traced": traced, "grouped": grouped}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
